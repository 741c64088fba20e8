"""Resuming with another schedule: a real (1-process, DeepSpeed, CPU) run stopped at step 2 of 4,
then resumed configured for 7 steps at twice the learning rate, follows the new schedule.

The learning rate each step used is read back from metrics.jsonl (the optimizer's own parameter
group rate before its step) and compared with the closed form ``warmup_cosine``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clapscale.shards.synthetic import generate
from clapscale.shards.writer import write_shards
from clapscale.train.schedule import warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    from test_inference import _tiny_text_dir

    text = tmp_path / "text"
    if not text.exists():
        _tiny_text_dir(text)
        write_shards(generate("train", 16, seed=5), tmp_path / "shards", "train", shard_size=8)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "clapscale.train.cli", str(REPO / "configs" / "tiny.yaml"),
        f"data.train={tmp_path}/shards/train/{{000000..000001}}.tar", "data.val=", "data.workers=0",
        "data.batch_size=4", f"model.text.path={text}", "model.text.pretrained=false", "model.embed_dim=64",
        f"train.out_dir={tmp_path}/runs", "train.name=s", "train.eval_every=-1", "train.log_every=1",
        "train.checkpoint_every=0", "optim.warmup_steps=2", *overrides,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_resume_with_more_steps_and_another_lr_follows_the_new_schedule(tmp_path):
    _run(tmp_path, "train.steps=4", "train.stop_at=2", "optim.lr=1.0e-3")
    proc = _run(tmp_path, "train.steps=7", "optim.lr=2.0e-3", "optim.min_lr=1.0e-5", "train.resume=auto")

    records = [json.loads(line) for line in (tmp_path / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    used = {r["step"]: r["lr"] for r in records if "lr" in r and "event" not in r}
    assert sorted(used) == list(range(1, 8))
    # Step k (1-based) uses the rate of optimizer step k - 1.
    want = {k: warmup_cosine(k - 1, 1e-3, 2, 4) for k in (1, 2)}
    want.update({k: warmup_cosine(k - 1, 2e-3, 2, 7, 1e-5) for k in range(3, 8)})
    for k in want:
        assert used[k] == pytest.approx(want[k], rel=1e-12), (k, used, want)
    # The change is logged, with both schedules, and said on the console.
    changed = [r for r in records if r.get("event") == "lr_schedule_changed"]
    assert len(changed) == 1 and changed[0]["step"] == 2
    assert changed[0]["previous"]["total_steps"] == 4 and changed[0]["now"]["total_steps"] == 7
    assert "lr 0.002 over 7 steps" in proc.stdout and "checkpoint: lr 0.001 over 4 steps" in proc.stdout

