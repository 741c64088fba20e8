"""Shared shard fixtures for the loader tests (both backends), built once per session with the
real shard writer, plus hand-made tars for the bad-sample cases. Imported by test_data_wds.py and
test_data_dali.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clapscale.config import Config, load_config
from clapscale.shards.audio_io import encode_flac
from clapscale.shards.writer import write_shards

SR = 48000
# Clip lengths (s) of the clean set: mostly short, two longer than 10 s for fusion.
CLEAN_SECONDS = [1.0, 2.5, 1.5, 12.0, 3.0, 0.5, 2.0, 11.0, 1.2, 2.2, 1.8, 2.7, 0.8, 1.1, 2.9, 1.4]
CLEAN_SHARDS = 4  # 4 samples each


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def clean_records() -> list[dict]:
    return [
        {
            "key": f"clean-{i:03d}",
            "audio": clip(s, i),
            "text": [f"caption {i} first", f"caption {i} second"],
            "tag": [f"label{i % 3}"],
        }
        for i, s in enumerate(CLEAN_SECONDS)
    ]


def write_raw_shard(tar_path: Path, members: list[tuple[str, bytes]]) -> None:
    """A GNU tar with exactly these members, and its DALI wds2idx index (v1.2)."""
    buf = io.BytesIO()
    samples: dict[str, list[str]] = {}
    order: list[str] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            header_at = buf.tell()
            tar.addfile(info, io.BytesIO(data))
            key, ext = name.split(".", 1)
            if key not in samples:
                samples[key] = []
                order.append(key)
            samples[key].append(f"{ext} {header_at + tarfile.BLOCKSIZE} {len(data)} {name}")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tar_path.write_bytes(buf.getvalue())
    lines = [" ".join(samples[k]) for k in order]
    tar_path.with_suffix(".idx").write_text(f"v1.2 {len(order)}\n" + "\n".join(lines) + "\n")


def meta(text: list[str]) -> bytes:
    return json.dumps({"text": text, "tag": ["t"], "sample_rate": SR}).encode()


def good_members(key: str, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.flac", encode_flac(clip(1.0, seed))), (f"{key}.json", meta([f"good {key}"]))]


# Each bad case: (reason reported, the bad sample's members). Every bad shard is good, bad, good.
def bad_cases() -> dict[str, list[tuple[str, bytes]]]:
    flac = encode_flac(clip(1.0, 99))
    return {
        "decode_error": [("bad.flac", flac[:42] + bytes(range(256)) * 8), ("bad.json", meta(["x"]))],
        "missing_json": [("bad.flac", flac)],
        "bad_json": [("bad.flac", flac), ("bad.json", b"{not json")],
        "empty_caption": [("bad.flac", flac), ("bad.json", meta([]))],
        "empty_audio": [("bad.flac", b""), ("bad.json", meta(["silence"]))],
    }


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory) -> Path:
    """4 shards x 4 clips (two of them longer than 10 s) written by the real shard writer."""
    out = tmp_path_factory.mktemp("clean")
    write_shards(clean_records(), out, "train", shard_size=4)
    return out / "train"


@pytest.fixture(scope="session")
def bad_shards(tmp_path_factory) -> Path:
    """One shard per bad case (good, bad, good) plus a shard truncated inside its last sample."""
    out = tmp_path_factory.mktemp("bad")
    for i, (reason, members) in enumerate(bad_cases().items()):
        write_raw_shard(
            out / f"{reason}.tar",
            good_members(f"{reason}-a", 10 * i) + [(n.replace("bad", f"{reason}-bad"), d) for n, d in members]
            + good_members(f"{reason}-z", 10 * i + 1),
        )
    write_raw_shard(out / "truncated_tar.tar", good_members("trunc-a", 1) + good_members("trunc-b", 2))
    data = (out / "truncated_tar.tar").read_bytes()
    # Cut inside the second sample's FLAC member: the first sample survives.
    second_flac = data.index(b"trunc-b.flac")
    (out / "truncated_tar.tar").write_bytes(data[: second_flac + 512 + 100])
    return out


def make_cfg(spec: str, *overrides: str) -> Config:
    return load_config(None, [f"data.train={spec}", *overrides])


def clean_spec(root: Path) -> str:
    return f"{root}/{{000000..{CLEAN_SHARDS - 1:06d}}}.tar"


def test_bad_shards_hold_what_they_claim(bad_shards):
    names = sorted(p.stem for p in bad_shards.glob("*.tar"))
    assert names == sorted([*bad_cases(), "truncated_tar"])
    with pytest.raises(tarfile.ReadError):
        with tarfile.open(bad_shards / "truncated_tar.tar") as tar:
            for m in tar:
                tar.extractfile(m).read()


# ----------------------------------------------------------------------------------------------
# Shard specs as users write them: globs, missing files, gaps, count tables in other places
# ----------------------------------------------------------------------------------------------


def copy_shard_set(clean_shards: Path, dest: Path) -> Path:
    """A copy of the clean shard set (``train/`` + ``manifest.json``); returns its ``train`` dir."""
    import shutil

    shutil.copytree(clean_shards.parent, dest)
    return dest / "train"


def eval_keys(spec: str) -> list[str]:
    from clapscale.data import build_loader

    cfg = make_cfg(spec, "data.batch_size=16", "data.workers=0")
    return sorted(k for b in build_loader(cfg, spec, train=False) for k in b["keys"])


def test_missing_shard_is_named_at_loader_construction(clean_shards):
    from clapscale.data import build_loader
    from clapscale.data.specs import ShardSpecError

    spec = f"{clean_shards}/{{000000..000005}}.tar"  # the set has 000000..000003
    with pytest.raises(ShardSpecError, match=r"no such file: .*000004\.tar, .*000005\.tar \(2 of the 6"):
        build_loader(make_cfg(spec, "data.resampled=false"), spec)
    with pytest.raises(ShardSpecError, match="no such file"):
        build_loader(make_cfg(spec), spec, train=False)


def test_glob_in_local_spec_expands_sorted(clean_shards):
    from clapscale.data.specs import ShardSpecError, expand_urls

    assert expand_urls(f"{clean_shards}/*.tar") == expand_urls(clean_spec(clean_shards))
    assert eval_keys(f"{clean_shards}/00000[12].tar") == [f"clean-{i:03d}" for i in range(4, 12)]
    with pytest.raises(ShardSpecError, match=r"no file matches the shard pattern .*nope-\*\.tar"):
        expand_urls(f"{clean_shards}/nope-*.tar")


def test_gap_not_in_manifest_is_left_out_by_name(clean_shards, tmp_path, caplog):
    """A shard the manifest does not list (a rejected unit) is a gap the loader reads around; a shard
    the manifest lists but the disk lacks stays an error."""
    from clapscale.data.specs import ShardSpecError

    train = copy_shard_set(clean_shards, tmp_path / "set")
    spec = clean_spec(train)
    (train / "000001.tar").unlink()
    with pytest.raises(ShardSpecError, match="000001.tar"):
        eval_keys(spec)  # still listed by sizes.json and the manifest
    sizes = json.loads((train / "sizes.json").read_text())
    del sizes["000001.tar"]
    (train / "sizes.json").write_text(json.dumps(sizes))
    with caplog.at_level("WARNING"):
        keys = eval_keys(spec)
    assert keys == [f"clean-{i:03d}" for i in (*range(0, 4), *range(8, 16))]
    assert "000001.tar" in caplog.text and "gap" in caplog.text
    (train / "000003.tar").unlink()  # past the last present shard: not a gap
    with pytest.raises(ShardSpecError, match="000003.tar"):
        eval_keys(spec)


def test_eval_over_a_count_table_of_zeros_reads_every_sample_once(clean_shards, tmp_path):
    """A stale sizes.json saying 0 for every shard: the two ranks' evaluation still reads every clip
    the shards hold, once (a plan cut from the table alone gave every rank nothing)."""
    from clapscale.data import build_loader

    train = copy_shard_set(clean_shards, tmp_path / "set")
    sizes = json.loads((train / "sizes.json").read_text())
    (train / "sizes.json").write_text(json.dumps({name: 0 for name in sizes}))
    spec = clean_spec(train)
    cfg = make_cfg(spec, "data.batch_size=16", "data.workers=0")
    per_rank = [[k for b in build_loader(cfg, spec, rank=r, world_size=2, train=False) for k in b["keys"]]
                for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(r["key"] for r in clean_records())


@pytest.mark.parametrize("layout", ["manifest_above", "sizes_above", "sizes_above_keyed_by_split", "none"])
def test_counts_without_sizes_json_beside_the_shards(clean_shards, tmp_path, layout, caplog):
    """No sizes.json and no .idx beside the shards (LAION mirrors): counts come from the manifest or
    a sizes.json one level up, or from one scan of the tar headers, with a warning."""
    from clapscale.data import build_loader
    from clapscale.data.specs import shard_sizes

    train = copy_shard_set(clean_shards, tmp_path / "set")
    sizes = json.loads((train / "sizes.json").read_text())
    (train / "sizes.json").unlink()
    for idx in train.glob("*.idx"):
        idx.unlink()
    if layout != "manifest_above":
        (train.parent / "manifest.json").unlink()
    if layout == "sizes_above":
        (train.parent / "sizes.json").write_text(json.dumps(sizes))
    if layout == "sizes_above_keyed_by_split":
        (train.parent / "sizes.json").write_text(json.dumps({f"train/{k}": v for k, v in sizes.items()}))
    spec = clean_spec(train)
    with caplog.at_level("WARNING"):
        got = shard_sizes([str(train / n) for n in sorted(sizes)])
    assert got == {str(train / n): v for n, v in sizes.items()}
    assert ("scanning their tar headers" in caplog.text) == (layout == "none")
    cfg = make_cfg(spec, "data.batch_size=4", "data.workers=0")
    assert len(build_loader(cfg, spec)) == sum(sizes.values()) // 4  # resampled: nominal epoch from counts


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_eval_with_fewer_samples_than_ranks_reads_each_once(clean_shards, backend):
    """4 clips on 6 ranks: two ranks read nothing, the others one clip each, none twice."""
    from clapscale.data import build_loader

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    spec = f"{clean_shards}/000000.tar"
    cfg = make_cfg(spec, "data.batch_size=2", "data.workers=0", f"data.backend={backend}")
    per_rank = [[k for b in build_loader(cfg, spec, rank=r, world_size=6, train=False) for k in b["keys"]]
                for r in range(6)]
    assert sorted(k for keys in per_rank for k in keys) == [f"clean-{i:03d}" for i in range(4)]
    assert sorted(len(keys) for keys in per_rank) == [0, 0, 1, 1, 1, 1]


def _bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_header_scan_counts_are_remembered_while_a_shard_is_unchanged(clean_shards, tmp_path, caplog):
    """Without count tables (LAION layout), shards are counted by a header scan once per process: the
    next evaluation's loader reads no tar byte and warns no more. A rewritten shard is counted again."""
    from clapscale.data.specs import shard_sizes

    train = copy_shard_set(clean_shards, tmp_path / "set")
    sizes = json.loads((train / "sizes.json").read_text())
    for table in (train / "sizes.json", train.parent / "manifest.json", *train.glob("*.idx")):
        table.unlink()
    urls = [str(train / n) for n in sorted(sizes)]
    with caplog.at_level("WARNING"):
        assert shard_sizes(urls) == {u: sizes[n] for u, n in zip(urls, sorted(sizes))}
    assert "scanning their tar headers" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        before = _bytes_read_by_this_process()
        again = shard_sizes(urls)
        read = _bytes_read_by_this_process() - before
    assert again == {u: sizes[n] for u, n in zip(urls, sorted(sizes))}
    # The counter counts its own read of /proc/self/io (~120 bytes); one tar header block is 512.
    assert read < 512, f"{read} bytes read by the second count"
    assert "scanning" not in caplog.text

    # Rewrite one shard with only its first sample: a new size and mtime, so it is scanned again.
    shard = train / "000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.split(".", 1)[0] == first_key:
                tar.addfile(m, io.BytesIO(data))
    with caplog.at_level("WARNING"):
        assert shard_sizes(urls)[str(shard)] == 1
    assert "1 shard(s) (first: " + str(shard) in caplog.text
