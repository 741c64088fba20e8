#!/usr/bin/env bash
# The pivot miniature (README "Through images"; papers/vip-ant-visually-pivoted-audio-text.txt) without a
# pretrained CLIP, on the synthetic corpus with rendered pictures (each sound class a shape in a colour):
#   stage0      a CPU-sized image ViT learns pictures <-> captions against the frozen MiniLM text tower
#               (configs/pivot-stage0.yaml, training shards 000000-000009)
#   pivot       the audio tower learns audio <-> pictures only, image and text frozen
#               (configs/pivot-stage1.yaml, shards 000010-000019): no audio-text pair is ever used
#   pivot+pairs the pivot model continues with PAIRS audio-text pairs (shards 000010..) for FEW steps,
#               audio-text and audio-image losses (VIP-ANT's few-shot step)
#   pairs-only  the same pairs and steps from scratch, audio-text loss only (no pivot)
# then scores each on the held-out valid split with `clapscale eval` (retrieval and zero-shot, with
# chance and the majority-class baseline) and prints one table.
#   benchmarks/pivot_miniature.sh [SHARDS=shards/pictures] [OUT=/tmp/pivot-miniature] [STEPS_SCALE=1]
# SHARDS is built (once) by make_shards --synthetic 2400 --synthetic-images --shard-size 100.
# STEPS_SCALE divides every stage's steps (e.g. 80 for a smoke run). Cost at scale 1: ~800 CLAP steps
# + 5 evaluations, ~15 min on a quiet 2-core machine.
set -euo pipefail
SHARDS=${1:-shards/pictures}
OUT=${2:-/tmp/pivot-miniature}
SCALE=${3:-1}
PY=${CLAPSCALE_PYTHON:-python3}
NPROC=${NPROC:-2}
s() { echo $(( ($1 + SCALE - 1) / SCALE )); }
few=$(s 60)
if [[ ! -f "$SHARDS/manifest.json" ]]; then
  "$PY" tools/make_shards.py --synthetic 2400 --synthetic-images --shard-size 100 --out "$SHARDS" --workers 2 --quiet
fi
train() { echo "+ train $*" >&2; "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m clapscale.train.cli "$@" "train.out_dir=$OUT/runs" train.resume=none "data.val=$SHARDS/valid/*.tar"; }
PAIRS="$SHARDS/train/{000010..000012}.tar"   # 300 clips with their captions
train configs/pivot-stage0.yaml "data.train=$SHARDS/train/{000000..000009}.tar" "train.steps=$(s 200)"
train configs/pivot-stage1.yaml "data.train=$SHARDS/train/{000010..000019}.tar" "train.steps=$(s 240)" \
  "train.init_from=$OUT/runs/pivot-stage0/model"
train configs/pivot-stage1.yaml train.name=pivot-pairs "data.train=$PAIRS" "train.steps=$few" \
  "train.init_from=$OUT/runs/pivot-stage1/model" loss.weight_audio_text=1 optim.warmup_steps=5
train configs/pivot-stage1.yaml train.name=pairs-only "data.train=$PAIRS" "train.steps=$few" train.init_from= \
  loss.weight_audio_text=1 loss.weight_audio_image=0 optim.warmup_steps=5
for run in pivot-stage0 pivot-stage1 pivot-pairs pairs-only; do
  "$PY" -m clapscale.cli eval --checkpoint "$OUT/runs/$run/model" --shards "$SHARDS/valid/*.tar" \
    --task retrieval,zeroshot --device cpu --out "$OUT/$run.json" > "$OUT/$run.eval.log"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
names = {"pivot-stage0": "untrained audio (stage 0 only)", "pivot-stage1": "audio through the picture pivot, no pairs",
         "pivot-pairs": "pivot + 300 audio-text pairs", "pairs-only": "300 audio-text pairs only"}
print("| model (held-out valid) | t2a R@10 | a2t R@10 | zero-shot top-1 | zero-shot mAP |")
print("|---|---|---|---|---|")
chance = None
for run, label in names.items():
    res = {r["task"]: r for r in json.loads((out / f"{run}.json").read_text())["results"]}
    rt, zs = res["retrieval"], res["zeroshot"]
    chance = (rt["chance"], zs["chance"], zs.get("baseline", {}))
    x = lambda v, c: f"{v:.1f} ({v / c:.1f}x)" if c else f"{v:.1f}"
    print(f"| {label} | {x(rt['metrics']['t2a/R@10'], rt['chance']['t2a/R@10'])} | "
          f"{x(rt['metrics']['a2t/R@10'], rt['chance']['a2t/R@10'])} | {x(zs['metrics']['top1'], zs['chance']['top1'])} | "
          f"{x(zs['metrics']['mAP'], zs['chance']['mAP'])} |")
rt_c, zs_c, base = chance
print(f"chance: t2a R@10 {rt_c['t2a/R@10']:.1f}, a2t R@10 {rt_c['a2t/R@10']:.1f}, zero-shot top-1 {zs_c['top1']:.1f}, "
      f"mAP {zs_c['mAP']:.1f}" + (f"; majority-class baseline {json.dumps(base)}" if base else ""))
PY
