"""make_shards under injected faults: a decoder that hangs costs its own clip (code ``timeout``), not the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from clapscale.shards.cli import main as make_shards
from clapscale.shards.verify import verify_shards

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_shards.py"


def _tones(src: Path, n: int) -> None:
    src.mkdir(parents=True, exist_ok=True)
    t = np.arange(14400) / 48000
    for i in range(n):
        sf.write(src / f"tone_{i}.wav", 0.3 * np.sin(2 * np.pi * (300 + 150 * i) * t), 48000)


def _originals(out: Path) -> list[str]:
    found = []
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tf:
            found += [json.loads(tf.extractfile(m).read())["original"] for m in tf.getmembers() if m.name.endswith(".json")]
    return sorted(found)


def _rejects(out: Path) -> list[tuple[str, str]]:
    return [(r["path"], r["code"]) for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())]


def test_a_fifo_that_blocks_on_open_is_rejected_as_timeout(tmp_path):
    """A named pipe with no writer blocks libsndfile's open() forever, inside C code: the per-clip
    timeout must end it from outside Python, and the tool must finish with every other clip."""
    src = tmp_path / "src"
    _tones(src, 5)
    os.mkfifo(src / "stuck_pipe.wav")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(TOOL), "--from-dir", str(src), "--out", str(out), "--workers", "2",
                             "--shard-size", "2", "--clip-timeout", "1", "--quiet"],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # it hung: fail the test instead of hanging the suite
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    assert _rejects(out) == [("stuck_pipe.wav", "timeout")]
    reason = json.loads((out / "rejects.jsonl").read_text())["reason"]
    assert "stuck_pipe.wav" in reason and "1 s" in reason
    assert "timeout" in stdout and "Traceback" not in stderr
    assert _originals(out) == [f"tone_{i}.wav" for i in range(5)]
    assert verify_shards(out).ok


def test_a_hanging_decode_costs_only_its_own_clip(tmp_path, monkeypatch):
    """One clip's decode sleeps (a hang in Python code) among clips decoded by the other worker: the
    hung clip alone is rejected as ``timeout`` (had it not been stopped, it would have been accepted
    after its sleep); every other clip is kept, including any that were in flight when the pool broke."""
    from clapscale.shards import builder

    real = builder.build_sample

    def hanging(index, item, max_seconds):
        if "sleeper" in item.original:
            time.sleep(120)
        return real(index, item, max_seconds)

    monkeypatch.setattr(builder, "build_sample", hanging)  # inherited by the forked workers
    src = tmp_path / "src"
    _tones(src, 6)
    sf.write(src / "tone_sleeper.wav", 0.3 * np.sin(np.arange(14400) / 10), 48000)
    out = tmp_path / "out"
    assert make_shards(["--from-dir", str(src), "--out", str(out), "--workers", "2", "--shard-size", "3",
                        "--clip-timeout", "1", "--quiet"]) == 0
    assert _rejects(out) == [("tone_sleeper.wav", "timeout")]
    assert _originals(out) == [f"tone_{i}.wav" for i in range(6)]
