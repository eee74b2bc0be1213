#!/bin/bash
# Pretrain M2-GPT-145M (configs/m2_gpt_145m.yaml): 2 nodes x 8 GPUs, one torchrun per node.
#   sbatch slurm/m2_gpt_145m.sh                                    (from the repository root)
#   M2_DATA=/data/x M2_OVERRIDES="train.max_steps=20000" sbatch --nodes=2 slurm/m2_gpt_145m.sh
# Checkpoints and requeues itself on the time-limit warning (USR1); settings, resume and CPU-only runs:
# slurm/README.md and `python -m m2train.launch.job batch --help`.
#SBATCH --job-name=m2-gpt-145m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

export M2_CONFIG=${M2_CONFIG:-m2_gpt_145m}
export M2_DATA=${M2_DATA:-data/c4_gpt2048}
source "${M2_REPO:-$SLURM_SUBMIT_DIR}/slurm/lib/job.sh" train
