#!/usr/bin/env bash
# The real-data recipe at GPU scale on one GPU, end to end: corpus, training, both held-out reports.
#
#   bash launch/real_gpu.sh [--shards DIR] [--out RUN_DIR] [--device cuda|cpu] [section.field=value ...]
#
# 1. corpus: tools/real_corpus.py --out shards/real with one worker per core (needs apt-get download
#    once; a complete shard set is kept), unless --shards names a built one;
# 2. train: configs/real-gpu.yaml (CNN14, bf16, 128 clips per step, 1200 steps) on one process;
# 3. report: tools/real_report.py over the by-file test split and the held-out package, into
#    RUN_DIR/metrics.json (default runs/real-gpu), with chance and the majority-class baseline.
# Each stage's wall time is printed and written to RUN_DIR/timings.json. Budget on one H100/H200: under
# 8 minutes with the .debs already downloaded. Extra arguments override the recipe (the CPU test runs
# two steps with `--device cpu train.precision=fp32 ...`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SHARDS=""
RUN="runs/real-gpu"
DEVICE="cuda"
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --shards) SHARDS="$2"; shift 2 ;;
    --out) RUN="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "real_gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "real_gpu.sh: $1 is neither an option nor a section.field=value override" >&2; exit 2 ;;
  esac
done
# The run directory is replaced (a fresh run, as `make real` does), but only when it is a run
# (the trainer's metrics.jsonl or this script's timings.json) or empty: never another folder.
if [[ -n "$(ls -A "$RUN" 2>/dev/null)" && ! -f "$RUN/metrics.jsonl" && ! -f "$RUN/timings.json" ]]; then
  echo "real_gpu.sh: --out $RUN holds files but no run (metrics.jsonl / timings.json); not replacing it" >&2
  exit 2
fi
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
[[ "$DEVICE" == cpu ]] && export DS_ACCELERATOR=cpu

now() { date +%s.%N; }
t0=$(now)
if [[ -z "$SHARDS" ]]; then
  SHARDS="shards/real"
  "$PY" tools/real_corpus.py --out "$SHARDS" --workers "$(nproc)" --quiet
fi
t1=$(now)
rm -rf "$RUN"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m clapscale.train.cli configs/real-gpu.yaml \
  "data.train=$SHARDS/train/*.tar" "data.val=$SHARDS/valid/*.tar" \
  "train.out_dir=$(dirname "$RUN")" "train.name=$(basename "$RUN")" train.resume=none "${OVERRIDES[@]}"
t2=$(now)
"$PY" tools/real_report.py --checkpoint "$RUN/model" --shards "$SHARDS" --out "$RUN/metrics.json" --device "$DEVICE"
t3=$(now)
"$PY" - "$RUN/timings.json" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, sys
out, t0, t1, t2, t3 = sys.argv[1], *map(float, sys.argv[2:])
times = {"corpus_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1), "report_s": round(t3 - t2, 1),
         "total_s": round(t3 - t0, 1)}
open(out, "w").write(json.dumps(times) + "\n")
print("real_gpu.sh:", ", ".join(f"{k} {v}" for k, v in times.items()))
PY
