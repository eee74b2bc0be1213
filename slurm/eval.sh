#!/bin/bash
# Evaluate a training checkpoint (perplexity for GPT, MLM accuracy for BERT) with `m2train eval`, one
# torchrun per node (every rank reads its share of the split; sums are all-reduced).
#
#   M2_CHECKPOINT=runs/m2_gpt_360m/checkpoints M2_DATA=data/c4_gpt2048 sbatch slurm/eval.sh
#   M2_CONFIG=m2_bert_80m sbatch slurm/eval.sh     # evaluates runs/m2_bert_80m/checkpoints (latest)
# Settings (environment): M2_CHECKPOINT (checkpoint folder or root; default RUN_DIR/checkpoints of M2_CONFIG),
#   M2_DATA (default: the checkpoint's data.path), M2_EVAL_ARGS (e.g. "--batches 200 --split val"),
#   M2_GPUS_PER_NODE, M2_PROCS_PER_NODE, M2_LOCAL_CACHE, M2_PYTHON, M2_REPO.
# Not requeued on a stop signal: an evaluation is short, rerun it.
#SBATCH --job-name=m2-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%x-%j.out

source "${M2_REPO:-$SLURM_SUBMIT_DIR}/slurm/lib/job.sh" eval
