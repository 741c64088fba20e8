"""The training loop: ``Trainer(cfg).train()`` on every rank.

One optimizer step, top to bottom (``Trainer._step``):

1. take ``train.grad_accum`` batches from this rank's loader (time spent waiting is logged);
2. log-mel front end on the training device, then the DeepSpeed engine's forward;
3. the loss outside the engine, over features gathered from every rank (``clapscale.losses``);
   with ``grad_accum > 1`` over the whole accumulated global batch (``train.gradcache``);
4. a non-finite loss on any rank skips the step on all ranks (counted; ``train.max_nonfinite``
   in a row stops with ``NonFiniteLossError`` without saving: the weights that produce them
   must not become the newest checkpoint that ``resume=auto`` picks);
5. ``engine.backward`` and the optimizer step (``train.engine``: clipping, ZeRO reduction,
   AdamW, LR schedule).

Around the steps: periodic evaluation and checkpoints, a stop agreed by all ranks on SIGTERM /
SIGUSR1 (``train.signals``; ``train`` then returns ``stopped_by="signal"``, the CLI exits with
``EXIT_REQUEUE`` and launch/pretrain.sh requeues), and at the end a last evaluation and the
export of the fp32 model.

Batch norm across ranks: not synchronised. CNN14's BatchNorms (and HTSAT's bn0) normalise with
this rank's batch statistics, as PANNs and LAION-CLAP trained them under DDP; SyncBatchNorm
would add an all-reduce per BN layer per forward and has no CPU/gloo implementation. With
batches of 32+ per rank the statistics are close; running statistics are rank 0's when saved
(DeepSpeed saves rank 0's module buffers).
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from clapscale.config import Config, ConfigError
from clapscale.features import tower_input
from clapscale.losses import DuplicateAwareClipLoss, PairwiseInfoNCE, SoftLabelClipLoss, build_loss, caption_groups
from clapscale.train import engine as engines
from clapscale.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from clapscale.train.distributed import DistEnv, device_for, discover, init_process_group
from clapscale.train.gradcache import accumulated_backward
from clapscale.train.logging import RunLogger, ThroughputWindow
from clapscale.train.signals import StopSignals
from clapscale.train.augment import augment_generator, augment_mel
from clapscale.train.teacher import load_teacher, teacher_features


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
        self._grad_norm: float | None = None

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> "Trainer":
        from clapscale.data import build_loader
        from clapscale.data.specs import check_shards_exist, parse_spec
        from clapscale.features import AudioFrontend
        from clapscale.models import build_model, build_tokenizer

        cfg, denv = self.cfg, self.denv
        # Shard paths first: a typo in data.train / data.val is a one-line error now, not after
        # the process group, DeepSpeed and the towers are up (~20 s).
        for spec in (cfg.data.train, cfg.data.val):
            if spec:
                check_shards_exist(parse_spec(spec))
        engines.init_distributed(init_process_group(denv, cfg.train.dist_timeout_s))
        self.device = device_for(denv)
        # Same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway for ZeRO 0-2).
        _seed_everything(cfg.train.seed)
        model = build_model(cfg)
        if cfg.train.init_from:
            # Weights only; the engine built below gets a fresh optimizer and schedule, and
            # _resume replaces the weights when this run has a checkpoint of its own.
            from clapscale.models.loading import init_weights_from

            init_weights_from(model, cfg.train.init_from)
        self.tokenizer = build_tokenizer(cfg.model.text)
        self.frontend = AudioFrontend(cfg.audio).to(self.device)
        self.loader = build_loader(
            cfg, cfg.data.train, tokenizer=self.tokenizer, rank=denv.rank, world_size=denv.world_size, train=True
        )
        self.loss_fn = build_loss(cfg.loss, rank=denv.rank, world_size=denv.world_size)
        soft_teacher = isinstance(self.loss_fn, SoftLabelClipLoss) and cfg.loss.teacher
        self.teacher = load_teacher(cfg, self.device) if soft_teacher else None
        # A waveform tower (ESResNeXt) makes its own spectrogram: it gets the loader's clips, not mels.
        self.audio_input = model.audio_tower.input_kind
        if self.audio_input == "waveform" and cfg.augment.enabled:
            raise ConfigError(
                f"the augment section shifts and masks log-mels, but model.audio.name={cfg.model.audio.name!r} "
                "reads the waveform: set augment.gain_db=0 augment.time_masks=0 augment.freq_masks=0"
            )
        self.engine = engines.build_engine(model, cfg, denv.world_size, self.device)
        self.dtype = engines.compute_dtype(cfg)
        # Different dropout masks on different ranks.
        _seed_everything(cfg.train.seed + 1 + denv.rank)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", cfg.train.keep_last, denv.rank, denv.world_size
        )
        self.checkpoints.remove_partial()
        self.log = RunLogger(self.run_dir, enabled=denv.is_main, config_yaml=cfg.to_yaml())
        self.signals = StopSignals(self.device)
        self._resume()
        return self

    def _resume(self) -> None:
        path = self.checkpoints.resolve_agreed(self.cfg.train.resume)
        if path is None:
            return
        state = self.checkpoints.load(self.engine, path)
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.loader.load_state_dict(state["data"])
        restore_rng(state["rng"])
        self.log.event(self.step, "resumed", path=str(path))
        previous = engines.follow_configured_schedule(self.engine, self.cfg)
        if previous is not None:
            now = vars(engines.warmup_cosine_of(self.cfg))
            self.log.notice(
                self.step, "lr_schedule_changed",
                f"the LR schedule differs from the checkpoint's; following the configured one from here: "
                f"{_describe_schedule(now)} (checkpoint: {_describe_schedule(previous)})",
                previous=previous, now=now,
            )

    # ------------------------------------------------------------------------------ one step

    def _prepare(self, batch: dict[str, Any], augment: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        on_device = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad():
            mel, is_longer = tower_input(self.frontend, on_device, self.audio_input)
            if augment is not None:
                mel = augment_mel(mel, self.cfg.augment, augment)
        inputs = {
            "mel": mel,
            "is_longer": is_longer,
            "input_ids": on_device["input_ids"],
            "attention_mask": on_device["attention_mask"],
        }
        if "image" in on_device:
            inputs["image"] = on_device["image"]
        return inputs

    def _forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        """CLAP: ``(audio, text, scale)``; with images: ``({modality: rows}, {pair: scale})``."""
        args = (inputs["mel"].to(self.dtype), inputs["is_longer"], inputs["input_ids"], inputs["attention_mask"])
        if "image" in inputs:
            return self.engine(*args, inputs["image"].to(self.dtype))
        return self.engine(*args)

    def _loss(self, audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
              teacher: tuple[torch.Tensor, torch.Tensor] | None, captions: list[str]) -> torch.Tensor:
        if isinstance(self.loss_fn, SoftLabelClipLoss):
            # Without a teacher checkpoint the model itself, detached, provides the soft labels.
            ta, tt = teacher if teacher is not None else (audio.detach(), text.detach())
            return self.loss_fn(audio, text, scale, ta, tt)
        if isinstance(self.loss_fn, DuplicateAwareClipLoss):
            return self.loss_fn(audio, text, scale, caption_groups(captions).to(audio.device))
        return self.loss_fn(audio, text, scale)

    def _pairwise_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, bool]:
        """AudioCLIP / VIP-ANT: batches of (audio, image, text), the weighted pairwise InfoNCE over
        the whole accumulated batch."""
        def loss_of(feats: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss_fn({k: v.float() for k, v in feats.items()}, {k: v.float() for k, v in scales.items()})

        if len(micro) > 1:
            return accumulated_backward(micro, self._forward, loss_of, self._accumulated_backward, self._all_finite,
                                        frozen=self._rows_without_grad)
        return self._backward_step(loss_of(*self._forward(micro[0])))

    @functools.cached_property
    def _rows_without_grad(self) -> frozenset[str]:
        """Modalities whose embeddings no trainable parameter feeds (a frozen tower and no trained
        projection after it: VIP-ANT's pivot). Fixed for the run: found once."""
        model = self.engine.module
        out = set()
        for modality in ("audio", "text", "image"):
            parts = [getattr(model, f"{modality}_{part}", None) for part in ("tower", "projection")]
            if parts[0] is not None and not any(p.requires_grad for m in parts if m is not None for p in m.parameters()):
                out.add(modality)
        return frozenset(out)

    def _backward_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One batch's loss: back-propagated and stepped when finite on every rank."""
        if not self._all_finite(loss):
            return loss.detach(), False
        self.engine.backward(loss)
        self._engine_step()
        return loss.detach(), True

    def _accumulated_backward(self, surrogate: torch.Tensor) -> None:
        # The surrogate already carries the whole accumulated gradient: no 1/A scaling.
        self.engine.backward(surrogate, scale_wrt_gas=False)
        self._engine_step()

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0], device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _engine_step(self) -> None:
        self._grad_norm = engines.optimizer_step(self.engine, self.cfg.train.zero_stage)

    def _step(self, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, bool]:
        g = augment_generator(self.cfg.train.seed, self.step, self.denv.rank) if self.cfg.augment.enabled else None
        micro = [self._prepare(b, g) for b in batches]
        teacher = teacher_features(self.teacher, micro) if self.teacher is not None else None
        captions = [c for b in batches for c in b.get("texts", ())]  # in the loss's row order
        if isinstance(self.loss_fn, PairwiseInfoNCE):
            return self._pairwise_step(micro)
        if len(micro) == 1:
            audio, text, scale = self._forward(micro[0])
            return self._backward_step(self._loss(audio.float(), text.float(), scale.float(), teacher, captions))

        def forward(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            audio, text, scale = self._forward(inputs)
            return {"audio": audio, "text": text}, {"scale": scale}

        return accumulated_backward(
            micro, forward, lambda r, s: self._loss(r["audio"], r["text"], s["scale"], teacher, captions),
            self._accumulated_backward, self._all_finite,
        )

    # ------------------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run until ``train.steps`` (or ``train.stop_at``, or a signal). Every rank calls this."""
        if not hasattr(self, "engine"):
            self.setup()
        cfg = self.cfg
        target = min(cfg.train.steps, cfg.train.stop_at) if cfg.train.stop_at > 0 else cfg.train.steps
        samples_per_step = cfg.data.batch_size * cfg.train.grad_accum * self.denv.world_size
        result = TrainResult(self.step, self.samples_seen, "done")
        in_a_row, last_saved = 0, self.step
        window = ThroughputWindow()
        batches = self._batches()
        try:
            with self.signals:
                self.engine.train()
                while self.step < target:
                    t0 = time.perf_counter()
                    micro = [next(batches) for _ in range(cfg.train.grad_accum)]
                    window.waited(time.perf_counter() - t0)
                    lr = engines.current_lr(self.engine)  # the rate this step uses; the step moves it on
                    loss, finite = self._step(micro)
                    if not finite:
                        in_a_row += 1
                        self._skip_nonfinite(loss, in_a_row)
                        if self._stop_requested():
                            break
                        continue
                    in_a_row = 0
                    self.step += 1
                    self.samples_seen += samples_per_step
                    window.stepped()
                    result.losses.append(self._log_step(loss, lr, target, window, samples_per_step))
                    if cfg.train.eval_every > 0 and self.step % cfg.train.eval_every == 0 and self.step < target:
                        self.evaluate()
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        result.checkpoint, last_saved = self._save(), self.step
                    if self._stop_requested():
                        break
                self._finish(result, last_saved)
        finally:
            self.log.close()
        result.step, result.samples_seen = self.step, self.samples_seen
        return result

    def _finish(self, result: TrainResult, last_saved: int) -> None:
        """Save the final state (unless just saved); when the run is done, evaluate and export."""
        if self.signals.received is not None:
            result.stopped_by = "signal"
        elif self.step < self.cfg.train.steps:
            result.stopped_by = "stop_at"
        if self.step != last_saved or result.checkpoint is None:
            result.checkpoint = self._save()
        if result.stopped_by == "done":
            if self.cfg.train.eval_every >= 0:
                self.evaluate()
            result.export = self.export()

    def _skip_nonfinite(self, loss: torch.Tensor, in_a_row: int) -> None:
        """Count a skipped step; raise ``NonFiniteLossError`` at ``train.max_nonfinite`` in a row."""
        self.nonfinite_total += 1
        self.log.event(self.step, "nonfinite_loss", loss=float(loss), in_a_row=in_a_row)
        if in_a_row >= self.cfg.train.max_nonfinite:
            last_good = self.checkpoints.latest()
            raise NonFiniteLossError(
                f"{in_a_row} non-finite losses in a row (train.max_nonfinite="
                f"{self.cfg.train.max_nonfinite}) at step {self.step}, last loss {float(loss)}; "
                "the state that produced them is not saved. The newest checkpoint is "
                f"{last_good or 'none (none was saved yet)'}. Lower optim.lr, raise "
                "optim.warmup_steps, use train.precision=bf16 or fp32, or check the data"
            )

    def _log_step(self, loss: torch.Tensor, lr: float, target: int, window: ThroughputWindow,
                  samples_per_step: int) -> float:
        """Collective. Log the step just taken; returns its loss averaged over ranks."""
        mean_loss = self._mean_over_ranks(loss)
        record = {
            "loss": mean_loss,
            "lr": lr,
            "logit_scale": engines.logit_scale(self.engine, self.cfg.model.max_logit_scale),  # 1 / temperature
            "grad_norm": self._global_grad_norm(),
            "samples_seen": self.samples_seen,
            "nonfinite_skipped": self.nonfinite_total,
        }
        to_tb = self.step % self.cfg.train.log_every == 0 or self.step == target
        if to_tb:
            record.update(window.read(samples_per_step), skipped_samples=self._skipped_total())
        self.log.step(self.step, record, to_tb)
        return mean_loss

    def _batches(self) -> Iterator[dict[str, Any]]:
        return training_batches(self.loader, self.denv.rank, self.cfg.data.train, self.cfg.data.batch_size)

    # ------------------------------------------------------------------------------ helpers

    def _stop_requested(self) -> bool:
        """Collective: whether any rank received SIGTERM / SIGUSR1 (logged)."""
        signum = self.signals.agreed()
        if signum is not None:
            self.log.event(self.step, "signal", signum=int(signum))
        return signum is not None

    def _global_grad_norm(self) -> float:
        return engines.global_grad_norm(self.engine, self._grad_norm)

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

        state = engines.full_fp32_state_dict(self.engine)
        out = self.run_dir / "model"
        if self.denv.is_main:
            model = build_model(self.cfg)
            model.load_state_dict(state)
            save_model(model, self.cfg, out)
        if dist.get_world_size() > 1:
            dist.barrier()
        return out


def training_batches(loader: Any, rank: int, spec: str, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of ``loader``, pass after pass, without touching torch's global generator.

    Starting a DataLoader pass draws worker seeds from torch's global generator; a resumed run
    starts its pass at a different step than the original did, so that draw would shift every
    dropout mask after it. Data loading must not touch the training RNG. Two passes without a
    batch raise ``RuntimeError`` naming the rank and ``spec``.
    """
    it, empty_passes = iter(()), 0
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
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
                    f"rank {rank}: the training loader yielded no batch over two passes of "
                    f"data.train={spec!r}: too few samples for data.batch_size="
                    f"{batch_size} on this rank, or every sample was skipped "
                    f"({dict(getattr(loader, 'skipped', {}))})"
                )


def _describe_schedule(schedule: dict[str, Any]) -> str:
    return (f"lr {schedule['base_lr']:g} over {schedule['total_steps']} steps, warmup {schedule['warmup_steps']}, "
            f"min_lr {schedule['min_lr']:g}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
