"""Checkpoints: DeepSpeed's own layout plus our trainer state, by step, atomic, last k kept.

Layout under ``runs/<name>/checkpoints/``::

    step_00000050/                  complete (renamed into place only once every rank wrote)
      mp_rank_00_model_states.pt    DeepSpeed (module, ZeRO partitions, optimizer, LR scheduler)
      zero_pp_rank_*_optim_states.pt
      trainer_state_rank{r}.pt      ours, one per rank: step, samples seen, data position, RNG
      config.yaml                   the resolved config of the run
      meta.json                     step, samples seen, world size; written last (the marker)
    step_00000100.tmp/              a save in progress (or killed mid-way): never resumed from
    step_00000050.old/              a complete checkpoint being replaced by a re-save of its step

Every rank calls ``save`` and ``load`` (DeepSpeed's are collective). A checkpoint never replaces
a good one until it is complete: the directory is written under a ``.tmp`` name, every file is
fsynced, the ranks agree that all of them wrote, and only then rank 0 writes ``meta.json`` and
renames the directory into place. Re-saving a step that exists (a signal right after a periodic
save or a resume) first renames the old directory aside to ``.old``, renames the new one in, and
only then deletes the old one; ``remove_partial`` (at start-up) puts an ``.old`` back when a kill
left no ``step_N`` beside it. So a kill at any instant leaves the newest complete checkpoint
resumable. A save that fails (disk full, quota, permissions) on any rank raises
``CheckpointWriteError`` on every rank, after deleting its ``.tmp`` directory.
Our state is loaded with ``weights_only=True``: it holds only tensors, numbers, strings, lists
and dicts.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_of(path: Path) -> int:
    """The step of a checkpoint directory (``step_00000008`` -> 8)."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNNNN)")
    return int(m.group(1))


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as weights_only-loadable data."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions); raised on every rank."""


def _errors_by_rank(error: BaseException | None) -> dict[int, str]:
    """Collective. Every rank's write error (``{rank: message}``, empty when all succeeded).

    An error on one rank must stop all of them at the same point: a rank that raised alone would
    leave the others waiting in the next collective.
    """
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {} if mine is None else {0: mine}
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {r: m for r, m in enumerate(gathered) if m is not None}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path``, then the directories: data on disk before the rename."""
    for sub, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(sub, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(sub))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    """Saves and finds checkpoints under ``root``; every method marked collective runs on all ranks."""

    def __init__(self, root: str | Path, keep_last: int, rank: int = 0, world_size: int = 1):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ---------------------------------------------------------------------------- finding

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """``auto``: newest complete checkpoint here (None when there is none); ``none``: start
        fresh; anything else: a checkpoint directory that must exist and be complete."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(
                f"train.resume={resume!r} is not a complete checkpoint directory (no meta.json); "
                f"use 'auto', 'none' or one of: {[str(p) for p in self.complete()] or 'none saved yet'}"
            )
        return path

    def resolve_agreed(self, resume: str) -> Path | None:
        """Collective: ``resolve`` as rank 0 sees it, on every rank, so ranks never pick different
        checkpoints while one is being written."""
        choice = [str(p) if (p := self.resolve(resume)) else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] is not None else None

    # ---------------------------------------------------------------------------- saving

    def save(self, engine, step: int, state: dict[str, Any], config_yaml: str) -> Path:
        """Collective. Write DeepSpeed's checkpoint and this rank's ``state`` for ``step``.

        Raises ``CheckpointWriteError`` on every rank when any rank could not write; the previous
        checkpoints are then untouched and no ``.tmp`` directory is left behind.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                error = e
        self._raise_if_failed(_errors_by_rank(error), step, tmp)
        # torch.save reports a failed write (disk full, file too large) as RuntimeError.
        try:
            engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        except (OSError, RuntimeError) as e:
            error = e
            # DeepSpeed's save ends in a barrier where the ranks that could write now wait: join
            # it so the agreement below lines up with theirs.
            _barrier()
        if error is None:
            try:
                part = tmp / f"trainer_state_rank{self.rank}.pt"
                with open(str(part) + ".part", "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(str(part) + ".part", part)
            except (OSError, RuntimeError) as e:
                error = e
        self._raise_if_failed(_errors_by_rank(error), step, tmp)
        if self.rank == 0:
            try:
                _fsync_tree(tmp)  # every rank has written and closed its files by now
                _write_synced(tmp / "config.yaml", config_yaml)
                meta = {
                    "step": step,
                    "samples_seen": state.get("samples_seen"),
                    "world_size": self.world_size,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                _write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
                _fsync_dir(tmp)
                self._publish(tmp, final)
            except OSError as e:
                error = e
        self._raise_if_failed(_errors_by_rank(error), step, tmp)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0: move the complete ``tmp`` to ``final`` so that some complete copy of the step
        exists at every instant, then prune to the last ``keep_last``."""
        aside = final.with_name(final.name + ".old")
        if final.exists():  # a re-save of a step that was already saved
            shutil.rmtree(aside, ignore_errors=True)  # a stale copy: final is complete
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _raise_if_failed(self, errors: dict[int, str], step: int, tmp: Path) -> None:
        if not errors:
            return
        if self.rank == 0:
            self._recover()
        _barrier()
        latest = self.latest()
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items()))
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} under {self.root} ({detail}). "
            f"Nothing was replaced: the newest complete checkpoint is "
            f"{latest if latest else 'none (none saved yet)'}. Free disk space (or fix the quota or "
            "permissions) and rerun with train.resume=auto"
        )

    def remove_partial(self) -> None:
        """Rank 0 cleans up after a run killed mid-save: deletes ``.tmp`` directories (never
        complete) and puts back an ``.old`` copy whose re-save was killed before it replaced it."""
        if self.rank == 0:
            self._recover()
        _barrier()

    def _recover(self) -> None:
        if not self.root.is_dir():
            return
        for p in self.root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob("step_*.old"):
            final = p.with_name(p.name[: -len(".old")])
            if (final / "meta.json").is_file():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, final)

    # ---------------------------------------------------------------------------- loading

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Collective. Restore the engine from ``path`` and return this rank's trainer state."""
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise RuntimeError(
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                f"{self.world_size}: per-rank data positions and ZeRO partitions do not carry over; "
                "resume with the same number of ranks or start fresh with train.resume=none"
            )
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        return torch.load(path / f"trainer_state_rank{self.rank}.pt", weights_only=True)
