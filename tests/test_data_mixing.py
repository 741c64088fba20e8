"""Source mixing and shard order on both backends, on real shards of uneven sizes written by the
project's writer: mixing weights hold per sample (not per shard), DALI reshuffles its shards every
epoch in webdataset's order, and tag fields as foreign shards write them are read as tags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clapscale.data import build_loader
from clapscale.data.specs import parse_spec
from clapscale.shards.audio_io import encode_flac
from clapscale.shards.writer import write_shards
from test_data_common import make_cfg, write_raw_shard

BIG, SMALL = 64, 8  # samples per shard of the two sources (the 512 vs 100, scaled down)
# 50 ms clips padded to 1 s: the audio is irrelevant here, and 10 s rows would only cost time.
SHORT = ("audio.length_policy=pad", "audio.clip_seconds=1", "audio.max_seconds=1")


def tiny_records(prefix: str, n: int) -> list[dict]:
    """Short clips (50 ms) so that hundreds of samples decode in well under a second."""
    rng = np.random.default_rng(len(prefix) + n)
    return [
        {"key": f"{prefix}-{i:04d}", "audio": (0.1 * rng.standard_normal(2400)).astype(np.float32),
         "text": [f"{prefix} clip {i}"]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """Source "big": 2 shards x 64 samples; source "small": 4 shards x 8 samples. Same total per
    source would hide nothing: the sizes differ 4x in total and 8x per shard."""
    root = tmp_path_factory.mktemp("uneven")
    write_shards(tiny_records("big", 2 * BIG), root / "big", "train", shard_size=BIG)
    write_shards(tiny_records("small", 4 * SMALL), root / "small", "train", shard_size=SMALL)
    return f"{root}/big/train/{{000000..000001}}.tar::{root}/small/train/{{000000..000003}}.tar"


def tolerance(weight: float, n: int) -> float:
    """4 standard deviations of a binomial share over n samples (fails by chance < 1e-4)."""
    return 4 * math.sqrt(weight * (1 - weight) / n)


def big_share(batches) -> tuple[float, int]:
    keys = [k for b in batches for k in b["keys"]]
    return sum(k.startswith("big-") for k in keys) / len(keys), len(keys)


def train_batches(loader, n: int) -> list[dict]:
    out: list[dict] = []
    while len(out) < n:
        out += list(loader)  # whole epochs (a pass ends at the epoch boundary)
    return out[:n]


@pytest.mark.parametrize("weights,big_weight", [("0.5::0.5", 0.5), ("1::4", 0.2)])
def test_both_backends_realise_the_weights_per_sample(uneven, weights, big_weight):
    """Per-shard picking gave the big source 0.5*64 / (0.5*64 + 0.5*8) = 0.889 of the samples for
    weights 0.5::0.5 (0.67 for 1::4); per-sample picking gives the weight, on both backends, and the
    loader's own counts say so."""
    from clapscale.data.dali import DaliLoader
    from clapscale.data.wds import WdsLoader

    cfg = make_cfg(uneven, f"data.train_weights={weights}", "data.batch_size=16", "data.workers=0",
                   "data.shuffle_buffer=16", *SHORT)
    sources = parse_spec(uneven, weights)
    shares = {}
    for name, loader in [
        ("wds", WdsLoader(sources, cfg.audio, cfg.data)),
        ("dali", DaliLoader(sources, cfg.audio, cfg.data, features="waveform")),
    ]:
        assert len(loader) == (2 * BIG + 4 * SMALL) // 16
        share, n = big_share(train_batches(loader, 40))
        assert n == 640
        assert abs(share - big_weight) < tolerance(big_weight, n), (name, share)
        assert loader.source_counts[0] == round(share * n) and sum(loader.source_counts) == n, name
        shares[name] = share
    assert abs(shares["wds"] - shares["dali"]) < math.sqrt(2) * tolerance(big_weight, 640)


def test_realised_shares_are_logged(uneven, caplog):
    cfg = make_cfg(uneven, "data.train_weights=0.5::0.5", "data.batch_size=16", "data.workers=0",
                   "data.shuffle_buffer=1", *SHORT)
    loader = build_loader(cfg, cfg.data.train)
    with caplog.at_level("INFO", logger="clapscale.data.wds"):
        list(loader)
    (record,) = [r for r in caplog.records if "realised source shares" in r.getMessage()]
    big, small = loader.source_counts
    line = record.getMessage()
    assert f"{big / (big + small):.3f} (configured 0.500)" in line and f"{big + small} samples" in line
    assert record.levelname == "INFO"  # within the tolerance: no warning


def test_a_source_short_of_its_weight_is_a_warning(tmp_path, caplog):
    """The source pick is per raw sample: a source whose samples are mostly bad (3 of 4 have no
    caption) yields ~0.2 of the samples for weight 0.5, and the epoch's log line says so."""
    write_shards(tiny_records("ok", 32), tmp_path / "ok", "train", shard_size=32)
    members = []
    for i, rec in enumerate(tiny_records("poor", 32)):
        text = [f"poor clip {i}"] if i % 4 == 0 else []
        members += [(f"{rec['key']}.flac", encode_flac(rec["audio"])),
                    (f"{rec['key']}.json", json.dumps({"text": text}).encode())]
    write_raw_shard(tmp_path / "poor" / "000000.tar", members)
    spec = f"{tmp_path}/ok/train/000000.tar::{tmp_path}/poor/000000.tar"
    cfg = make_cfg(spec, "data.train_weights=0.5::0.5", "data.batch_size=16", "data.workers=0",
                   "data.shuffle_buffer=1", *SHORT)
    loader = build_loader(cfg, cfg.data.train)
    with caplog.at_level("INFO", logger="clapscale.data.wds"):
        for _ in range(3):
            list(loader)
    last = [r for r in caplog.records if "realised source shares" in r.getMessage()][-1]
    assert last.levelname == "WARNING" and "off the weights" in last.getMessage()
    assert loader.source_counts[1] / sum(loader.source_counts) < 0.3
    assert loader.skipped["empty_caption"] > 0


def test_unreadable_source_is_an_error_not_a_hang(tmp_path):
    """A source whose every shard is unreadable was silently left out (the other source got all the
    samples); with a shard open per source it would spin looking for a sample. It is an error
    naming the source."""
    from clapscale.data.wds import WdsLoader

    write_shards(tiny_records("ok", 8), tmp_path / "ok", "train", shard_size=8)
    write_shards(tiny_records("bad", 8), tmp_path / "bad", "train", shard_size=8)
    (tmp_path / "bad/train/000000.tar").write_bytes(b"not a tar" * 100)
    spec = f"{tmp_path}/ok/train/000000.tar::{tmp_path}/bad/train/000000.tar"
    cfg = make_cfg(spec, "data.batch_size=4", "data.workers=0", *SHORT)
    with pytest.raises(ValueError, match="bad/train/000000.tar.*none of its 1 shard"):
        list(WdsLoader(parse_spec(spec), cfg.audio, cfg.data))


@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_reshuffles_shards_every_epoch_like_webdataset(uneven, world_size):
    """Epoch mode, no sample shuffle: both backends read this epoch's permutation of the shards,
    rank r taking shards r::world_size, so they yield the same keys in the same order; the order
    changes from epoch to epoch (DALI used to repeat one sequence forever)."""
    from clapscale.data.dali import DaliLoader

    cfg = make_cfg(uneven, "data.resampled=false", "data.batch_size=8", "data.workers=1",
                   "data.shuffle_buffer=1", "data.seed=3", *SHORT)
    for rank in range(world_size):
        wds = build_loader(cfg, cfg.data.train, rank=rank, world_size=world_size)
        dali = DaliLoader(parse_spec(cfg.data.train), cfg.audio, cfg.data, rank=rank, world_size=world_size,
                          features="waveform")
        epochs = []
        for epoch in range(3):
            got = [k for b in dali for k in b["keys"]]
            want = [k for b in wds for k in b["keys"]]
            assert got == want, (rank, epoch)
            epochs.append(got)
        assert epochs[0] != epochs[1] != epochs[2]


def write_foreign_tags(path: Path) -> dict[str, list[str]]:
    """A shard in the layouts foreign writers use for labels; returns the tags each should give."""
    cases = {
        "string": ({"tag": "dog"}, ["dog"]),
        "plural": ({"tags": ["rain", "thunder"]}, ["rain", "thunder"]),
        "int": ({"tags": 3}, ["3"]),  # UrbanSound8K's class id
        "mixed": ({"tag": ["siren", 7, {"x": 1}]}, ["siren", "7"]),
        "clean": ({"tag": ["bird"]}, ["bird"]),
        "none": ({}, []),
    }
    members = []
    for i, (key, (fields, _)) in enumerate(cases.items()):
        flac = encode_flac((0.1 * np.random.default_rng(i).standard_normal(2400)).astype(np.float32))
        meta = json.dumps({"text": [f"clip {key}"], **fields}).encode()
        members += [(f"{key}.flac", flac), (f"{key}.json", meta)]
    write_raw_shard(path, members)
    return {key: want for key, (_, want) in cases.items()}


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_tag_fields_as_foreign_shards_write_them(tmp_path, backend):
    """A string tag is one tag ("dog" became d, o, g and the caption "The sound of d, o and g");
    ``tags`` is read as ``tag``; a number is its string; non-list values are counted."""
    want = write_foreign_tags(tmp_path / "foreign.tar")
    cfg = make_cfg(str(tmp_path / "foreign.tar"), f"data.backend={backend}", "data.batch_size=8",
                   "data.workers=1", "data.caption=tag_template", *SHORT)
    loader = build_loader(cfg, cfg.data.train, train=False)
    (batch,) = list(loader)
    got = dict(zip(batch["keys"], batch["tags"]))
    assert got == want
    texts = dict(zip(batch["keys"], batch["texts"]))
    assert texts["string"] == "The sound of dog"
    assert texts["plural"] == "The sound of rain and thunder"
    assert texts["none"] == "clip none"
    assert loader.warned == {"tag_coerced": 3}  # string, int, mixed
    assert loader.skipped == {}
