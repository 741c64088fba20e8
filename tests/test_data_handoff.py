"""The webdataset loader's worker hand-off: batches built in a worker are built in shared memory
(sent without a copy) and are the same, padding included, as those built in the main process."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from clapscale.data import build_loader
from clapscale.data.wds import collate_waveforms
from test_data_common import clean_shards, clean_spec, make_cfg  # noqa: F401 - session fixture


class Collated(IterableDataset):
    def __init__(self, waves):
        self.waves = waves

    def __iter__(self):
        out = collate_waveforms(self.waves)
        yield {"waveform": out, "shared_in_worker": out.is_shared()}


def test_collate_in_a_worker_builds_the_batch_in_shared_memory():
    rng = np.random.default_rng(0)
    # Garbage-free padding matters: a reused or uninitialised buffer would leak other clips' samples.
    waves = [rng.standard_normal(n).astype(np.float32) for n in (5, 9, 1)]
    (got,) = list(DataLoader(Collated(waves), batch_size=None, num_workers=1))
    assert got["shared_in_worker"]
    ref = np.zeros((3, 9), np.float32)
    for i, w in enumerate(waves):
        ref[i, : len(w)] = w
    assert got["waveform"].dtype == torch.float32 and np.array_equal(got["waveform"].numpy(), ref)
    assert not collate_waveforms(waves).is_shared()  # in the main process: ordinary memory
    assert np.array_equal(collate_waveforms(waves).numpy(), ref)


def test_worker_batches_equal_in_process_batches(clean_shards):
    """Fusion keeps long clips whole, so rows are zero-padded to the longest in their batch (which
    differs between layouts: the padding must be zeros, whatever its length)."""
    def batches(workers: int) -> dict:
        cfg = make_cfg(clean_spec(clean_shards), "data.batch_size=8", f"data.workers={workers}",
                       "audio.length_policy=fusion")
        out = {}
        for b in build_loader(cfg, cfg.data.train, train=False):
            for key, wave, n in zip(b["keys"], b["waveform"], b["lengths"].tolist()):
                assert not wave[max(n, cfg.audio.clip_samples):].any(), key
                out[key] = wave[:n]
        return out

    ref, got = batches(0), batches(2)
    assert sorted(got) == sorted(ref) and len(ref) == 16
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
