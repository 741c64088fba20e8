"""DALI loader (CPU-only pipelines here, mel on GPU where one exists): feature parity with the torch
front end on the same clips, exact-once evaluation, fixed-size training batches, exact resume from a
reader checkpoint, and every bad-sample case skipped and counted."""

from __future__ import annotations

import pytest
import torch

from clapscale.data import build_loader
from clapscale.features import AudioFrontend
from test_data_common import (  # noqa: F401 - session fixtures
    bad_cases,
    bad_shards,
    clean_records,
    clean_shards,
    clean_spec,
    make_cfg,
)

pytest.importorskip("nvidia.dali")

ALL_KEYS = sorted(r["key"] for r in clean_records())
# Max abs difference in dB between DALI's float32 STFT / mel / dB and our torch front end.
# Measured ~3e-4 dB; 1e-2 dB still catches DALI's default (half-sample shifted) Hann window
# (0.28 dB max on a tone + noise clip), its default per-sample-max reference (20 dB) or a wrong
# filter norm (several dB).
DB_ATOL = 1e-2


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("policy,scale", [("rand_trunc", "slaney"), ("fusion", "htk")])
def test_dali_features_match_torch_front_end(clean_shards, policy, scale):
    over = (f"audio.length_policy={policy}", f"audio.mel_scale={scale}", "data.batch_size=16", "data.workers=1")
    wds_cfg = make_cfg(clean_spec(clean_shards), *over, "data.workers=0")
    dali_cfg = make_cfg(clean_spec(clean_shards), *over, "data.backend=dali")
    (ref,) = list(build_loader(wds_cfg, wds_cfg.data.train, train=False))
    (got,) = list(build_loader(dali_cfg, dali_cfg.data.train, train=False))
    assert "mel" in got and "waveform" not in got
    assert got["keys"] == ref["keys"]
    for k in ("lengths", "is_longer", "fusion_starts"):
        assert torch.equal(got[k], ref[k]), k
    assert got["texts"] == ref["texts"] and got["all_texts"] == ref["all_texts"] and got["tags"] == ref["tags"]
    fe = AudioFrontend(wds_cfg.audio)
    mel_ref, longer_ref = fe(ref)
    mel_got, longer_got = fe(got)
    assert mel_got.shape == mel_ref.shape == (16, 4 if policy == "fusion" else 1, 1001, 64)
    assert torch.equal(longer_got, longer_ref)
    torch.testing.assert_close(mel_got.cpu(), mel_ref.cpu(), atol=DB_ATOL, rtol=0)


def test_dali_eval_sees_every_sample_once_across_ranks(clean_shards):
    cfg = make_cfg(clean_spec(clean_shards), "data.backend=dali", "data.batch_size=3", "data.workers=1")
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, cfg.data.train, rank=rank, world_size=2, train=False)
        first = keys_of(loader)
        assert first == keys_of(loader)  # deterministic, restarts each pass
        assert len(loader) == -(-len(first) // 3)
        seen += first
    assert sorted(seen) == ALL_KEYS


@pytest.mark.parametrize("resampled", [True, False])
def test_dali_training_batches_and_exact_resume(bad_shards, clean_shards, resampled):
    """Training over shards full of bad samples: every batch is full, and stopping after k batches
    then resuming from state_dict gives exactly the uninterrupted stream (including the samples
    carried over between DALI reader batches), across an epoch boundary. Resampled: two readers
    (clean and bad source) mixed per sample, both positions restored; epoch mode: one reader."""
    spec = f"{clean_spec(clean_shards)}::{bad_shards}/{{{','.join(sorted(p.name for p in bad_shards.glob('*.tar')))}}}"
    cfg = make_cfg(spec, "data.backend=dali", "data.batch_size=3", "data.workers=1", "data.shuffle_buffer=8",
                   "audio.length_policy=fusion", f"data.resampled={str(resampled).lower()}")
    full_loader = build_loader(cfg, cfg.data.train)
    full = list(full_loader) + list(full_loader)  # two epochs
    assert len(full) == 2 * len(full_loader) and all(len(b["keys"]) == 3 for b in full)
    assert set(full_loader.skipped) == {*bad_cases(), "truncated_tar"}
    skip_rows = []
    for stop in (2, len(full_loader) + 1):  # inside epoch 0, inside epoch 1
        first = build_loader(cfg, cfg.data.train)
        it = iter(first)
        taken = [next(it) for _ in range(min(stop, len(first)))]
        if stop > len(first):  # stop in the second epoch
            taken += [b for _, b in zip(range(stop - len(first)), first)]
        state = first.state_dict()
        skip_rows += state["skip_rows"]
        resumed = build_loader(cfg, cfg.data.train)
        resumed.load_state_dict(state)
        rest = list(resumed)
        if stop < len(first):
            rest += list(resumed)
        assert keys_of(taken + rest) == keys_of(full)
        for a, b in zip(taken + rest, full):
            assert torch.equal(a["fusion_starts"], b["fusion_starts"])
            torch.testing.assert_close(a["mel"], b["mel"])
    assert any(skip_rows), "no stop fell inside a DALI reader batch: the carry path went untested"


@pytest.fixture(scope="module")
def dali_bad_run(bad_shards):
    """One DALI evaluation pass per bad shard (pipelines are cheap on CPU; each shard alone so
    that each case's count is its own)."""
    out = {}
    for reason in [*bad_cases(), "truncated_tar"]:
        cfg = make_cfg(str(bad_shards / f"{reason}.tar"), "data.backend=dali", "data.batch_size=8", "data.workers=1")
        loader = build_loader(cfg, cfg.data.train, train=False)
        out[reason] = (keys_of(loader), dict(loader.skipped))
    return out


@pytest.mark.parametrize("reason", [*bad_cases(), "truncated_tar"])
def test_dali_bad_sample_is_skipped_and_counted(dali_bad_run, reason):
    keys, skipped = dali_bad_run[reason]
    assert keys == (["trunc-a"] if reason == "truncated_tar" else [f"{reason}-a", f"{reason}-z"])
    assert skipped == {reason: 1}


def test_dali_refuses_mixing_weights_in_epoch_mode(clean_shards):
    """Epoch mode reads every shard once: weights cannot hold there, on either backend."""
    from clapscale.config import ConfigError
    from clapscale.data.dali import DaliLoader
    from clapscale.data.specs import parse_spec

    spec = f"{clean_shards}/000000.tar::{clean_shards}/000001.tar"
    make_cfg(spec, "data.backend=dali", "data.train_weights=0.7::0.3")  # resampled: accepted
    with pytest.raises(ConfigError, match="resampled=true"):
        make_cfg(spec, "data.backend=dali", "data.train_weights=0.7::0.3", "data.resampled=false")
    cfg = make_cfg(spec, "data.batch_size=2", "data.resampled=false")
    with pytest.raises(ValueError, match="mixing weights need data.resampled=true"):
        DaliLoader(parse_spec(spec, "0.7::0.3"), cfg.audio, cfg.data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_mel_on_gpu_matches_cpu(clean_shards):
    cfg = make_cfg(clean_spec(clean_shards), "data.backend=dali", "data.batch_size=16", "data.workers=1")
    from clapscale.data.dali import DaliLoader
    from clapscale.data.specs import parse_spec

    gpu = DaliLoader(parse_spec(cfg.data.train), cfg.audio, cfg.data, train=False, device_id=0)
    (b_gpu,) = list(gpu)
    assert b_gpu["mel"].is_cuda
    cpu_cfg = make_cfg(clean_spec(clean_shards), "data.batch_size=16", "data.workers=0")
    (b_cpu,) = list(build_loader(cpu_cfg, cpu_cfg.data.train, train=False))
    fe = AudioFrontend(cfg.audio)
    torch.testing.assert_close(fe(b_gpu)[0].cpu(), fe(b_cpu)[0], atol=DB_ATOL, rtol=0)


def test_dali_waveform_mode_decodes_like_soundfile(clean_shards):
    """features="waveform" (mel left to AudioFrontend): same samples as the webdataset loader."""
    from clapscale.data.dali import DaliLoader
    from clapscale.data.specs import parse_spec

    cfg = make_cfg(clean_spec(clean_shards), "data.batch_size=16", "data.workers=0", "audio.length_policy=pad")
    (ref,) = list(build_loader(cfg, cfg.data.train, train=False))
    (got,) = list(DaliLoader(parse_spec(cfg.data.train), cfg.audio, cfg.data, train=False, features="waveform"))
    assert got["keys"] == ref["keys"]
    torch.testing.assert_close(got["waveform"], ref["waveform"], atol=1e-6, rtol=0)


def test_dali_decoding_stops_at_max_seconds(clean_shards):
    cfg = make_cfg(clean_spec(clean_shards), "data.backend=dali", "data.batch_size=16", "data.workers=1",
                   "audio.length_policy=fusion", "audio.max_seconds=11")
    (batch,) = list(build_loader(cfg, cfg.data.train, train=False))
    assert int(batch["lengths"].max()) == 11 * 48000
    assert int(batch["mel_frames"].max()) == 11 * 48000 // 480 + 1 == batch["mel"].shape[1]


@pytest.mark.parametrize("policy", ["rand_trunc", "fusion"])
def test_backends_make_the_same_random_choices_per_sample(clean_shards, policy):
    """Training draws (caption, crop offset, fusion chunk starts) come from one per-(seed, epoch, key)
    generator; both backends must draw in the same order, so one seed means the same sample content
    whichever backend reads it (sample order may differ)."""
    from clapscale.data.dali import DaliLoader
    from clapscale.data.specs import parse_spec

    cfg = make_cfg(clean_spec(clean_shards), "data.batch_size=4", "data.workers=0", "data.resampled=false",
                   "data.seed=7", f"audio.length_policy={policy}")

    def per_key(batches):
        out = {}
        for b in batches:
            for i, key in enumerate(b["keys"]):
                n = int(b["lengths"][i])
                out[key] = (b["texts"][i], b["fusion_starts"][i].tolist(), b["waveform"][i, :n].clone())
        return out

    wds_loader = build_loader(cfg, cfg.data.train, train=True)
    ref = per_key(b for _, b in zip(range(len(wds_loader)), wds_loader))
    dali_loader = DaliLoader(parse_spec(cfg.data.train), cfg.audio, cfg.data, train=True, features="waveform")
    got = per_key(b for _, b in zip(range(len(dali_loader)), dali_loader))
    common = sorted(set(ref) & set(got))
    # clean-003 / clean-007 are the clips over 10 s: their crop offsets / chunk starts are random draws.
    assert len(common) >= 8 and {"clean-003", "clean-007"} <= set(common), (sorted(ref), sorted(got))
    for key in common:
        assert got[key][0] == ref[key][0], key
        assert got[key][1] == ref[key][1], key
        torch.testing.assert_close(got[key][2], ref[key][2], atol=1e-6, rtol=0, msg=key)


@pytest.fixture(scope="module")
def more_damage(tmp_path_factory):
    """A shard with a sample lacking its .flac and one with a 0-byte .json (good, bad, bad, good),
    and a shard cut inside its first sample (no whole sample: DALI drops it from its plan)."""
    from test_data_common import good_members, meta, write_raw_shard

    out = tmp_path_factory.mktemp("more_damage")
    write_raw_shard(out / "absent.tar", good_members("absent-a", 1) + [("absent-noflac.json", meta(["x"]))]
                    + [("absent-nojson.flac", good_members("x", 2)[0][1]), ("absent-nojson.json", b"")]
                    + good_members("absent-z", 3))
    write_raw_shard(out / "cut.tar", good_members("cut-a", 4) + good_members("cut-b", 5))
    data = (out / "cut.tar").read_bytes()
    (out / "cut.tar").write_bytes(data[: data.index(b"cut-a.flac") + 512 + 100])
    return out


def damaged_spec(bad_shards, more_damage) -> str:
    names = ",".join(sorted(p.name for p in bad_shards.glob("*.tar")))
    return f"{bad_shards}/{{{names}}}::{more_damage}/absent.tar::{more_damage}/cut.tar"


# Each damaged sample of bad_shards + more_damage counted once. A sample without .flac and one with
# a 0-byte .flac are both empty_audio, a sample without .json and one with a 0-byte .json both
# missing_json: DALI reads an absent member as a 0-byte one, so neither backend tells them apart.
DAMAGE_COUNTS = {"decode_error": 1, "missing_json": 2, "bad_json": 1, "empty_caption": 1, "empty_audio": 2,
                 "truncated_tar": 2}


def test_backends_count_the_same_skips_on_one_damaged_shard_set(bad_shards, more_damage):
    """Evaluation over 2 ranks: the skip counts summed over ranks (what the trainer reports) are
    the same on both backends, each fault once, a truncated shard included."""
    totals = {}
    for backend in ("wds", "dali"):
        cfg = make_cfg(damaged_spec(bad_shards, more_damage), f"data.backend={backend}", "data.batch_size=4",
                       "data.workers=0")
        total: dict[str, int] = {}
        for rank in range(2):
            loader = build_loader(cfg, cfg.data.train, rank=rank, world_size=2, train=False)
            list(loader)
            for reason, n in loader.skipped.items():
                total[reason] = total.get(reason, 0) + n
        totals[backend] = total
    assert totals["wds"] == totals["dali"] == DAMAGE_COUNTS


def test_dali_counts_a_truncated_shard_once_per_epoch_across_ranks(bad_shards, more_damage):
    """Training, 2 ranks, epoch mode: each truncated shard is counted by one rank once per epoch
    (as the webdataset backend counts it once per read), not by every rank at construction."""
    cfg = make_cfg(damaged_spec(bad_shards, more_damage), "data.backend=dali", "data.batch_size=2",
                   "data.workers=0", "data.resampled=false")
    loaders = [build_loader(cfg, cfg.data.train, rank=r, world_size=2) for r in range(2)]
    assert sum(ld.skipped.get("truncated_tar", 0) for ld in loaders) == 0  # nothing read yet
    for epochs in (1, 2):
        for ld in loaders:
            list(ld)
        assert sum(ld.skipped.get("truncated_tar", 0) for ld in loaders) == 2 * epochs


def test_a_position_saved_by_one_backend_is_refused_clearly_by_the_other(clean_shards):
    """Switching data.backend on resume: each backend names the other in a ValueError (the trainer
    reports it), instead of a bare KeyError from a field only its own positions have."""
    over = ("data.batch_size=2", "data.workers=0", "data.resampled=false")
    wds_cfg = make_cfg(clean_spec(clean_shards), *over)
    dali_cfg = make_cfg(clean_spec(clean_shards), *over, "data.backend=dali")
    saved = {}
    for name, cfg in (("wds", wds_cfg), ("dali", dali_cfg)):
        loader = build_loader(cfg, cfg.data.train)
        next(iter(loader))
        saved[name] = loader.state_dict()
    with pytest.raises(ValueError, match="saved by data.backend=dali, this run uses wds"):
        build_loader(wds_cfg, wds_cfg.data.train).load_state_dict(saved["dali"])
    with pytest.raises(ValueError, match="saved by backend 'wds'"):
        build_loader(dali_cfg, dali_cfg.data.train).load_state_dict(saved["wds"])


def test_dali_resume_over_other_sources_restarts_the_source_counts(clean_shards):
    """Epoch mode has one reader whatever the sources, so a position saved over one source resumes
    over the same shards written as two: the stream continues exactly and the per-source counts
    restart (as on the webdataset backend) instead of failing with an IndexError."""
    over = ("data.backend=dali", "data.batch_size=2", "data.workers=0", "data.resampled=false")
    one = make_cfg(clean_spec(clean_shards), *over)
    two = make_cfg(f"{clean_shards}/{{000000..000001}}.tar::{clean_shards}/{{000002..000003}}.tar", *over)
    full = keys_of(build_loader(one, one.data.train))
    first = build_loader(one, one.data.train)
    it = iter(first)
    taken = keys_of([next(it) for _ in range(3)])
    resumed = build_loader(two, two.data.train)
    resumed.load_state_dict(first.state_dict())
    rest = keys_of(resumed)
    assert taken + rest == full
    assert len(resumed.source_counts) == 2 and sum(resumed.source_counts) == len(rest)


def test_a_dropped_dali_loader_frees_its_pipeline_threads(clean_shards):
    """DALI pipelines run native threads. A loader kept alive by a reference cycle until the garbage
    collector ran kept them too, and a later fork (a webdataset DataLoader worker) could deadlock on a
    lock one of them held: test_data_wds hung that way after the DALI tests."""
    import gc
    import os

    cfg = make_cfg(clean_spec(clean_shards), "data.backend=dali", "data.batch_size=2", "data.workers=0",
                   "data.resampled=false")

    def threads_after_one_batch() -> tuple[int, int]:
        loader = build_loader(cfg, cfg.data.train)
        next(iter(loader))
        alive = len(os.listdir("/proc/self/task"))
        del loader
        return alive, len(os.listdir("/proc/self/task"))

    gc.disable()  # what frees the pipelines must be the last reference going, not a collection
    try:
        threads_after_one_batch()  # warm-up: threads the process keeps anyway (torch's pools)
        before = len(os.listdir("/proc/self/task"))
        alive, after = threads_after_one_batch()
    finally:
        gc.enable()
    assert alive > before and after == before
