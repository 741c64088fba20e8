"""Two gloo processes: the distributed loss and every parameter gradient equal a single-process
computation over the same global batch (and open_clip's loss agrees)."""

import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clapscale.losses import ClipLoss, DuplicateAwareClipLoss, SoftLabelClipLoss, gather_features

WORLD = 2
B = 3  # per rank
D_IN, D = 5, 4


class _TwoTower(nn.Module):
    """Projection heads + temperature: enough parameters to check every gradient path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Linear(D_IN, D)
        self.text = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, xa, xt):
        return (
            F.normalize(self.audio(xa), dim=-1),
            F.normalize(self.text(xt), dim=-1),
            self.logit_scale.exp(),
        )


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B * WORLD, D_IN, generator=g) for _ in range(4)]


CASES = {
    "infonce_local": lambda **kw: ClipLoss(local_loss=True, gather_with_grad=True, **kw),
    "infonce_full_grad": lambda **kw: ClipLoss(local_loss=False, gather_with_grad=True, **kw),
    "infonce_full_nograd": lambda **kw: ClipLoss(local_loss=False, gather_with_grad=False, **kw),
    "soft_label_local": lambda **kw: SoftLabelClipLoss(beta=0.3, temperature=0.2, **kw),
    "duplicate_aware_local": lambda **kw: DuplicateAwareClipLoss(**kw),
}
# Caption groups of the global batch for the duplicate-aware case: duplicates within a rank
# (samples 0 and 2) and across ranks (1 and 4).
GROUPS = torch.tensor([7, 5, 7, 2, 5, 9])


def _run(model, loss_fn, xa, xt, ta, tt, groups=GROUPS):
    a, t, s = model(xa, xt)
    if isinstance(loss_fn, DuplicateAwareClipLoss):
        return loss_fn(a, t, s, groups)
    if isinstance(loss_fn, SoftLabelClipLoss):
        teacher = F.normalize(ta, dim=-1)[:, :D], F.normalize(tt, dim=-1)[:, :D]
        return loss_fn(a, t, s, F.normalize(teacher[0], dim=-1), F.normalize(teacher[1], dim=-1))
    return loss_fn(a, t, s)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _warn_probe():
    warnings.warn(_PROBE, UserWarning)


_PROBE = "probe: a warning shown once per location"


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        xa, xt, ta, tt = _global_batch()
        mine = slice(rank * B, (rank + 1) * B)
        results = {}
        for name, make in CASES.items():
            ref_model = _TwoTower()
            ref = _run(ref_model, make(rank=0, world_size=1), xa, xt, ta, tt)
            ref.backward()

            model = _TwoTower()
            loss = _run(model, make(rank=rank, world_size=WORLD), xa[mine], xt[mine], ta[mine], tt[mine], GROUPS[mine])
            loss.backward()
            # What DeepSpeed / DDP do: average the loss report and the gradients over ranks.
            report = loss.detach().clone()
            dist.all_reduce(report)
            report /= WORLD
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            results[name] = (ref.detach(), _grads(ref_model), report, _grads(model))

        # open_clip, the peer library, in its recommended distributed setting.
        from open_clip.loss import ClipLoss as OpenClipLoss

        model = _TwoTower()
        oc = _run(model, OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD),
                  xa[mine], xt[mine], ta, tt)
        mine_ours = _run(_TwoTower(), ClipLoss(rank=rank, world_size=WORLD), xa[mine], xt[mine], ta, tt)
        results["open_clip"] = (oc.detach(), mine_ours.detach())

        # The trap the loss refuses: local rows + a gather without gradient.
        model = _TwoTower()
        a, t, s = model(xa[mine], xt[mine])
        all_a = gather_features(a, rank, WORLD, with_grad=False)
        all_t = gather_features(t, rank, WORLD, with_grad=False)
        rows = torch.arange(B) + B * rank
        wrong = 0.5 * (F.cross_entropy(s * a @ all_t.T, rows) + F.cross_entropy(s * t @ all_a.T, rows))
        wrong.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        results["trap"] = _grads(model)

        # Under the default warning filters (this is a fresh interpreter), torch's deprecation notice
        # for the gradient-carrying all_gather is not printed by every rank, and a gathered forward
        # leaves the process's other warnings alone: one shown once per location stays shown once.
        with warnings.catch_warnings(record=True) as caught:
            _warn_probe()
            gather_features(torch.ones(B, D, requires_grad=True), rank, WORLD, with_grad=True)
            _warn_probe()
        results["warnings"] = [str(w.message) for w in caught]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(worker, out, world: int, timeout: float = 120) -> list:
    """Spawn ``worker(rank, port, out_dir)`` on ``world`` processes (bounded) and load each rank's
    ``rank{r}.pt``; shared by the loss tests that compare gloo ranks with one process."""
    ctx = mp.start_processes(worker, args=(_free_port(), str(out)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo loss workers did not finish within {timeout:g} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_gloo_workers(_worker, tmp_path_factory.mktemp("loss_dist"), WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_loss_and_gradients_equal_single_process(results, case):
    for rank_results in results:
        ref_loss, ref_grads, loss, grads = rank_results[case]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert set(grads) == {"audio.weight", "audio.bias", "text.weight", "text.bias", "logit_scale"}
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_rank_loss_matches_open_clip(results):
    for rank_results in results:
        theirs, ours = rank_results["open_clip"]
        torch.testing.assert_close(ours, theirs)


@pytest.mark.slow
def test_local_loss_without_grad_gather_gives_wrong_gradient(results):
    _, ref_grads, _, _ = results[0]["infonce_local"]
    trap = results[0]["trap"]
    assert not torch.allclose(trap["audio.weight"], ref_grads["audio.weight"], rtol=1e-3)


@pytest.mark.slow
def test_gradient_carrying_gather_prints_no_deprecation_warning(results):
    for rank_results in results:
        assert not any("all_gather" in w for w in rank_results["warnings"]), rank_results["warnings"]


@pytest.mark.slow
def test_gathered_forward_does_not_reprint_other_warnings(results):
    """A gathered forward changes no warning state that makes a once-per-location warning show again
    (a ``catch_warnings`` per forward did: every step re-printed the process's warnings)."""
    for rank_results in results:
        assert rank_results["warnings"] == [_PROBE], rank_results["warnings"]
