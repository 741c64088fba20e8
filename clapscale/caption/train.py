"""Training the tag-guided captioner: ``CaptionTrainer(cfg).train()`` on every rank.

Launched like the CLAP trainer (one process, ``torchrun``, or ``srun`` under launch/; ranks come
from the environment through ``clapscale.train.distributed``). Gradients are averaged with torch
DDP (no ZeRO: the captioner is small). One step: a batch from this rank's loader (the CLAP
loader, ``data.*``), log-mel front end, tag ids and caption tokens, forward with scheduled
sampling, label-smoothed cross-entropy, AdamW with a linear-warmup-then-exponential-decay rate.

Checkpoints use the trainer's ``CheckpointManager`` (atomic, by step, the last ``average_last``
kept, every rank's data position and RNG), so ``train.resume=auto`` continues exactly where a run
stopped. SIGTERM / SIGUSR1 (Slurm's preemption and time-limit warning) stop every rank at the
same step after a checkpoint, as in the CLAP trainer: ``train`` then returns None, ``stopped_by``
is ``"signal"`` and the CLI exits with the requeue code. Such a checkpoint is off the
``checkpoint_every`` grid: it serves only to resume and is never averaged, so a preempted run
exports the same captioner as an uninterrupted one. At the end rank 0 averages the weights of the last ``average_last`` checkpoints
(stochastic weight averaging as in the paper: "averaging the last five checkpoints") and writes
``runs/<name>/captioner`` (``clapscale.caption.export``). Batch-norm statistics of a trained audio
tower are averaged too rather than recomputed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clapscale.caption.config import CaptionRunConfig
from clapscale.caption.export import adopt_clap_audio, build_captioner, hf_tokenizer_of, save_captioner
from clapscale.caption.model import CaptionVocab, caption_loss, pad_captions

STATE_FILE = "captioner_state.pt"


class WarmupExponential:
    """``LambdaLR`` multiplier: linear warmup to ``lr``, then exponential decay reaching
    ``final_lr`` at ``total_steps`` (the paper's captioner schedule)."""

    def __init__(self, lr: float, final_lr: float, warmup_steps: int, total_steps: int):
        self.lr, self.final_lr = lr, final_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return (self.final_lr / self.lr) ** (min(step - self.warmup_steps, span) / span)


def scan_vocab(cfg: CaptionRunConfig, hf_tokenizer) -> CaptionVocab:
    """Decoder tokens and tags of every sample in ``data.train`` (JSON members only are parsed)."""
    from clapscale.data.captions import clean_captions, normalise_tags
    from clapscale.data.shardio import iter_tar_samples
    from clapscale.data.specs import all_urls, parse_spec

    captions, tags = [], []

    def quiet(reason: str, where: str, detail: str) -> None:
        pass

    for url in all_urls(parse_spec(cfg.data.train)):
        for raw in iter_tar_samples(url, quiet):
            try:
                meta = json.loads(raw.get("json") or b"{}")
            except ValueError:
                continue
            captions += clean_captions(meta.get("text"))
            tags += normalise_tags(meta)[0]
    if not captions:
        raise ValueError(f"data.train={cfg.data.train!r} holds no captions to train a captioner on")
    return CaptionVocab.from_captions(hf_tokenizer, captions, tags)


class _TorchCheckpointable:
    """What ``CheckpointManager`` asks of an engine, for a plain torch model + optimizer + schedule."""

    def __init__(self, model: nn.Module, optimizer, scheduler, rank: int):
        self.model, self.optimizer, self.scheduler, self.rank = model, optimizer, scheduler, rank

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = False) -> None:
        if self.rank == 0:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict()}
            torch.save(state, Path(root) / tag / STATE_FILE)
        if dist.is_initialized():
            dist.barrier()  # as DeepSpeed's save ends: the manager's error path relies on it

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> tuple[str, None]:
        path = Path(root) / tag
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return str(path), None


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the model weights saved in ``paths`` (integer buffers: the last one's)."""
    total: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    for p in paths:
        state = torch.load(p / STATE_FILE, map_location="cpu", weights_only=True)["model"]
        for k, v in state.items():
            if v.is_floating_point():
                total[k] = total.get(k, torch.zeros_like(v, dtype=torch.float64)) + v.double()
            last[k] = v
    return {k: (total[k] / len(paths)).to(last[k].dtype) if k in total else last[k] for k in last}


class CaptionTrainer:
    """Every rank runs ``CaptionTrainer(cfg).train()``; returns the captioner directory."""

    def __init__(self, cfg: CaptionRunConfig, denv=None) -> None:
        from clapscale.train.distributed import discover

        self.cfg = cfg
        self.denv = denv or discover()
        self.run_dir = Path(cfg.train.out_dir) / cfg.train.name
        self.step = 0
        self.losses: list[float] = []
        self.stopped_by = ""  # "done" | "signal", set by train()

    def setup(self) -> "CaptionTrainer":
        from clapscale.data import build_loader
        from clapscale.data.specs import check_shards_exist, parse_spec
        from clapscale.features import AudioFrontend
        from clapscale.models import no_weight_decay
        from clapscale.train.checkpoint import CheckpointManager
        from clapscale.train.distributed import device_for, init_process_group

        cfg, denv = self.cfg, self.denv
        check_shards_exist(parse_spec(cfg.data.train))
        init_process_group(denv, cfg.train.dist_timeout_s)
        self.device = device_for(denv)
        self.hf_tokenizer = hf_tokenizer_of(cfg)
        vocab_file = self.run_dir / "vocab.json"
        box: list[Any] = [None]
        if denv.is_main:
            # A resumed run keeps the vocabulary it started with (the decoder's rows are its ids).
            box[0] = CaptionVocab.load(vocab_file) if vocab_file.is_file() else scan_vocab(cfg, self.hf_tokenizer)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            box[0].save(vocab_file)
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        self.vocab: CaptionVocab = box[0]
        _seed(cfg.train.seed)  # the same initial weights on every rank
        tower = adopt_clap_audio(cfg) if cfg.model.clap_model else None
        self.model = build_captioner(cfg, self.vocab, tower).to(self.device)
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if dist.get_world_size() > 1 else self.model
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and not no_weight_decay(n, p)]
        keep = [p for n, p in self.model.named_parameters() if p.requires_grad and no_weight_decay(n, p)]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupExponential(o.lr, o.final_lr, o.warmup_steps, cfg.train.steps))
        self.frontend = AudioFrontend(cfg.audio).to(self.device)
        self.loader = build_loader(cfg, cfg.data.train, rank=denv.rank, world_size=denv.world_size, train=True)
        # One slot beyond the average: a checkpoint written on a signal (off the checkpoint_every grid)
        # never pushes out one of the grid checkpoints the export averages.
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.average_last + 1,
                                             denv.rank, denv.world_size)
        self.checkpoints.remove_partial()
        self._state = _TorchCheckpointable(self.model, self.optimizer, self.scheduler, denv.rank)
        _seed(cfg.train.seed + 1 + denv.rank)
        self._resume()
        return self

    def _resume(self) -> None:
        from clapscale.train.checkpoint import restore_rng

        path = self.checkpoints.resolve_agreed(self.cfg.train.resume)
        if path is None:
            return
        state = self.checkpoints.load(self._state, path)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        restore_rng(state["rng"])

    def _batches(self):
        from clapscale.train.loop import training_batches

        return training_batches(self.loader, self.denv.rank, self.cfg.data.train, self.cfg.data.batch_size)

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        m = self.cfg.model
        with torch.no_grad():
            mel, is_longer = self.frontend({k: (v.to(self.device) if torch.is_tensor(v) else v)
                                             for k, v in batch.items()})
        tags = self.vocab.tag_batch(batch["tags"], m.max_tags).to(self.device)
        tokens = pad_captions([self.vocab.encode_caption(self.hf_tokenizer, t, m.max_length)
                               for t in batch["texts"]]).to(self.device)
        return mel, is_longer, tags, tokens

    def _on_grid(self, step: int) -> bool:
        """A checkpoint the export may average (every ``checkpoint_every`` steps, and the last)."""
        return step % self.cfg.train.checkpoint_every == 0 or step == self.cfg.train.steps

    def _grid_checkpoints(self) -> list[Path]:
        from clapscale.train.checkpoint import step_of

        return [p for p in self.checkpoints.complete() if self._on_grid(step_of(p))]

    def _save(self) -> None:
        """Collective: a checkpoint of this step. Rank 0 then deletes older off-grid checkpoints
        (written on a signal, only for resuming), so preemptions never change what is averaged."""
        import shutil

        from clapscale.train.checkpoint import capture_rng, step_of

        newest = self.checkpoints.save(self._state, self.step, {"step": self.step, "data": self.loader.state_dict(),
                                                                "rng": capture_rng()}, self.cfg.to_yaml())
        if self.denv.is_main:
            for old in self.checkpoints.complete():
                if old != newest and not self._on_grid(step_of(old)):
                    shutil.rmtree(old, ignore_errors=True)

    def train(self) -> Path | None:
        """Train to ``train.steps`` and export the averaged captioner (its path); None when a signal
        stopped the run after a checkpoint (``stopped_by == "signal"``; rerun to resume)."""
        from tqdm import tqdm

        from clapscale.train.signals import StopSignals

        if not hasattr(self, "model"):
            self.setup()
        cfg = self.cfg
        batches = self._batches()
        self.ddp.train()
        bar = tqdm(total=cfg.train.steps, initial=self.step, unit="step", disable=not self.denv.is_main,
                   desc="caption train")
        last_saved = self.step
        with StopSignals(self.device) as signals:  # held through the last save: a second signal waits
            while self.step < cfg.train.steps:
                self._train_step(next(batches), bar)
                if self._on_grid(self.step):
                    self._save()
                    last_saved = self.step
                if signals.agreed() is not None:
                    break
            bar.close()
            if last_saved != self.step:
                self._save()
        if self.step < cfg.train.steps:
            self.stopped_by = "signal"
            return None
        self.stopped_by = "done"
        out = self.run_dir / "captioner"
        if self.denv.is_main:
            last = self._grid_checkpoints()[-cfg.train.average_last:]
            save_captioner(average_checkpoints(last), cfg, self.vocab, out)
            (self.run_dir / "losses.json").write_text(json.dumps(self.losses))
        if dist.get_world_size() > 1:
            dist.barrier()
        return out

    def _train_step(self, batch: dict[str, Any], bar) -> None:
        """One optimizer step on ``batch`` (every rank), its rank-averaged loss logged."""
        cfg = self.cfg
        mel, is_longer, tags, tokens = self._inputs(batch)
        self.model.sampling_prob = cfg.optim.scheduled_sampling * self.step / max(1, cfg.train.steps - 1)
        loss = caption_loss(self.ddp(mel, is_longer, tags, tokens), tokens, cfg.optim.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        mean = loss.detach().clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.losses.append(float(mean))
        bar.update(1)
        if self.step % cfg.train.log_every == 0:
            bar.set_postfix(loss=f"{float(mean):.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
