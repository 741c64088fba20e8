"""``train.init_from``: a run starts from another run's weights with a fresh optimizer and schedule.

- in-process: ``init_weights_from`` copies an exported model's weights exactly, and refuses one of
  another shape (naming the tensor) or a path that does not exist, as one-line user errors;
- a real DeepSpeed trainer (1 spawned CPU process): run A trains 2 steps; run B with
  ``train.init_from`` = A's trainer checkpoint starts at step 0 with A's weights, no optimizer
  state and the LR schedule at its first step; after B saved a checkpoint of its own, restarting B
  (``train.resume=auto``) resumes B, not A's weights.
"""

from __future__ import annotations

import pytest
import torch

from clapscale.config import load_config
from clapscale.errors import UserError
from clapscale.models import CheckpointMismatchError, build_model, save_model
from clapscale.models.loading import init_weights_from


def _cfg(text_dir, *extra):
    return load_config("configs/tiny.yaml", [
        f"model.text.path={text_dir}", "model.text.pretrained=false", "model.embed_dim=32", *extra,
    ])


def test_init_weights_from_an_export_copies_every_tensor_and_refuses_another_shape(tmp_path):
    from test_inference import _tiny_text_dir

    text = _tiny_text_dir(tmp_path / "text")
    cfg = _cfg(text)
    torch.manual_seed(1)
    source = build_model(cfg)
    save_model(source, cfg, tmp_path / "a")
    torch.manual_seed(2)
    target = build_model(cfg)
    assert not torch.equal(target.audio_projection.linear1.weight, source.audio_projection.linear1.weight)
    init_weights_from(target, tmp_path / "a")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k

    other = build_model(_cfg(text, "model.embed_dim=16"))
    with pytest.raises(CheckpointMismatchError, match=r"train.init_from.*audio_projection.linear1.weight"):
        init_weights_from(other, tmp_path / "a")
    with pytest.raises(UserError, match="train.init_from"):
        init_weights_from(other, tmp_path / "missing")


def _two_stage(rank: int, root: str, out: str) -> None:
    """Spawned (1 process): run A, then run B initialised from A's checkpoint, then B restarted."""
    from pathlib import Path

    from clapscale.shards.synthetic import generate
    from clapscale.shards.writer import write_shards
    from clapscale.train.distributed import DistEnv
    from clapscale.train.engine import current_lr, warmup_cosine_of
    from clapscale.train.loop import Trainer

    torch.set_num_threads(1)
    root = Path(root)
    write_shards(generate("train", 16, seed=3), root / "shards", "train", shard_size=8)
    denv = DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single")
    common = [f"data.train={root}/shards/train/{{000000..000001}}.tar", "data.val=", "data.workers=0",
              "data.batch_size=4", f"train.out_dir={root}/runs", "train.steps=2", "train.checkpoint_every=2",
              "train.eval_every=-1", "optim.warmup_steps=5"]
    text = root / "text"

    def state(trainer):
        return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}

    a = Trainer(_cfg(text, *common, "train.name=a"), denv)
    a.train()
    found = {"a": state(a)}
    a_ckpt = root / "runs" / "a" / "checkpoints" / "step_00000002"

    cfg_b = _cfg(text, *common, "train.name=b", f"train.init_from={a_ckpt}")
    b = Trainer(cfg_b, denv).setup()
    found["b_start"] = state(b)
    found["b_step"] = b.step
    found["b_opt_state"] = sum(len(s) for s in b.engine.optimizer.optimizer.state.values())
    found["b_lr"] = current_lr(b.engine)
    found["lr_at_0"] = warmup_cosine_of(cfg_b)(0) * cfg_b.optim.lr
    found["a_opt_state"] = sum(len(s) for s in a.engine.optimizer.optimizer.state.values())
    b.train()
    found["b_end"] = state(b)

    again = Trainer(cfg_b, denv).setup()
    found["again_step"] = again.step
    found["again"] = state(again)
    torch.save(found, out)


@pytest.mark.slow
def test_trainer_init_from_checkpoint_fresh_optimizer_and_resume_wins(tmp_path):
    import torch.multiprocessing as mp
    from test_inference import _tiny_text_dir

    _tiny_text_dir(tmp_path / "text")
    mp.spawn(_two_stage, args=(str(tmp_path), str(tmp_path / "found.pt")), nprocs=1, join=True)
    found = torch.load(tmp_path / "found.pt", weights_only=False)

    assert found["b_step"] == 0
    for k, v in found["a"].items():
        assert torch.equal(found["b_start"][k], v), k
    assert found["a_opt_state"] > 0 and found["b_opt_state"] == 0
    assert found["b_lr"] == pytest.approx(found["lr_at_0"]) and found["b_lr"] < 5e-4
    # Resume of B's own checkpoint wins over init_from.
    assert found["again_step"] == 2
    for k, v in found["b_end"].items():
        assert torch.equal(found["again"][k], v), k
    assert not torch.equal(found["again"]["audio_projection.linear1.weight"], found["a"]["audio_projection.linear1.weight"])
