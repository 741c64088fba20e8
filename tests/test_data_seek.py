"""Seek-decoding (``wds.decode_crop``): a cropping length policy decodes only its window, and both
loaders give bit-for-bit the batches of the full decode (``decode_audio`` + ``apply_length_policy``)
for the same seed; a window that cannot stand for the whole decode falls back to it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from clapscale.config import AudioConfig
from clapscale.data import build_loader
from clapscale.data import dali as dali_mod
from clapscale.data import wds
from clapscale.data.policies import apply_length_policy
from clapscale.shards.audio_io import encode_flac
from test_data_common import clean_shards, clean_spec, make_cfg  # noqa: F401 - session fixture

SR = 48000


def flac(seconds: float, seed: int, channels: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    x = (0.1 * rng.standard_normal((int(seconds * SR), channels))).astype(np.float32)
    if channels == 1:
        return encode_flac(x[:, 0])
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def full_decode(data: bytes, cfg: AudioConfig, rng):
    return apply_length_policy(wds.decode_audio(data, cfg), cfg, rng)


def assert_same(got, ref) -> None:
    assert got.waveform.dtype == ref.waveform.dtype == np.float32
    assert np.array_equal(got.waveform, ref.waveform)
    assert (got.length, got.is_longer, got.fusion_starts) == (ref.length, ref.is_longer, ref.fusion_starts)


@pytest.mark.parametrize("policy", ["rand_trunc", "repeatpad", "pad", "fusion"])
@pytest.mark.parametrize("channels", [1, 2])
def test_crop_equals_full_decode_bit_for_bit(policy, channels):
    """Clips shorter than, equal to, a few samples over, well over one clip and over max_seconds."""
    cfg = AudioConfig(clip_seconds=1.0, max_seconds=3.0, length_policy=policy)
    seeked = 0
    for i, seconds in enumerate([0.5, 1.0, 1.0 + 100 / SR, 2.3, 7.0]):
        data = flac(seconds, i, channels)
        for seed in range(4):
            for rng_ref, rng_got in ((np.random.default_rng(seed), np.random.default_rng(seed)), (None, None)):
                ref = full_decode(data, cfg, rng_ref)
                got = wds.decode_crop(data, cfg, rng_got)
                if got is None:
                    got = full_decode(data, cfg, rng_got)
                else:
                    seeked += 1
                assert_same(got, ref)
                if rng_ref is not None:  # the same draws were taken
                    assert rng_got.bit_generator.state == rng_ref.bit_generator.state
    # Cropping policies seek for every clip over one clip (3 of 5 lengths, 4 seeds, train + eval);
    # fusion only for the one a few samples over N (longer fusion clips are kept whole).
    assert seeked == (8 if policy == "fusion" else 24)


def test_crop_reads_only_the_window_of_a_long_clip(monkeypatch):
    """The point of it: a 60 s clip costs one clip's frames (plus one FLAC frame at the end)."""
    cfg = AudioConfig(clip_seconds=1.0, max_seconds=60.0)
    data = flac(60.0, 0)
    frames = []
    real_read = sf.SoundFile.read

    def counting_read(self, *args, **kwargs):
        out = real_read(self, *args, **kwargs)
        frames.append(out.shape[0])
        return out

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    assert wds.decode_crop(data, cfg, np.random.default_rng(0)) is not None
    assert sum(frames) <= cfg.clip_samples + 1


@pytest.mark.parametrize("case", ["truncated", "silent_window", "not_flac", "fusion_longer"])
def test_crop_falls_back_and_leaves_the_generator_alone(case):
    cfg = AudioConfig(clip_seconds=1.0, max_seconds=10.0,
                      length_policy="fusion" if case == "fusion_longer" else "rand_trunc")
    data = flac(4.0, 3)
    if case == "truncated":  # ends before STREAMINFO says: only the full decode knows the real length
        data = data[: len(data) * 3 // 5]
    elif case == "silent_window":  # silence first, noise after: the eval crop (offset 0) is silent
        x = np.concatenate([np.zeros(2 * SR, np.float32), 0.1 * np.ones(2 * SR, np.float32)])
        data = encode_flac(x)
    elif case == "not_flac":
        buf = io.BytesIO()
        sf.write(buf, np.full(4 * SR, 0.1, np.float32), SR, format="WAV", subtype="PCM_16")
        data = buf.getvalue()
    rng = None if case == "silent_window" else np.random.default_rng(5)
    state = rng.bit_generator.state if rng is not None else None
    assert wds.decode_crop(data, cfg, rng) is None
    if rng is not None:
        assert rng.bit_generator.state == state
    if case == "silent_window":  # the full decode keeps it (the clip is not silent)
        assert wds.decode_crop(data, cfg, None) is None and full_decode(data, cfg, None).length == 4 * SR


def per_key(batches) -> dict:
    out = {}
    for b in batches:
        for i, key in enumerate(b["keys"]):
            out[key] = (b["texts"][i], int(b["lengths"][i]), bool(b["is_longer"][i]),
                        b["fusion_starts"][i].tolist(), b["waveform"][i].clone())
    return out


def run_loader(cfg, backend: str, train: bool, seek: bool, monkeypatch) -> tuple[dict, int]:
    """Per-key samples of one epoch, and how many crops were decoded by seeking."""
    seeked = [0]
    real = wds.decode_crop

    def spy(*args):
        res = real(*args) if seek else None
        seeked[0] += res is not None
        return res

    with monkeypatch.context() as m:
        m.setattr(wds, "decode_crop", spy)
        m.setattr(dali_mod, "decode_crop", spy)
        if backend == "wds":
            loader = build_loader(cfg, cfg.data.train, train=train)
        else:
            from clapscale.data.specs import parse_spec

            loader = dali_mod.DaliLoader(parse_spec(cfg.data.train), cfg.audio, cfg.data, train=train,
                                         features="waveform")
        n = len(loader)
        got = per_key(b for _, b in zip(range(n), loader))
    return got, seeked[0]


@pytest.mark.parametrize("backend", ["wds", "dali"])
@pytest.mark.parametrize("policy", ["rand_trunc", "pad"])
def test_loaders_with_seeking_give_the_full_decode_batches(clean_shards, backend, policy, monkeypatch):
    """1 s crops from clips of 0.5-12 s capped at 5 s: most samples are cropped, at random offsets."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    # DALI: 2 threads, so the crops are decoded on its thread pool (webdataset: in-process).
    workers = 2 if backend == "dali" else 0
    cfg = make_cfg(clean_spec(clean_shards), "data.batch_size=4", f"data.workers={workers}", "data.resampled=false",
                   "data.seed=7", "audio.clip_seconds=1", "audio.max_seconds=5", f"audio.length_policy={policy}")
    for train in (True, False):
        ref, none = run_loader(cfg, backend, train, False, monkeypatch)
        got, seeked = run_loader(cfg, backend, train, True, monkeypatch)
        assert none == 0 and seeked >= 8, seeked  # 11 of the 16 clips are over 1 s
        assert sorted(got) == sorted(ref) and len(ref) >= 12
        for key in ref:
            assert got[key][:4] == ref[key][:4], key
            assert torch.equal(got[key][4], ref[key][4]), key
