"""End-to-end training runs of the tiny ClapModel on real shards, in subprocesses with timeouts.

- 2 ranks under torchrun, ZeRO-3, bf16, gradient accumulation 2: N steps + stop + resume + N more
  gives the same per-step losses as 2N steps straight; checkpoints are pruned to the last k; the
  fp32 export equals DeepSpeed's own consolidation of the final checkpoint; evaluation at the end
  runs on every rank; TensorBoard has the scalars, eval metrics and the config.
- a diverging run (absurd learning rate) skips non-finite steps, stops after K in a row with a
  clear error and does not save the state that produced them (resume=auto must not pick it).
- SIGUSR1 (SLURM's time-limit warning) makes the run checkpoint and exit with code 3 (run with the
  soft-label loss + frozen teacher, a frozen text tower and gradient checkpointing).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    """A training subprocess's environment: offline, CPU DeepSpeed, no inherited rank variables."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), PYTHONUNBUFFERED="1",
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(var, None)
    env.update(extra)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(nproc, args):
    if nproc == 1:
        return [sys.executable, "-m", "clapscale.train.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "clapscale.train.cli", *args]


def _train(nproc, args, timeout=240):
    proc = subprocess.run(_command(nproc, args), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "tools/make_shards.py", "--synthetic", "80", "--out", str(out),
                    "--shard-size", "16", "--quiet"], cwd=REPO, env=_env(), check=True, timeout=120)
    train = sorted((out / "train").glob("*.tar"))
    assert len(train) >= 2
    return f"{out}/train/{{{train[0].stem}..{train[-1].stem}}}.tar"


def _val_spec(train_spec):
    return train_spec.split("/train/")[0] + "/valid/000000.tar"


def _base(shards, out_dir, *extra):
    return ["configs/tiny.yaml", f"data.train={shards}", "data.val=", f"train.out_dir={out_dir}",
            "data.batch_size=4", "train.eval_every=-1", "train.log_every=1", *extra]


def _records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r and "event" not in r}


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow
def test_zero3_bf16_accumulation_resume_is_exact(shards, tmp_path):
    # data.resampled=false: the loader replays its stream to the saved position (a resampled
    # stream is re-seeded at the position instead: equally random, not the same samples).
    common = ["train.zero_stage=3", "train.precision=bf16", "train.grad_accum=2", "train.steps=4",
              "train.checkpoint_every=1", "train.keep_last=2", "optim.warmup_steps=2", "data.resampled=false",
              # Augmentation draws depend on (seed, step, rank) only: the resumed run repeats them.
              "augment.gain_db=6", "augment.time_masks=2", "augment.time_mask_frames=40",
              "augment.freq_masks=1", "augment.freq_mask_bins=8"]
    straight = tmp_path / "straight"
    # Only the straight run evaluates (at its end): every rank takes part, under ZeRO-3.
    proc = _train(2, _base(shards, straight, *common, f"data.val={_val_spec(shards)}", "train.eval_every=0"))
    _ok(proc)
    # No rank prints torch's all_gather deprecation warnings (ours and DeepSpeed's ZeRO gathers).
    assert "is deprecated" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    split = tmp_path / "split"
    _ok(_train(2, _base(shards, split, *common, "train.stop_at=2")))
    assert sorted(_losses(split / "tiny")) == [1, 2]
    _ok(_train(2, _base(shards, split, *common)))

    want, got = _losses(straight / "tiny"), _losses(split / "tiny")
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (step, want, got)
    assert any(r.get("event") == "resumed" for r in _records(split / "tiny"))
    assert not any(r.get("event") == "lr_schedule_changed" for r in _records(split / "tiny"))

    ckpts = sorted(p.name for p in (straight / "tiny" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000004"]  # keep_last=2
    meta = json.loads((straight / "tiny" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["samples_seen"] == 4 * 4 * 2 * 2 and meta["world_size"] == 2

    # The fp32 export equals DeepSpeed's own offline consolidation of the final ZeRO-3 checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from clapscale.models import load_model

    model, cfg = load_model(straight / "tiny" / "model")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(straight / "tiny" / "checkpoints"),
                                                         tag="step_00000004")
    exported = model.state_dict()
    for name, p in model.named_parameters():
        assert exported[name].dtype == torch.float32
        torch.testing.assert_close(exported[name], reference[name].reshape(p.shape).float(), msg=name)
    assert model.logit_scale.shape == ()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tiny"), size_guidance={"tensors": 0}).Reload()
    tags = set(events.Tags()["scalars"]) | set(events.Tags()["tensors"])
    for tag in ("train/loss", "train/lr", "train/logit_scale", "train/grad_norm", "train/samples_per_s",
                "train/data_wait_fraction", "train/skipped_samples", "config/text_summary",
                "eval/retrieval/t2a/R@1", "eval/zeroshot/top1"):
        assert tag in tags, sorted(tags)
    evals = [r["eval"] for r in _records(straight / "tiny") if "eval" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["retrieval/t2a/R@1"] <= 100.0


@pytest.mark.slow
def test_nonfinite_losses_stop_without_saving_the_state_that_produced_them(shards, tmp_path):
    # AdamW moves every weight by ~lr on the first step: the second forward overflows.
    proc = _train(1, _base(shards, tmp_path, "optim.lr=1.0e+30", "optim.warmup_steps=0", "train.steps=20",
                          "train.max_nonfinite=2", "train.checkpoint_every=0"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 non-finite losses in a row" in proc.stderr and "produced them is not saved" in proc.stderr
    assert "newest checkpoint is none" in proc.stderr
    records = _records(tmp_path / "tiny")
    assert [r["in_a_row"] for r in records if r.get("event") == "nonfinite_loss"] == [1, 2]
    assert sorted(_losses(tmp_path / "tiny")) == [1]
    # Step 1's update made the weights overflow: saving them would make resume=auto restart from them.
    assert not list((tmp_path / "tiny" / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_sigusr1_saves_a_checkpoint_and_exits_for_requeue(shards, tmp_path):
    # Also the switches: soft-label loss against a frozen teacher checkpoint (an untrained tiny
    # CLAP), a frozen text tower, gradient checkpointing in the audio tower.
    from clapscale.config import load_config
    from clapscale.models import build_model, save_model

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(7)
    save_model(build_model(cfg), cfg, tmp_path / "teacher")
    args = _base(shards, tmp_path, "train.steps=1000", "train.checkpoint_every=0", "loss.kind=soft_label",
                 f"loss.teacher={tmp_path / 'teacher'}", "model.text.frozen=true",
                 "model.audio.grad_checkpointing=true")
    proc = subprocess.Popen(_command(1, args),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out[-4000:]
    last = max(_losses(tmp_path / "tiny"))
    assert (tmp_path / "tiny" / "checkpoints" / f"step_{last:08d}" / "meta.json").is_file()
    assert "stopped by signal" in out
    assert all(0.0 < loss < 20.0 for loss in _losses(tmp_path / "tiny").values())
