#!/bin/bash
# Tokenize a corpus into MDS shards with a Slurm job array, then merge the parts into one dataset.
#
# Usage (from the repository root, on the login node; `bash`, not `sbatch`: it submits the jobs itself):
#   SOURCE=c4 INPUT='/data/c4/en/c4-train.*.json.gz' TOKENIZER=/data/tok/m2_32k.model \
#     OUT=/data/prepared/c4_gpt2048 bash slurm/prep_array.sh
# submits an array of ARRAY_SIZE tasks and a merge job that runs after all of them succeeded.
# Required: SOURCE (c4 | pile | jsonl | text | hf), INPUT (file glob, quoted), TOKENIZER, OUT.
# Optional: LAYOUT (gpt_packed | bert_doc | bert_packed, default gpt_packed), SEQ_LEN (default 2048),
#   ARRAY_SIZE (default 32), VAL_FRACTION (default 0.005), JOB_NAME (default prep-$SOURCE),
#   M2TRAIN (command, default `$M2_PYTHON -m m2train` when M2_PYTHON is set, else `m2train`),
#   EXTRA_ARGS (more `m2train prep` options, e.g. "--pile-exclude Github"),
#   SBATCH_ARGS (e.g. "--partition=cpu --account=abc --cpus-per-task=8").
# slurm/prep_c4.sh and slurm/prep_pile.sh are this script with SOURCE and the array size preset.
#
# Each array task i runs `m2train prep ... --out $OUT`; prep reads its part from SLURM_ARRAY_TASK_ID /
# SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_MIN (keep the array contiguous: --array=0-N, no step) and
# writes $OUT/part-0000i/ with one worker per allocated CPU. A preempted or failed task can simply be
# resubmitted (`sbatch --array=i ...` with the same variables): it continues where it stopped. The merge
# job (`m2train prep-merge $OUT`) leaves one dataset in $OUT, identical to a single-job run
# (data_prep/FORMAT.md; tests/test_slurm.py compares the bytes).
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail

: "${OUT:?set OUT to the dataset folder}"
if [[ -z "${M2TRAIN:-}" ]]; then
    M2TRAIN=${M2_PYTHON:+$M2_PYTHON -m m2train}
    M2TRAIN=${M2TRAIN:-m2train}
fi

if [[ "${PREP_STAGE:-}" == "merge" ]]; then
    # shellcheck disable=SC2086  # M2TRAIN may be "python -m m2train"
    exec $M2TRAIN prep-merge "$OUT"
fi

: "${SOURCE:?set SOURCE (c4, pile, jsonl, text or hf)}" "${INPUT:?set INPUT to the input file glob}"
: "${TOKENIZER:?set TOKENIZER}"
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of options
    exec $M2TRAIN prep --source "$SOURCE" --input "$INPUT" --tokenizer "$TOKENIZER" --out "$OUT" \
        --layout "${LAYOUT:-gpt_packed}" --seq-len "${SEQ_LEN:-2048}" \
        --val-fraction "${VAL_FRACTION:-0.005}" --workers "${SLURM_CPUS_PER_TASK:-1}" \
        --no-progress ${EXTRA_ARGS:-}
fi

# Not inside a Slurm job: submit the array and the merge that depends on it.
N=${ARRAY_SIZE:-32}
name=${JOB_NAME:-prep-$SOURCE}
# shellcheck disable=SC2086
array_id=$(sbatch --parsable --array=0-$((N - 1)) --job-name="$name" ${SBATCH_ARGS:-} --export=ALL "$0")
# shellcheck disable=SC2086
merge_id=$(sbatch --parsable --dependency=afterok:"${array_id%%;*}" --cpus-per-task=1 --job-name="$name-merge" \
    ${SBATCH_ARGS:-} --export=ALL,PREP_STAGE=merge "$0")
echo "submitted prep array ${array_id} (${N} tasks) and merge job ${merge_id} -> ${OUT}"
