"""Video files as clips: the audio track plus K frames sampled sparsely (VIP-ANT, AudioCLIP).

``make_shards.py --from-dir DIR --video-frames K`` takes video files (``VIDEO_EXTENSIONS``) besides
audio files. Each becomes one sample: its first audio stream (channels averaged to mono, resampled
to 48 kHz by our resampler, as audio files are) and K frames at equal spacing, frame ``i`` the first
decoded frame at or after ``(i + 0.5) / K`` of the video's duration (VIP-ANT samples four). Decoding
is PyAV's (FFmpeg); nothing here parses a container.

The K frames are stored as one JPEG, ``<key>.jpg``: a strip of K square tiles, each the frame's
centre crop at ``frame_size`` pixels (a multiple of 16, so that JPEG blocks never straddle two
tiles), with ``"video_frames": K`` in the sample's JSON. The shard layout stays ``.flac``, ``.jpg``,
``.json`` (verified, indexed, read as before); the loader cuts the strip: a random tile per sample
in training, tile ``(K - 1) // 2`` in evaluation (VIP-ANT's "second of four").
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from clapscale.shards.audio_io import MAX_CHANNELS, AudioDecodeError, Resampler, check_sample_rate

__all__ = ["VIDEO_EXTENSIONS", "eval_frame", "frame_times", "read_video"]

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg"})
JPEG_QUALITY = 90


def eval_frame(frames: int) -> int:
    """The tile evaluation uses: the second of four, the middle one of an odd count."""
    return (int(frames) - 1) // 2


def frame_times(duration: float, frames: int) -> list[float]:
    """``frames`` equally spaced instants (seconds) over ``duration``: the centres of K equal parts."""
    return [(i + 0.5) * duration / frames for i in range(frames)]


def _open(path: str):
    import av

    try:
        return av.open(path)
    except (av.error.FFmpegError, OSError) as exc:
        raise AudioDecodeError(path, f"not a readable video ({exc})", "unreadable") from exc


def _audio(path: str, target_sr: int, max_seconds: float | None) -> np.ndarray:
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise AudioDecodeError(path, "the video has no audio stream", "no_audio_stream")
        stream = container.streams.audio[0]
        sr = int(stream.rate or stream.codec_context.sample_rate or 0)
        check_sample_rate(sr, path)
        channels = int(stream.codec_context.channels or 0)
        if not 1 <= channels <= MAX_CHANNELS:
            raise AudioDecodeError(path, f"unsupported channel layout: {channels} channels (at most {MAX_CHANNELS})",
                                   "channel_layout")
        limit = None if max_seconds is None else int(round(max_seconds * sr))
        # Planar float at the stream's own rate and layout: channels are averaged here and the
        # rate converted by our resampler, exactly as for audio files.
        planar = av.AudioResampler(format="fltp", rate=sr)
        rs = None if sr == target_sr else Resampler(sr, target_sr)
        out, taken = [], 0
        def take(parts) -> None:
            nonlocal taken
            for part in parts:
                mono = part.to_ndarray().astype(np.float32).mean(axis=0)
                if limit is not None:
                    mono = mono[: max(0, limit - taken)]
                taken += mono.size
                out.append(mono if rs is None else rs.push(mono))

        try:
            for frame in container.decode(stream):
                take(planar.resample(frame))
                if limit is not None and taken >= limit:
                    break
            take(planar.resample(None))
        except av.error.FFmpegError as exc:
            raise AudioDecodeError(path, f"audio stream does not decode ({exc})", "decode_error") from exc
        except ValueError as exc:  # PyAV: a frame whose layout or rate changed mid-stream
            raise AudioDecodeError(path, f"audio stream changes its format ({exc})", "channel_layout") from exc
        if rs is not None:
            out.append(rs.finish())
    audio = np.concatenate(out) if out else np.zeros(0, np.float32)
    if not np.all(np.isfinite(audio)):
        raise AudioDecodeError(path, "audio stream has NaN or infinite samples", "non_finite")
    return audio


def _frames(path: str, frames: int, frame_size: int, max_seconds: float | None) -> tuple[bytes, float]:
    import av
    from PIL import Image

    from clapscale.data.images import centre_square

    with _open(path) as container:
        if not container.streams.video:
            raise AudioDecodeError(path, "the file has no video stream", "no_video_stream")
        stream = container.streams.video[0]
        # Times count from the stream's first instant: .mpg / MPEG-TS and cut streams rarely start at 0.
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        # The container's duration first: MPEG program streams report a one-frame stream duration.
        if container.duration is not None:
            c_start = container.start_time / av.time_base if container.start_time is not None else 0.0
            duration = container.duration / av.time_base - max(0.0, start - c_start)
        elif stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            raise AudioDecodeError(path, "the video stream has no duration", "no_video_stream")
        source_seconds = duration
        if max_seconds is not None:
            duration = min(duration, max_seconds)
        wanted = [start + t for t in frame_times(duration, frames)]
        strip = Image.new("RGB", (frames * frame_size, frame_size))
        got, last = 0, None
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                last = frame
                while got < frames and frame.time + 1e-6 >= wanted[got]:
                    strip.paste(centre_square(frame.to_image().convert("RGB"), frame_size), (got * frame_size, 0))
                    got += 1
                if got == frames:
                    break
        except av.error.FFmpegError as exc:
            raise AudioDecodeError(path, f"video stream does not decode ({exc})", "decode_error") from exc
        if last is None:
            raise AudioDecodeError(path, "the video stream has no decodable frame", "no_video_stream")
        while got < frames:  # a stream that ends before its stated duration: its last frame
            strip.paste(centre_square(last.to_image().convert("RGB"), frame_size), (got * frame_size, 0))
            got += 1
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), source_seconds


def read_video(path: str | Path, target_sr: int, max_seconds: float | None, frames: int,
               frame_size: int) -> tuple[np.ndarray, bytes, float]:
    """``(mono float32 audio at target_sr, JPEG strip of `frames` tiles, the video's duration in s)``;
    ``AudioDecodeError`` (codes ``unreadable``, ``no_audio_stream``, ``no_video_stream``,
    ``decode_error``, ``channel_layout``, ...) otherwise. The whole audio track is held in memory
    (about 190 KB per second at 48 kHz): cap long videos with ``max_seconds``."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if frame_size < 16 or frame_size % 16:
        raise ValueError(f"frame_size must be a positive multiple of 16, got {frame_size}")
    path = str(path)
    strip, seconds = _frames(path, frames, frame_size, max_seconds)
    return _audio(path, target_sr, max_seconds), strip, seconds
