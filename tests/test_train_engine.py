"""DeepSpeed config and optimizer groups built from our config (no process group needed)."""

import pytest
import torch

from clapscale.config import ConfigError, load_config
from clapscale.train.engine import check_precision, deepspeed_config, param_groups


def test_deepspeed_config_follows_ours():
    cfg = load_config("configs/tiny.yaml", [
        "data.batch_size=6", "train.grad_accum=3", "train.zero_stage=2", "train.precision=bf16",
        "optim.grad_clip=0.5",
    ])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5


def test_no_weight_decay_on_norms_biases_and_temperature():
    from clapscale.models import build_model

    cfg = load_config("configs/tiny.yaml", ["optim.weight_decay=0.1"])
    model = build_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in kept
    assert not any(n.endswith(".bias") for n in decayed)
    assert not any("norm" in n.lower() or ".bn" in n for n in decayed), sorted(decayed)
    assert "audio_projection.linear1.weight" in decayed and "text_projection.linear2.weight" in decayed
    assert len(decayed) + len(kept) == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_tower_is_not_optimised():
    from clapscale.models import build_model

    model = build_model(load_config("configs/tiny.yaml", ["model.text.frozen=true"]))
    optimised = {id(p) for g in param_groups(model, 0.0) for p in g["params"]}
    assert not any(id(p) in optimised for p in model.text_tower.parameters())
    assert all(id(p) in optimised for p in model.audio_tower.parameters())


def test_fp16_on_cpu_is_refused_with_a_way_out():
    cfg = load_config("configs/tiny.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="bf16 or fp32"):
        check_precision(cfg, torch.device("cpu"))


_STAGES, _REDUCE_DTYPES = (1, 2, 3), ("fp32", "bf16")


def _engine_dtypes(rank: int, text_dir: str, out: str) -> None:
    """Spawned: build the real bf16 engine of every ZeRO stage and ``train.grad_reduce_dtype`` and
    record the dtypes it reduces and accumulates gradients in, read from DeepSpeed's own objects."""
    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from clapscale.models import build_model
    from clapscale.train.distributed import DistEnv, init_process_group
    from clapscale.train.engine import build_engine

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend=init_process_group(DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single")))
    found = {}
    for stage in _STAGES:
        for reduce_dtype in _REDUCE_DTYPES:
            cfg = load_config("configs/tiny.yaml", [
                f"model.text.path={text_dir}", "model.text.pretrained=false", "model.embed_dim=16",
                "train.precision=bf16", f"train.zero_stage={stage}", f"train.grad_reduce_dtype={reduce_dtype}",
                "train.grad_accum=2",
            ])
            engine = build_engine(build_model(cfg), cfg, 1, torch.device("cpu"))
            opt = engine.optimizer
            if isinstance(opt, BF16_Optimizer):  # ZeRO-1 with fp32 accumulation: flat fp32 gradient buffers
                accum = {g.dtype for g in opt.fp32_groups_gradients_flat}
            else:  # the ZeRO-1/2 and ZeRO-3 optimizers accumulate gradient partitions in this dtype
                accum = {opt.gradient_accumulation_dtype}
            found[stage, reduce_dtype] = {"comm": engine.communication_data_type, "accum": accum,
                                          "grad_accum_dtype": engine.get_data_types()[1]}
            engine.destroy()
    torch.save(found, out)


@pytest.fixture(scope="module")
def bf16_engine_dtypes(tmp_path_factory):
    import torch.multiprocessing as mp
    from test_inference import _tiny_text_dir

    root = tmp_path_factory.mktemp("bf16_engines")
    text = _tiny_text_dir(root / "text")
    # One spawn for all six engines: process start-up and imports dominate.
    mp.spawn(_engine_dtypes, args=(str(text), str(root / "dtypes.pt")), nprocs=1, join=True)
    return torch.load(root / "dtypes.pt", weights_only=False)


@pytest.mark.parametrize("stage", _STAGES)
def test_bf16_gradients_accumulate_and_reduce_in_fp32_in_the_engine(stage, bf16_engine_dtypes):
    fp32, bf16 = bf16_engine_dtypes[stage, "fp32"], bf16_engine_dtypes[stage, "bf16"]
    assert fp32["comm"] == fp32["grad_accum_dtype"] == torch.float32, fp32
    assert fp32["accum"] == {torch.float32}, fp32
    # The switch is real: bf16 gives DeepSpeed's own default back.
    assert bf16["comm"] == bf16["grad_accum_dtype"] == torch.bfloat16, bf16
    assert bf16["accum"] == {torch.bfloat16}, bf16


def test_zero0_bf16_refuses_fp32_accumulation_with_a_way_out():
    # DeepSpeed 0.19 has no fp32 gradient accumulation without ZeRO (it raises deep in initialize).
    with pytest.raises(ConfigError, match="grad_reduce_dtype=bf16"):
        load_config("configs/tiny.yaml", ["train.precision=bf16", "train.zero_stage=0"])
    load_config("configs/tiny.yaml", ["train.precision=bf16", "train.zero_stage=0", "train.grad_reduce_dtype=bf16"])
