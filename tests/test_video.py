"""Video files as clips (clapscale/shards/video.py): ``make_shards --from-dir --video-frames K`` stores a
video's audio track and K equally spaced frames, and the loader hands training a random frame and
evaluation the second of four (VIP-ANT's sparse sampling).

The fixture video is written here with PyAV (MPEG-4 part 2 video, AAC audio in an .mp4): 2 s at 8 fps,
pure red frames for the first second and pure blue after it, a 440 Hz tone at 44.1 kHz in stereo.
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
RED, BLUE = (230, 20, 20), (20, 20, 230)


def _write_video(path: Path, seconds: float = 2.0, fps: int = 8, audio: bool = True) -> None:
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        if audio:
            ast = out.add_stream("aac", rate=44100)
            ast.layout = "stereo"
        for i in range(int(seconds * fps)):
            rgb = np.zeros((48, 64, 3), np.uint8)
            rgb[:] = RED if i < fps * seconds / 2 else BLUE
            for packet in vs.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if audio:
            t = np.arange(int(seconds * 44100)) / 44100
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, tone.size, 1024):
                block = np.stack([tone[start:start + 1024]] * 2)
                frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = 44100, start, Fraction(1, 44100)
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
    proc = _make_shards(src, root / "shards", "--video-frames", "4", "--frame-size", "32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def _members(shards: Path) -> dict[str, bytes]:
    (tar,) = sorted((shards / "train").glob("*.tar"))
    with tarfile.open(tar) as tf:
        return {m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in tf if m.isfile()}


def _tile_colours(jpg: bytes, tiles: int) -> list[tuple[int, ...]]:
    from PIL import Image

    im = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float32)
    w = im.shape[1] // tiles
    return [tuple(int(c) for c in im[:, i * w:(i + 1) * w].reshape(-1, 3).mean(0).round()) for i in range(tiles)]


def test_video_becomes_audio_track_and_a_strip_of_four_equally_spaced_frames(video_shards):
    members = _members(video_shards / "shards")
    meta = json.loads(members["json"])
    assert meta["frames"] == 4 and meta["text"] == ["birds robin song"]
    # Frames at 0.25, 0.75, 1.25, 1.75 s of 2 s: red, red, blue, blue.
    colours = _tile_colours(members["jpg"], 4)
    for colour, want in zip(colours, (RED, RED, BLUE, BLUE)):
        assert np.abs(np.subtract(colour, want)).max() < 25, colours
    # The audio track: mono 48 kHz FLAC of ~2 s holding the 440 Hz tone (AAC adds priming at most).
    wave, sr = sf.read(io.BytesIO(members["flac"]), dtype="float32")
    assert sr == 48000 and wave.ndim == 1 and 1.95 < wave.size / sr < 2.1
    spectrum = np.abs(np.fft.rfft(wave[4800:-4800]))
    assert abs(np.argmax(spectrum) * sr / (wave.size - 9600) - 440) < 3
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
    (tar,) = sorted((video_shards / "shards" / "train").glob("*.tar"))
    (raw,) = list(iter_tar_samples(str(tar), lambda *a: None))

    def colour(image: np.ndarray) -> str:
        rgb = image.mean(axis=(1, 2)) * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)
        return "red" if rgb[0] > rgb[2] else "blue"

    assert colour(decode_sample(raw, cfg.audio, cfg.data, epoch=0, train=False)["image"]) == "red"  # tile 1
    seen = [colour(decode_sample(raw, cfg.audio, cfg.data, epoch=e, train=True)["image"]) for e in range(24)]
    assert 6 <= seen.count("red") <= 18, seen  # tiles 0-1 red, 2-3 blue, drawn per epoch
    # The same seed, epoch and key draw the same frame.
    again = [colour(decode_sample(raw, cfg.audio, cfg.data, epoch=e, train=True)["image"]) for e in range(24)]
    assert again == seen


def test_bad_video_options_are_one_line_errors(tmp_path):
    (tmp_path / "src").mkdir()
    proc = _make_shards(tmp_path / "src", tmp_path / "out", "--video-frames", "4", "--frame-size", "30")
    assert proc.returncode == 2 and "multiple of 16" in proc.stderr and "Traceback" not in proc.stderr
