"""Rank discovery, LR schedule and checkpoint bookkeeping (no process group needed)."""

import json
import math
import random

import numpy as np
import pytest
import torch

from clapscale.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from clapscale.train.distributed import discover
from clapscale.train.schedule import WarmupCosine, warmup_cosine


def test_torchrun_env_wins_over_slurm():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    d = discover(env)
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size, d.master_addr, d.master_port,
            d.launcher) == (3, 1, 4, 2, "n1", 1234, "torchrun")


def test_slurm_env_uses_first_host_and_job_port():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    seen = []
    d = discover(env, hostnames=lambda nl: seen.append(nl) or "gpu07")
    assert seen == ["gpu[07-08]"]
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size, d.master_addr, d.master_port,
            d.launcher) == (5, 1, 8, 4, "gpu07", 15000 + 4242, "slurm")
    assert discover({**env, "MASTER_PORT": "777", "MASTER_ADDR": "x"}).master_port == 777


def test_batch_script_with_many_tasks_without_srun_is_refused():
    with pytest.raises(RuntimeError, match="srun"):
        discover({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    assert discover({}).launcher == "single" and discover({}).master_port == 0


def test_warmup_then_cosine():
    lr = lambda s: warmup_cosine(s, 1.0, 10, 110, 0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))
    assert WarmupCosine(2.0, 10, 110, 0.2)(60) == pytest.approx(lr(60))


def test_rng_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_resolve_skips_partial_and_picks_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.resolve("auto") is None and mgr.resolve("none") is None
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        if complete:
            (d / "meta.json").write_text(json.dumps({"step": step}))
    (tmp_path / "step_00000040.tmp").mkdir()
    assert mgr.resolve("auto") == tmp_path / "step_00000020"
    assert mgr.resolve(str(tmp_path / "step_00000010")) == tmp_path / "step_00000010"
    with pytest.raises(FileNotFoundError, match="step_00000030"):
        mgr.resolve(str(tmp_path / "step_00000030"))
    mgr.remove_partial()
    assert not (tmp_path / "step_00000040.tmp").exists()


def test_soft_label_teacher_must_read_the_students_inputs():
    from clapscale.config import ConfigError, load_config
    from clapscale.train.teacher import check_teacher

    student = load_config("configs/tiny.yaml", ["loss.kind=soft_label", "loss.teacher=runs/t/model"])
    check_teacher(student, load_config("configs/tiny.yaml", ["audio.max_seconds=30"]))  # crop bound: fine
    teacher = load_config("configs/tiny.yaml", ["audio.mel_scale=htk", "model.text.name=bert",
                                                "model.text.path=/some/bert"])
    with pytest.raises(ConfigError) as e:
        check_teacher(student, teacher)
    msg = str(e.value)
    assert "loss.teacher='runs/t/model'" in msg
    assert "audio.mel_scale: 'slaney' vs teacher 'htk'" in msg
    assert "model.text.name: 'minilm' vs teacher 'bert'" in msg


_SIGNALS_ON_TWO_RANKS = """
import os, signal
import torch, torch.distributed as dist
from clapscale.train.signals import StopSignals
dist.init_process_group("gloo")
rank = dist.get_rank()
with StopSignals(torch.device("cpu")) as stop:
    first = stop.agreed()
    os.kill(os.getpid(), (signal.SIGUSR1, signal.SIGTERM)[rank])
    print(first, stop.agreed())
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_that_received_different_signals_agree_on_one():
    """SIGUSR1 on rank 0 and SIGTERM on rank 1: both ranks log the same stop signal (the larger)."""
    import signal

    from test_eval_gather import run_two_ranks

    runs = run_two_ranks(_SIGNALS_ON_TWO_RANKS, [], timeout=60)
    assert all(rc == 0 for rc, _, _ in runs), [err[-2000:] for _, _, err in runs]
    got = [stdout.split() for _, stdout, _ in runs]
    assert got == [["None", str(int(signal.SIGTERM))]] * 2, got


def _raise_inside_torch_distributed(message):
    """A RuntimeError whose innermost frame is in torch/distributed, as gloo's transport raises them."""
    import os

    import torch.distributed as dist

    code = compile(f"raise RuntimeError({message!r})", os.path.join(os.path.dirname(dist.__file__), "gloo_io.py"),
                   "exec")
    try:
        exec(code)
    except RuntimeError as e:
        return e


def test_only_transport_failures_count_as_a_dead_peer():
    # A shape bug raised by torch.distributed itself must keep its traceback (a real gloo group of
    # one); gloo's transport failures after a peer died or hung are peer failures.
    import torch.distributed as dist

    from clapscale.train.distributed import is_peer_failure

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError) as bug:
            dist.all_gather([torch.empty(2)], torch.empty(3))
        assert not is_peer_failure(bug.value)
    finally:
        dist.destroy_process_group()
    for message in ("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:3",
                    "Application timeout caused pair closure",
                    "Timed out waiting 20000ms for recv operation to complete"):
        assert is_peer_failure(_raise_inside_torch_distributed(message)), message
    assert not is_peer_failure(RuntimeError("Connection reset by peer"))  # not raised by torch.distributed
