"""Replay (``data.replay``): each training batch is, with probability ``prob``, a replay batch.

Curation students train on an Improvement-Set and, against catastrophic forgetting, "randomly
replace the batches with samples replayed from the teacher training set" (DU) or from the DS set
(ADS) (papers/clap-unsupervised-curation-soft-labels.txt, section 4). ``ReplayLoader`` wraps the
training loader and a second loader over the replay shards: whether output batch ``n`` (counted
over the whole run) comes from the replay set is a draw of a generator seeded by
``(data.seed, n)``, the same on every rank, so every rank replays on the same steps and the
decision does not depend on where a run was resumed. A replayed batch does not consume a batch of
the training set: the training set's epochs stay whole. ``state_dict`` holds both loaders'
positions and ``n``, so a resumed run continues identically.

Per-sample mixing of the replay set (instead of whole batches) is ``data.train`` with two
``::``-joined sources and ``data.train_weights``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Separates the replay draws from any other generator seeded with data.seed.
_STREAM = 0x5245504C  # "REPL"


def replay_draw(seed: int, position: int, prob: float) -> bool:
    """Whether output batch ``position`` is a replay batch (True with probability ``prob``)."""
    return bool(np.random.default_rng([seed, _STREAM, position]).random() < prob)


class ReplayLoader:
    """The training loader with a share ``prob`` of its batches replaced by replay batches.

    Same interface as the loader it wraps (``set_epoch``, ``state_dict`` / ``load_state_dict``,
    ``skipped``, ``warned``, ``source_counts``, ``len``, which are the training set's); ``replayed``
    counts replay batches yielded and ``position`` all batches yielded.
    """

    def __init__(self, main: Any, replay: Any, prob: float, seed: int):
        if not 0.0 < prob < 1.0:
            raise ValueError(f"replay probability must be in (0, 1), got {prob}")
        self.main, self.replay, self.prob, self.seed = main, replay, prob, seed
        self.position = 0
        self.replayed = 0
        self._replay_it: Iterator[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.main)

    @property
    def skipped(self) -> dict[str, int]:
        out = dict(self.main.skipped)
        for k, v in self.replay.skipped.items():
            out[k] = out.get(k, 0) + v
        return out

    @property
    def warned(self) -> dict[str, int]:
        return self.main.warned

    @property
    def source_counts(self) -> list[int]:
        return self.main.source_counts

    def set_epoch(self, epoch: int) -> None:
        self.main.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"replay_position": self.position, "replayed": self.replayed,
                "main": self.main.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "replay_position" not in state:
            raise ValueError(
                "data position was saved without data.replay: its replay position is unknown; resume "
                "with the same data.replay as the run that saved it, or start the data stream afresh"
            )
        self.main.load_state_dict(state["main"])
        self.replay.load_state_dict(state["replay"])
        self.position = int(state["replay_position"])
        self.replayed = int(state["replayed"])
        self._replay_it = None  # reopened at the restored position

    def _next_replay(self) -> dict[str, Any]:
        for _ in range(2):
            if self._replay_it is None:
                self._replay_it = iter(self.replay)
            batch = next(self._replay_it, None)
            if batch is not None:
                return batch
            self._replay_it = None  # the replay set's epoch ended: its next epoch
        raise RuntimeError("the replay loader yielded no batch over a whole pass: check data.replay.spec")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        main_it = iter(self.main)
        while True:
            if replay_draw(self.seed, self.position, self.prob):
                batch = self._next_replay()
                self.replayed += 1
            else:
                batch = next(main_it, None)
                if batch is None:
                    return  # the training set's pass ended; the next pass draws at this position again
            self.position += 1
            yield batch
