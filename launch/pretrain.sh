#!/usr/bin/env bash
# Pretrain CLAP on a SLURM cluster: one task per GPU, DeepSpeed over NCCL (gloo on CPU nodes).
#
#   sbatch launch/pretrain.sh configs/<recipe>.yaml [section.field=value ...]
#   sbatch --nodes=4 --time=24:00:00 launch/pretrain.sh configs/htsat-roberta.yaml train.name=big
#
# Every #SBATCH line below can be overridden on the sbatch command line (flags win). Ranks and
# world size come from srun's SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS; MASTER_ADDR is
# the allocation's first host, MASTER_PORT is derived from the job id (two jobs on one node do
# not collide). Preemption / time limit: Slurm sends SIGUSR1 180 s before the end, every rank
# saves a checkpoint and exits with code 3, rank 0 writes the marker file $CLAPSCALE_REQUEUE_FILE
# once the checkpoint is complete, and this script requeues the job when the marker exists
# (whatever srun returns: with --kill-on-bad-exit, srun reports 137/143 when it killed the other
# tasks); the requeued job resumes from the newest complete checkpoint (train.resume=auto).
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: SRUN_CPUS_PER_TASK
# passes it on, so every rank (and its data workers) gets the cores the job asked for.
# CPU-only clusters: sbatch --gpus-per-node=0 --ntasks-per-node=2 launch/pretrain.sh ...
#SBATCH --job-name=clapscale
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=clapscale-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch launch/pretrain.sh CONFIG [section.field=value ...]" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
export PYTHONUNBUFFERED=1
# The checkout's virtual environment when there is one, else whatever `python3` is on PATH.
PYTHON=${CLAPSCALE_PYTHON:-}
if [[ -z $PYTHON ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

echo "clapscale: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}," \
     "${SLURM_NTASKS} tasks, master ${MASTER_ADDR}:${MASTER_PORT}"
# A requeued job keeps its id: a marker left by an earlier run of this job must not count.
# In the submit directory (shared by the nodes); the script removes it once read.
export CLAPSCALE_REQUEUE_FILE=$PWD/.clapscale-requeue-${SLURM_JOB_ID}
rm -f "$CLAPSCALE_REQUEUE_FILE"
set +e
# CLAPSCALE_MODULE runs another stage under the same launch (e.g. "clapscale.caption.cli" with
# arguments "train RECIPE" or "generate ..."; launch/two_stage.sh).
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" -m ${CLAPSCALE_MODULE:-clapscale.train.cli} "$@"
rc=$?
set -e
if [[ -f $CLAPSCALE_REQUEUE_FILE ]]; then
  rm -f "$CLAPSCALE_REQUEUE_FILE"
  echo "clapscale: checkpointed on signal (srun exit code $rc); requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $rc
