#!/usr/bin/env bash
# The "Synthetic captions" miniature (README): on the built-in synthetic corpus, train the tag-guided
# captioner on half of the training clips (shards 000000-000001), score it on the validation split,
# write synthetic captions (beam 3) for the other half (000002-000003) from their audio and tags, and
# train the tiny CLAP four ways for the same number of steps on that half:
#   real-only     its real captions                        (configs/stage2-real.yaml, no init_from)
#   template      "The sound of A and B" from its tags     (data.caption=tag_template)
#   k2c           keyword-to-caption captions from its tags (a small T5 trained by `clapscale k2c --train`
#                 on the first half's (tags, caption) pairs; data.caption=text_augment_t5)
#   synthetic     the generated captions only
#   two-stage     synthetic for STEPS/2, then real captions for STEPS/2 from its weights (init_from)
# then print held-out (valid split) retrieval and zero-shot of each from the trainer's final eval.
#   benchmarks/synthetic_captions.sh [SHARDS=shards/demo] [OUT=/tmp/synthetic-captions] [STEPS=200]
# Cost: about 300 captioner steps + 300 K2C steps + 5 x STEPS CLAP steps + 5 evaluations; on a quiet 2-core machine
# ~1 s per CLAP step (configs/demo.yaml), far more on a loaded one.
set -euo pipefail
SHARDS=${1:-shards/demo}
OUT=${2:-/tmp/synthetic-captions}
STEPS=${3:-200}
PY=${CLAPSCALE_PYTHON:-python3}
HALF=$((STEPS / 2))
mkdir -p "$OUT"
run() { echo "+ $*" >&2; "$PY" -m clapscale.cli "$@"; }

# CAPTION_ARGS: extra overrides of the captioner recipe (e.g. "train.steps=3" for a smoke run).
# shellcheck disable=SC2086
run caption train configs/caption/demo.yaml "data.train=$SHARDS/train/{000000..000001}.tar" \
    "train.out_dir=$OUT/runs" ${CAPTION_ARGS:-}
CAP=$OUT/runs/captioner-demo/captioner
run caption score --captioner "$CAP" --shards "$SHARDS/valid/000000.tar" --out "$OUT/captioner-valid.json"
run caption generate --captioner "$CAP" --shards "$SHARDS/train/{000002..000003}.tar" --out "$OUT/synthetic" \
    --split train

# K2C reads shard-set directories: each half as a set of links to its shards.
for half in a b; do mkdir -p "$OUT/half-$half/train"; done
ln -sf "$(realpath "$SHARDS")"/train/00000[01].tar "$OUT/half-a/train/"
ln -sf "$(realpath "$SHARDS")"/train/00000[23].tar "$OUT/half-b/train/"
# shellcheck disable=SC2086
run k2c --train --shards "$OUT/half-a" --out "$OUT/k2c-model" --steps 300 --d-model 64 --d-ff 128 \
    --train-batch-size 32 --lr 3e-3 --quiet ${K2C_ARGS:-}
run k2c --shards "$OUT/half-b" --model "$OUT/k2c-model" --out "$OUT/k2c" --num-captions 3 --quiet

REAL="$SHARDS/train/{000002..000003}.tar"
common=("data.val=$SHARDS/valid/000000.tar" "train.out_dir=$OUT/runs" "train.resume=none")
run train configs/stage2-real.yaml "${common[@]}" train.name=real-only train.init_from= "data.train=$REAL" \
    "train.steps=$STEPS"
run train configs/stage2-real.yaml "${common[@]}" train.name=template train.init_from= "data.train=$REAL" \
    data.caption=tag_template "train.steps=$STEPS"
run train configs/stage2-real.yaml "${common[@]}" train.name=k2c train.init_from= "data.train=$OUT/k2c/train/*.tar" \
    data.caption=text_augment_t5 "train.steps=$STEPS"
run train configs/stage1-synthetic.yaml "${common[@]}" train.name=synthetic "data.train=$OUT/synthetic/train/*.tar" \
    "train.steps=$STEPS"
run train configs/stage1-synthetic.yaml "${common[@]}" train.name=stage1-synthetic \
    "data.train=$OUT/synthetic/train/*.tar" "train.steps=$HALF"
run train configs/stage2-real.yaml "${common[@]}" train.name=two-stage "data.train=$REAL" \
    "train.init_from=$OUT/runs/stage1-synthetic/model" "train.steps=$HALF"

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
cap = json.loads((out / "captioner-valid.json").read_text())["metrics"]
print(f"captioner on valid ({int(cap['clips'])} clips, beam 3): BLEU-4 {cap['bleu4']:.3f}  ROUGE-L {cap['rouge_l']:.3f}  "
      f"tag recall {cap['tag_recall']:.3f}")
man = json.loads((out / "synthetic" / "manifest.json").read_text())["splits"]["train"]
print(f"generated {man['written']} captions, skipped {man['skipped_unseen_tag']} (unseen tags) + {man['skipped_no_tag']} (no tags)")
evals = {}
for name in ("real-only", "template", "k2c", "synthetic", "two-stage"):
    records = [json.loads(l) for l in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    evals[name] = [r["eval"] for r in records if "eval" in r][-1]
keys = ["retrieval/t2a/R@1", "retrieval/t2a/R@10", "retrieval/a2t/R@1", "retrieval/a2t/R@10"]
keys += sorted(k for k in evals["real-only"] if k.startswith("zeroshot/") and not k.endswith("_rank"))
print("| run (held-out valid, %) | " + " | ".join(k.split("/", 1)[1] if k.startswith("retrieval") else k for k in keys) + " |")
print("|---|" + "---|" * len(keys))
for name, ev in evals.items():
    print(f"| {name} | " + " | ".join(f"{ev.get(k, float('nan')):.1f}" for k in keys) + " |")
PY
