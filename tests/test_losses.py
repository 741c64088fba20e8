"""Single-process specifications of clapscale.losses against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from clapscale.config import LossConfig
from clapscale.losses import ClipLoss, SoftLabelClipLoss, build_loss


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    t = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return a, t


def test_clip_loss_matches_open_clip():
    from open_clip.loss import ClipLoss as OpenClipLoss

    a, t = _features()
    scale = torch.tensor(12.5)
    ours = ClipLoss()(a, t, scale)
    theirs = OpenClipLoss()(a, t, scale)
    torch.testing.assert_close(ours, theirs)


def test_clip_loss_closed_form_for_orthogonal_pairs():
    # a_i == t_i one-hot: the diagonal logit is s, every other logit 0.
    n, s = 4, 3.0
    eye = torch.eye(n)
    loss = ClipLoss()(eye, eye, torch.tensor(s))
    expected = -math.log(math.exp(s) / (math.exp(s) + n - 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _soft_label_reference(a, t, s, ta, tt, temperature, beta):
    """Row-by-row loops, straight from eqs. 2-5 of the soft-label paper (softmax-normalised)."""
    n = a.shape[0]
    total = 0.0
    for student_rows, student_cols, teacher in ((a, t, ta), (t, a, tt)):
        for i in range(n):
            sim = [float(teacher[i] @ teacher[j]) / temperature for j in range(n)]
            z = sum(math.exp(v) for v in sim)
            target = [(1 - beta) * (i == j) + beta * math.exp(sim[j]) / z for j in range(n)]
            logits = [float(student_rows[i] @ student_cols[j]) * s for j in range(n)]
            lz = math.log(sum(math.exp(v) for v in logits))
            total += sum(p * (math.log(p) - (logits[j] - lz)) for j, p in enumerate(target) if p > 0)
    return total / (2 * n)


def test_soft_label_loss_matches_reference():
    a, t = _features(seed=1)
    ta, tt = _features(seed=2)
    got = SoftLabelClipLoss(beta=0.3, temperature=0.05)(a, t, torch.tensor(10.0), ta, tt)
    want = _soft_label_reference(a.double(), t.double(), 10.0, ta.double(), tt.double(), 0.05, 0.3)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_soft_label_with_beta_zero_is_infonce():
    a, t = _features(seed=3)
    ta, tt = _features(seed=4)
    s = torch.tensor(7.0)
    soft = SoftLabelClipLoss(beta=0.0)(a, t, s, ta, tt)
    torch.testing.assert_close(soft, ClipLoss()(a, t, s))


def _pair_at_cosine(c):
    """Two unit vectors at cosine ``c`` (2, 2)."""
    return torch.tensor([[1.0, 0.0], [c, math.sqrt(1.0 - c * c)]], dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5])
def test_soft_targets_closed_form(temperature):
    # Row 0 of a 2-sample batch: own cosine 1, neighbour cosine c. softmax([1, c] / T) puts
    # 1 / (1 + e^((c - 1) / T)) on itself; the hard label adds (1 - beta) there.
    c, beta = 0.9, 0.3
    x = _pair_at_cosine(c)
    loss = SoftLabelClipLoss(beta=beta, temperature=temperature)
    target = loss.targets(x @ x.T, torch.arange(2))
    neighbour = math.exp((c - 1.0) / temperature) / (1.0 + math.exp((c - 1.0) / temperature))
    want = torch.tensor([[1.0 - beta * neighbour, beta * neighbour],
                         [beta * neighbour, 1.0 - beta * neighbour]], dtype=torch.float32)
    torch.testing.assert_close(target, want, rtol=1e-6, atol=1e-7)


def test_soft_targets_keep_neighbours_of_a_trained_teacher():
    # A trained teacher's learned scale sits at its clamp, 100: softmaxing its cosines at that
    # scale gave a neighbour at cosine 0.9 the weight e^-10 (the targets were one-hot). The
    # targets' own default temperature keeps it a real share of the soft label.
    default = LossConfig().soft_label_temperature
    x = _pair_at_cosine(0.9)
    neighbour = SoftLabelClipLoss(beta=1.0, temperature=default).targets(x @ x.T, torch.arange(2))[0, 1]
    at_teacher_scale = SoftLabelClipLoss(beta=1.0, temperature=1 / 100).targets(x @ x.T, torch.arange(2))[0, 1]
    assert at_teacher_scale < 1e-4
    assert neighbour > 0.1


def test_soft_label_temperature_is_validated():
    from clapscale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.soft_label_temperature"):
        load_config(None, ["loss.soft_label_temperature=0"])
    with pytest.raises(ValueError, match="temperature"):
        SoftLabelClipLoss(temperature=-1.0)


def test_local_loss_without_grad_gather_is_refused():
    with pytest.raises(ValueError, match="silently wrong gradient"):
        ClipLoss(rank=0, world_size=2, local_loss=True, gather_with_grad=False)
    with pytest.raises(ValueError, match="gather_with_grad"):
        from clapscale.config import ConfigError, load_config

        try:
            load_config(None, ["loss.local_loss=true", "loss.gather_with_grad=false"])
        except ConfigError as e:
            raise ValueError(str(e)) from e


def test_build_loss_from_config():
    assert isinstance(build_loss(LossConfig(kind="infonce")), ClipLoss)
    soft = build_loss(LossConfig(kind="soft_label", soft_label_beta=0.25, soft_label_temperature=0.07))
    assert isinstance(soft, SoftLabelClipLoss) and soft.beta == 0.25 and soft.temperature == 0.07


def test_mismatched_shapes_name_both():
    a, t = _features()
    with pytest.raises(ValueError, match=r"\(6, 8\) and \(5, 8\)"):
        ClipLoss()(a, t[:5], torch.tensor(1.0))
