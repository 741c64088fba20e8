"""The DeepSpeed engine: the only module in clapscale that knows DeepSpeed.

The engine owns the optimizer state (ZeRO 0/1/2/3 partitions), precision (bf16 / fp16 / fp32
with fp32 master weights), gradient clipping and gradient accumulation bookkeeping. Its config
is built here from ours and handed to ``deepspeed.initialize`` as a dict, on every rank, from
the same validated ``Config``: no rank writes a JSON file another one reads.

The optimizer is torch's AdamW (ZeRO supports it directly, and no C++ op has to be compiled) with
two parameter groups: weight decay on weight matrices, none on norms, biases and the temperature
(``clapscale.models.no_weight_decay`` decides). The LR follows ``schedule.WarmupCosine`` through a
``LambdaLR`` that DeepSpeed steps on every optimizer step and saves in its checkpoints.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from clapscale.config import Config, ConfigError
from clapscale.train.schedule import WarmupCosine


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict for this run (``train_batch_size`` = batch x accumulation x ranks)."""
    micro = cfg.data.batch_size
    accum = cfg.train.grad_accum
    zero: dict[str, Any] = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage == 3:
        # Gather the full model when saving a 16-bit copy is asked for; the fp32 export below
        # reads the master weights instead, so this stays off.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0) starting at 2**16; DeepSpeed skips overflowing steps.
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        # DeepSpeed's defaults accumulate micro-batch gradients and all-reduce them across ranks in
        # bf16 (8-bit mantissa): summing many contributions rounds the small ones away.
        # train.grad_reduce_dtype (fp32 by default) sets both.
        ds["communication_data_type"] = cfg.train.grad_reduce_dtype
        ds["data_types"] = {"grad_accum_dtype": cfg.train.grad_reduce_dtype}
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed / not decayed (norms, biases, temperature)."""
    from clapscale.models import no_weight_decay

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("every parameter is frozen (model.audio.frozen and model.text.frozen): nothing to train")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_precision(cfg: Config, device: torch.device) -> None:
    """Refuse precisions the device cannot run, before DeepSpeed fails obscurely."""
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision=fp16 needs a CUDA device (DeepSpeed's fp16 loss scaler does not run on "
            "CPU); use train.precision=bf16 or fp32"
        )


def build_engine(model: nn.Module, cfg: Config, world_size: int, device: torch.device):
    """Wrap ``model`` in a DeepSpeed engine. Collective: every rank calls it.

    Returns the engine; ``engine.module`` is the model, ``engine.optimizer`` the (ZeRO) optimizer,
    ``engine.lr_scheduler`` the LambdaLR.
    """
    import deepspeed

    # DeepSpeed's ZeRO collectives call torch.distributed.all_gather_into_tensor and
    # reduce_scatter_tensor, which torch 2.14 marks deprecated: a FutureWarning per rank and call
    # (every step), not ours to fix. Registered here, once, rather than at import.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated\. Please use",
                            category=FutureWarning)
    check_precision(cfg, device)
    model.to(device)
    apply_speed_settings(model, cfg, device)
    _lift_scalar_parameters(model)
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_of(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
    )
    # ZeRO 0-2 cast the whole module (buffers included) to bf16 / fp16; ZeRO-3 casts only the
    # parameters it partitions, leaving e.g. BatchNorm running statistics in fp32, which
    # BatchNorm refuses to mix with half inputs. Make all stages alike.
    dtype = compute_dtype(cfg)
    for buf in engine.module.buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            buf.data = buf.data.to(dtype)
    return engine


def apply_speed_settings(model: nn.Module, cfg: Config, device: torch.device) -> None:
    """``train.tf32`` (process-wide TF32 for fp32 matmuls and cuDNN convolutions, CUDA only: CPU runs
    stay bit-exact; cuDNN's own default is TF32 on, so ``false`` turns it off there too) and
    ``train.compile`` (each tower compiled in place, so parameter names and checkpoints are unchanged)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if cfg.train.compile:
        for tower in (model.audio_tower, model.text_tower):
            tower.compile(backend=cfg.train.compile)


def warmup_cosine_of(cfg: Config) -> WarmupCosine:
    """The LR multiplier ``cfg`` asks for (``optim.lr``, ``optim.warmup_steps``, ``train.steps``, ``optim.min_lr``)."""
    return WarmupCosine(cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr)


def follow_configured_schedule(engine, cfg: Config) -> dict[str, Any] | None:
    """Make the engine's LR schedule ``cfg``'s from the step it has reached; returns the previous
    schedule's parameters when they differed (else None).

    A checkpoint restores the ``LambdaLR`` state *including* the multiplier's fields and the base
    rates, so without this a resumed run configured for more steps or another ``optim.lr`` would
    silently keep the old schedule (and sit at ``min_lr`` for every extra step). Extending a run
    is a normal need: the configured schedule wins, evaluated at the restored step count (optimizer
    steps actually taken), and the caller logs the change.
    """
    scheduler = engine.lr_scheduler
    wanted = warmup_cosine_of(cfg)
    current = scheduler.lr_lambdas[0]
    previous = dict(vars(current))
    previous["base_lr"] = float(scheduler.base_lrs[0])
    for fn in scheduler.lr_lambdas:  # LambdaLR holds one multiplier per group (the same object here)
        vars(fn).update(vars(wanted))
    scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)
    # The rate of the next optimizer step, computed as LambdaLR.get_lr does (bit for bit).
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
        group["initial_lr"] = cfg.optim.lr
    scheduler._last_lr = rates
    return previous if previous != vars(wanted) else None


def init_distributed(backend: str) -> None:
    """Let DeepSpeed adopt the process group already joined (``distributed.init_process_group``)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)


def optimizer_step(engine, zero_stage: int) -> float | None:
    """``engine.step()`` (clipping, ZeRO reduction, AdamW, LR schedule at the accumulation boundary).

    Returns the global gradient norm measured before the step where DeepSpeed does not report
    one, else None (``global_grad_norm`` combines both). DeepSpeed reports the (pre-clipping)
    norm for ZeRO 1-3 and bf16, not for ZeRO-0 in fp32 / fp16: there the gradients are whole and
    already averaged over ranks after the boundary backward, so they are measured the same way.
    """
    measured = None
    if zero_stage == 0 and engine.is_gradient_accumulation_boundary():
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        if grads:
            measured = float(torch.linalg.vector_norm(torch.stack(grads)))
    engine.step()
    return measured


def global_grad_norm(engine, measured: float | None) -> float:
    """The last step's global gradient norm: DeepSpeed's, else ``measured`` (NaN when neither)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan") if measured is None else measured
    return float(norm.item() if torch.is_tensor(norm) else norm)


def current_lr(engine) -> float:
    """The rate the next optimizer step uses (the optimizer's own parameter-group rate)."""
    return float(engine.get_lr()[0])


def logit_scale(engine, max_logit_scale: float) -> float:
    """The model's 1 / temperature as its forward uses it (clamped), from the fp32 master copy.

    Collective under ZeRO (the master copy is partitioned): every rank calls it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    p = engine.module.logit_scale
    full = safe_get_full_fp32_param(p) if p.requires_grad else None
    log_scale = float((full if full is not None else p).detach().float().reshape(-1)[0])
    return math.exp(min(log_scale, math.log(max_logit_scale)))


def _lift_scalar_parameters(model: nn.Module) -> None:
    """Give 0-d parameters (the temperature) shape (1,), in place.

    DeepSpeed 0.19's engine broadcasts every parameter as ``p.data.view(torch.uint8)``, which
    raises for 0-d tensors. A (1,) temperature broadcasts against the logits the same way;
    ``full_fp32_state_dict`` gives it back its original shape for export.
    """
    for p in model.parameters():
        if p.dim() == 0:
            p._clapscale_shape = tuple(p.shape)
            p.data = p.data.reshape(1)


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype the engine's module computes in (inputs are cast to it)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.train.precision]


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Collective. The fp32 master weights of every parameter (buffers as they are), on CPU.

    Under ZeRO the master copy lives partitioned in the optimizer; ``safe_get_full_fp32_param``
    all-gathers it, so every rank must call this; frozen parameters have no master copy and are
    taken from the module (gathered under ZeRO-3).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
                full = p.detach().clone()
        out[name] = full.detach().float().cpu().reshape(getattr(p, "_clapscale_shape", full.shape))
    saved = set(module.state_dict().keys())  # non-persistent buffers are not part of a model
    for name, b in module.named_buffers():
        if name not in saved:
            continue
        out[name] = (b.float() if b.is_floating_point() else b).detach().cpu().clone()
    return out
