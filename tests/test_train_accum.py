"""Gradient accumulation that keeps every negative: GradCache equals the one-graph computation,
with plain autograd and under the real DeepSpeed engine (1 process, ZeRO 0 / 1; 2 gloo ranks, ZeRO-2)."""

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clapscale.losses import ClipLoss, SoftLabelClipLoss
from clapscale.train.gradcache import accumulated_backward
from test_inference import _tiny_text_dir


class _Towers(nn.Module):
    """Two towers with dropout, so replaying each micro-batch's RNG state matters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
        self.text = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Linear(16, 4))
        self.logit_scale = nn.Parameter(torch.tensor([2.5]))

    def forward(self, inputs):
        xa, xt = inputs
        return F.normalize(self.audio(xa), dim=-1), F.normalize(self.text(xt), dim=-1), self.logit_scale.exp()


def _as_rows(out):
    audio, text, scale = out
    return {"audio": audio, "text": text}, {"scale": scale}


def _micro_batches(a_count=3, b=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 6, generator=g), torch.randn(b, 5, generator=g)) for _ in range(a_count)]


def _check(loss_fn):
    micro = _micro_batches()

    # Reference: one graph over all micro-batches, forwarded in the same order from the same RNG state.
    ref = _Towers().train()
    torch.manual_seed(123)
    outs = [ref(x) for x in micro]
    ref_loss = loss_fn(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    ref_loss.backward()
    after_ref = torch.rand(1)

    model = _Towers().train()
    torch.manual_seed(123)
    calls = []
    loss, finite = accumulated_backward(
        micro, lambda x: _as_rows(model(x)), lambda r, s: loss_fn(r["audio"], r["text"], s["scale"]),
        lambda s: (calls.append(s.detach()), s.backward()), lambda l: bool(torch.isfinite(l)),
    )
    assert finite and len(calls) == len(micro)
    torch.testing.assert_close(loss, ref_loss.detach())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # The generator ends where the reference left it: later steps draw the same numbers.
    assert torch.equal(torch.rand(1), after_ref)


def test_gradcache_matches_single_graph_infonce():
    _check(ClipLoss())


def test_gradcache_matches_single_graph_soft_label():
    teacher = _Towers().eval()
    micro = _micro_batches()
    with torch.no_grad():
        ta = torch.cat([teacher(x)[0] for x in micro])
        tt = torch.cat([teacher(x)[1] for x in micro])
    soft = SoftLabelClipLoss(beta=0.3, temperature=0.1)
    _check(lambda a, t, s: soft(a, t, s, ta, tt))


class _ThreeTowers(nn.Module):
    """Audio, image and text towers with dropout and a temperature per pair; the text tower frozen
    (VIP-ANT's pivot: its rows carry no gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
        self.image = nn.Sequential(nn.Linear(7, 16), nn.Dropout(0.3), nn.Linear(16, 4))
        self.text = nn.Linear(5, 4).requires_grad_(False)
        self.log_scales = nn.Parameter(torch.tensor([2.5, 2.0, 1.5]))

    def forward(self, inputs):
        xa, xi, xt = inputs
        feats = {"audio": F.normalize(self.audio(xa), dim=-1), "image": F.normalize(self.image(xi), dim=-1),
                 "text": F.normalize(self.text(xt), dim=-1)}
        return feats, dict(zip(("audio-text", "audio-image", "image-text"), self.log_scales.exp()))


@pytest.mark.parametrize("pairs, frozen", [({"audio-text": 1.0, "audio-image": 0.5, "image-text": 2.0}, frozenset()),
                                           ({"audio-image": 1.0, "image-text": 1.0}, frozenset({"text"}))])
def test_gradcache_matches_single_graph_pairwise(pairs, frozen):
    """AudioCLIP's three pairs and VIP-ANT's two with a frozen tower: accumulation scores every
    micro-batch's rows against all others, as one graph over the whole batch does."""
    from clapscale.losses import PairwiseInfoNCE

    g = torch.Generator().manual_seed(1)
    micro = [(torch.randn(4, 6, generator=g), torch.randn(4, 7, generator=g), torch.randn(4, 5, generator=g))
             for _ in range(3)]
    loss_fn = PairwiseInfoNCE(pairs)
    ref = _ThreeTowers().train()
    torch.manual_seed(123)
    outs = [ref(x) for x in micro]
    ref_loss = loss_fn({k: torch.cat([o[0][k] for o in outs]) for k in outs[0][0]}, outs[0][1])
    ref_loss.backward()
    model = _ThreeTowers().train()
    torch.manual_seed(123)
    graded = []

    def loss_of(feats, scales):
        graded.append({k for k, v in feats.items() if v.requires_grad})
        return loss_fn(feats, scales)

    loss, finite = accumulated_backward(micro, model, loss_of, lambda s: s.backward(), lambda l: bool(torch.isfinite(l)),
                                        frozen=frozen)
    assert finite and graded == [{"audio", "image", "text"} - frozen]  # a frozen tower's rows are constants
    torch.testing.assert_close(loss, ref_loss.detach())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert model.log_scales.grad is not None and model.image[0].weight.grad.abs().sum() > 0
    # Declaring a trained modality frozen would drop its gradient: refused.
    with pytest.raises(ValueError, match=r"\['image'\] were declared frozen"):
        accumulated_backward(micro, model, loss_of, lambda s: s.backward(), lambda l: bool(torch.isfinite(l)),
                             frozen=frozen | {"image"})


def test_nonfinite_loss_back_propagates_nothing():
    model = _Towers()
    calls = []
    loss, finite = accumulated_backward(
        _micro_batches(), lambda x: _as_rows(model(x)), lambda r, s: (r["audio"] * float("nan")).sum(), calls.append,
        lambda l: bool(torch.isfinite(l)),
    )
    assert not finite and not calls and torch.isnan(loss)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Under the real DeepSpeed engine: train.grad_accum=2 with data.batch_size=b makes the same
# update as grad_accum=1 with batch 2b (and as one process with the whole global batch).
#
# Adam is nearly blind to a constant gradient factor (its first update is ~lr * sign(g)): halving
# every gradient (DeepSpeed dividing by gradient_accumulation_steps once more) moves the parameters
# after two steps by at most ~3e-4 here. So every parameter's gradient is compared at each
# optimizer step, before AdamW consumes it, with the logged grad norm, the loss, and the
# parameters after both steps. The audio tower is frozen (its BatchNorm stays in eval mode, so
# the micro-batch size cannot change its output); the text tower and projections train.

GLOBAL_ROWS = 8  # samples per optimizer step, over all ranks and micro-batches
ENGINE_STEPS = 2
TOKENS = 12
PICTURE = 16  # data.image_size of the pairwise runs


def _engine_text_dir(path):
    # Dropout off: the runs compared draw their masks over different batch shapes.
    text = _tiny_text_dir(path)
    config = json.loads((text / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (text / "config.json").write_text(json.dumps(config))
    return text


def _engine_data(clip_samples):
    """The same global batches for every run: ``ENGINE_STEPS`` x ``GLOBAL_ROWS`` samples."""
    g = torch.Generator().manual_seed(3)
    steps = []
    for _ in range(ENGINE_STEPS):
        ids = torch.randint(1000, 20000, (GLOBAL_ROWS, TOKENS), generator=g)
        lengths = torch.randint(4, TOKENS + 1, (GLOBAL_ROWS,), generator=g)
        mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).long()
        ids[:, 0] = 101  # [CLS]
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        steps.append({
            "waveform": 0.1 * torch.randn(GLOBAL_ROWS, clip_samples, generator=g),
            "is_longer": torch.zeros(GLOBAL_ROWS, dtype=torch.bool),
            "input_ids": ids,
            "attention_mask": mask,
            # Repeated captions (within and across the halves that micro-batches / ranks take),
            # read only by loss.kind=duplicate_aware.
            "texts": ["wolf hit", "horse", "wolf hit", "rain", "door", "horse", "bell", "wolf hit"],
            "image": torch.randn(GLOBAL_ROWS, 3, PICTURE, PICTURE, generator=g),  # loss.kind=pairwise only
        })
    return steps


def _engine_worker(rank, world, port, cfg, runs, out_dir):
    """Train each run of ``runs`` (name -> (zero_stage, grad_accum, loss kind)) ``ENGINE_STEPS`` steps on fixed batches."""
    from deepspeed.utils import safe_get_full_grad

    from clapscale.train.distributed import DistEnv
    from clapscale.train.engine import full_fp32_state_dict
    from clapscale.train.loop import Trainer

    torch.set_num_threads(1)
    denv = DistEnv(rank, rank, world, world, "127.0.0.1", port if world > 1 else 0, "torchrun")
    data = _engine_data(cfg.audio.clip_samples)
    per_rank = GLOBAL_ROWS // world
    results = {}
    for name, (zero_stage, accum, loss_kind) in runs.items():
        run_cfg = dataclasses.replace(
            cfg,
            loss=dataclasses.replace(cfg.loss, kind=loss_kind),
            data=dataclasses.replace(cfg.data, batch_size=per_rank // accum),
            train=dataclasses.replace(cfg.train, grad_accum=accum, zero_stage=zero_stage, name=name),
        )
        if loss_kind == "pairwise":  # AudioCLIP: a CPU-sized CLIP image tower and all three pairs
            run_cfg = dataclasses.replace(
                run_cfg,
                model=dataclasses.replace(cfg.model, image=dataclasses.replace(cfg.model.image, name="clip", size="tiny")),
                data=dataclasses.replace(run_cfg.data, image_size=PICTURE),
                loss=dataclasses.replace(run_cfg.loss, weight_audio_text=1.0, weight_audio_image=0.5,
                                         weight_image_text=2.0),
            )
        trainer = Trainer(run_cfg, denv).setup()
        engine = trainer.engine
        engine.train()
        grads, engine_step = [], trainer._engine_step

        def recording_step(engine=engine, grads=grads, engine_step=engine_step):
            if engine.is_gradient_accumulation_boundary():
                # The reduced, accumulated gradient the optimizer is about to use (collective under ZeRO-3).
                grads.append({n: safe_get_full_grad(p).detach().float().clone().reshape(-1)
                              for n, p in engine.module.named_parameters() if p.requires_grad})
            engine_step()

        trainer._engine_step = recording_step
        seen_groups = []
        if loss_kind == "duplicate_aware":  # record the caption groups the trainer hands the loss
            loss_forward = trainer.loss_fn.forward
            trainer.loss_fn.forward = lambda a, t, s, g, f=loss_forward: (seen_groups.append(g.clone()), f(a, t, s, g))[1]
        losses, norms = [], []
        for batch in data:
            mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()
                    if k != "image" or loss_kind == "pairwise"}
            micro = [{k: v[m * run_cfg.data.batch_size:(m + 1) * run_cfg.data.batch_size] for k, v in mine.items()}
                     for m in range(accum)]
            loss, finite = trainer._step(micro)
            assert finite
            losses.append(trainer._mean_over_ranks(loss))
            norms.append(trainer._global_grad_norm())
        assert engine.global_steps == ENGINE_STEPS, (name, engine.global_steps)
        results[name] = {"losses": losses, "grad_norms": norms, "grads": grads, "groups": seen_groups,
                         "params": full_fp32_state_dict(engine)}
        trainer.log.close()
    torch.save(results, os.path.join(out_dir, f"{world}_{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine_cfg(tmp_path_factory):
    from clapscale.config import load_config

    from clapscale.shards.synthetic import generate
    from clapscale.shards.writer import write_shards

    root = tmp_path_factory.mktemp("accum_engine")
    # Trainer.setup builds its loader over real shards; the steps below are fed fixed tensors instead.
    write_shards(generate("train", GLOBAL_ROWS, seed=0), root / "shards", "train", shard_size=GLOBAL_ROWS)
    return load_config("configs/tiny.yaml", [
        f"model.text.path={_engine_text_dir(root / 'text')}", "model.text.pretrained=false",
        "model.embed_dim=32", "model.audio.frozen=true",  # frozen: BatchNorm in eval mode
        "audio.clip_seconds=1", "audio.max_seconds=1",
        f"data.train={root / 'shards' / 'train' / '000000.tar'}", "data.val=", "data.workers=0",
        "optim.lr=1e-3", "optim.warmup_steps=0", "optim.grad_clip=1e9", f"train.out_dir={root / 'runs'}",
        "train.steps=10",
    ]), root


_ENGINE_RESULTS = {}


# One spawn per world size (process start-up and imports dominate): ZeRO 0 and 1 on one process,
# ZeRO-2 on two ranks; each with grad_accum 1 and 2.
_ENGINE_STAGES = {1: (0, 1), 2: (2,)}


def _engine_runs(cfg, root, world):
    """Rank 0's results, ``{"z<stage>_a<accum>": ...}``, of every run on ``world`` gloo ranks; cached."""
    if world not in _ENGINE_RESULTS:
        out = root / f"out_w{world}"
        out.mkdir()
        runs = {f"z{z}_a{a}": (z, a, "infonce") for z in _ENGINE_STAGES[world] for a in (1, 2)}
        if world == 1:
            runs.update({f"dup_a{a}": (1, a, "duplicate_aware") for a in (1, 2)})
            runs.update({f"pair_a{a}": (1, a, "pairwise") for a in (1, 2)})
        mp.spawn(_engine_worker, args=(world, _free_port(), cfg, runs, str(out)), nprocs=world, join=True)
        _ENGINE_RESULTS[world] = torch.load(out / f"{world}_0.pt", weights_only=False)
    return _ENGINE_RESULTS[world]


def _assert_same_update(got, want, what):
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5), what
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=1e-4), what
    assert len(got["grads"]) == len(want["grads"]) == ENGINE_STEPS, what
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert sorted(g) == sorted(w), what
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, step=step: f"{what} step {step} grad {name}: {m}")
    for name, p in want["params"].items():
        got_p = got["params"][name]
        if name in want["grads"][0]:
            # An element whose true gradient is zero (an attention key's bias: softmax ignores a
            # per-query constant) gets rounding noise (~1e-8 here), and Adam's first step turns noise of
            # any size into +-lr: such elements are left out (their gradients were compared above).
            live = torch.stack([w[name] for w in want["grads"]]).abs().amax(0).reshape(p.shape) > 1e-7
            got_p, p = got_p[live], p[live]
        torch.testing.assert_close(got_p, p, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{what} param {name}: {m}")


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_engine_accumulation_equals_one_big_batch(engine_cfg, zero_stage):
    cfg, root = engine_cfg
    res = _engine_runs(cfg, root, 1)
    want = res[f"z{zero_stage}_a1"]
    # The step moved the trainable parameters (projections, text tower, temperature): an update happened.
    assert want["params"]["logit_scale"] != pytest.approx(float(torch.log(torch.tensor(1 / 0.07))), abs=1e-4)
    assert "audio_projection.linear1.weight" in want["grads"][0]
    assert not any(n.startswith("audio_tower.") for n in want["grads"][0])
    _assert_same_update(res[f"z{zero_stage}_a2"], want, f"zero {zero_stage}, grad_accum=2 vs 1")


def test_engine_duplicate_aware_loss_reads_the_batch_captions(engine_cfg):
    # loss.kind=duplicate_aware through the trainer's own step: the captions reach the loss in row
    # order, whole accumulated batch at once, and accumulation over 2 micro-batches makes the same
    # update as one batch.
    from clapscale.losses import caption_groups

    cfg, root = engine_cfg
    res = _engine_runs(cfg, root, 1)
    texts = _engine_data(cfg.audio.clip_samples)[0]["texts"]
    for run in ("dup_a1", "dup_a2"):
        assert len(res[run]["groups"]) == ENGINE_STEPS
        for groups in res[run]["groups"]:
            assert torch.equal(groups, caption_groups(texts))
    _assert_same_update(res["dup_a2"], res["dup_a1"], "duplicate_aware, grad_accum=2 vs 1")


@pytest.mark.slow
def test_engine_accumulation_on_two_ranks_equals_one_process(engine_cfg):
    # ZeRO-2 over 2 gloo ranks: gradients partitioned and reduced across ranks, each rank's
    # micro-batches a quarter of the global batch; the loss gathers every rank's features.
    cfg, root = engine_cfg
    want = _engine_runs(cfg, root, 1)["z1_a1"]
    two = _engine_runs(cfg, root, 2)
    _assert_same_update(two["z2_a1"], want, "2 ranks, zero 2, grad_accum=1 vs 1 process, batch 8")
    _assert_same_update(two["z2_a2"], want, "2 ranks, zero 2, grad_accum=2 vs 1 process, batch 8")


def test_engine_pairwise_accumulation_equals_one_big_batch(engine_cfg):
    # loss.kind=pairwise (AudioCLIP's three pairs, an image tower) through the trainer's own step:
    # grad_accum=2 makes the same update as one batch of twice the size, image tower included.
    cfg, root = engine_cfg
    res = _engine_runs(cfg, root, 1)
    want = res["pair_a1"]
    assert any(n.startswith("image_tower.") for n in want["grads"][0])
    assert {"log_scale_audio_image", "log_scale_image_text"} <= set(want["grads"][0])
    _assert_same_update(res["pair_a2"], want, "pairwise, grad_accum=2 vs 1")
