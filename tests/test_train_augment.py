"""Training-time augmentation (clapscale/train/augment.py) against what each draw must do."""

import pytest
import torch

from clapscale.config import AugmentConfig, ConfigError, load_config
from clapscale.train.augment import augment_generator, augment_mel


def _mel(b=6, c=1, t=200, f=64):
    return torch.randn(b, c, t, f, generator=torch.Generator().manual_seed(0)) * 10 - 40


def test_off_by_default_and_gain_is_a_per_clip_offset_within_bounds():
    assert not AugmentConfig().enabled
    mel = _mel()
    out = augment_mel(mel, AugmentConfig(gain_db=6), augment_generator(0, 3, 1))
    shift = out - mel
    per_clip = shift[:, :, :1, :1]
    torch.testing.assert_close(shift, per_clip.expand_as(shift))  # one offset per clip
    assert per_clip.abs().max() <= 6 and per_clip.std() > 0.5  # drawn in +-6 dB, not constant
    # The floor (silence, padding) stays at -100 dB, as a gain on the waveform would leave it.
    floor = torch.full((6, 1, 10, 64), -100.0)
    torch.testing.assert_close(augment_mel(floor, AugmentConfig(gain_db=6), augment_generator(0, 3, 1)), floor)


def test_masks_cover_whole_stripes_filled_with_the_clip_mean_and_spare_the_input():
    mel, before = _mel(c=4), _mel(c=4)
    cfg = AugmentConfig(time_masks=2, time_mask_frames=30, freq_masks=1, freq_mask_bins=8)
    out = augment_mel(mel, cfg, augment_generator(1, 0, 0))
    torch.testing.assert_close(mel, before)  # input untouched
    changed = out != mel
    # The four channels of a fusion clip share one mask.
    assert torch.equal(changed, changed[:, :1].expand_as(changed))
    for i in range(mel.shape[0]):
        m = changed[i, 0]
        times = m.all(dim=1).sum().item()  # fully masked frames (time stripes)
        bins = m.all(dim=0).sum().item()  # fully masked bins (freq stripes)
        assert times <= 2 * 30 and bins <= 8
        # Every changed cell lies in a fully masked frame or bin, and holds the clip's mean (of that channel).
        assert torch.equal(m, m.all(dim=1, keepdim=True) | m.all(dim=0, keepdim=True))
        torch.testing.assert_close(out[i, 0][m], mel[i, 0].mean().expand(int(m.sum())))  # per channel
    assert changed.any()


def test_draws_depend_only_on_seed_step_and_rank():
    cfg = AugmentConfig(gain_db=3, time_masks=2, time_mask_frames=30, freq_masks=2, freq_mask_bins=8)
    mel = _mel()
    a = augment_mel(mel, cfg, augment_generator(0, 5, 0))
    torch.testing.assert_close(a, augment_mel(mel, cfg, augment_generator(0, 5, 0)))
    for other in (augment_generator(0, 6, 0), augment_generator(0, 5, 1), augment_generator(1, 5, 0)):
        assert not torch.equal(a, augment_mel(mel, cfg, other))


def test_config_refuses_negative_or_too_wide_masks():
    with pytest.raises(ConfigError, match="augment.gain_db"):
        load_config(None, ["augment.gain_db=-1"])
    with pytest.raises(ConfigError, match="narrower than the mel"):
        load_config(None, ["audio.clip_seconds=1", "augment.time_masks=1", "augment.time_mask_frames=500"])
    assert load_config(None, ["augment.time_masks=2", "augment.time_mask_frames=50"]).augment.enabled
