"""Run logging: TensorBoard scalars and a metrics.jsonl, written by rank 0 only.

Both live in ``runs/<name>/``: ``tensorboard --logdir runs/`` shows every run. The JSONL file
holds one line per optimizer step with full-precision values (what tests and scripts read);
TensorBoard gets the same scalars (loss, lr, logit_scale = 1/temperature, grad_norm,
samples_per_s, data_wait_fraction, skipped_samples, nonfinite_skipped) every ``train.log_every``
steps, eval metrics under ``eval/``, and the resolved config as text at start-up. The console
(rank 0's stdout) gets the same step records at ``train.log_every`` and every evaluation's figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class ThroughputWindow:
    """Samples per second and the fraction of time spent waiting for data, since the last read.

    ``waited(seconds)`` after each wait for batches, ``stepped()`` after each optimizer step,
    ``read(samples_per_step)`` returns the window's figures and starts a new window.
    """

    def __init__(self) -> None:
        self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def stepped(self) -> None:
        self._steps += 1

    def read(self, samples_per_step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        figures = {"samples_per_s": self._steps * samples_per_step / elapsed, "data_wait_fraction": self._wait / elapsed}
        self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0
        return figures


class RunLogger:
    """Writes only when ``enabled`` (rank 0); other ranks hold a logger that does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool, config_yaml: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(log_dir=str(self.run_dir))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if config_yaml:
            # Markdown code block so TensorBoard keeps the indentation.
            self._tb.add_text("config", "```\n" + config_yaml + "\n```", 0)

    def step(self, step: int, record: dict[str, Any], to_tensorboard: bool) -> None:
        """One optimizer step's record (``{"loss": ..., "lr": ...}``); JSONL always, TB when asked."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        if to_tensorboard:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)
            shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
            print(f"step {step} {shown}", flush=True)

    def scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
        """E.g. eval metrics: ``scalars("eval", 100, {"retrieval/t2a/R@1": 3.1})``; also printed,
        on the console where the loss is, one line per group (``eval retrieval step 100: t2a/R@1 3.1 ...``)."""
        if not self.enabled:
            return
        for key, value in values.items():
            self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._jsonl.write(json.dumps({"step": step, prefix: values}) + "\n")
        groups: dict[str, list[str]] = {}
        for key, value in values.items():
            group, _, name = key.partition("/")
            groups.setdefault(group, []).append(f"{name or group} {value:.4g}")
        for group, shown in groups.items():
            print(f"{prefix} {group} step {step}: {' '.join(shown)}", flush=True)

    def event(self, step: int, what: str, **info: Any) -> None:
        """A non-scalar event (checkpoint saved, non-finite loss, stop) into the JSONL."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, "event": what, **info}) + "\n")

    def notice(self, step: int, what: str, text: str, **info: Any) -> None:
        """An event the user must see: into the JSONL like ``event``, and ``text`` on the console."""
        if self.enabled:
            self.event(step, what, **info)
            print(f"step {step}: {text}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._tb.close()
            self._jsonl.close()
