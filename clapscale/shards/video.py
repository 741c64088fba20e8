"""Video files as clips: the audio track plus K frames sampled sparsely (VIP-ANT, AudioCLIP).

``make_shards.py --from-dir DIR --video-frames K`` takes video files (``VIDEO_EXTENSIONS``) besides
audio files. Each becomes one sample: its first audio stream (channels averaged to mono, resampled
to 48 kHz by our resampler, as audio files are) and K frames at equal spacing, frame ``i`` the first
decoded frame at or after ``(i + 0.5) / K`` of the video's duration (VIP-ANT samples four), reached
by seeking to the keyframe before it when it lies far ahead (``pick_frames``). The audio is streamed
into the FLAC encoder a decoded frame at a time, so a video of any length costs its FLAC bytes.
Decoding is PyAV's (FFmpeg); nothing here parses a container.

The K frames are stored as one JPEG, ``<key>.jpg``: a strip of K square tiles, each the frame's
centre crop at ``frame_size`` pixels (a multiple of 16, so that JPEG blocks never straddle two
tiles), with ``"video_frames": K`` in the sample's JSON. The shard layout stays ``.flac``, ``.jpg``,
``.json`` (verified, indexed, read as before); the loader cuts the strip: a random tile per sample
in training, tile ``(K - 1) // 2`` in evaluation (VIP-ANT's "second of four").
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from clapscale.shards.audio_io import (
    MAX_CHANNELS, AudioDecodeError, EncodedAudio, Resampler, check_sample_rate, encode_flac_stream,
)

__all__ = ["VIDEO_EXTENSIONS", "eval_frame", "frame_times", "iter_video_audio", "pick_frames", "read_video"]

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


def iter_video_audio(path: str, target_sr: int, max_seconds: float | None) -> Iterator[np.ndarray]:
    """The first audio stream of ``path`` as mono float32 blocks at ``target_sr`` (channels averaged,
    our resampler), up to ``max_seconds``: one decoded frame at a time, so with
    ``encode_flac_stream`` a video of any length costs its FLAC bytes, not its PCM (as audio files
    do with ``iter_audio``). ``AudioDecodeError`` as soon as a problem shows."""
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
        taken = 0

        def blocks(parts) -> Iterator[np.ndarray]:
            nonlocal taken
            for part in parts:
                mono = part.to_ndarray().astype(np.float32).mean(axis=0)
                if limit is not None:
                    mono = mono[: max(0, limit - taken)]
                taken += mono.size
                if not np.all(np.isfinite(mono)):
                    raise AudioDecodeError(path, "audio stream has NaN or infinite samples", "non_finite")
                yield mono if rs is None else rs.push(mono)

        try:
            for frame in container.decode(stream):
                yield from blocks(planar.resample(frame))
                if limit is not None and taken >= limit:
                    break
            yield from blocks(planar.resample(None))
        except av.error.FFmpegError as exc:
            raise AudioDecodeError(path, f"audio stream does not decode ({exc})", "decode_error") from exc
        except AudioDecodeError:  # our own (a ValueError too): its code stands
            raise
        except ValueError as exc:  # PyAV: a frame whose layout or rate changed mid-stream
            raise AudioDecodeError(path, f"audio stream changes its format ({exc})", "channel_layout") from exc
        if rs is not None:
            yield rs.finish()


SEEK_GAP = 8.0  # seconds: a wanted frame further ahead than this is reached by seeking, not decoding
# Containers whose frames carry other timestamps after a seek than in a decode from the start
# (MPEG program / transport streams: half a frame later at 4 fps): decoded in order, never sought.
NO_SEEK_FORMATS = frozenset({"mpeg", "mpegts", "mpegvideo"})


def seek_gap_for(container) -> float:
    """``SEEK_GAP``, or infinity (never seek) for a container in ``NO_SEEK_FORMATS``."""
    names = set((container.format.name or "").split(","))
    return float("inf") if names & NO_SEEK_FORMATS else SEEK_GAP


def pick_frames(container, stream, wanted: list[float], convert: Callable[[Any], Any],
                seek_gap: float = SEEK_GAP) -> tuple[list, int] | None:
    """``convert(frame)`` of the first decoded frame at or after each of the ``wanted`` times (seconds
    on the stream's clock, ascending), and how many frames were decoded. Frames are decoded in
    order; when the next wanted time lies more than ``seek_gap`` past the last decoded frame, the
    container seeks to the keyframe at or before it and decodes on from there until that time is
    reached (a long video costs a few GOPs, not its length), which picks the same frame where the
    container's timestamps do not depend on the seek (``seek_gap_for``). A seek that lands no
    further than where decoding already was turns seeking off for the rest (keyframes too far apart
    to gain anything). None when a seek lands after its time (the frame cannot then be vouched for:
    decode from the start with ``seek_gap=inf``); ``([], n)`` for a stream with no decodable frame.
    A stream that ends early gives its last frame for the remaining times."""
    picked: list = []
    decoded, last = 0, None
    while len(picked) < len(wanted):
        t = wanted[len(picked)]
        seeked = sought = last is not None and t - last.time > seek_gap
        if seeked:
            before = last.time
            container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            decoded += 1
            if seeked:
                if frame.time > t + 1e-6:
                    return None
                if frame.time <= before + 1e-6:
                    seek_gap = float("inf")
                seeked = False
            last = frame
            while len(picked) < len(wanted) and frame.time + 1e-6 >= wanted[len(picked)]:
                picked.append(convert(frame))
            if len(picked) == len(wanted):
                break
            # After a seek, seek again only once its time is reached: the frames before it are needed.
            if (not sought or frame.time + 1e-6 >= t) and wanted[len(picked)] - frame.time > seek_gap:
                break
        else:  # the stream ended
            break
    if last is None:
        return [], decoded
    if len(picked) < len(wanted):
        picked += [convert(last)] * (len(wanted) - len(picked))
    return picked, decoded


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

        def tile(frame):  # kept at tile size: K frames of a 4K video would be ~100 MB
            return centre_square(frame.to_image().convert("RGB"), frame_size)

        try:
            picked = pick_frames(container, stream, wanted, tile, seek_gap=seek_gap_for(container))
        except av.error.FFmpegError:
            picked = None  # a seek the demuxer refuses: decode from the start instead
    if picked is None:  # (or a seek landed past its frame)
        with _open(path) as again:
            try:
                picked = pick_frames(again, again.streams.video[0], wanted, tile, seek_gap=float("inf"))
            except av.error.FFmpegError as exc:
                raise AudioDecodeError(path, f"video stream does not decode ({exc})", "decode_error") from exc
    tiles, _ = picked
    if not tiles:
        raise AudioDecodeError(path, "the video stream has no decodable frame", "no_video_stream")
    strip = Image.new("RGB", (frames * frame_size, frame_size))
    for i, image in enumerate(tiles):
        strip.paste(image, (i * frame_size, 0))
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), source_seconds


def read_video(path: str | Path, target_sr: int, max_seconds: float | None, frames: int,
               frame_size: int) -> tuple[EncodedAudio, bytes, float]:
    """``(the audio track as mono FLAC at target_sr, JPEG strip of `frames` tiles, the video's
    duration in s)``; ``AudioDecodeError`` (codes ``unreadable``, ``no_audio_stream``,
    ``no_video_stream``, ``decode_error``, ``channel_layout``, ``non_finite``) otherwise. Memory:
    the FLAC bytes, the strip's tiles and a decoded frame or two, whatever the video's length."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if frame_size < 16 or frame_size % 16:
        raise ValueError(f"frame_size must be a positive multiple of 16, got {frame_size}")
    path = str(path)
    strip, seconds = _frames(path, frames, frame_size, max_seconds)
    with closing(iter_video_audio(path, target_sr, max_seconds)) as blocks:  # closes the file on errors too
        return encode_flac_stream(blocks), strip, seconds
