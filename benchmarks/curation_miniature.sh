#!/usr/bin/env bash
# The curation miniature in the paper's low-resource setting (papers/clap-unsupervised-curation-soft-
# labels.txt, "teacher trained on 10% of the data"), on the built-in synthetic corpus:
#   teacher     configs/demo.yaml on demo train shard 000000 only (512 of 1,920 clips)
#   wild audio  demo train shards 000001-000003 (1,408 clips; their captions are never read)
#   pool        the teacher's training captions; labels: the valid split's tags
# then curates DU / DS / ADS and trains each student for STUDENT_STEPS from the teacher:
#   control     the teacher's own training set again (what the extra steps alone give)
#   DU, DU+SL   curated DU pairs, replaying the teacher's set (prob 0.5); +SL: soft labels, teacher frozen
#   DS+SL       the DS subset of the teacher's set, soft labels, no replay
#   ADS, ADS+SL curated ADS pairs, replaying the DS set
#   full data   the wild clips' real captions revealed (the upper bound curation aims at)
# and prints held-out (valid) zero-shot and retrieval of each from the trainer's final evaluation.
#   benchmarks/curation_miniature.sh [SHARDS=shards/demo] [OUT=/tmp/curation-miniature] [TEACHER_STEPS=160]
#       [STUDENT_STEPS=120] [SIGMA=0.6] [DS_THRESHOLD=0.9]
# Cost: TEACHER_STEPS + 7 x STUDENT_STEPS CLAP steps and three curations; ~15 min on a quiet 2-core machine.
set -euo pipefail
SHARDS=${1:-shards/demo}
OUT=${2:-/tmp/curation-miniature}
TSTEPS=${3:-160}
SSTEPS=${4:-120}
SIGMA=${5:-0.6}
DS_T=${6:-0.9}
PY=${CLAPSCALE_PYTHON:-python3}
NPROC=${NPROC:-2}
mkdir -p "$OUT"
TEACHER_SET="$SHARDS/train/000000.tar"
WILD="$SHARDS/train/{000001..000003}.tar"
VAL="$SHARDS/valid/000000.tar"
train() { echo "+ train $*" >&2; "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m clapscale.train.cli "$@" "train.out_dir=$OUT/runs" train.resume=none "data.val=$VAL" train.eval_every=0; }
curate() { echo "+ curate $*" >&2; "$PY" -m clapscale.cli curate --teacher "$OUT/runs/teacher/model" \
  --pool "$TEACHER_SET" --device cpu "$@"; }

train configs/demo.yaml train.name=teacher "data.train=$TEACHER_SET" "train.steps=$TSTEPS"
curate --strategy du --wild "$WILD" --sigma "$SIGMA" --out "$OUT/du"
curate --strategy ds --label-shards "$VAL" --ds-threshold "$DS_T" --out "$OUT/ds"
curate --strategy ads --wild "$WILD" --label-shards "$VAL" --ds-threshold "$DS_T" --sigma "$SIGMA" --out "$OUT/ads"

student=("train.init_from=$OUT/runs/teacher/model" "train.steps=$SSTEPS")
sl=(loss.kind=soft_label "loss.teacher=$OUT/runs/teacher/model")
train configs/student-du.yaml train.name=control "data.train=$TEACHER_SET" "data.replay.spec=" data.replay.prob=0 "${student[@]}"
train configs/student-du.yaml train.name=du "data.train=$OUT/du/train/*.tar" "data.replay.spec=$TEACHER_SET" "${student[@]}"
train configs/student-du.yaml train.name=du-sl "data.train=$OUT/du/train/*.tar" "data.replay.spec=$TEACHER_SET" \
  "${sl[@]}" "${student[@]}"
train configs/student-ads-sl.yaml train.name=ds-sl "data.train=$OUT/ds/train/*.tar" "data.replay.spec=" data.replay.prob=0 \
  "loss.teacher=$OUT/runs/teacher/model" "${student[@]}"
train configs/student-du.yaml train.name=ads "data.train=$OUT/ads/train/*.tar" "data.replay.spec=$OUT/ds/train/*.tar" \
  "${student[@]}"
train configs/student-ads-sl.yaml train.name=ads-sl "data.train=$OUT/ads/train/*.tar" \
  "data.replay.spec=$OUT/ds/train/*.tar" "loss.teacher=$OUT/runs/teacher/model" "${student[@]}"
train configs/student-du.yaml train.name=full-data "data.train=$SHARDS/train/{000000..000003}.tar" \
  "data.replay.spec=" data.replay.prob=0 "${student[@]}"

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("du", "ds", "ads"):
    c = json.loads((out / name / "manifest.json").read_text())["curation"]
    print(name, c["counts"], "pairs at thresholds:", c["pairs_at_threshold"])
rows = [("teacher", "teacher (shard 000000 only)"), ("control", "control: more steps on the teacher's set"),
        ("du", "DU (replay teacher set)"), ("du-sl", "DU+SL"), ("ds-sl", "DS+SL (no replay)"),
        ("ads", "ADS (replay DS set)"), ("ads-sl", "ADS+SL"), ("full-data", "full data (wild captions revealed)")]
print("| model (held-out valid, %) | zero-shot top-1 | zero-shot mAP | t2a R@10 | a2t R@10 |")
print("|---|---|---|---|---|")
for run, label in rows:
    recs = [json.loads(l) for l in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    ev = [r["eval"] for r in recs if "eval" in r][-1]
    print(f"| {label} | {ev['zeroshot/top1']:.1f} | {ev['zeroshot/mAP']:.1f} | {ev['retrieval/t2a/R@10']:.1f} | "
          f"{ev['retrieval/a2t/R@10']:.1f} |")
PY
