"""Pairwise (tri-modal / bi-bi-modal) InfoNCE: single-process specifications, and two gloo processes
whose loss and every parameter gradient equal a single-process computation over the global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clapscale.config import ConfigError, LossConfig
from clapscale.losses import ClipLoss, PairwiseInfoNCE, build_loss, pair_name
from test_losses_dist import run_gloo_workers

WORLD = 2
B = 3  # per rank
D_IN, D = 5, 4
MODALITIES = ("audio", "image", "text")


class _ThreeTower(nn.Module):
    """Projection heads for three modalities + one log-temperature per pair."""

    def __init__(self, frozen=()):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleDict({m: nn.Linear(D_IN, D) for m in MODALITIES})
        self.log_scales = nn.ParameterDict(
            {p.replace("-", "_"): nn.Parameter(torch.tensor(2.0 + i / 4)) for i, p in enumerate(PAIRS)}
        )
        for m in frozen:
            self.heads[m].requires_grad_(False)

    def forward(self, inputs):
        feats = {m: F.normalize(self.heads[m](x), dim=-1) for m, x in inputs.items()}
        return feats, {p: self.log_scales[p.replace("-", "_")].exp() for p in PAIRS}


PAIRS = ("audio-image", "audio-text", "image-text")

# name -> (pair weights, frozen heads, one shared scale?, loss kwargs)
CASES = {
    "audioclip_local": ({"audio-text": 1.0, "audio-image": 0.5, "image-text": 2.0}, (), False, {}),
    "audioclip_full_grad": ({"audio-text": 1.0, "audio-image": 0.5, "image-text": 2.0}, (), False,
                            dict(local_loss=False)),
    "audioclip_full_nograd": ({"audio-text": 1.0, "audio-image": 0.5, "image-text": 2.0}, (), False,
                              dict(local_loss=False, gather_with_grad=False)),
    "vipant_local": ({"audio-image": 1.0, "image-text": 1.0}, ("image", "text"), True, {}),
    "clap_local": ({"audio-text": 1.0}, (), True, {}),
}


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(B * WORLD, D_IN, generator=g) for m in MODALITIES}


def _run(case, inputs, rank, world_size):
    weights, frozen, shared, kwargs = CASES[case]
    model = _ThreeTower(frozen)
    feats, scales = model(inputs)
    loss_fn = PairwiseInfoNCE(weights, rank=rank, world_size=world_size, **kwargs)
    loss = loss_fn(feats, scales["audio-image"] if shared else scales)
    return model, loss


def _reference_loss(case, inputs):
    """Straight from the definition, no clapscale code: sum_p w_p * (CE(rows) + CE(cols)) / 2 over
    the full global similarity matrix of each pair."""
    weights, frozen, shared, _ = CASES[case]
    model = _ThreeTower(frozen)
    feats, scales = model(inputs)
    n = next(iter(inputs.values())).shape[0]
    labels = torch.arange(n)
    total = torch.zeros(())
    for name, w in weights.items():
        first, second = name.split("-")
        s = scales["audio-image"] if shared else scales[name]
        logits = s * feats[first] @ feats[second].T
        total = total + w * 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return model, total


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        batch = _global_batch()
        mine = {m: x[rank * B:(rank + 1) * B] for m, x in batch.items()}
        results = {}
        for case in CASES:
            ref_model, ref = _run(case, batch, 0, 1)
            ref.backward()
            indep_model, indep = _reference_loss(case, batch)
            indep.backward()

            model, loss = _run(case, mine, rank, WORLD)
            loss.backward()
            # What DeepSpeed / DDP do: average the reported loss and the gradients over ranks.
            report = loss.detach().clone()
            dist.all_reduce(report)
            report /= WORLD
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            results[case] = dict(
                ref=(ref.detach(), _grads(ref_model)),
                indep=(indep.detach(), _grads(indep_model)),
                dist=(report, _grads(model)),
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_gloo_workers(_worker, tmp_path_factory.mktemp("trimodal_loss_dist"), WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_pairwise_loss_and_gradients_equal_single_process(results, case):
    weights, frozen, shared, _ = CASES[case]
    for rank_results in results:
        r = rank_results[case]
        ref_loss, ref_grads = r["ref"]
        for other in ("indep", "dist"):
            loss, grads = r[other]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{other} loss")
            assert set(grads) == set(ref_grads), other
            for name in ref_grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                           msg=f"{other}: {name}")
        # Frozen towers get no gradient; every trained head and every used temperature does.
        trained = {f"heads.{m}.weight" for m in MODALITIES if m not in frozen
                   and any(m in p for p in weights)}
        assert trained <= set(ref_grads)
        assert not any(n.startswith(tuple(f"heads.{m}." for m in frozen)) for n in ref_grads)


# ---------------------------------------------------------------------------- single process


def _unit(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: F.normalize(torch.randn(n, d, generator=g), dim=-1) for m in MODALITIES}


def test_audio_text_pair_alone_is_the_clap_loss():
    f = _unit()
    s = torch.tensor(7.0)
    torch.testing.assert_close(PairwiseInfoNCE({"text-audio": 1.0})(f, s), ClipLoss()(f["audio"], f["text"], s))


def test_weighted_sum_of_pair_losses_and_terms_reported():
    f = _unit()
    s = {"audio-text": torch.tensor(3.0), "audio-image": torch.tensor(5.0), "image-text": torch.tensor(9.0)}
    loss_fn = PairwiseInfoNCE({"audio-text": 0.25, "image-audio": 2.0, "image-text": 1.0})
    loss = loss_fn(f, s)
    expected = {
        "audio-text": ClipLoss()(f["audio"], f["text"], s["audio-text"]),
        "audio-image": ClipLoss()(f["audio"], f["image"], s["audio-image"]),
        "image-text": ClipLoss()(f["image"], f["text"], s["image-text"]),
    }
    torch.testing.assert_close(loss, 0.25 * expected["audio-text"] + 2.0 * expected["audio-image"]
                               + expected["image-text"])
    assert set(loss_fn.last_terms) == set(expected)
    for name, term in expected.items():
        torch.testing.assert_close(loss_fn.last_terms[name], term)


def test_bi_bi_modal_loss_needs_no_text_audio_pairs_and_trains_audio_only():
    """VIP-ANT: with image and text frozen, only the audio features receive a gradient."""
    f = _unit()
    audio = f["audio"].clone().requires_grad_(True)
    loss = PairwiseInfoNCE({"audio-image": 1.0, "image-text": 1.0})(
        {"audio": audio, "image": f["image"], "text": f["text"]}, torch.tensor(10.0)
    )
    loss.backward()
    assert audio.grad is not None and audio.grad.abs().sum() > 0


def test_pair_names_and_bad_pairs():
    assert pair_name("text", "audio") == "audio-text"
    assert pair_name("image", "audio") == "audio-image"
    with pytest.raises(ValueError, match="'video' is not one of"):
        PairwiseInfoNCE({"audio-video": 1.0})
    with pytest.raises(ValueError, match="two different modalities"):
        PairwiseInfoNCE({"audio-audio": 1.0})
    with pytest.raises(ValueError, match="given twice"):
        PairwiseInfoNCE({"audio-text": 1.0, "text-audio": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        PairwiseInfoNCE({})
    with pytest.raises(ValueError, match="missing image"):
        PairwiseInfoNCE({"audio-image": 1.0})({"audio": _unit()["audio"]}, torch.tensor(1.0))


def test_build_loss_from_config_and_config_errors():
    cfg = LossConfig(kind="pairwise", weight_audio_text=0.0, weight_audio_image=1.0, weight_image_text=0.5)
    cfg.validate("loss")
    loss_fn = build_loss(cfg)
    assert isinstance(loss_fn, PairwiseInfoNCE)
    assert loss_fn.pairs == {"audio-image": 1.0, "image-text": 0.5}
    with pytest.raises(ConfigError, match="every loss.weight_"):
        LossConfig(kind="pairwise", weight_audio_text=0.0).validate("loss")
    with pytest.raises(ConfigError, match="loss.weight_audio_image must be >= 0"):
        LossConfig(kind="pairwise", weight_audio_image=-1.0).validate("loss")
