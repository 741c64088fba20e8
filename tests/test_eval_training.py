"""Evaluation as the trainer uses it, with real (2-step, DeepSpeed, CPU) training runs:

- the metrics the trainer logs at its final step equal `evaluate` on the exported model;
- `clapscale.inference.load` reads the trainer's DeepSpeed checkpoint directory and gets the
  exported weights exactly, and a run directory resolves to its export;
- under ZeRO-3 on 2 ranks whose eval shares differ in batch count, the in-training evaluation
  completes (no rank waits forever in a parameter all-gather), and the partitioned checkpoint
  loads to exactly the exported weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clapscale.eval.runner import evaluate
from clapscale.inference import load
from clapscale.models.loading import load_trained_model
from clapscale.models import load_model
from clapscale.shards.synthetic import generate
from clapscale.shards.writer import write_shards

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
                TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")


def _train(tmp_path, launcher: list[str], extra: list[str], module: str = "clapscale.cli",
           with_output: bool = False):
    """Train through ``python -m <module>`` (``clapscale.cli`` takes the ``train`` subcommand);
    returns the run directory (and the run's stdout with ``with_output``)."""
    from test_inference import _tiny_text_dir

    if not (tmp_path / "shards").exists():
        write_shards(generate("train", 16, seed=3), tmp_path / "shards", "train", shard_size=8)
        write_shards(generate("valid", 5, seed=3), tmp_path / "shards", "valid", shard_size=5)
    text = tmp_path / "text" if (tmp_path / "text").exists() else _tiny_text_dir(tmp_path / "text")
    env = _env()
    subcommand = ["train"] if module == "clapscale.cli" else []
    cmd = [
        *launcher, "-m", module, *subcommand, str(REPO / "configs" / "tiny.yaml"),
        f"data.train={tmp_path}/shards/train/{{000000..000001}}.tar",
        f"data.val={tmp_path}/shards/valid/000000.tar",
        f"model.text.path={text}", "model.text.pretrained=false", "model.embed_dim=64",
        "train.steps=2", "train.checkpoint_every=2", "data.workers=0", f"train.out_dir={tmp_path}/runs", *extra,
    ]
    # Own process group, so that a hang is cleaned up with every rank torchrun started.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"training did not finish in 240 s (a hang?):\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    run = tmp_path / "runs" / [x for x in extra if x.startswith("train.name=")][0].split("=")[1]
    return (run, out) if with_output else run


@pytest.mark.slow
def test_trainer_eval_and_checkpoint_loading(tmp_path):
    run = _train(tmp_path, [sys.executable], ["train.name=t", "data.batch_size=4", "eval.batch_size=4"])

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r["eval"] for r in logged if "eval" in r and r["step"] == 2][-1]
    model, cfg = load_model(run / "model")
    ours = evaluate(model, cfg, rank=0, world_size=1, device="cpu")
    assert set(final_eval) == set(ours)
    for k in ours:
        assert final_eval[k] == pytest.approx(ours[k], abs=1e-6), k

    ckpt_model, ckpt_cfg = load_trained_model(run / "checkpoints" / "step_00000002")
    exported = model.state_dict()
    for k, v in ckpt_model.state_dict().items():
        assert torch.equal(v, exported[k]), k
    assert ckpt_cfg.model.embed_dim == 64
    assert load(run, device="cpu").source == str(run)


@pytest.mark.slow
def test_caption_only_val_set_trains_evaluates_and_exports(tmp_path):
    # data.val without any `tag` (Clotho, AudioCaps, most LAION sources): the trainer's own
    # evaluation at the end of the run (train.eval_every=0) reports retrieval and skips zero-shot
    # instead of dying between the final checkpoint and the export.
    records = [dict(r, tag=[]) for r in generate("valid", 5, seed=3)]
    write_shards(records, tmp_path / "caption_only", "valid", shard_size=5)
    captions = f"{tmp_path}/caption_only/valid/000000.tar"
    run, out = _train(tmp_path, [sys.executable], ["train.name=c", "data.batch_size=4", "eval.batch_size=4",
                                                   "train.eval_every=0", f"data.val={captions}"],
                      module="clapscale.train.cli", with_output=True)
    assert (run / "model" / "model.safetensors").is_file()
    evals = [r["eval"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert len(evals) == 1
    assert "retrieval/t2a/R@1" in evals[0] and not any(k.startswith("zeroshot/") for k in evals[0])
    # The figures are on the console too, where the loss is printed.
    assert f"eval retrieval step 2: t2a/R@1 {evals[0]['retrieval/t2a/R@1']:.4g}" in out

    # `clapscale eval` with its default tasks prints the retrieval it computed and exits 0.
    proc = subprocess.run([sys.executable, "-m", "clapscale.cli", "eval", "--checkpoint", str(run / "model"),
                           "--shards", captions, "--device", "cpu", "--batch-size", "4"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"retrieval on {captions}" in proc.stdout and "text->audio R@1" in proc.stdout
    assert "skipped zeroshot" in proc.stdout
    # Asked for explicitly, zero-shot without labels is still an error.
    proc = subprocess.run([sys.executable, "-m", "clapscale.cli", "eval", "--checkpoint", str(run / "model"),
                           "--shards", captions, "--device", "cpu", "--task", "zeroshot"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "needs labels" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_zero3_two_ranks_unequal_eval_batches(tmp_path):
    # 5 eval clips over 2 ranks = 3 + 2; eval batches of 2 -> 2 batches on rank 0, 1 on rank 1.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    run = _train(tmp_path, torchrun, ["train.name=z3", "train.zero_stage=3", "data.batch_size=2", "eval.batch_size=2"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r["eval"] for r in logged if "eval" in r and r["step"] == 2][-1]
    model, cfg = load_model(run / "model")
    assert set(final_eval) == set(evaluate(model, cfg, rank=0, world_size=1, device="cpu"))
    # Numbers are not compared here: the 2-step model's clip embeddings nearly coincide (they differ
    # by ~1e-6), so float rounding between batchings can reorder near-ties in zero-shot mAP.
    # The partitioned checkpoint consolidates to exactly the exported fp32 weights.
    ckpt_model, _ = load_trained_model(run / "checkpoints" / "step_00000002")
    exported = model.state_dict()
    for k, v in ckpt_model.state_dict().items():
        assert torch.equal(v, exported[k]), k
