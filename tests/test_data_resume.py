"""Epoch-mode resume (``data.resampled: false``) on real shards: a resumed stream equals the
uninterrupted one sample for sample, counts every skipped sample once, and reads only what it
yields (plus tar headers) instead of replaying the epoch's bytes up to the saved position."""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from clapscale.data import build_loader
from test_data_common import (  # noqa: F401 - session fixtures
    bad_shards,
    clean_shards,
    clean_spec,
    make_cfg,
)

# Bytes per sample a resume may read besides the data of the samples it yields: two 512-byte
# member headers and tarfile's 1-byte end-of-member probes, with room to spare.
HEADER_ALLOWANCE = 2048


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def run_until(cfg, n_batches: int):
    """A loader that has yielded ``n_batches`` batches, and those batches."""
    loader = build_loader(cfg, cfg.data.train)
    taken = []
    if n_batches:
        for batch in loader:
            taken.append(batch)
            if len(taken) == n_batches:
                break
    return loader, taken


def resume_from(cfg, state):
    loader = build_loader(cfg, cfg.data.train)
    loader.load_state_dict(state)
    return loader, list(loader)


def member_bytes(tars: list[Path]) -> dict[str, int]:
    """Data bytes of each sample key, from the tars themselves (independent of the loader)."""
    out: dict[str, int] = defaultdict(int)
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    out[m.name.split(".", 1)[0]] += m.size
    return out


def test_resumed_epoch_equals_uninterrupted_with_each_skip_counted_once(clean_shards, bad_shards):
    """Two workers over clean shards, a shard truncated mid-sample and one with an undecodable
    sample: resuming after any batch gives the same batches and the same skip counts."""
    spec = "::".join([clean_spec(clean_shards), str(bad_shards / "truncated_tar.tar"),
                      str(bad_shards / "decode_error.tar")])
    cfg = make_cfg(spec, "data.batch_size=2", "data.workers=2", "data.resampled=false",
                   "data.shuffle_buffer=3", "audio.length_policy=rand_trunc")
    full, _ = run_until(cfg, 0)
    batches = list(full)
    assert full.skipped == {"truncated_tar": 1, "decode_error": 1}
    for stop in range(1, len(batches)):
        first, taken = run_until(cfg, stop)
        resumed, rest = resume_from(cfg, first.state_dict())
        assert keys_of(taken + rest) == keys_of(batches), stop
        for a, b in zip(taken + rest, batches):
            assert torch.equal(a["waveform"], b["waveform"])  # same crops: same epoch, same keys
        assert resumed.skipped == full.skipped, stop


def bytes_read_by_process() -> int:
    """Bytes this process has read through read() calls so far (the kernel's count, /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


@pytest.mark.parametrize("stop", [2, 5, 7])
def test_resume_reads_only_what_it_yields(clean_shards, stop):
    """In-process loader (no workers), so the kernel's read count is the loader's."""
    tars = sorted(clean_shards.glob("*.tar"))
    cfg = make_cfg(clean_spec(clean_shards), "data.batch_size=2", "data.workers=0", "data.resampled=false",
                   "data.shuffle_buffer=4")
    full, _ = run_until(cfg, 0)
    everything = keys_of(full)
    first, taken = run_until(cfg, stop)
    before = bytes_read_by_process()
    resumed, rest = resume_from(cfg, first.state_dict())
    read = bytes_read_by_process() - before
    assert keys_of(taken) + keys_of(rest) == everything
    sizes = member_bytes(tars)
    yielded = sum(sizes[k] for k in keys_of(rest))
    # Replaying would read every byte up to the position again (the taken samples' data too).
    assert read <= yielded + HEADER_ALLOWANCE * len(everything)
    assert 0 < resumed.bytes_read <= read  # the loader's own count is of the same reads


def test_resume_on_laion_layout_shards(tmp_path):
    """LAION's layout: PAX headers (long nested member names), shuffled members, ``0.tar, 1.tar``,
    no ``.idx``: offsets recorded from the headers still land on the right samples."""
    from laion_layout import laion_spec, write_laion_split
    from test_data_common import clip

    clips = [{"audio": clip(0.5 + 0.1 * i, i), "text": [f"caption {i}"]} for i in range(12)]
    split = write_laion_split(tmp_path, "a_source_with_a_long_name_as_published", "train", clips, per_shard=4)
    with tarfile.open(split / "0.tar") as tf:
        assert all(m.pax_headers.get("path") for m in tf.getmembers())  # the names need PAX records
    spec = laion_spec(split)
    cfg = make_cfg(spec, "data.batch_size=2", "data.workers=0", "data.resampled=false", "data.shuffle_buffer=3")
    full, _ = run_until(cfg, 0)
    batches = list(full)
    assert len(keys_of(batches)) == 12
    for stop in (1, 3, 5):
        first, taken = run_until(cfg, stop)
        _, rest = resume_from(cfg, first.state_dict())
        assert keys_of(taken + rest) == keys_of(batches)
        for a, b in zip(taken + rest, batches):
            assert torch.equal(a["waveform"], b["waveform"]) and a["texts"] == b["texts"]


def write_dense_bad_shards(root: Path) -> str:
    """2 shards x 12 clips: every third sample has an empty caption (skipped), and of the others
    every third has a bare-string tag (read, counted as ``tag_coerced``). So many bad samples put
    bad rows behind the first sample not yet yielded, where a resume reads them again."""
    import json

    from clapscale.shards.audio_io import encode_flac
    from test_data_common import clip, write_raw_shard

    flac = encode_flac(clip(1.0, 99))
    for s in range(2):
        members = []
        for i in range(12):
            key = f"s{s}-{i:02d}"
            record = {"text": [] if i % 3 == 1 else [f"caption {key}"], "tag": "dog" if i % 3 == 2 else ["dog"]}
            members += [(f"{key}.flac", flac), (f"{key}.json", json.dumps(record).encode())]
        write_raw_shard(root / f"{s:06d}.tar", members)
    return f"{root}/{{000000..000001}}.tar"


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_resume_counts_each_skip_and_warning_once_with_many_bad_samples(tmp_path, backend):
    """Resuming after any batch of the epoch gives the uninterrupted run's keys, skip counts and
    warning counts: no bad row handed out before the stop is counted again when the resumed run
    reads it again (DALI: rows behind the first sample not yet yielded are read again)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = make_cfg(write_dense_bad_shards(tmp_path), f"data.backend={backend}", "data.resampled=false",
                   "data.batch_size=4", "data.workers=0", "data.shuffle_buffer=1",
                   "audio.length_policy=rand_trunc", "audio.clip_seconds=0.5")
    full, _ = run_until(cfg, 0)
    batches = list(full)
    assert full.skipped["empty_caption"] >= 8 and full.warned["tag_coerced"] >= 8  # each bad one read
    # 16 good samples make 4 batches; the epoch's other 2 come from a second read (DALI: the reader
    # wraps; wds: a top-up pass from the epoch's start, whose resume is not exact: review finding 17).
    stops = range(1, len(batches)) if backend == "dali" else range(1, 5)
    for stop in stops:
        first, taken = run_until(cfg, stop)
        resumed, rest = resume_from(cfg, first.state_dict())
        assert keys_of(taken + rest) == keys_of(batches), stop
        assert (resumed.skipped, resumed.warned) == (full.skipped, full.warned), stop
