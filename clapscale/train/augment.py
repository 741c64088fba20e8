"""Training-time augmentation of the log-mel batch (``augment`` in the config): level and SpecAugment.

Applied by the trainer after the front end, on the training device, to ``mel (B, C, T, F)`` in dB.
Each clip gets its own draws; the C channels of a fusion clip share them (one sound, one level).
The draws come from a generator seeded by (seed, step, rank), so a resumed run sees exactly the
augmentation of the uninterrupted run, and two ranks never repeat each other's masks.
"""

from __future__ import annotations

import math

import torch

from clapscale.config import AugmentConfig
from clapscale.features import AMIN

FLOOR_DB = 10.0 * math.log10(AMIN)  # -100 dB: the log-mel's floor


def augment_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for one step of one rank (independent of everything else drawn in training)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return g


def _stripes(batch: int, count: int, max_width: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``(batch, size)`` bool: the union of ``count`` stripes of width U[0, max_width] per row."""
    width = torch.randint(0, max_width + 1, (batch, count), generator=g)
    start = (torch.rand(batch, count, generator=g) * (size - width + 1)).long()
    pos = torch.arange(size).view(1, 1, size)
    inside = (pos >= start.unsqueeze(-1)) & (pos < (start + width).unsqueeze(-1))
    return inside.any(dim=1)


def augment_mel(mel: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """``mel (B, C, T, F)`` dB -> an augmented copy (the input is not modified)."""
    b, _, t, f = mel.shape
    out = mel.clone()
    if cfg.gain_db:
        gain = (torch.rand(b, generator=g) * 2 - 1) * cfg.gain_db
        shifted = (out + gain.to(out.device, out.dtype).view(b, 1, 1, 1)).clamp(min=FLOOR_DB)
        # As a gain on the waveform would: silence and padding stay at the front end's floor.
        out = torch.where(out <= FLOOR_DB, out, shifted)
    mask = torch.zeros(b, t, f, dtype=torch.bool)
    if cfg.time_masks and cfg.time_mask_frames:
        mask |= _stripes(b, cfg.time_masks, cfg.time_mask_frames, t, g).unsqueeze(-1)
    if cfg.freq_masks and cfg.freq_mask_bins:
        mask |= _stripes(b, cfg.freq_masks, cfg.freq_mask_bins, f, g).unsqueeze(1)
    if mask.any():
        fill = out.mean(dim=(2, 3), keepdim=True).expand_as(out)
        out = torch.where(mask.to(out.device).unsqueeze(1), fill, out)
    return out
