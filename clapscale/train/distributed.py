"""Who am I in the job: rank, local rank and world size from torchrun's or SLURM's environment.

torchrun exports ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``.
Under ``srun`` every task gets ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_STEP_NUM_TASKS``; the
rendezvous host is the first host of the allocation (``scontrol show hostnames``) and the port is
derived from the job id unless ``MASTER_PORT`` is set, so every task agrees without talking.

Faults: every collective waits at most ``train.dist_timeout_s`` (torch's default is 30 min, so a
hung peer would stall the whole job that long). When a collective fails (a peer died, or hung
past the timeout), ``describe_peer_failure`` asks the rendezvous store which ranks still answer
and names the others, so the log says which rank to look at.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (``node[01-04],gpu7`` -> ``node01``)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(
            f"could not expand SLURM node list {nodelist!r} with `scontrol show hostnames` ({e}); "
            "set MASTER_ADDR explicitly"
        ) from e
    if not out:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` printed no host")
    return out[0]


def _tasks_on_first_node(spec: str) -> int:
    # SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1": the first group is enough for a local size.
    m = re.match(r"(\d+)", spec or "")
    return int(m.group(1)) if m else 1


def discover(
    env: Mapping[str, str] | None = None,
    hostnames: Callable[[str], str] = first_slurm_host,
) -> DistEnv:
    """Read the launcher's environment; torchrun's variables win over SLURM's.

    Raises ``RuntimeError`` for an sbatch batch script that asks for several tasks but runs Python
    directly (not under ``srun``): that process would wait forever for ranks that never start.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        addr = env.get("MASTER_ADDR") or (hostnames(nodelist) if nodelist else "127.0.0.1")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            local_world_size=_tasks_on_first_node(env.get("SLURM_STEP_TASKS_PER_NODE", "")),
            master_addr=addr,
            # A port per job so two jobs sharing a node do not collide.
            master_port=int(env.get("MASTER_PORT") or 15000 + job % 20000),
            launcher="slurm",
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        raise RuntimeError(
            f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun: "
            "launch training with `srun` (launch/pretrain.sh does) or `torchrun`"
        )
    # Port 0: a single process needs no rendezvous port (see init_process_group).
    return DistEnv(0, 0, 1, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)), "single")


# The rendezvous store of this process's group, kept to ask who is alive after a failure.
_STORE: dist.Store | None = None


def init_process_group(denv: DistEnv, timeout_s: float = 1800.0) -> str:
    """Join the job's process group (NCCL with CUDA, gloo otherwise); returns the backend.

    ``timeout_s`` bounds every collective (and the rendezvous): a rank whose peer died or hangs
    raises instead of waiting. A single process still gets a (world size 1) group: DeepSpeed's
    engine wants one.
    """
    global _STORE
    if dist.is_initialized():
        return dist.get_backend()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    # DeepSpeed reads these even when the group already exists.
    os.environ.update(
        RANK=str(denv.rank), LOCAL_RANK=str(denv.local_rank), WORLD_SIZE=str(denv.world_size),
        LOCAL_WORLD_SIZE=str(denv.local_world_size),
        MASTER_ADDR=denv.master_addr, MASTER_PORT=str(denv.master_port),
    )
    timeout = datetime.timedelta(seconds=timeout_s)
    if denv.world_size == 1 and denv.master_port == 0:
        # An in-memory store: two single-process runs on one machine never fight over a port.
        store: dist.Store = dist.HashStore()
    else:
        # torch's own tcp:// rendezvous (under torchrun it joins the agent's store), done here so
        # the store stays reachable for ``describe_peer_failure``.
        store, _, _ = next(dist.rendezvous(
            f"tcp://{denv.master_addr}:{denv.master_port}", denv.rank, denv.world_size, timeout=timeout
        ))
    dist.init_process_group(backend, store=store, rank=denv.rank, world_size=denv.world_size, timeout=timeout)
    _STORE = store
    return backend


# What gloo's transport says when the other side of a pair died, hung past the timeout or dropped
# off the network. A RuntimeError from torch.distributed without one of these (a shape mismatch,
# an uninitialised group) is our bug and keeps its traceback.
_PEER_FAILURE_MESSAGES = (
    "connection reset by peer", "connection closed by peer", "pair closure", "timed out", "timeout",
    "broken pipe", "connection refused", "socket closed", "end of file",
)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because of another rank (it died, hung past
    the timeout, or the network dropped): torch's DistError family (NCCL, the store), or a
    ``RuntimeError`` raised inside torch.distributed whose message is one of gloo's transport
    failures ("Connection reset by peer", "Application timeout caused pair closure", ...)."""
    if isinstance(error, dist.DistError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    tb, innermost = error.__traceback__, None
    while tb is not None:
        innermost, tb = tb, tb.tb_next
    where = innermost.tb_frame.f_code.co_filename if innermost is not None else ""
    if os.path.join("torch", "distributed", "") not in where:
        return False
    message = str(error).lower()
    return any(m in message for m in _PEER_FAILURE_MESSAGES)


def describe_peer_failure(denv: DistEnv, error: BaseException, wait_s: float = 10.0) -> str:
    """Why this rank's collective failed, naming the ranks that no longer answer.

    Every surviving rank checks in under a key of the rendezvous store and waits up to
    ``wait_s`` for the others; ranks missing then are dead or hung. When the store itself is gone
    (it lives in rank 0's process unless torchrun's agent hosts it) rank 0 is the one to look at.
    """
    base = f"rank {denv.rank}: a collective operation failed ({type(error).__name__}: {str(error).strip()[:300]})"
    if _STORE is None or denv.world_size == 1:
        return base
    peers = [r for r in range(denv.world_size) if r != denv.rank]
    answered: list[int] = []

    def roll_call() -> None:
        try:
            _STORE.set(f"clapscale/alive/{denv.rank}", "1")
            deadline = time.monotonic() + wait_s
            pending = list(peers)
            while pending and time.monotonic() < deadline:
                for r in [r for r in pending if _STORE.check([f"clapscale/alive/{r}"])]:
                    answered.append(r)
                    pending.remove(r)
                time.sleep(0.2)
        except (RuntimeError, OSError):  # the store's host died: whoever has not answered is missing
            return

    # In a daemon thread: a store whose host is stopped blocks its client without a timeout.
    caller = threading.Thread(target=roll_call, daemon=True)
    caller.start()
    caller.join(wait_s + 2.0)
    missing = [r for r in peers if r not in answered]
    if not missing:
        return f"{base}; every other rank still answers, so the failure is a timeout or a network fault"
    names = ", ".join(str(r) for r in missing)
    return f"{base}; rank{'s' if len(missing) > 1 else ''} {names} did not answer within {wait_s:.0f} s: dead or hung"


def request_requeue(denv: DistEnv, env: Mapping[str, str] | None = None) -> Path | None:
    """Collective. Rank 0 writes the marker file ``$CLAPSCALE_REQUEUE_FILE`` (set by
    launch/pretrain.sh) that asks the batch script to requeue the job; returns its path.

    Called after the checkpoint is complete. The barrier keeps every rank alive until the marker
    exists: with ``srun --kill-on-bad-exit`` the first rank to exit gets the others killed, and
    srun's own exit code (137 / 143 then) cannot say that the run asked to be requeued.
    """
    env = os.environ if env is None else env
    marker = Path(env["CLAPSCALE_REQUEUE_FILE"]) if env.get("CLAPSCALE_REQUEUE_FILE") else None
    if marker is not None and denv.is_main:
        part = marker.with_name(marker.name + ".part")
        part.write_text(f"requeue requested by rank 0 at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        os.replace(part, marker)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return marker


def device_for(denv: DistEnv) -> torch.device:
    """The device this rank trains on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", denv.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
