#!/bin/bash
# Pretrain M2-GPT-360M (configs/m2_gpt_360m.yaml) on 4 nodes x 8 GPUs: one torchrun per node, data-parallel DeepSpeed.
#
# Submit from the repository root (the job runs from the folder sbatch was called in):
#   sbatch slurm/m2_gpt_360m.sh
#   M2_DATA=/data/prepared/x M2_OVERRIDES="train.max_steps=20000" sbatch --nodes=2 slurm/m2_gpt_360m.sh
# Resume: nothing to do. On the 300 s warning before the time limit (or scancel --signal=USR1 --batch, or
# preemption's SIGTERM) the job checkpoints and requeues itself; the new attempt resumes from
# RUN_DIR/checkpoints/latest (at most M2_MAX_REQUEUES times). Resubmitting the same command also resumes.
# Settings (environment, documented defaults; full list: python -m m2train.launch.job batch --help):
#   M2_CONFIG=m2_gpt_360m  M2_DATA=data/c4_gpt2048  M2_RUN_DIR=runs/<config name>
#   M2_CKPT_DIR (default RUN_DIR/checkpoints)  M2_OVERRIDES (key=value ...)  M2_GPUS_PER_NODE (default: the
#   GPUs Slurm allocated)  M2_PROCS_PER_NODE  M2_MAX_REQUEUES=10  M2_LOCAL_CACHE  M2_PYTHON  M2_REPO
# Resources: the #SBATCH lines below are defaults; command-line options override them, e.g. CPU only:
#   sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=4 --mem=8G slurm/m2_gpt_360m.sh
#SBATCH --job-name=m2-gpt-360m
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

export M2_CONFIG=${M2_CONFIG:-m2_gpt_360m}
export M2_DATA=${M2_DATA:-data/c4_gpt2048}
source "${M2_REPO:-$SLURM_SUBMIT_DIR}/slurm/lib/job.sh" train
