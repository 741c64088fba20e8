"""benchmarks/gpu_suite.sh in its reduced CPU mode: every stage runs, one JSON report says so.

The suite exists for the first short GPU lease; this keeps it from rotting meanwhile. The reduced
mode runs the same commands with tiny sizes (the CUDA tests skip on CPU, the loader benchmark on 8
two-second clips, the training benchmark on the CPU-sized recipe, `clapscale train` for 2 steps on
real synthetic shards) and the report must hold each stage's status and figures as numbers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
CUDA_TESTS = {
    "tests.test_data_dali::test_dali_mel_on_gpu_matches_cpu",
    "tests.test_features::test_frontend_on_cuda_matches_cpu",
    "tests.test_models_fusion::test_htsat_fusion_bf16_on_cuda",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT", "GPU_SUITE_CPU_SMOKE"):
        env.pop(var, None)
    # The interpreter running the tests, not whatever .venv or python3 the checkout happens to have.
    env["GPU_SUITE_PYTHON"] = sys.executable
    return env


def _suite(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), *args], cwd=REPO, env={**_env(), **env}, capture_output=True,
                          text=True, timeout=timeout)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def real_recipe(tmp_path_factory) -> Path:
    """The tiny recipe pointed at freshly written synthetic shards: a stand-in for configs/real-gpu.yaml."""
    tmp = tmp_path_factory.mktemp("real")
    subprocess.run([sys.executable, "tools/make_shards.py", "--synthetic", "24", "--out", str(tmp / "s"),
                    "--shard-size", "8", "--quiet"], cwd=REPO, env=_env(), check=True, timeout=120)
    tars = sorted((tmp / "s" / "train").glob("*.tar"))
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"].update(train=f"{tmp}/s/train/{{{tars[0].stem}..{tars[-1].stem}}}.tar", val="")
    path = tmp / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_into_one_report(tmp_path, real_recipe):
    report = tmp_path / "out" / "gpu_suite.json"
    proc = _suite("--cpu-smoke", "--real-config", str(real_recipe), str(report), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["mode"] == "cpu-smoke" and _number(r["wall_s"])
    assert r["environment"]["torch"] == torch.__version__.split("+")[0]
    assert r["environment"]["gpu"] is None
    stages = r["stages"]
    assert list(stages) == ["tests", "loader", "train", "real_data"]
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage)
        assert _number(stage["wall_s"]) and 0 < stage["wall_s"] <= stage["timeout_s"], (name, stage)

    # 1. the CUDA tests were selected and, without a device, skipped (not deselected or broken).
    tests = stages["tests"]["figures"]
    names = {c["name"] for c in tests["cases"]}
    assert CUDA_TESTS <= names
    assert tests["failures"] == tests["errors"] == 0
    assert all(c["result"] == "skipped" for c in tests["cases"])

    # 2. the loader benchmark: every stage, clips per CPU-second as positive numbers, ratios to decode.
    loader = stages["loader"]["figures"]
    assert loader["clips"] == 8 and loader["skipped"] == {}
    assert set(loader["stages"]) == {"raw_decode", "wds", "dali_waveform", "dali_mel_cpu", "torch_mel_cpu"}
    for key, row in loader["stages"].items():
        assert _number(row["clips_per_cpu_s"]) and row["clips_per_cpu_s"] > 0, key
        assert row["ratio_to_decode"] == pytest.approx(row["clips_per_cpu_s"] / loader["stages"]["raw_decode"]
                                                       ["clips_per_cpu_s"]), key
    assert loader["stages"]["raw_decode"]["ratio_to_decode"] == 1.0
    pictures = loader["pictures"]
    assert pictures["strips"] == 8 and set(pictures["stages"]) == {"pil", "dali"}
    for key, row in pictures["stages"].items():
        assert _number(row["pictures_per_cpu_s"]) and row["pictures_per_cpu_s"] > 0, key
        assert row["ratio_to_pil"] == pytest.approx(row["pictures_per_cpu_s"]
                                                    / pictures["stages"]["pil"]["pictures_per_cpu_s"]), key

    # 3. the training benchmark: the CPU recipe's step, memory and FLOPs; no MFU without a device peak.
    (rec,) = stages["train"]["figures"]["recipes"]
    assert rec["recipe"] == "smoke" and rec["status"] == "ok"
    assert (rec["audio"], rec["text"], rec["batch"], rec["steps"]) == ("cnn-tiny", "roberta-tiny", 2, 1)
    assert "train.precision=bf16" in rec["overrides"] and "train.zero_stage=1" in rec["overrides"]
    for key in ("samples_per_s", "step_ms", "peak_mem_mib", "fwd_gflop_per_sample", "params", "loss_last"):
        assert _number(rec[key]) and rec[key] > 0, key
    assert rec["step_ms"] == pytest.approx(1000 * rec["batch"] / rec["samples_per_s"])
    # Backward of every matmul / conv costs two forwards: the backward pass was counted too
    # (MFU would be a third of the truth otherwise).
    assert rec["bwd_gflop_per_sample"] == pytest.approx(2 * rec["fwd_gflop_per_sample"], rel=0.05)
    assert rec["mfu"] is None and rec["peak_tflops"] is None

    # 4. the real-data recipe trained its 2 steps through `clapscale train`.
    real = stages["real_data"]
    assert real["config"] == str(real_recipe)
    assert real["figures"]["steps"] == 2
    assert _number(real["figures"]["samples_per_s"]) and real["figures"]["samples_per_s"] > 0
    assert _number(real["figures"]["loss_last"])

    log = report.with_suffix(".log").read_text()
    assert all(f"=== {name}: rc=0" in log for name in ("tests", "loader", "train", "real_data"))


def test_failed_stage_is_recorded_and_others_skipped(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    report = tmp_path / "r.json"
    proc = _suite("--cpu-smoke", "--only", "real_data", "--real-config", str(bad), str(report), timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads(report.read_text())["stages"]
    for name in ("tests", "loader", "train"):
        assert stages[name]["status"] == "skipped" and "--only" in stages[name]["reason"]
    assert stages["real_data"]["status"] == "failed"
    assert stages["real_data"]["rc"] != 0 and "train.stepz" in stages["real_data"]["log_tail"]


def test_budget_spent_skips_stages_and_still_reports(tmp_path):
    report = tmp_path / "r.json"
    proc = _suite("--cpu-smoke", "--budget", "0", str(report), timeout=120)
    assert proc.returncode == 0, proc.stderr
    stages = json.loads(report.read_text())["stages"]
    assert [s["status"] for s in stages.values()] == ["skipped"] * 4
    assert all("budget" in s["reason"] for s in list(stages.values())[:3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("args, message", [
    ((), "no CUDA device"),
    (("--cpu-smoke", "--only", "tests,bogus"), "--only: unknown stage 'bogus'"),
    (("--cpu-smoke", "--budget", "ten"), "--budget needs whole seconds"),
    (("--cpu-smoke", "--real-config", "/nonexistent.yaml"), "--real-config needs an existing YAML"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    report = tmp_path / "r.json"
    proc = _suite(*args, str(report), timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not report.exists() and not report.with_suffix(".log").exists()


def test_missing_packages_stop_before_any_stage(tmp_path):
    # An interpreter without site-packages stands for a GPU machine given no --wheels.
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    report = tmp_path / "r.json"
    proc = _suite("--cpu-smoke", str(report), timeout=120, GPU_SUITE_PYTHON=str(bare))
    assert proc.returncode == 2
    assert "cannot import: deepspeed webdataset soundfile open_clip transformers yaml" in proc.stderr
    assert "--fetch-wheels" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not report.exists()
