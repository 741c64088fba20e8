"""Interrupting make_shards (kill -9 mid-run) and rerunning gives exactly the uninterrupted result."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import soundfile as sf

from clapscale.shards.cli import main as make_shards
from clapscale.shards.verify import verify_shards

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_shards.py"
ARGS = ["--synthetic", "60", "--shard-size", "4", "--quiet"]


def _shards(out: Path) -> dict[str, list[tuple[str, int, str]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {split: [(s["name"], s["samples"], s["sha256"]) for s in entry["shards"]]
            for split, entry in manifest["splits"].items()}


def _keys(out: Path) -> list[str]:
    keys = []
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tf:
            keys += [m.name[:-5] for m in tf.getmembers() if m.name.endswith(".json")]
    return keys


def _alive(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (only not yet reaped)


def _assert_final_tars_whole(out: Path) -> None:
    for tar_path in out.glob("*/*.tar"):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                payload = tf.extractfile(m).read()
                assert len(payload) == m.size
                if m.name.endswith(".flac"):
                    sf.read(io.BytesIO(payload))
        assert tar_path.with_suffix(".idx").exists()


def _folder_args(tmp_path: Path) -> list[str]:
    """A folder source (shuffled by make_shards, unlike the synthetic corpus) of 60 clips that need
    resampling and downmixing, so that a build takes long enough to be interrupted."""
    import numpy as np

    src = tmp_path / "src"
    t = np.arange(44100) / 44100
    for c in range(6):
        (src / f"class_{'abcdef'[c]}").mkdir(parents=True)
        for k in range(10):
            x = 0.3 * np.sin(2 * np.pi * (200 + 60 * c + 5 * k) * t)
            sf.write(src / f"class_{'abcdef'[c]}" / f"take_{k}.wav", np.stack([x, x], axis=1), 44100)
    return ["--from-dir", str(src), "--shard-size", "4", "--quiet"]


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_kill_9_then_rerun_completes_every_clip_exactly_once(tmp_path, source):
    args = ARGS if source == "synthetic" else _folder_args(tmp_path)
    ref = tmp_path / "ref"
    assert make_shards([*args, "--out", str(ref)]) == 0
    want = _shards(ref)
    total_units = sum(len(v) for v in want.values())

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TOOL), *args, "--workers", "2", "--out", str(out)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / ".make_shards" / "train"
    deadline = time.monotonic() + 60
    try:
        while len(list(state.glob("*.done.json"))) < 3:
            assert proc.poll() is None, "make_shards finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(proc.pid, signal.SIGKILL)  # only the tool, mid-run: its workers must not linger
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers and not any(map(_alive, workers)), "orphaned workers survived"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = len(list((out / ".make_shards").glob("*/*.done.json")))
    assert 3 <= done < total_units
    _assert_final_tars_whole(out)
    assert not (out / "manifest.json").exists()
    # The kill can land while a worker writes a done marker: its temp must not outlive the rerun.
    (state / f".{total_units - 1:06d}.done.json.tmp-1").write_text("{")

    assert make_shards([*args, "--workers", "2", "--out", str(out)]) == 0
    assert _shards(out) == want  # byte-identical shards, same names and counts
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 60
    assert not list(out.rglob("*.tmp-*"))
    assert verify_shards(out).ok


def test_rerun_after_crash_between_rename_and_done_record(tmp_path, capsys):
    """A tar renamed into place whose unit was not yet recorded is rebuilt, not duplicated."""
    out = tmp_path / "out"
    args = ["--synthetic", "24", "--shard-size", "4", "--quiet", "--out", str(out)]
    assert make_shards(args) == 0
    want = _shards(out)
    (out / ".make_shards" / "train" / "000002.done.json").unlink()
    (out / "train" / ".000003.tar.tmp-99999").write_bytes(b"half a shard")
    assert make_shards(args) == 0
    assert "resumed: 2 shard unit(s)" in capsys.readouterr().out
    assert _shards(out) == want
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 24
    assert not list(out.rglob("*.tmp-*"))


def test_ctrl_c_stops_cleanly_and_rerun_finishes(tmp_path):
    out = tmp_path / "run"
    # 240 clips (60 units): on an idle machine 60 clips could finish between the second unit's
    # record and the signal, and the run then rightly exited 0.
    args = ["--synthetic", "240", "--shard-size", "4", "--quiet"]
    # A terminal's child starts with Ctrl-C at its default; the test process's own disposition (a
    # library may have set it to ignored, which a child would inherit) must not leak into it.
    proc = subprocess.Popen([sys.executable, str(TOOL), *args, "--workers", "2", "--out", str(out)],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    try:
        while len(list((out / ".make_shards" / "train").glob("*.done.json"))) < 2:
            assert proc.poll() is None, "make_shards finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the whole foreground group on Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert "Rerun the same command" in err and "Traceback" not in err
    _assert_final_tars_whole(out)
    assert make_shards([*args, "--out", str(out)]) == 0
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 240
    assert verify_shards(out).ok


def test_rerun_of_a_shuffled_folder_with_rejected_units_is_byte_identical(tmp_path, capsys):
    """The shuffled order and the dense shard numbers are reproduced by a rerun that finishes an
    interrupted build: units after the first missing done-record are rebuilt under the same names, and
    a final-named tar that no done-record names (left by the interrupted run) is removed."""
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    t = np.arange(9600) / 48000
    for i in range(8):
        sf.write(src / f"tone_{i}.wav", 0.3 * np.sin(2 * np.pi * (300 + 120 * i) * t), 48000)
    for name in ("broken_a.wav", "broken_b.wav"):
        (src / name).write_bytes(b"RIFF not really a wave file" * 10)
    out = tmp_path / "out"
    args = ["--from-dir", str(src), "--shard-size", "1", "--quiet", "--out", str(out)]
    assert make_shards(args) == 0
    want = _shards(out)
    assert [name for name, _, _ in want["train"]] == [f"{i:06d}.tar" for i in range(8)]  # 10 units, 8 shards
    state = out / ".make_shards" / "train"
    for u in range(4, 10):
        (state / f"{u:06d}.done.json").unlink()
    (out / "manifest.json").unlink()
    (out / "train" / "000009.tar").write_bytes((out / "train" / "000000.tar").read_bytes())  # a stray shard
    assert make_shards(args) == 0
    assert "resumed: 4 shard unit(s)" in capsys.readouterr().out
    assert _shards(out) == want
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [name for name, _, _ in want["train"]]
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 8
    assert verify_shards(out).ok


def test_a_build_started_before_shuffling_existed_is_finished_with_no_shuffle(tmp_path, capsys):
    """A half-built OUT whose plan.json has no shuffle seed (written by the unshuffled make_shards) is
    refused with a hint, and --no-shuffle finishes it exactly as that version would have."""
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    t = np.arange(9600) / 48000
    for i in range(6):
        sf.write(src / f"tone_{i}.wav", 0.3 * np.sin(2 * np.pi * (300 + 120 * i) * t), 48000)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--from-dir", str(src), "--shard-size", "2", "--quiet", "--no-shuffle"]
    assert make_shards([*args, "--out", str(ref)]) == 0
    assert make_shards([*args, "--out", str(out)]) == 0
    plan_path = out / ".make_shards" / "train" / "plan.json"
    plan = json.loads(plan_path.read_text())
    del plan["shuffle_seed"]  # the plan as the earlier version wrote it
    plan_path.write_text(json.dumps(plan))
    (out / ".make_shards" / "train" / "000002.done.json").unlink()
    assert make_shards([*args[:-1], "--out", str(out)]) == 2
    assert "add --no-shuffle to finish it" in capsys.readouterr().err
    assert make_shards([*args, "--out", str(out)]) == 0
    assert _shards(out) == _shards(ref)
