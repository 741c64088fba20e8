#!/usr/bin/env bash
# gpu_suite.sh: everything a short GPU lease should measure, in one command, into one JSON report.
#
#   benchmarks/gpu_suite.sh [--cpu-smoke] [--wheels DIR] [--budget SECONDS] [--real-config YAML]
#                           [--only STAGE,...] [REPORT.json]
#   benchmarks/gpu_suite.sh --fetch-wheels DIR      # on a machine with PyPI, before the lease
#
# Stages, in order, each under its own `timeout` and all under one overall budget (default 480 s on a
# GPU); a stage that fails or times out is recorded and the next one runs:
#   tests      the CUDA / gpu-marked tests (pytest -k "cuda or gpu" over the test files that ask for
#              a device, not this suite's own), counts from pytest's junit XML
#   loader     benchmarks/bench_loader.py: raw decode, webdataset, DALI (mel left to the device, and
#              DALI's mel on the GPU), torch log-mel on the GPU; clips per CPU-second; pictures (224 px
#              frames of video strips) per CPU-second, PIL vs DALI on nvJPEG
#   train      benchmarks/bench_train.py --recipes: HTSAT tiny / base + RoBERTa-base, CNN14 + BERT-base,
#              ViT-B/32 + CLIP text; random init, bf16, ZeRO-1, one GPU: samples/s, peak memory, MFU;
#              then the speed switches as variants (SDPA windows, torch.compile + TF32, channels_last,
#              activation checkpointing)
#   real_data  `clapscale train` on configs/real-gpu.yaml (or --real-config) for a few steps;
#              skipped (and recorded) when the recipe does not exist
# The report (REPORT.json, default $OUT/gpu_suite.json, else ./gpu_suite.json) holds per stage its
# status (ok | failed | timeout | skipped), wall time, figures and the end of its log, and the
# environment (torch / CUDA / DALI / DeepSpeed versions, GPU name); REPORT.log beside it holds the
# stages' whole output. Exit status: 0 when no stage failed, 1 otherwise, 2 for a bad command line.
#
# --only runs the named stages (the others are recorded as skipped): a rerun after a fix.
# --cpu-smoke (or GPU_SUITE_CPU_SMOKE=1) runs every stage on the CPU with tiny sizes and steps, so
# the script is exercised in CI (tests/test_gpu_suite.py) and cannot rot.
#
# --wheels DIR installs the Python packages in DIR (wheels made by --fetch-wheels) into a private
# folder first: the lent GPU machines have PyTorch and transformers but no network and no DeepSpeed,
# webdataset, soundfile or open_clip. DALI (476 MB installed) and the MiniLM weights package (88 MB)
# are too large to carry there (64 MiB per call): without them the DALI loader stages are recorded
# as skipped, the DALI test as failed, and everything else runs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE="${GPU_SUITE_CPU_SMOKE:-0}"
WHEELS=""
FETCH=""
BUDGET=""
REAL_CONFIG="configs/real-gpu.yaml"
REPORT=""
STAGES="tests,loader,train,real_data"
ONLY="$STAGES"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "gpu_suite.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --wheels) [[ $# -ge 2 ]] || die "--wheels needs a directory"; WHEELS="$2"; shift ;;
    --fetch-wheels) [[ $# -ge 2 ]] || die "--fetch-wheels needs a directory"; FETCH="$2"; shift ;;
    --budget) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--budget needs whole seconds"; BUDGET="$2"; shift ;;
    --real-config) [[ $# -ge 2 && -f "$2" ]] || die "--real-config needs an existing YAML recipe, got '${2:-}'"
                   REAL_CONFIG="$(realpath "$2")"; shift ;;
    --only) [[ $# -ge 2 ]] || die "--only needs stage names ($STAGES)"; ONLY="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$REPORT" ]] || die "one report path only, got $REPORT and $1"; REPORT="$1" ;;
  esac
  shift
done

for stage in ${ONLY//,/ }; do
  [[ ",$STAGES," == *",$stage,"* ]] || die "--only: unknown stage '$stage'; choose from $STAGES"
done

# The interpreter: GPU_SUITE_PYTHON, else the checkout's .venv, else python3 (the lent machines' PyTorch).
if [[ -n "${GPU_SUITE_PYTHON:-}" ]]; then PY="$GPU_SUITE_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"
else PY="$(command -v python3)" || die "no python3 on PATH"; fi

# ------------------------------------------------------------------------------ --fetch-wheels
# Wheels for the packages the lent GPU image lacks, at this checkout's installed versions, for its
# CPython 3.12 on x86-64 (pip download); DeepSpeed ships only a source archive, so its wheel is built
# here (pure Python: its C++ ops are compiled on first use, and the trainer uses none).
if [[ -n "$FETCH" ]]; then
  mkdir -p "$FETCH"
  pins="$("$PY" - <<'EOF'
import importlib.metadata as md
names = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "webdataset",
         "braceexpand", "soundfile", "cffi", "pycparser", "open-clip-torch", "ftfy", "wcwidth"]
print(" ".join(f"{n}=={md.version(n)}" for n in names))
EOF
)"
  deepspeed_pin="deepspeed==$("$PY" -c 'import importlib.metadata as md; print(md.version("deepspeed"))')"
  # shellcheck disable=SC2086  # $pins is a list of requirement strings
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$FETCH" $pins
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$FETCH" "$deepspeed_pin"
  echo "gpu_suite.sh: wheels in $FETCH ($(du -sh "$FETCH" | cut -f1)); carry it and pass --wheels $FETCH"
  exit 0
fi

if [[ "$SMOKE" == 1 ]]; then
  MODE="cpu-smoke"
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
  BUDGET="${BUDGET:-300}"
else
  MODE="gpu"
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "no CUDA device visible to $PY: run on a GPU machine, or pass --cpu-smoke for the reduced CPU run"
  export DS_ACCELERATOR=cuda
  BUDGET="${BUDGET:-480}"
fi

if [[ -z "$REPORT" ]]; then REPORT="${OUT:-.}/gpu_suite.json"; fi
mkdir -p "$(dirname "$REPORT")" || die "cannot create the folder of $REPORT"
REPORT="$(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")"
LOG="${REPORT%.json}.log"
: >"$LOG" || die "cannot write $LOG"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$REPO/.cache/torch_extensions"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$WHEELS" ]]; then
  compgen -G "$WHEELS/*.whl" >/dev/null || die "--wheels $WHEELS holds no .whl files (make them with --fetch-wheels)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl >>"$LOG" 2>&1 || die "installing the wheels in $WHEELS failed (see $LOG)"
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

# Fail in seconds, not stage by stage, when the machine lacks what every stage imports.
missing="$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("deepspeed", "webdataset", "soundfile", "open_clip", "transformers", "yaml")
               if u.find_spec(m) is None))')"
[[ -z "$missing" ]] || die "$PY cannot import: $missing; on a machine with PyPI run benchmarks/gpu_suite.sh --fetch-wheels .whl and pass --wheels .whl here"

cd "$REPO"
SUITE_T0=$(date +%s.%N)
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# run_stage NAME TIMEOUT_S CMD...: runs CMD with at most min(TIMEOUT_S, what the budget has left),
# output to $WORK/NAME.log (and the suite log); records rc, wall time and the timeout used.
run_stage() {
  local name="$1" limit="$2" left t0 rc
  shift 2
  if [[ ",$ONLY," != *",$name,"* ]]; then
    skip_stage "$name" "not selected (--only $ONLY)"
    return 0
  fi
  left=$(awk -v b="$BUDGET" -v t0="$SUITE_T0" -v now="$(date +%s.%N)" 'BEGIN { printf "%d", b - (now - t0) }')
  if (( left < 15 )); then
    skip_stage "$name" "the suite's budget of ${BUDGET} s was spent before this stage"
    return 0
  fi
  if (( limit > left )); then limit=$left; fi
  echo "=== $name (timeout ${limit} s): $*" | tee -a "$LOG"
  t0=$(date +%s.%N)
  set +e
  timeout --kill-after=15 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  set -e
  cat "$WORK/$name.log" >>"$LOG"
  awk -v t0="$t0" -v now="$(date +%s.%N)" -v rc="$rc" -v lim="$limit" \
    'BEGIN { printf "rc=%d\nwall_s=%.3f\ntimeout_s=%d\n", rc, now - t0, lim }' >"$WORK/$name.stage"
  echo "=== $name: rc=$rc" | tee -a "$LOG"
}

skip_stage() {
  printf 'skipped=%s\n' "$2" >"$WORK/$1.stage"
  echo "=== $1: skipped: $2" | tee -a "$LOG"
}

# Sizes: on a GPU about 1 + 1.5 + 3.5 + 1.5 minutes (start-up included); on the CPU, tiny.
if [[ "$MODE" == gpu ]]; then
  TESTS_T=90; LOADER_T=120; TRAIN_T=270; REAL_T=150
  LOADER_ARGS=(--clips 160 --seconds 10 --batch 32 --workers 8 --pictures 512)
  # The speed switches (bench_train.py VARIANTS) after the recipes as shipped, most informative first;
  # bench_train rewrites its JSON after every recipe, so a stage cut by the budget keeps what it measured.
  VARIANTS="htsat-base-roberta+sdpa,htsat-base-roberta+sdpa+compile+tf32,cnn14-bert+channels_last,htsat-base-roberta+ckpt"
  TRAIN_ARGS=(--recipes "htsat-tiny-roberta,htsat-base-roberta,cnn14-bert,vit-b32-clip,$VARIANTS" --steps 10 --timeout 120)
  REAL_ARGS=(train.steps=60 train.log_every=10 train.eval_every=-1 train.checkpoint_every=0)
else
  TESTS_T=120; LOADER_T=90; TRAIN_T=120; REAL_T=120
  LOADER_ARGS=(--clips 8 --seconds 2 --batch 4 --workers 1 --pictures 8)
  TRAIN_ARGS=(--recipes smoke --steps 1 --recipe-batch 2 --timeout 100)
  REAL_ARGS=(train.steps=2 train.log_every=1 train.eval_every=-1 train.checkpoint_every=0 data.batch_size=4
             data.workers=0 data.shuffle_buffer=0 train.precision=fp32)
fi

# Only the files that can hold a CUDA test (they must ask for the device) are collected: faster, and a
# file that cannot import on the lent machine (no DALI there) does not touch the others.
mapfile -t CUDA_FILES < <(grep -lE 'cuda\.is_available|mark\.gpu' tests/test_*.py | grep -v '/test_gpu_suite\.py$')
run_stage tests "$TESTS_T" "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
  -k "cuda or gpu" --junitxml "$WORK/junit.xml" "${CUDA_FILES[@]}"
run_stage loader "$LOADER_T" "$PY" benchmarks/bench_loader.py "${LOADER_ARGS[@]}" --json "$WORK/loader.json"
run_stage train "$TRAIN_T" "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --json "$WORK/train.json"
if [[ -f "$REAL_CONFIG" ]]; then
  run_stage real_data "$REAL_T" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m clapscale.train.cli "$REAL_CONFIG" "train.out_dir=$WORK/real" train.resume=none "${REAL_ARGS[@]}"
elif [[ ",$ONLY," == *",real_data,"* ]]; then
  skip_stage real_data "$REAL_CONFIG not found"
else
  skip_stage real_data "not selected (--only $ONLY)"
fi

# ------------------------------------------------------------------------------ the report
"$PY" - "$WORK" "$REPORT" "$MODE" "$BUDGET" "$SUITE_T0" "$STARTED" "$REAL_CONFIG" <<'EOF'
"""Gather the stages' records and figures into one JSON report."""
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

work, report, mode, budget, t0, started, real_config = sys.argv[1:]
work = Path(work)


def stage_record(name):
    rec = dict(line.split("=", 1) for line in (work / f"{name}.stage").read_text().splitlines())
    if "skipped" in rec:
        return {"status": "skipped", "reason": rec["skipped"], "wall_s": 0.0, "figures": {}}
    rc = int(rec["rc"])
    log = (work / f"{name}.log").read_text(errors="replace").splitlines()
    status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
    return {"status": status, "rc": rc, "wall_s": float(rec["wall_s"]), "timeout_s": int(rec["timeout_s"]),
            "log_tail": "\n".join(log[-40:]), "figures": {}}


def junit_counts(path):
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    keys = ("tests", "failures", "errors", "skipped")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["cases"] = [
        {"name": f"{c.get('classname')}::{c.get('name')}",
         "result": next((e.tag for e in c if e.tag in ("failure", "error", "skipped")), "passed")}
        for s in suites for c in s.iter("testcase")
    ]
    return total


def real_figures(out_dir):
    rows = [json.loads(x) for p in sorted(Path(out_dir).glob("*/metrics.jsonl")) for x in p.read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    if not rows:
        return {}
    return {"steps": max(r.get("step", 0) for r in rows),
            "samples_per_s": statistics.median(rates) if rates else None,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def versions():
    env = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(), "mode": mode}
    for pkg in ("torch", "deepspeed", "transformers", "nvidia-dali-cuda130", "webdataset", "open-clip-torch"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    import torch

    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


stages = {name: stage_record(name) for name in ("tests", "loader", "train", "real_data")}
for name, path, read in (("tests", work / "junit.xml", junit_counts),
                         ("loader", work / "loader.json", lambda p: json.loads(p.read_text())),
                         ("train", work / "train.json", lambda p: json.loads(p.read_text())),
                         ("real_data", work / "real", real_figures)):
    if stages[name]["status"] != "skipped" and path.exists():
        try:
            stages[name]["figures"] = read(path)
        except (ValueError, ET.ParseError) as e:  # a stage killed mid-write leaves a partial file
            stages[name]["figures_error"] = f"{type(e).__name__}: {e}"
if stages["real_data"]["status"] != "skipped":
    stages["real_data"]["config"] = real_config
out = {"suite": "benchmarks/gpu_suite.sh", "mode": mode, "started": started, "budget_s": int(budget),
       "wall_s": time.time() - float(t0), "environment": versions(), "stages": stages}
Path(report).write_text(json.dumps(out, indent=1))
print(f"gpu_suite.sh: report {report}")
for name, s in stages.items():
    print(f"  {name:<10} {s['status']:<8} {s['wall_s']:7.1f} s  {s.get('reason', '')}")
EOF

for name in tests loader train real_data; do
  if grep -q '^rc=[1-9]' "$WORK/$name.stage"; then exit 1; fi
done
exit 0
