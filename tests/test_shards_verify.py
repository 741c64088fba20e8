"""`make_shards.py --verify` on a shard set made elsewhere (LAION's layout, no manifest.json): what can
be verified is verified (decoding, sample rate, JSON, captions, pairs, sizes.json, .idx), each fault
named, instead of refusing the set."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from clapscale.shards.cli import main as make_shards
from clapscale.shards.verify import verify_shards
from laion_layout import write_laion_split

SR = 48000


def _clips(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"audio": (0.1 * rng.standard_normal(SR // 2)).astype(np.float32), "text": [f"clip {i}", f"also {i}"]}
            for i in range(n)]


@pytest.fixture(scope="module")
def laion_set(tmp_path_factory) -> Path:
    """Two sources x one split each, as LAION publishes them; returns the set's root."""
    root = tmp_path_factory.mktemp("laion-verify")
    write_laion_split(root, "clotho", "train", _clips(6), per_shard=3, seed=1)
    write_laion_split(root, "audiocaps", "valid", _clips(4), per_shard=4, seed=2)
    return root / "laion"


def _copy(laion_set: Path, tmp_path: Path) -> Path:
    shutil.copytree(laion_set, tmp_path / "laion")
    return tmp_path / "laion"


def _rewrite_member(tar: Path, which: int, payload: bytes) -> str:
    """Replace the payload of member number ``which`` (PAX headers kept); -> its sample's key."""
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, (m, data) in enumerate(members):
            if i == which:
                data = payload
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    return members[which][0].name.rsplit(".", 1)[0]


def _flac(audio: np.ndarray, sr: int = SR) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, sr, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def test_a_clean_foreign_set_verifies(laion_set, capsys):
    assert make_shards(["--verify", str(laion_set)]) == 0
    out = capsys.readouterr().out
    assert "verifying it as a shard set made elsewhere" in out
    assert "3 of 3 shard(s) have no .idx" in out and f"clapscale shards index {laion_set}" in out
    assert f"verify {laion_set}: OK; 3 shards, 10 samples, {10 * 0.5 / 3600:.3f} hours" in out
    report = verify_shards(laion_set, workers=2)
    assert report.ok and report.samples == 10 and report.seconds == pytest.approx(5.0)


def test_an_indexed_foreign_set_has_its_idx_checked(laion_set, tmp_path, capsys):
    root = _copy(laion_set, tmp_path)
    assert make_shards(["index", str(root)]) == 0
    report = verify_shards(root)
    assert report.ok and not any("have no .idx" in n for n in report.notes)
    idx = root / "clotho" / "train" / "1.idx"
    idx.write_text(idx.read_text().replace(" 1536 ", " 1024 ", 1))
    problems = verify_shards(root).problems
    assert problems == [f"clotho/train/1.tar: index 1.idx does not match the tar; rewrite it with "
                        f"`clapscale shards index --force {root / 'clotho' / 'train' / '1.tar'}`"]


def test_every_fault_is_named(laion_set, tmp_path, capsys):
    root = _copy(laion_set, tmp_path)
    train, valid = root / "clotho" / "train", root / "audiocaps" / "valid"
    t = np.arange(SR // 2) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    # Members alternate flac, json: 0 is the first sample's audio, 1 its JSON, 2 the second's audio.
    faults = {
        "bad_json": _rewrite_member(train / "0.tar", 1, b"{not json"),
        "no_caption": _rewrite_member(train / "1.tar", 1, json.dumps({"text": ["  "], "tags": ["x"]}).encode()),
        "rate": _rewrite_member(valid / "0.tar", 0, _flac(tone, 44100)),
        # A stereo clip whose channels cancel: silence after the loaders' downmix.
        "silent": _rewrite_member(valid / "0.tar", 2, _flac(np.stack([tone, -tone], axis=1))),
    }
    sizes = json.loads((train / "sizes.json").read_text())
    (train / "sizes.json").write_text(json.dumps({**sizes, "1.tar": 4}))
    (valid / "sizes.json").unlink()
    data = (train / "1.tar").read_bytes()
    with tarfile.open(train / "1.tar") as tf:
        last = tf.getmembers()[-1]
    (train / "1.tar").write_bytes(data[: last.offset_data + 10])  # cut inside the last sample's JSON

    assert make_shards(["--verify", str(root)]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert f"PROBLEM clotho/train/0.tar:{faults['bad_json']}: JSON does not parse" in err
    assert f"PROBLEM clotho/train/1.tar:{faults['no_caption']}: no caption" in err
    assert f"PROBLEM audiocaps/valid/0.tar:{faults['rate']}: audio is ('FLAC', 'PCM_16', 44100)" in err
    assert f"PROBLEM audiocaps/valid/0.tar:{faults['silent']}: all-silent after downmix" in err
    assert "clotho/train/1.tar:" in err and "the file ends inside this sample (truncated)" in err
    assert "PROBLEM clotho/train/1.tar: holds 3 samples, sizes.json says 4" in err
    assert err.count("PROBLEM") == 6, err
    assert "NOTE audiocaps/valid/sizes.json: missing" in captured.out
    assert "FAILED with 6 problem(s)" in captured.out


def test_a_directory_without_shards_is_a_problem(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert make_shards(["--verify", str(tmp_path / "empty")]) == 1
    assert f"PROBLEM {tmp_path / 'empty'}: no *.tar below it" in capsys.readouterr().err


_VERIFY_PROBE = """
import json, resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a safety net for the machine
from pathlib import Path
from clapscale.shards import verify

def high_water_kb():
    # VmHWM, not ru_maxrss: ru_maxrss carries over exec from the forked (large) pytest parent.
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

base = high_water_kb()
problems, samples, seconds = ACTION
print(json.dumps({"problems": problems, "samples": samples, "seconds": seconds,
                  "peak_mb": (high_water_kb() - base) / 1024}))
"""


def _verify_peak(action: str) -> dict:
    """Run ``action`` (an expression over ``verify`` giving problems, samples, seconds) in a fresh
    interpreter; its result and the peak resident memory it added (MB)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _VERIFY_PROBE.replace("ACTION", action)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_verify_reads_a_large_shard_in_bounded_memory(tmp_path):
    """--verify holds one block of one member at a time, not the tar (issue 9: bounded memory): a
    shard of one 6-minute noise clip (~30 MB of FLAC) is checked, both as our shard set (sha256,
    content_hash) and as a set made elsewhere, in well under the size of the tar."""
    src = tmp_path / "src" / "field"
    src.mkdir(parents=True)
    seconds = 360
    rng = np.random.default_rng(0)
    with sf.SoundFile(src / "long_walk.wav", "w", SR, 1, subtype="PCM_16") as f:
        for _ in range(seconds // 30):  # noise: FLAC barely compresses it
            f.write((0.1 * rng.standard_normal(30 * SR)).astype(np.float32))
    out = tmp_path / "out"
    assert make_shards(["--from-dir", str(tmp_path / "src"), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    (tar,) = (out / "train").glob("*.tar")
    tar_mb = tar.stat().st_size / 2**20
    bound_mb = 10  # a few decode blocks of 2^18 frames (1 MB as float32) and their temporaries
    assert tar_mb > 2.5 * bound_mb, tar_mb  # reading the tar whole cost 65 MB here (twice the tar)

    ours = _verify_peak(f"(lambda r: (r.problems, r.samples, r.seconds))(verify.verify_shards(Path({str(out)!r})))")
    assert (ours["problems"], ours["samples"]) == ([], 1) and ours["seconds"] == pytest.approx(seconds)
    assert ours["peak_mb"] < bound_mb, (ours["peak_mb"], tar_mb)
    foreign = _verify_peak(f"verify.verify_foreign_tar(Path({str(tar)!r}), 'train/{tar.name}')")
    assert (foreign["problems"], foreign["samples"]) == ([], 1) and foreign["seconds"] == pytest.approx(seconds)
    assert foreign["peak_mb"] < bound_mb, (foreign["peak_mb"], tar_mb)


def test_shards_not_named_tar_get_one_index_each(laion_set, tmp_path):
    """One rule says where a shard's .idx is (index.idx_path_of), for the indexer, --verify and the
    loaders' sample counts alike: ``N.tar`` -> ``N.idx``; any other name gets ``.idx`` appended, so
    ``part.000`` and ``part.001`` do not share (and overwrite) one ``part.idx``."""
    from clapscale.data.specs import shard_sizes
    from clapscale.shards.index import idx_path_of, index_tar
    from clapscale.shards.verify import verify_foreign_tar

    d = tmp_path / "odd"
    d.mkdir()
    parts = [d / "part.000", d / "part.001"]
    shutil.copy(laion_set / "clotho" / "train" / "0.tar", parts[0])  # 3 samples
    shutil.copy(laion_set / "audiocaps" / "valid" / "0.tar", parts[1])  # 4 samples
    assert make_shards(["index", *map(str, parts)]) == 0
    assert [idx_path_of(p).name for p in parts] == ["part.000.idx", "part.001.idx"]
    assert idx_path_of(d / "7.tar") == d / "7.idx"
    for p in parts:
        assert idx_path_of(p).read_text() == index_tar(p).text()
        assert verify_foreign_tar(p, p.name)[0] == []
    assert shard_sizes([str(p) for p in parts]) == {str(parts[0]): 3, str(parts[1]): 4}
