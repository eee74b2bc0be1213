#!/bin/bash
# C4 preset of slurm/prep_array.sh (read it for every variable): SOURCE=c4, INPUT from C4_GLOB, 32 tasks.
#   C4_GLOB='/data/c4/en/c4-train.*.json.gz' TOKENIZER=/data/tok/m2_32k.model OUT=/data/prepared/c4_gpt2048 \
#     bash slurm/prep_c4.sh
set -euo pipefail
: "${C4_GLOB:?set C4_GLOB to the C4 json.gz files (quoted glob)}"
SOURCE=c4 INPUT=$C4_GLOB ARRAY_SIZE=${ARRAY_SIZE:-32} exec bash "$(dirname "$0")/prep_array.sh"
