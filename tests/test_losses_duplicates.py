"""Duplicate-aware InfoNCE: identical captions are positives, checked against closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from clapscale.losses import ClipLoss, DuplicateAwareClipLoss, caption_groups


def _features(n, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_distinct_groups_reduce_to_clip_loss():
    a, t = _features(5)
    scale = torch.tensor(10.0)
    ours = DuplicateAwareClipLoss()(a, t, scale, torch.arange(5))
    torch.testing.assert_close(ours, ClipLoss()(a, t, scale))


def test_two_identical_captions_closed_form():
    # Three samples, 0 and 1 share a caption: rows 0 and 1 have target (1/2, 1/2, 0), row 2 (0, 0, 1).
    a, t = _features(3, seed=1)
    scale = 7.0
    loss = DuplicateAwareClipLoss()(a, t, torch.tensor(scale), torch.tensor([4, 4, 9]))

    def direction(x, y):
        total = 0.0
        for i in range(3):
            z = [scale * float(x[i] @ y[j]) for j in range(3)]
            lse = math.log(sum(math.exp(v) for v in z))
            positives = [0, 1] if i < 2 else [2]
            total += -sum((z[j] - lse) / len(positives) for j in positives)
        return total / 3

    expected = 0.5 * (direction(a, t) + direction(t, a))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # And it differs from plain InfoNCE, which calls the shared caption a negative.
    assert loss.item() != pytest.approx(ClipLoss()(a, t, torch.tensor(scale)).item(), rel=1e-3)


def test_caption_groups_are_stable_and_equal_for_equal_text():
    g = caption_groups(["wolf hit", "Wolf  hit", "horse", "wolf hit"])
    assert g.dtype == torch.long and g.shape == (4,)
    assert g[0] == g[1] == g[3] and g[0] != g[2]
    assert torch.equal(g, caption_groups(["wolf hit", "Wolf  hit", "horse", "wolf hit"]))


def test_groups_shape_is_checked():
    a, t = _features(3)
    with pytest.raises(ValueError, match="one id per sample"):
        DuplicateAwareClipLoss()(a, t, torch.tensor(1.0), torch.arange(4))
