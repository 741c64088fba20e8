"""Fault injection: real faults in real processes, and what must survive them.

- checkpoint writes: a real DeepSpeed engine re-saving a step is SIGKILLed before every rename /
  rmtree of the save in turn; every time, the newest complete checkpoint is intact and whole.
- 2-rank runs over gloo (tiny config, ZeRO-1, fp32, data.resampled=false), ranks started as plain
  processes as srun does. ONE uninterrupted run (the module fixture ``reference``) is shared by
  every case that compares losses or weights with it:
  * kill -9 of rank 1 mid-run: rank 0 exits 1 at once naming rank 1; then rank 0 hangs
    (SIGSTOP): rank 1 exits after train.dist_timeout_s naming rank 0; a rerun with
    resume=auto ends with the reference's per-step losses and final weights, bit for bit;
  * kill -9 of both ranks while a checkpoint is being written: the newest complete one is
    intact and is the one resumed; the run ends as the reference did;
  * disk full (RLIMIT_FSIZE) at a checkpoint: a one-line error on both ranks, the previous
    checkpoint byte-identical, nothing half-named left;
  * shards truncated, overwritten with noise and deleted while the run reads them: skipped and
    counted, the run reaches its last step;
  * SIGUSR1 at two random steps (all ranks, then one rank): exit 3 with the requeue marker each
    time, and the final weights equal the reference's bit for bit.

Each case is bounded by explicit timeouts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_runs import _env

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------ real 2-rank runs over gloo

# Ranks are started as two plain processes with the rendezvous in their environment, as srun does
# (torchrun would kill the survivors itself and hide what the trainer does when a peer dies).
STEPS = 6
FAULT_TIMEOUT_S = 20  # train.dist_timeout_s of these runs: a hung peer is detected after this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """Two rank processes of one run; their output goes to ``log_dir/rank{r}.log``."""

    def __init__(self, args: list[str], log_dir: Path, preexec_fn=None, **extra_env: str):
        port = _free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{r}.log" for r in range(2)]
        self.procs = []
        for r in range(2):
            env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env)
            with open(self.logs[r], "a") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "clapscale.train.cli", *args], cwd=REPO, env=env,
                    stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                ))

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ranks still running after {timeout} s:\n" + self.output(0)[-3000:])
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _args(shards: str, out_dir: Path, *extra: str) -> list[str]:
    return ["configs/tiny.yaml", f"data.train={shards}", "data.val=", f"train.out_dir={out_dir}",
            # A small shuffle buffer: resumes mid-epoch take the branch that seeks past the buffer's
            # last sample and reads on (tiny.yaml's 256 would only drain a buffer holding the epoch).
            "data.batch_size=4", "data.resampled=false", "data.shuffle_buffer=4", "train.eval_every=-1",
            "train.log_every=1",
            f"train.steps={STEPS}", "train.checkpoint_every=2", "train.keep_last=10", "optim.warmup_steps=2",
            f"train.dist_timeout_s={FAULT_TIMEOUT_S}", *extra]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(run_dir: Path) -> dict[int, float]:
    # A resumed run appends to the same file: the last record of a step is the one that counted.
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r and "event" not in r}


def _wait_for_step(run_dir: Path, step: int, ranks: Ranks, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(_losses(run_dir), default=0) < step:
        codes = [p.poll() for p in ranks.procs]
        assert None in codes, f"run ended ({codes}) before step {step}:\n{ranks.output(0)[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.1)


def _resumed_from(run_dir: Path) -> list[str]:
    return [Path(r["path"]).name for r in _records(run_dir) if r.get("event") == "resumed"]


def _exported(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    """Per-step losses and final weights equal the uninterrupted run's, bit for bit (CPU, fp32)."""
    want, got = _losses(reference), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    assert got == want, (got, want)
    ref_w, w = _exported(reference), _exported(run_dir)
    assert sorted(w) == sorted(ref_w)
    different = [k for k in w if not torch.equal(w[k], ref_w[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "tools/make_shards.py", "--synthetic", "80", "--out", str(out),
                    "--shard-size", "8", "--quiet"], cwd=REPO, env=_env(), check=True, timeout=180)
    assert len(list((out / "train").glob("*.tar"))) >= 6
    return out


def _spec(shards: Path) -> str:
    return f"{shards}/train/{{000000..000003}}.tar"


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """THE uninterrupted run every fault case compares with (shared by the cases below)."""
    out = tmp_path_factory.mktemp("reference")
    ranks = Ranks(_args(_spec(shards), out), out / "logs")
    assert ranks.wait(600) == [0, 0], ranks.output(0)[-4000:]
    return out / "tiny"


@pytest.mark.slow
def test_a_dead_or_hung_rank_is_named_and_the_run_resumes_exactly(shards, reference, tmp_path):
    # 1. kill -9 of rank 1 mid-run: rank 0 stops at its next collective and names rank 1.
    ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / "logs1")
    try:
        _wait_for_step(tmp_path / "tiny", 3, ranks)
        ranks.procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        codes = ranks.wait(FAULT_TIMEOUT_S + 60)
        took = time.monotonic() - t0
    finally:
        ranks.kill()
    assert codes == [1, -signal.SIGKILL], (codes, ranks.output(0)[-3000:])
    err = ranks.output(0)
    assert "rank 1 did not answer" in err and "train.resume=auto" in err and "Traceback" not in err, err[-3000:]
    assert took < FAULT_TIMEOUT_S + 45, took

    # 2. rank 0 hangs (SIGSTOP) in the resumed run: rank 1 gives up after train.dist_timeout_s
    # instead of torch's default 30 min, and says rank 0 is the one to look at.
    ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / "logs2")
    try:
        _wait_for_step(tmp_path / "tiny", 4, ranks)
        ranks.procs[0].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        ranks.procs[1].wait(timeout=FAULT_TIMEOUT_S + 90)
        took = time.monotonic() - t0
    finally:
        ranks.kill()
    assert ranks.procs[1].returncode == 1, ranks.output(1)[-3000:]
    assert "rank 0" in ranks.output(1).split("clapscale train:")[-1], ranks.output(1)[-3000:]
    assert took < FAULT_TIMEOUT_S + 60, took

    # 3. a rerun resumes from the newest complete checkpoint and ends as the uninterrupted run did.
    ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / "logs3")
    assert ranks.wait(600) == [0, 0], ranks.output(0)[-4000:]
    assert len(_resumed_from(tmp_path / "tiny")) == 2
    _assert_same_run(tmp_path / "tiny", reference)


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_resumes_the_newest_complete_one(shards, reference, tmp_path):
    ckpts = tmp_path / "tiny" / "checkpoints"
    ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / "logs1")
    try:
        # Freeze both ranks as soon as the save after the first complete one is in progress; if it
        # is still being written, kill -9 both (a node lost mid-checkpoint), else try the next one.
        deadline = time.monotonic() + 300
        while True:
            assert None in [p.poll() for p in ranks.procs], ranks.output(0)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint write caught in 300 s"
            writing = list(ckpts.glob("step_*.tmp")) if (ckpts / "step_00000002" / "meta.json").is_file() else []
            if writing:
                for p in ranks.procs:
                    p.send_signal(signal.SIGSTOP)
                if writing[0].exists():
                    break
                for p in ranks.procs:
                    p.send_signal(signal.SIGCONT)
            time.sleep(0.01)
    finally:
        ranks.kill()
    killed_in = writing[0].name
    assert not (writing[0] / "meta.json").exists()
    complete = sorted(p.name for p in ckpts.glob("step_????????") if (p / "meta.json").is_file())
    newest = complete[-1]
    assert f"{newest}.tmp" != killed_in and newest < killed_in

    ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / "logs2")
    assert ranks.wait(600) == [0, 0], ranks.output(0)[-4000:]
    assert _resumed_from(tmp_path / "tiny") == [newest]
    assert not list(ckpts.glob("step_*.tmp"))
    _assert_same_run(tmp_path / "tiny", reference)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(shards, reference, tmp_path):
    import resource

    ckpts = tmp_path / "tiny" / "checkpoints"
    # Start from a copy of the uninterrupted run's step 4: this run's only write is step 6's.
    shutil.copytree(reference / "checkpoints" / "step_00000004", ckpts / "step_00000004")
    before = {p.name: p.read_bytes() for p in (ckpts / "step_00000004").iterdir()}
    limit = 16 * 2**20  # no file over 16 MiB: the logs fit, the model and optimizer states do not

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / "logs", preexec_fn=small_disk)
    assert ranks.wait(600) == [1, 1], ranks.output(0)[-4000:]
    for r in range(2):
        out = ranks.output(r)
        assert "Traceback" not in out, out[-4000:]
        message = out.split("clapscale train: ")[-1]
        assert message.startswith("could not write the checkpoint of step 6"), out[-3000:]
        assert "step_00000004" in message and "Free disk space" in message, message
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000004"]
    assert {p.name: p.read_bytes() for p in (ckpts / "step_00000004").iterdir()} == before
    want = _losses(reference)
    assert _losses(tmp_path / "tiny") == {5: want[5], 6: want[6]}


@pytest.mark.slow
def test_shards_damaged_or_deleted_mid_run_are_skipped_and_counted(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards / "train", data)
    tars = sorted(data.glob("*.tar"))[:6]
    spec = f"{data}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
    run = tmp_path / "tiny"
    # 6 shards x 8 clips over 2 ranks at batch 4: 6 steps an epoch; 14 steps read every shard again
    # after the damage.
    ranks = Ranks(_args(spec, tmp_path, "train.steps=14", "train.checkpoint_every=0"), tmp_path / "logs")
    try:
        _wait_for_step(run, 1, ranks)
        # While the run reads the set: one shard cut in half, one overwritten with noise in its
        # middle third, one deleted.
        size = tars[1].stat().st_size
        os.truncate(tars[1], size // 2)
        size = tars[3].stat().st_size
        with open(tars[3], "r+b") as f:
            f.seek(size // 3)
            f.write(random.Random(3).randbytes(size // 3))
        tars[5].unlink()
        codes = ranks.wait(600)
    finally:
        ranks.kill()
    assert codes == [0, 0], ranks.output(0)[-4000:]
    assert sorted(_losses(run)) == list(range(1, 15))
    skipped = [r["skipped_samples"] for r in _records(run) if "skipped_samples" in r]
    assert skipped[0] == 0 and skipped[-1] > 0, skipped
    logs = ranks.output(0) + ranks.output(1)
    assert "unreadable_shard" in logs and "truncated_tar" in logs, logs[-4000:]


@pytest.mark.slow
def test_sigusr1_at_random_steps_gives_the_uninterrupted_weights_bit_for_bit(shards, reference, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    stops = sorted(random.Random(seed).sample(range(1, STEPS - 2), 2))
    marker = tmp_path / "requeue-me"
    run = tmp_path / "tiny"
    for i, stop in enumerate(stops):
        # At least one step of this run first: its signal handlers are installed by then.
        first_new = max(_losses(run), default=0) + 1
        ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / f"logs{i}", CLAPSCALE_REQUEUE_FILE=str(marker))
        try:
            _wait_for_step(run, max(stop, first_new), ranks)
            # As Slurm does (every task), then to one rank only: the ranks agree on stopping.
            for p in ranks.procs if i == 0 else ranks.procs[1:]:
                p.send_signal(signal.SIGUSR1)
            codes = ranks.wait(300)
        finally:
            ranks.kill()
        assert codes == [3, 3], (seed, stops, codes, ranks.output(0)[-3000:])
        assert marker.is_file(), (seed, stops)  # rank 0 asked the batch script to requeue
        marker.unlink()
    ranks = Ranks(_args(_spec(shards), tmp_path), tmp_path / "logs_end", CLAPSCALE_REQUEUE_FILE=str(marker))
    assert ranks.wait(600) == [0, 0], ranks.output(0)[-4000:]
    assert not marker.exists()
    assert len(_resumed_from(run)) == 2, (seed, stops)
    _assert_same_run(run, reference)
