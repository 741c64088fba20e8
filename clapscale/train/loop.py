"""The training loop: ``Trainer(cfg).train()`` on every rank.

One optimizer step, top to bottom (``Trainer._step``):

1. take ``train.grad_accum`` batches from this rank's loader (time spent waiting is logged);
2. log-mel front end on the training device, then the DeepSpeed engine's forward;
3. the loss outside the engine, over features gathered from every rank (``clapscale.losses``);
4. a non-finite loss on any rank skips the step on all ranks (counted; ``train.max_nonfinite``
   in a row stops with ``NonFiniteLossError`` without saving: the weights that produce them
   must not become the newest checkpoint that ``resume=auto`` picks);
5. ``engine.backward`` / ``engine.step`` (clipping, ZeRO reduction, AdamW, LR schedule).

Gradient accumulation keeps every global negative: with ``grad_accum = A`` the loss is the loss
of the whole accumulated global batch (A x b x world rows), computed the GradCache way
(``accumulated_backward``): embed the A micro-batches without a graph, compute the loss and its
gradient with respect to the cached embeddings, then re-run each micro-batch with a graph and
back-propagate the cached gradient into it. The RNG state of each micro-batch is replayed so the
re-run sees the same dropout masks. Cost: one extra forward per micro-batch.

Batch norm across ranks: not synchronised. CNN14's BatchNorms (and HTSAT's bn0) normalise with
this rank's batch statistics, as PANNs and LAION-CLAP trained them under DDP; SyncBatchNorm
would add an all-reduce per BN layer per forward and has no CPU/gloo implementation. With
batches of 32+ per rank the statistics are close; running statistics are rank 0's when saved
(DeepSpeed saves rank 0's module buffers). Under gradient accumulation the running statistics
are updated twice per micro-batch (the cached and the re-run forward).

Signals: SIGTERM and SIGUSR1 (SLURM's preemption and time-limit warnings) set a flag; at the
next step boundary all ranks agree, save a checkpoint and ``train`` returns with
``stopped_by="signal"`` (the CLI exits with ``EXIT_REQUEUE``, and launch/pretrain.sh requeues).
"""

from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from clapscale.config import Config, ConfigError
from clapscale.losses import SoftLabelClipLoss, build_loss
from clapscale.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from clapscale.train.distributed import DistEnv, device_for, discover, init_process_group
from clapscale.train.engine import (
    build_engine, compute_dtype, follow_configured_schedule, full_fp32_state_dict, warmup_cosine_of,
)
from clapscale.train.logging import RunLogger


class NonFiniteLossError(RuntimeError):
    """``train.max_nonfinite`` non-finite losses in a row."""


@dataclass
class TrainResult:
    step: int
    samples_seen: int
    stopped_by: str  # "done" | "stop_at" | "signal"
    losses: list[float] = field(default_factory=list)  # this run's per-step losses (mean over ranks)
    checkpoint: Path | None = None
    export: Path | None = None


Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _rng_replay(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def accumulated_backward(
    micro_inputs: list[Any],
    forward: Callable[[Any], Features],
    loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    is_finite: Callable[[torch.Tensor], bool],
) -> tuple[torch.Tensor, bool]:
    """Loss and gradient of the concatenated micro-batches, one micro-batch graph at a time.

    ``forward(inputs) -> (audio (b, D), text (b, D), scale ())``; ``loss_of(audio (A*b, D),
    text (A*b, D), scale)`` the (gathering) loss; ``backward(surrogate)`` runs once per
    micro-batch (the engine's backward + step). The parameter gradient summed over the
    ``backward`` calls equals that of ``loss_of`` on the concatenation: the surrogate
    ``<a_m, dL/da_m> + <t_m, dL/dt_m> + s * dL/ds / A`` has exactly that gradient.
    Returns ``(loss, finite)``; when not finite, nothing is back-propagated.
    """
    states, audio, text, scale = [], [], [], None
    with torch.no_grad():
        for inputs in micro_inputs:
            states.append(_rng_snapshot())
            a, t, scale = forward(inputs)
            audio.append(a.float())
            text.append(t.float())
    after = _rng_snapshot()
    all_audio = torch.cat(audio).requires_grad_(True)
    all_text = torch.cat(text).requires_grad_(True)
    leaf_scale = scale.detach().float().requires_grad_(True)
    loss = loss_of(all_audio, all_text, leaf_scale)
    if not is_finite(loss):
        return loss.detach(), False
    loss.backward()
    sizes = [a.shape[0] for a in audio]
    grad_audio = all_audio.grad.split(sizes)
    grad_text = all_text.grad.split(sizes)
    grad_scale = leaf_scale.grad / len(micro_inputs)
    for m, inputs in enumerate(micro_inputs):
        _rng_replay(states[m])
        a, t, s = forward(inputs)
        surrogate = (
            (a.float() * grad_audio[m]).sum() + (t.float() * grad_text[m]).sum() + (s.float() * grad_scale).sum()
        )
        backward(surrogate)
    _rng_replay(after)
    return loss.detach(), True


class Trainer:
    """Builds everything from a validated ``Config`` and trains; every rank runs the same code.

    ``Trainer(cfg).train() -> TrainResult``. ``cfg.train.resume`` = ``auto`` continues from the
    newest complete checkpoint in ``runs/<name>/checkpoints`` if there is one.
    """

    def __init__(self, cfg: Config, denv: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.denv = denv or discover()
        self.run_dir = Path(cfg.train.out_dir) / cfg.train.name
        self.step = 0
        self.samples_seen = 0
        self.nonfinite_total = 0
        self._signal: int | None = None
        self._grad_norm: float | None = None

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> "Trainer":
        from clapscale.data import build_loader
        from clapscale.features import AudioFrontend
        from clapscale.models import build_model, build_tokenizer, load_model

        cfg, denv = self.cfg, self.denv
        backend = init_process_group(denv, cfg.train.dist_timeout_s)
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        self.device = device_for(denv)
        # Same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway for ZeRO 0-2).
        _seed_everything(cfg.train.seed)
        model = build_model(cfg)
        self.tokenizer = build_tokenizer(cfg.model.text)
        self.frontend = AudioFrontend(cfg.audio).to(self.device)
        self.loader = build_loader(
            cfg, cfg.data.train, tokenizer=self.tokenizer, rank=denv.rank, world_size=denv.world_size, train=True
        )
        self.loss_fn = build_loss(cfg.loss, rank=denv.rank, world_size=denv.world_size)
        self.teacher = None
        if isinstance(self.loss_fn, SoftLabelClipLoss) and cfg.loss.teacher:
            teacher, teacher_cfg = load_model(cfg.loss.teacher)
            check_teacher(cfg, teacher_cfg)
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.engine = build_engine(model, cfg, denv.world_size, self.device)
        self.dtype = compute_dtype(cfg)
        # Different dropout masks on different ranks.
        _seed_everything(cfg.train.seed + 1 + denv.rank)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", cfg.train.keep_last, denv.rank, denv.world_size
        )
        self.checkpoints.remove_partial()
        self.log = RunLogger(self.run_dir, enabled=denv.is_main, config_yaml=cfg.to_yaml())
        self._resume()
        return self

    def _resume(self) -> None:
        choice = [str(p) if (p := self.checkpoints.resolve(self.cfg.train.resume)) else None]
        if dist.get_world_size() > 1:
            # Rank 0 decides, so ranks never pick different checkpoints while one is being written.
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return
        path = Path(choice[0])
        state = self.checkpoints.load(self.engine, path)
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.loader.load_state_dict(state["data"])
        restore_rng(state["rng"])
        self.log.event(self.step, "resumed", path=str(path))
        previous = follow_configured_schedule(self.engine, self.cfg)
        if previous is not None:
            now = vars(warmup_cosine_of(self.cfg))
            self.log.notice(
                self.step, "lr_schedule_changed",
                f"the LR schedule differs from the checkpoint's; following the configured one from here: "
                f"{_describe_schedule(now)} (checkpoint: {_describe_schedule(previous)})",
                previous=previous, now=now,
            )

    # ------------------------------------------------------------------------------ one step

    def _prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        on_device = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad():
            mel, is_longer = self.frontend(on_device)
        return {
            "mel": mel,
            "is_longer": is_longer,
            "input_ids": on_device["input_ids"],
            "attention_mask": on_device["attention_mask"],
        }

    def _forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        return self.engine(inputs["mel"].to(self.dtype), inputs["is_longer"], inputs["input_ids"], inputs["attention_mask"])

    def _teacher_features(self, micro_inputs: list[dict[str, torch.Tensor]]):
        if self.teacher is None:
            return None
        with torch.no_grad():
            outs = [self.teacher(x["mel"].float(), x["is_longer"], x["input_ids"], x["attention_mask"]) for x in micro_inputs]
        return torch.cat([o[0] for o in outs]).float(), torch.cat([o[1] for o in outs]).float()

    def _loss(self, audio, text, scale, teacher) -> torch.Tensor:
        if isinstance(self.loss_fn, SoftLabelClipLoss):
            # Without a teacher checkpoint the model itself, detached, provides the soft labels.
            ta, tt = teacher if teacher is not None else (audio.detach(), text.detach())
            return self.loss_fn(audio, text, scale, ta, tt)
        return self.loss_fn(audio, text, scale)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0], device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _engine_step(self) -> None:
        # DeepSpeed reports the (pre-clipping) global gradient norm for ZeRO 1-3 and bf16, not
        # for ZeRO-0 in fp32 / fp16: there the gradients are whole and already averaged over
        # ranks after the boundary backward, so measure them the same way before the step.
        self._grad_norm = None
        if self.cfg.train.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            if grads:
                self._grad_norm = float(torch.linalg.vector_norm(torch.stack(grads)))
        self.engine.step()

    def _step(self, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, bool]:
        micro = [self._prepare(b) for b in batches]
        teacher = self._teacher_features(micro)
        if len(micro) == 1:
            audio, text, scale = self._forward(micro[0])
            loss = self._loss(audio.float(), text.float(), scale.float(), teacher)
            if not self._all_finite(loss):
                return loss.detach(), False
            self.engine.backward(loss)
            self._engine_step()
            return loss.detach(), True

        def backward(surrogate: torch.Tensor) -> None:
            # The surrogate already carries the whole accumulated gradient: no 1/A scaling.
            self.engine.backward(surrogate, scale_wrt_gas=False)
            self._engine_step()

        return accumulated_backward(
            micro, self._forward, lambda a, t, s: self._loss(a, t, s, teacher), backward, self._all_finite
        )

    # ------------------------------------------------------------------------------ the loop

    def _batches(self):
        # Starting a DataLoader pass draws worker seeds from torch's global generator; a resumed
        # run starts its pass at a different step than the original did, so that draw would shift
        # every dropout mask after it. Data loading must not touch the training RNG.
        it, empty_passes = iter(()), 0
        while True:
            state = torch.get_rng_state()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(self.loader)
                batch = next(it, None)
            finally:
                torch.set_rng_state(state)
            if batch is not None:
                empty_passes = 0
                yield batch
            else:
                empty_passes += 1
                if empty_passes >= 2:
                    raise RuntimeError(
                        f"rank {self.denv.rank}: the training loader yielded no batch over two passes of "
                        f"data.train={self.cfg.data.train!r}: too few samples for data.batch_size="
                        f"{self.cfg.data.batch_size} on this rank, or every sample was skipped "
                        f"({dict(getattr(self.loader, 'skipped', {}))})"
                    )

    def train(self) -> TrainResult:
        """Run until ``train.steps`` (or ``train.stop_at``, or a signal). Every rank calls this."""
        if not hasattr(self, "engine"):
            self.setup()
        cfg = self.cfg
        target = min(cfg.train.steps, cfg.train.stop_at) if cfg.train.stop_at > 0 else cfg.train.steps
        world = self.denv.world_size
        per_step_samples = cfg.data.batch_size * cfg.train.grad_accum * world
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        result = TrainResult(self.step, self.samples_seen, "done")
        in_a_row = 0
        last_saved = self.step
        window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
        batches = self._batches()
        try:
            self.engine.train()
            while self.step < target:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.train.grad_accum)]
                window_wait += time.perf_counter() - t0
                lr = float(self.engine.get_lr()[0])  # the rate this step uses; step() moves it on
                loss, finite = self._step(micro)
                if not finite:
                    in_a_row += 1
                    self.nonfinite_total += 1
                    self.log.event(self.step, "nonfinite_loss", loss=float(loss), in_a_row=in_a_row)
                    if in_a_row >= cfg.train.max_nonfinite:
                        last_good = self.checkpoints.latest()
                        raise NonFiniteLossError(
                            f"{in_a_row} non-finite losses in a row (train.max_nonfinite="
                            f"{cfg.train.max_nonfinite}) at step {self.step}, last loss {float(loss)}; "
                            "the state that produced them is not saved. The newest checkpoint is "
                            f"{last_good or 'none (none was saved yet)'}. Lower optim.lr, raise "
                            "optim.warmup_steps, use train.precision=bf16 or fp32, or check the data"
                        )
                    if self._stop_requested():
                        break
                    continue
                in_a_row = 0
                self.step += 1
                self.samples_seen += per_step_samples
                window_steps += 1
                mean_loss = self._mean_over_ranks(loss)
                result.losses.append(mean_loss)
                to_tb = self.step % cfg.train.log_every == 0 or self.step == target
                record = {
                    "loss": mean_loss,
                    "lr": lr,
                    "logit_scale": float(self._scale()),  # 1 / temperature, after the clamp
                    "grad_norm": self._global_grad_norm(),
                    "samples_seen": self.samples_seen,
                    "nonfinite_skipped": self.nonfinite_total,
                }
                if to_tb:
                    elapsed = time.perf_counter() - window_start
                    record["samples_per_s"] = window_steps * per_step_samples / max(elapsed, 1e-9)
                    record["data_wait_fraction"] = window_wait / max(elapsed, 1e-9)
                    record["skipped_samples"] = self._skipped_total()
                    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
                self.log.step(self.step, record, to_tb)
                if cfg.train.eval_every > 0 and self.step % cfg.train.eval_every == 0 and self.step < target:
                    self.evaluate()
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    result.checkpoint = self._save()
                    last_saved = self.step
                if self._stop_requested():
                    break
            stopped = self._signal is not None
            if stopped:
                result.stopped_by = "signal"
            elif self.step < cfg.train.steps:
                result.stopped_by = "stop_at"
            if self.step != last_saved or result.checkpoint is None:
                result.checkpoint = self._save()
            if result.stopped_by == "done":
                if cfg.train.eval_every >= 0:
                    self.evaluate()
                result.export = self.export()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.log.close()
        result.step, result.samples_seen = self.step, self.samples_seen
        return result

    # ------------------------------------------------------------------------------ helpers

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def _stop_requested(self) -> bool:
        flag = torch.tensor([0 if self._signal is None else int(self._signal)], device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and self._signal is None:
            self._signal = int(flag.item())
        if self._signal is not None:
            self.log.event(self.step, "signal", signum=int(self._signal))
        return self._signal is not None

    def _global_grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan") if self._grad_norm is None else self._grad_norm
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        t = value.detach().float().reshape(1).clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return float(t.item())

    def _skipped_total(self) -> int:
        t = torch.tensor([sum(getattr(self.loader, "skipped", {}).values())], dtype=torch.float64, device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
        return int(t.item())

    def _scale(self) -> float:
        from deepspeed.utils import safe_get_full_fp32_param

        p = self.engine.module.logit_scale
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        log_scale = float((full if full is not None else p).detach().float().reshape(-1)[0])
        return math.exp(min(log_scale, math.log(self.cfg.model.max_logit_scale)))

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "nonfinite_total": self.nonfinite_total,
            "data": self.loader.state_dict(),
            "rng": capture_rng(),
        }

    def _save(self) -> Path:
        path = self.checkpoints.save(self.engine, self.step, self._state(), self.cfg.to_yaml())
        self.log.event(self.step, "checkpoint", path=str(path))
        return path

    def evaluate(self) -> dict[str, float]:
        """Collective: every rank embeds its share (safe under ZeRO-3); rank 0 logs the metrics.

        Runs the ``eval.tasks`` that have shards (``eval.<task>`` or ``data.val``); returns {}
        when none has, rather than failing a long run at its end. For the same reason a zero-shot
        task whose split has no tags (a caption-only set: Clotho, AudioCaps, most LAION sources)
        is skipped with a warning, as ``runner.evaluate`` does.
        """
        from clapscale.eval.runner import evaluate_tasks, flatten, task_spec

        tasks = [t for t in self.cfg.eval.tasks if task_spec(self.cfg, t)]
        if "linear_probe" in tasks and not self.cfg.eval.linear_probe_train:
            tasks.remove("linear_probe")
        if not tasks:
            return {}
        metrics = flatten(evaluate_tasks(
            self.engine.module, self.cfg, rank=self.denv.rank, world_size=self.denv.world_size,
            device=self.device, tasks=tasks, tokenizer=self.tokenizer, skip_unlabelled=True,
        ))
        self.engine.train()
        self.log.scalars("eval", self.step, metrics)
        return metrics

    def export(self) -> Path:
        """Collective. The consolidated fp32 model for inference in ``runs/<name>/model``."""
        from clapscale.models import build_model, save_model

        state = full_fp32_state_dict(self.engine)
        out = self.run_dir / "model"
        if self.denv.is_main:
            model = build_model(self.cfg)
            model.load_state_dict(state)
            save_model(model, self.cfg, out)
        if dist.get_world_size() > 1:
            dist.barrier()
        return out


# Front-end fields that shape the mel both models see (max_seconds and the crop rule do not).
_TEACHER_AUDIO_FIELDS = (
    "sample_rate", "clip_seconds", "n_fft", "win_length", "hop_length", "n_mels", "f_min", "f_max", "mel_scale",
)


def check_teacher(cfg: Config, teacher_cfg: Config) -> None:
    """Refuse a soft-label teacher that would read the student's inputs differently.

    The teacher is fed the student's log-mel batch and token ids, so its front end, its fusion
    layout and its tokenizer must be the student's; otherwise the soft labels are computed from
    garbage, silently. Raises ``ConfigError`` naming every differing field. ``model.text.path`` is
    not compared: an exported model points it at its own copy of the tokenizer files.
    """
    a, ta = cfg.audio, teacher_cfg.audio
    diffs = [f"audio.{f}: {getattr(a, f)!r} vs teacher {getattr(ta, f)!r}"
             for f in _TEACHER_AUDIO_FIELDS if getattr(a, f) != getattr(ta, f)]
    if (a.length_policy == "fusion") != (ta.length_policy == "fusion"):
        diffs.append(f"audio.length_policy: {a.length_policy!r} vs teacher {ta.length_policy!r} (fusion layout)")
    t, tt = cfg.model.text, teacher_cfg.model.text
    diffs += [f"model.text.{f}: {getattr(t, f)!r} vs teacher {getattr(tt, f)!r}"
              for f in ("name", "max_length") if getattr(t, f) != getattr(tt, f)]
    if diffs:
        raise ConfigError(
            f"loss.teacher={cfg.loss.teacher!r} reads inputs differently from the student (it gets the "
            f"student's mel batch and token ids): {'; '.join(diffs)}. Use a teacher trained with the same "
            "audio front end and text tokenizer, or leave loss.teacher empty"
        )


def _describe_schedule(schedule: dict[str, Any]) -> str:
    return (f"lr {schedule['base_lr']:g} over {schedule['total_steps']} steps, warmup {schedule['warmup_steps']}, "
            f"min_lr {schedule['min_lr']:g}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
