"""Video files as clips (clapscale/shards/video.py): ``make_shards --from-dir --video-frames K`` stores a
video's audio track and K equally spaced frames, and the loader hands training a random frame and
evaluation the second of four (VIP-ANT's sparse sampling).

The fixture videos are written here with PyAV: 2 s at 8 fps in four 0.5 s colour segments (red, green,
blue, yellow), a 440 Hz tone at 44.1 kHz in stereo; an MPEG-4/AAC .mp4 starting at 0, and an MPEG-2
program stream (.mpg) whose timestamps start at 10 s, as such files usually do.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

av = pytest.importorskip("av")
REPO = Path(__file__).resolve().parents[1]
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]  # red, green, blue, yellow


def _encode_pictures(out, vs, pictures, offset: int) -> None:
    """Encode 64 x 48 RGB ``pictures`` into video stream ``vs`` of ``out``, timestamps from ``offset`` s."""
    fps = int(vs.codec_context.framerate)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    for i, rgb in enumerate(pictures):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = i + offset * fps, Fraction(1, fps)
        for packet in vs.encode(frame):
            out.mux(packet)
    for packet in vs.encode():
        out.mux(packet)


def _write_video(path: Path, seconds: float = 2.0, fps: int = 8, audio: bool = True, offset: int = 0,
                 vcodec: str = "mpeg4", acodec: str = "aac") -> None:
    with av.open(str(path), "w") as out:
        vs = out.add_stream(vcodec, rate=fps)
        if audio:
            ast = out.add_stream(acodec, rate=44100)
            ast.layout = "stereo"
        n = int(seconds * fps)
        _encode_pictures(out, vs, (np.full((48, 64, 3), COLOURS[i * 4 // n], np.uint8) for i in range(n)), offset)
        if audio:
            t = np.arange(int(seconds * 44100)) / 44100
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            size = ast.codec_context.frame_size or 1024
            for start in range(0, tone.size - size + 1, size):
                block = np.stack([tone[start:start + size]] * 2)
                if acodec == "mp2":
                    frame = av.AudioFrame.from_ndarray((block.T.reshape(1, -1) * 3e4).astype(np.int16), format="s16",
                                                       layout="stereo")
                else:
                    frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
                frame.sample_rate, frame.time_base = 44100, Fraction(1, 44100)
                frame.pts = start + offset * 44100
                for packet in ast.encode(frame):
                    out.mux(packet)
            for packet in ast.encode():
                out.mux(packet)


def _make_shards(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/make_shards.py", "--from-dir", str(src), "--out", str(out),
                           "--workers", "0", "--quiet", *extra], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    src = root / "src"
    (src / "birds").mkdir(parents=True)
    _write_video(src / "birds" / "robin_song.mp4")
    _write_video(src / "birds" / "silent_film.mp4", audio=False)
    (src / "late").mkdir()
    _write_video(src / "late" / "broadcast_clip.mpg", offset=10, vcodec="mpeg2video", acodec="mp2")
    proc = _make_shards(src, root / "shards", "--video-frames", "4", "--frame-size", "32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def _samples(shards: Path) -> dict[str, dict[str, bytes]]:
    """Caption -> {extension: bytes} of every sample in the set's train split."""
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted((shards / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            groups: dict[str, dict[str, bytes]] = {}
            for m in tf:
                if m.isfile():
                    key, ext = m.name.split(".", 1)
                    groups.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for members in groups.values():
            out[json.loads(members["json"])["text"][0]] = members
    return out


def _tile_colours(jpg: bytes, tiles: int) -> list[tuple[int, ...]]:
    from PIL import Image

    im = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float32)
    w = im.shape[1] // tiles
    return [tuple(int(c) for c in im[:, i * w:(i + 1) * w].reshape(-1, 3).mean(0).round()) for i in range(tiles)]


def test_video_becomes_audio_track_and_a_strip_of_four_equally_spaced_frames(video_shards):
    samples = _samples(video_shards / "shards")
    assert sorted(samples) == ["birds robin song", "late broadcast clip"]
    for caption, members in samples.items():
        meta = json.loads(members["json"])
        assert meta["video_frames"] == 4, caption
        # Frames at 0.25, 0.75, 1.25, 1.75 s from the stream's start: one per colour segment, in order
        # (the .mpg's timestamps start at 10 s).
        colours = _tile_colours(members["jpg"], 4)
        for colour, want in zip(colours, COLOURS):
            assert np.abs(np.subtract(colour, want)).max() < 30, (caption, colours)
        # The audio track: mono 48 kHz FLAC of ~2 s holding the 440 Hz tone (codec priming at most).
        wave, sr = sf.read(io.BytesIO(members["flac"]), dtype="float32")
        assert sr == 48000 and wave.ndim == 1 and 1.9 < wave.size / sr < 2.1, caption
        spectrum = np.abs(np.fft.rfft(wave[4800:-4800]))
        assert abs(np.argmax(spectrum) * sr / (wave.size - 9600) - 440) < 3, caption
    # The verifier accepts the shard (a strip is one .jpg) and the video without sound is rejected.
    ok = subprocess.run([sys.executable, "tools/make_shards.py", "--verify", str(video_shards / "shards")],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rejects = [json.loads(line) for line in (video_shards / "shards" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["code"], r["path"]) for r in rejects] == [("no_audio_stream", "birds/silent_film.mp4")]


def test_loader_draws_a_frame_per_sample_in_training_and_the_second_of_four_in_evaluation(video_shards):
    from clapscale.config import load_config
    from clapscale.data.images import CLIP_MEAN, CLIP_STD
    from clapscale.data.shardio import iter_tar_samples
    from clapscale.data.wds import decode_sample

    cfg = load_config(None, ["data.image_size=32"])
    raws = [r for tar in sorted((video_shards / "shards" / "train").glob("*.tar"))
            for r in iter_tar_samples(str(tar), lambda *a: None)]
    (raw,) = [r for r in raws if b"robin" in r["json"]]

    def colour(image: np.ndarray) -> int:
        rgb = (image.mean(axis=(1, 2)) * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)) * 255
        return int(np.argmin([np.abs(rgb - np.asarray(c)).max() for c in COLOURS]))

    assert colour(decode_sample(raw, cfg.audio, cfg.data, epoch=0, train=False)["image"]) == 1  # the second
    seen = [colour(decode_sample(raw, cfg.audio, cfg.data, epoch=e, train=True)["image"]) for e in range(32)]
    assert set(seen) == {0, 1, 2, 3}, seen  # one of the four frames, drawn per epoch
    # The same seed, epoch and key draw the same frame.
    again = [colour(decode_sample(raw, cfg.audio, cfg.data, epoch=e, train=True)["image"]) for e in range(32)]
    assert again == seen


def test_max_seconds_cuts_a_video_and_records_it(tmp_path):
    (tmp_path / "src").mkdir()
    _write_video(tmp_path / "src" / "long_take.mp4")
    proc = _make_shards(tmp_path / "src", tmp_path / "out", "--video-frames", "2", "--frame-size", "16",
                        "--max-seconds", "1.0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (members,) = _samples(tmp_path / "out").values()
    meta = json.loads(members["json"])
    assert meta["truncated_from"] == pytest.approx(2.0, abs=0.05)
    wave, sr = sf.read(io.BytesIO(members["flac"]), dtype="float32")
    assert wave.size == sr  # the first second only
    # Two frames over the first second (0.25 s, 0.75 s): red and green.
    for colour, want in zip(_tile_colours(members["jpg"], 2), COLOURS[:2]):
        assert np.abs(np.subtract(colour, want)).max() < 30


def test_bad_video_options_are_one_line_errors(tmp_path):
    (tmp_path / "src").mkdir()
    proc = _make_shards(tmp_path / "src", tmp_path / "out", "--video-frames", "4", "--frame-size", "30")
    assert proc.returncode == 2 and "multiple of 16" in proc.stderr and "Traceback" not in proc.stderr


def _write_long_video(path: Path, seconds: int, fps: int, gop: int, vcodec: str, offset: int = 0) -> None:
    """Video only, every frame distinct: a grey level counting frames and a bar at a frame-dependent
    column, so that any other frame than the one meant would show."""
    def picture(i: int) -> np.ndarray:
        rgb = np.full((48, 64, 3), (i * 3) % 200 + 20, np.uint8)
        rgb[:, (i * 5) % 56: (i * 5) % 56 + 8] = (250, 30, 30)
        return rgb

    with av.open(str(path), "w") as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.codec_context.gop_size = gop
        vs.codec_context.options = {"sc_threshold": "1000000000"}  # keyframes every `gop` frames only
        _encode_pictures(out, vs, (picture(i) for i in range(seconds * fps)), offset)


@pytest.mark.parametrize("vcodec, suffix, offset, gop", [
    ("mpeg4", "mp4", 0, 8), ("mpeg2video", "mpg", 10, 8),  # a keyframe every 2 s
    ("mpeg4", "mp4", 0, 48),  # every 12 s: further apart than the seek gap
    ("mpeg4", "mp4", 0, 100000),  # one keyframe (screen recordings): seeking gains nothing
])
def test_frames_of_a_long_video_are_reached_by_seeking_and_equal_a_full_decode(tmp_path, vcodec, suffix, offset, gop):
    """A 2-minute video: four frames cost a few GOPs of decoding, not the 480 frames of the whole,
    and they are the very frames a decode from the start picks, however far apart the keyframes and
    wherever the wanted times fall between frames. MPEG program streams are decoded in order
    (their timestamps shift after a seek)."""
    from clapscale.shards.video import frame_times, pick_frames, seek_gap_for

    path = tmp_path / f"long.{suffix}"
    _write_long_video(path, seconds=120, fps=4, gop=gop, vcodec=vcodec, offset=offset)

    def picks(duration, seek_gap=None):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            start = float(stream.start_time * stream.time_base)
            assert start == pytest.approx(offset, abs=0.6)
            wanted = [start + t for t in frame_times(duration, 4)]
            gap = seek_gap_for(container) if seek_gap is None else seek_gap
            return pick_frames(container, stream, wanted, lambda f: (f.time, f.to_image()), seek_gap=gap)

    for duration in (120.0, 119.3, 118.7):  # wanted times on frames, and between them
        full, full_decoded = picks(duration, seek_gap=float("inf"))
        assert full_decoded >= 0.85 * duration * 4 * 7 / 8  # decoded from the start to the last wanted frame
        sought = picks(duration)
        assert sought is not None  # every seek landed at or before its frame
        got, decoded = sought
        for (t_got, image_got), (t_want, image_want) in zip(got, full):
            assert np.array_equal(np.asarray(image_got), np.asarray(image_want)), (duration, t_got, t_want)
        if suffix == "mpg":
            assert decoded == full_decoded  # never sought
        elif gop == 100000:
            assert decoded <= full_decoded + 1  # one seek at most, then in order
        else:
            assert decoded <= 4 * (gop + gop // 2), decoded  # at most about a GOP and a half per frame
    # The frames are the ones at 15, 45, 75 and 105 s: frame index 4 x t, read from the grey level.
    for t, (_, image) in zip((15, 45, 75, 105), picks(120.0)[0]):
        grey = float(np.median(np.asarray(image.convert("RGB"))[:, :, 1]))
        assert abs(grey - ((4 * t * 3) % 200 + 20)) < 8, (t, grey)


def test_non_finite_audio_in_a_video_is_rejected_as_such(tmp_path):
    """Float PCM with a NaN in a Matroska file: the reject names ``non_finite``, not another code."""
    from clapscale.shards.audio_io import AudioDecodeError
    from clapscale.shards.video import iter_video_audio

    path = tmp_path / "nan.mkv"
    with av.open(str(path), "w") as out:
        ast = out.add_stream("pcm_f32le", rate=48000)
        ast.layout = "mono"
        block = np.zeros((1, 4800), np.float32)
        block[0, 100] = np.nan
        frame = av.AudioFrame.from_ndarray(block, format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, 0, Fraction(1, 48000)
        for packet in ast.encode(frame):
            out.mux(packet)
        for packet in ast.encode():
            out.mux(packet)
    with pytest.raises(AudioDecodeError) as err:
        list(iter_video_audio(str(path), 48000, None))
    assert err.value.code == "non_finite", err.value
