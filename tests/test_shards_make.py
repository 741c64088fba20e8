"""make_shards end to end: folders, manifests, bad input, exclusion, --max-seconds, --verify."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import soundfile as sf

from clapscale.shards import sources
from clapscale.shards.audio_io import content_hash, load_audio
from clapscale.shards.cli import main as make_shards
from clapscale.shards.verify import verify_shards


def _tone(freq: float, seconds: float, sr: int = 48000, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    x = amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _write(path, data, sr=48000, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, **kw)


def _samples(out, split):
    """key -> (meta, int16 pcm) for every sample of a split."""
    found = {}
    for tar_path in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name in members:
            if name.endswith(".json"):
                key = name[:-5]
                assert key not in found, f"{key} stored twice"
                pcm, _ = sf.read(io.BytesIO(members[key + ".flac"]), dtype="int16")
                found[key] = (json.loads(members[name]), pcm)
    return found


def _rejects(out):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_caption_from_path():
    assert sources.caption_from_path("footsteps/Gravel_Run02.ogg") == "footsteps gravel run"
    assert sources.caption_from_path("ui/menuClickHTTPSound-3.wav") == "ui menu click http sound"
    assert sources.caption_from_path("01.wav") == ""
    assert sources.caption_from_path("data/core/sounds/horse-die.ogg") == "horse die"
    assert sources.template_caption(["dog_bark", "rain", "car horn"]) == "The sound of dog bark, rain and car horn"


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory):
    """A folder with good clips in several formats and every kind of bad input."""
    root = tmp_path_factory.mktemp("messy")
    _write(root / "footsteps" / "Gravel_Run02.wav", _tone(300, 1.0, 44100, channels=2), 44100)
    _write(root / "rain" / "heavyRain.flac", _tone(500, 0.8, 96000), 96000, subtype="PCM_24")
    _write(root / "wind_gust.ogg", _tone(700, 0.6, 22050), 22050)
    _write(root / "long_drone.wav", _tone(900, 3.0))
    _write(root / "odd" / "surround_five_one.wav", _tone(1100, 0.5, channels=6))
    shutil.copy(root / "long_drone.wav", root / "zz_copy_of_drone.wav")  # exact duplicate
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file" * 10)
    good = (root / "rain" / "heavyRain.flac").read_bytes()
    (root / "cut_short.flac").write_bytes(good[: len(good) // 2])
    _write(root / "empty.wav", np.zeros((0, 1)))
    _write(root / "silence.wav", np.zeros(48000))
    inverted = _tone(440, 0.5, channels=2)
    inverted[:, 1] *= -1
    _write(root / "phase_cancel.wav", inverted)
    nan = _tone(440, 0.5)
    nan[10] = np.nan
    _write(root / "nan_samples.wav", nan, subtype="FLOAT")
    _write(root / "many_channels.wav", _tone(440, 0.5, channels=12))
    _write(root / "0001.wav", _tone(440, 0.5))  # no words: empty caption
    with open(os.path.join(os.fsencode(root), b"caf\xe9_latin1.wav"), "wb") as f:
        f.write((root / "wind_gust.ogg").read_bytes())
    (root / "notes.txt").write_text("not audio, ignored")
    return root


EXPECTED_REJECTS = {
    "broken.wav": "unreadable", "cut_short.flac": "truncated", "empty.wav": "zero_length", "silence.wav": "silent",
    "phase_cancel.wav": "silent", "nan_samples.wav": "non_finite", "many_channels.wav": "channel_layout",
    "0001.wav": "empty_caption", "zz_copy_of_drone.wav": "duplicate",
}


def test_from_dir_accepts_good_rejects_bad_with_reasons(messy_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = make_shards(["--from-dir", str(messy_dir), "--out", str(out), "--split", "train", "--max-seconds", "2",
                      "--shard-size", "3", "--quiet"])
    assert rc == 0
    summary = capsys.readouterr().out
    rejects = {r["path"]: r for r in _rejects(out)}
    latin1 = [p for p in rejects if p.startswith("caf")]
    assert len(latin1) == 1 and rejects.pop(latin1[0])["code"] == "bad_text_encoding"
    assert {p: r["code"] for p, r in rejects.items()} == EXPECTED_REJECTS
    assert all(p in r["reason"] for p, r in rejects.items())  # each reason names its file
    assert "long_drone.wav" in rejects["zz_copy_of_drone.wav"]["reason"] or "long_drone" in rejects["zz_copy_of_drone.wav"]["reason"]

    samples = _samples(out, "train")
    by_original = {meta["original"]: (meta, pcm) for meta, pcm in samples.values()}
    assert sorted(by_original) == sorted(["footsteps/Gravel_Run02.wav", "rain/heavyRain.flac", "wind_gust.ogg",
                                          "long_drone.wav", "odd/surround_five_one.wav"])
    meta, pcm = by_original["footsteps/Gravel_Run02.wav"]
    assert meta["text"] == ["footsteps gravel run"] and meta["split"] == "train" and meta["source"] == f"dir:{messy_dir.name}"
    assert pcm.shape == (48000,)  # 1 s at 44.1 kHz stereo -> 48 kHz mono
    # --max-seconds truncates (documented behaviour) and records the original length.
    meta, pcm = by_original["long_drone.wav"]
    assert pcm.shape == (96000,) and meta["truncated_from"] == pytest.approx(3.0)
    assert meta["content_hash"] == content_hash(load_audio(messy_dir / "long_drone.wav", max_seconds=2))
    assert "accepted 5 clips" in summary and "rejected 10" in summary and "silent" in summary
    report = verify_shards(out)
    assert report.ok, report.problems
    assert report.samples == 5


def test_all_bad_input_exits_non_zero(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.wav").write_bytes(b"junk")
    _write(src / "quiet.wav", np.zeros(4800))
    rc = make_shards(["--from-dir", str(src), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 1
    assert "no clip was accepted" in capsys.readouterr().err
    assert len(_rejects(tmp_path / "out")) == 2


def test_manifest_csv_and_jsonl(tmp_path):
    root = tmp_path / "data"
    _write(root / "a.wav", _tone(400, 0.5))
    _write(root / "sub" / "b.wav", _tone(600, 0.5))
    _write(root / "c.wav", _tone(800, 0.5))
    _write(tmp_path / "outside.wav", _tone(1000, 0.5))
    (root / "evil").symlink_to(tmp_path / "outside.wav")
    manifest = tmp_path / "clips.csv"
    manifest.write_bytes(
        "path,caption,tags,split,id,licence\n"
        "a.wav,a low hum,,train,A1,CC0\n"
        "sub/b.wav,,dog_bark;rain,valid,B2,\n"
        "../outside.wav,escapes,,train,,\n"
        "evil,symlink escapes,,train,,\n"
        "c.wav,,,train,,\n"
        "gone.wav,a file that is not there,,train,,\n".encode() + b"a.wav,caf\xe9 au lait,,train,,\n"
    )
    out = tmp_path / "out"
    assert make_shards(["--from-manifest", str(manifest), "--root", str(root), "--out", str(out), "--quiet"]) == 0
    train, valid = _samples(out, "train"), _samples(out, "valid")
    (meta_a, _), = train.values()
    assert meta_a["text"] == ["a low hum"] and meta_a["licence"] == "CC0" and meta_a["id"] == "A1"
    (meta_b, _), = valid.values()
    assert meta_b["text"] == ["The sound of dog bark and rain"] and meta_b["tag"] == ["dog_bark", "rain"]
    codes = sorted(r["code"] for r in _rejects(out))
    assert codes == ["bad_text_encoding", "empty_caption", "missing_file", "path_escapes_root", "path_escapes_root"]

    jsonl = tmp_path / "clips.jsonl"
    jsonl.write_text(json.dumps({"path": "a.wav", "text": ["one", "two"], "split": "test",
                                 "text_augment_t5": ["a k2c caption"]}) + "\n{broken json\n")
    out2 = tmp_path / "out2"
    assert make_shards(["--from-manifest", str(jsonl), "--root", str(root), "--out", str(out2), "--quiet"]) == 0
    (meta, _), = _samples(out2, "test").values()
    assert meta["text"] == ["one", "two"] and meta["text_augment_t5"] == ["a k2c caption"]
    assert [r["code"] for r in _rejects(out2)] == ["bad_manifest_row"]


def test_exclude_by_shard_set_and_by_hash_file(tmp_path):
    src = tmp_path / "src"
    for i, f in enumerate((300, 500, 700)):
        _write(src / f"tone_{chr(97 + i)}.wav", _tone(f, 0.5))
    eval_dir = tmp_path / "evalsrc"
    _write(eval_dir / "held_out.wav", _tone(500, 0.5))  # same content as tone_b
    assert make_shards(["--from-dir", str(eval_dir), "--out", str(tmp_path / "eval"), "--split", "test", "--quiet"]) == 0
    hashes = tmp_path / "hashes.txt"
    hashes.write_text("# content hashes to drop\n" + content_hash(load_audio(src / "tone_c.wav")) + "\n")
    out = tmp_path / "out"
    rc = make_shards(["--from-dir", str(src), "--out", str(out), "--exclude", str(tmp_path / "eval"), str(hashes), "--quiet"])
    assert rc == 0
    kept = sorted(m["original"] for m, _ in _samples(out, "train").values())
    assert kept == ["tone_a.wav"]
    assert sorted((r["path"], r["code"]) for r in _rejects(out)) == [("tone_b.wav", "excluded"), ("tone_c.wav", "excluded")]
    bad = tmp_path / "bad_hashes.txt"
    bad.write_text("not-a-hash\n")
    assert make_shards(["--from-dir", str(src), "--out", str(tmp_path / "o3"), "--exclude", str(bad), "--quiet"]) == 2


def test_rerun_with_other_inputs_into_same_out_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    _write(src / "a.wav", _tone(300, 0.5))
    out = tmp_path / "out"
    assert make_shards(["--from-dir", str(src), "--out", str(out), "--quiet"]) == 0
    assert make_shards(["--from-dir", str(src), "--out", str(out), "--quiet"]) == 0  # same inputs: a no-op
    _write(src / "b.wav", _tone(400, 0.5))
    assert make_shards(["--from-dir", str(src), "--out", str(out), "--quiet"]) == 2
    assert "different inputs" in capsys.readouterr().err


@pytest.fixture()
def small_set(tmp_path):
    out = tmp_path / "set"
    assert make_shards(["--synthetic", "12", "--out", str(out), "--shard-size", "4", "--quiet"]) == 0
    assert verify_shards(out).ok
    return out


def test_verify_catches_corrupted_byte(small_set, capsys):
    tar_path = small_set / "train" / "000001.tar"
    data = bytearray(tar_path.read_bytes())
    with tarfile.open(tar_path) as tf:
        flac = next(m for m in tf.getmembers() if m.name.endswith(".flac"))
    data[flac.offset_data + flac.size // 2] ^= 0xFF  # one byte inside FLAC frames
    tar_path.write_bytes(bytes(data))
    assert make_shards(["--verify", str(small_set)]) == 1
    err = capsys.readouterr().err
    assert "train/000001.tar: sha256" in err
    assert flac.name[:-5] in err  # the damaged sample is named (decode error or PCM/hash mismatch)


def test_verify_catches_missing_sample(small_set, capsys):
    tar_path = small_set / "train" / "000000.tar"
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    dropped = members[0][0].name[:-5]
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tf:
        for m, payload in members[2:]:
            tf.addfile(m, io.BytesIO(payload))
    assert make_shards(["--verify", str(small_set)]) == 1
    err = capsys.readouterr().err
    assert "holds 3 samples, manifest says 4" in err and "index 000000.idx does not match" in err
    (small_set / "valid" / "000000.tar").unlink()
    assert make_shards(["--verify", str(small_set)]) == 1
    assert "valid/000000.tar: listed in the manifest but missing on disk" in capsys.readouterr().err
    assert dropped


def test_a_decoder_crash_costs_only_its_own_clip(tmp_path, monkeypatch):
    """A worker killed while decoding (a codec segfault) is retried alone; only that file is rejected."""
    from clapscale.shards import builder

    real = builder.build_sample

    def crashing(index, item, max_seconds):
        if "crasher" in item.original:
            os.kill(os.getpid(), 9)
        return real(index, item, max_seconds)

    monkeypatch.setattr(builder, "build_sample", crashing)  # inherited by the forked workers
    src = tmp_path / "src"
    for i in range(6):
        _write(src / f"tone_{i}.wav", _tone(200 + 100 * i, 0.3))
    _write(src / "tone_3_crasher.wav", _tone(1500, 0.3))
    out = tmp_path / "out"
    assert make_shards(["--from-dir", str(src), "--out", str(out), "--workers", "2", "--shard-size", "3", "--quiet"]) == 0
    assert [(r["path"], r["code"]) for r in _rejects(out)] == [("tone_3_crasher.wav", "crash")]
    assert len(_samples(out, "train")) == 6


def test_second_concurrent_run_into_same_out_is_refused(tmp_path, capsys):
    import subprocess
    import sys

    src = tmp_path / "src"
    _write(src / "a.wav", _tone(300, 0.3))
    out = tmp_path / "out"
    (out / ".make_shards").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(out / ".make_shards" / "lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert make_shards(["--from-dir", str(src), "--out", str(out), "--quiet"]) == 2
        assert "another make_shards run" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert make_shards(["--from-dir", str(src), "--out", str(out), "--quiet"]) == 0


CLASSES = ("dog", "rain", "bell", "wind")


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    """A folder-per-class tree, 4 classes x 6 distinct clips: sorted paths cluster the classes."""
    root = tmp_path_factory.mktemp("classes")
    for c, name in enumerate(CLASSES):
        for k in range(6):
            _write(root / name / f"take_{k}.wav", _tone(200 + 300 * c + 25 * k, 0.2))
    return root


def _classes_per_shard(out, split="train"):
    """[(shard name, set of classes)] in shard order; the class is the clip's folder."""
    found = []
    for tar_path in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            metas = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
        found.append((tar_path.name, {m["original"].split("/")[0] for m in metas}))
    return found


def _class_sequence(out, split="train"):
    """The class of every sample in storage order: shards in name order, members in tar order."""
    seq = []
    for tar_path in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            seq += [json.loads(tf.extractfile(m).read())["original"].split("/")[0]
                    for m in tf.getmembers() if m.name.endswith(".json")]
    return seq


def _manifest_split(out, split="train"):
    return json.loads((out / "manifest.json").read_text())["splits"][split]


def test_folder_per_class_tree_becomes_mixed_shards(class_tree, tmp_path):
    """Sorted paths would give one class per shard, which a loader's shuffle buffer cannot undo; the
    seeded shuffle spreads every class over the shards and the seed is recorded in the manifest."""
    args = ["--from-dir", str(class_tree), "--shard-size", "6", "--quiet"]
    out = tmp_path / "default"
    assert make_shards([*args, "--out", str(out)]) == 0
    shards = _classes_per_shard(out)
    assert len(shards) == 4
    assert all(len(classes) >= 2 for _, classes in shards), shards
    assert all(sum(c in classes for _, classes in shards) >= 2 for c in CLASSES), shards
    assert _manifest_split(out)["shuffle_seed"] == 0
    # Inside a shard too (members are stored in key order, keys follow the shuffled order): a loader
    # buffer smaller than a shard must not read runs of one class. Sorted, 24 clips change class 3 times.
    seq = _class_sequence(out)
    assert sum(a != b for a, b in zip(seq, seq[1:])) >= 14, seq

    # --no-shuffle keeps the source order (what make_shards did before): one class per shard.
    kept = tmp_path / "sorted"
    assert make_shards([*args, "--no-shuffle", "--out", str(kept)]) == 0
    assert [classes for _, classes in _classes_per_shard(kept)] == [{c} for c in sorted(CLASSES)]
    assert _manifest_split(kept)["shuffle_seed"] is None

    # Another seed: another assignment of the same samples; the same seed: byte-identical shards.
    other, again = tmp_path / "seed7", tmp_path / "seed7-again"
    assert make_shards([*args, "--shuffle-seed", "7", "--out", str(other)]) == 0
    assert make_shards([*args, "--shuffle-seed", "7", "--out", str(again)]) == 0
    assert _manifest_split(other)["shuffle_seed"] == 7
    assert _classes_per_shard(other) != shards
    hashes = {m["content_hash"] for m, _ in _samples(out, "train").values()}
    assert {m["content_hash"] for m, _ in _samples(other, "train").values()} == hashes and len(hashes) == 24
    assert _manifest_split(again)["shards"] == _manifest_split(other)["shards"]
    assert verify_shards(out).ok and verify_shards(other).ok


def test_a_fully_rejected_unit_leaves_no_gap_in_shard_numbers(tmp_path):
    """Unit 2 (of 4) has only a broken file: the shards stay 000000..000002, the manifest and sizes.json
    name exactly those, and the loader reads a brace spec over the range."""
    from clapscale.config import load_config
    from clapscale.data import build_loader

    src = tmp_path / "src"
    for name, freq in (("alpha", 300), ("beta", 500), ("delta", 900)):
        _write(src / f"{name}.wav", _tone(freq, 0.3))
    (src / "broken_gamma.wav").write_bytes(b"RIFF not really a wave file" * 10)
    out = tmp_path / "out"
    assert make_shards(["--from-dir", str(src), "--out", str(out), "--shard-size", "1", "--quiet"]) == 0
    names = ["000000.tar", "000001.tar", "000002.tar"]
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == names
    assert [s["name"] for s in _manifest_split(out)["shards"]] == names
    assert json.loads((out / "train" / "sizes.json").read_text()) == dict.fromkeys(names, 1)
    assert [r["code"] for r in _rejects(out)] == ["unreadable"]
    spec = f"{out}/train/{{000000..000002}}.tar"
    cfg = load_config(None, [f"data.train={spec}", "data.batch_size=1", "data.workers=0"])
    originals = sorted(o for batch in build_loader(cfg, spec, train=False) for o in batch["keys"])
    assert len(originals) == 3
    assert verify_shards(out).ok
