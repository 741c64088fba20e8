#!/usr/bin/env bash
# Synthetic captions + two-stage pretraining (papers/clap-synthetic-captions-audioset.txt) as a chain
# of SLURM jobs, each starting only when the one before it succeeded (sbatch --dependency=afterok):
#   1. train the tag-guided captioner                (clapscale caption train CAPTIONER_RECIPE)
#   2. caption the tag-only shards into a new set    (clapscale caption generate, beam 3, ranks split shards)
#   3. stage 1: CLAP on the synthetic captions       (configs/stage1-synthetic.yaml)
#   4. stage 2: CLAP on real captions from stage 1   (configs/stage2-real.yaml, train.init_from)
#
#   launch/two_stage.sh CAPTIONER_RECIPE TAGGED_SHARDS SYNTHETIC_OUT [extra sbatch flags...]
#   launch/two_stage.sh configs/caption/demo.yaml 'shards/demo/train/{000002..000003}.tar' \
#       shards/synthetic-captions --gpus-per-node=0 --ntasks-per-node=2
#
# Every job runs launch/pretrain.sh (same srun / requeue handling); CLAPSCALE_MODULE selects the
# caption stage for jobs 1-2. Stage 2 resumes its own checkpoint when requeued (train.resume=auto wins
# over train.init_from once the run has one). Prints the four job ids.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: launch/two_stage.sh CAPTIONER_RECIPE TAGGED_SHARDS SYNTHETIC_OUT [sbatch flags...]" >&2
  exit 2
fi
recipe=$1 tagged=$2 synthetic=$3
shift 3
name=$(sed -n 's/^  name: *//p' "$recipe" | head -n 1)
name=${name:-captioner}

captioner=$(sbatch --parsable "$@" --job-name=captioner --export=ALL,CLAPSCALE_MODULE=clapscale.caption.cli \
  launch/pretrain.sh train "$recipe")
generate=$(sbatch --parsable "$@" --job-name=caption-generate --dependency=afterok:"$captioner" \
  --export=ALL,CLAPSCALE_MODULE=clapscale.caption.cli \
  launch/pretrain.sh generate --captioner "runs/$name/captioner" --shards "$tagged" --out "$synthetic" --no-progress)
stage1=$(sbatch --parsable "$@" --job-name=stage1-synthetic --dependency=afterok:"$generate" \
  launch/pretrain.sh configs/stage1-synthetic.yaml "data.train=$synthetic/train/*.tar")
stage2=$(sbatch --parsable "$@" --job-name=stage2-real --dependency=afterok:"$stage1" \
  launch/pretrain.sh configs/stage2-real.yaml train.init_from=runs/stage1-synthetic/model)
echo "captioner $captioner -> generate $generate -> stage1 $stage1 -> stage2 $stage2"
