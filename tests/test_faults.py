"""Fault injection: real faults in real processes, and what must survive them.

- checkpoint writes: a real DeepSpeed engine re-saving a step is SIGKILLed at every filesystem
  mutation of the save in turn; every time, the newest complete checkpoint is intact and whole.

Each case is bounded by explicit timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), PYTHONUNBUFFERED="1",
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(var, None)
    env.update(extra)
    return env


# ------------------------------------------------------------------ a kill at every step of a save

# Audit events (PEP 578) that change the checkpoint tree at the directory level: a SIGKILL just
# before each one is a kill at that instant of the save (file writes in between are equivalent to
# a kill before the next rename).
_MUTATIONS = ("os.rename", "shutil.rmtree")


def _resave_child(root: str, kill_at: int) -> None:
    """Subprocess body. A one-process DeepSpeed engine (Linear 8 -> 8, ZeRO-1, AdamW) saves steps
    1 and 2 (weights "old"), takes an optimizer step (weights "new") and re-saves step 2, as a
    signal right after a periodic save does; it SIGKILLs itself just before the ``kill_at``-th
    rename / rmtree of that re-save (none left: the save completes, exit 0)."""
    import deepspeed

    from clapscale.train.checkpoint import CheckpointManager
    from clapscale.train.distributed import DistEnv, init_process_group

    init_process_group(DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single"))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1},
    )
    mgr = CheckpointManager(root, keep_last=3)
    mgr.save(engine, 1, {"version": "old"}, "cfg: old\n")
    mgr.save(engine, 2, {"version": "old"}, "cfg: old\n")
    engine.backward(engine(torch.ones(1, 8)).sum())
    engine.step()
    seen = [0]

    def hook(event: str, args: tuple) -> None:
        if event in _MUTATIONS:
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    mgr.save(engine, 2, {"version": "new"}, "cfg: new\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: the parent only needs the files


def _run_resave(root: Path, kill_at: int) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_faults; "
            f"test_faults._resave_child({str(root)!r}, {kill_at})")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=180)


def _weights(ckpt: Path) -> torch.Tensor:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]["weight"]


def test_a_kill_at_any_point_of_a_resave_keeps_the_step_complete(tmp_path):
    from clapscale.train.checkpoint import CheckpointManager

    versions = set()
    for k in range(1, 20):  # every kill point in turn, one process each, until a save completes
        root = tmp_path / f"kill{k:02d}"
        proc = _run_resave(root, k)
        assert proc.returncode in (0, -signal.SIGKILL), (k, proc.returncode, proc.stderr[-3000:])
        mgr = CheckpointManager(root, keep_last=3)
        mgr.remove_partial()  # what a restarted run does first
        assert [p.name for p in mgr.complete()] == ["step_00000001", "step_00000002"], (k, sorted(os.listdir(root)))
        assert not list(root.glob("step_*.tmp")) and not list(root.glob("step_*.old")), k
        ckpt = mgr.resolve("auto")
        version = torch.load(ckpt / "trainer_state_rank0.pt", weights_only=True)["version"]
        versions.add(version)
        # Whole: every file of the directory comes from the same save.
        assert (ckpt / "config.yaml").read_text() == f"cfg: {version}\n", k
        assert json.loads((ckpt / "meta.json").read_text())["step"] == 2
        step1 = _weights(root / "step_00000001")
        assert torch.equal(_weights(ckpt), step1) == (version == "old"), k
        if proc.returncode == 0:
            break
    assert k >= 4 and proc.returncode == 0, k  # the re-save has several kill points and ends
    assert versions == {"old", "new"}
