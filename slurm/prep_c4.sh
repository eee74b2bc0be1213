#!/bin/bash
# Tokenize C4 into MDS shards with a Slurm job array, then merge the parts into one dataset.
#
# Usage (from the repository root, on the login node):
#   C4_GLOB='/data/c4/en/c4-train.*.json.gz' TOKENIZER=/data/tok/m2_32k.model OUT=/data/prepared/c4_gpt2048 \
#     bash slurm/prep_c4.sh            # submits the array (ARRAY_SIZE tasks) and a dependent merge job
# Optional: LAYOUT (gpt_packed | bert_doc | bert_packed, default gpt_packed), SEQ_LEN (default 2048),
#   ARRAY_SIZE (default 32), VAL_FRACTION (default 0.005), M2TRAIN (command, default `m2train`),
#   EXTRA_ARGS (more `m2train prep` options), SBATCH_ARGS (e.g. "--partition=cpu --account=abc").
#
# Each array task i runs `m2train prep ... --out $OUT`; prep reads its part from SLURM_ARRAY_TASK_ID /
# SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_MIN (keep the array contiguous: --array=0-N, no step) and
# writes $OUT/part-0000i/ with one worker per allocated CPU. A preempted or failed task can simply be
# resubmitted (`sbatch --array=i ...` with the same variables): it continues where it stopped. The merge
# job (`m2train prep-merge $OUT`) runs after every task succeeded and leaves one dataset in $OUT, equal
# sample for sample to a single-job run (see data_prep/FORMAT.md).
#SBATCH --job-name=prep-c4
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail

: "${OUT:?set OUT to the dataset folder}"
M2TRAIN=${M2TRAIN:-m2train}

if [[ "${PREP_STAGE:-}" == "merge" ]]; then
    exec $M2TRAIN prep-merge "$OUT"
fi

if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    : "${C4_GLOB:?set C4_GLOB}" "${TOKENIZER:?set TOKENIZER}"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of options
    exec $M2TRAIN prep --source c4 --input "$C4_GLOB" --tokenizer "$TOKENIZER" --out "$OUT" \
        --layout "${LAYOUT:-gpt_packed}" --seq-len "${SEQ_LEN:-2048}" \
        --val-fraction "${VAL_FRACTION:-0.005}" --workers "${SLURM_CPUS_PER_TASK:-1}" \
        --no-progress ${EXTRA_ARGS:-}
fi

# Not inside a Slurm job: submit the array and the merge that depends on it.
: "${C4_GLOB:?set C4_GLOB}" "${TOKENIZER:?set TOKENIZER}"
N=${ARRAY_SIZE:-32}
# shellcheck disable=SC2086
array_id=$(sbatch --parsable --array=0-$((N - 1)) ${SBATCH_ARGS:-} --export=ALL "$0")
# shellcheck disable=SC2086
merge_id=$(sbatch --parsable --dependency=afterok:"${array_id%%;*}" --cpus-per-task=1 --job-name=prep-c4-merge \
    ${SBATCH_ARGS:-} --export=ALL,PREP_STAGE=merge "$0")
echo "submitted prep array ${array_id} (${N} tasks) and merge job ${merge_id} -> ${OUT}"
