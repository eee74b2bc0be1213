#!/bin/bash
# The PILE preset of slurm/prep_array.sh (read it for every variable): SOURCE=pile, INPUT from PILE_GLOB,
# 30 tasks (one per PILE training file).
#   PILE_GLOB='/data/pile/train/*.jsonl.zst' TOKENIZER=/data/tok/m2_32k.model OUT=/data/prepared/pile_gpt2048 \
#     bash slurm/prep_pile.sh
set -euo pipefail
: "${PILE_GLOB:?set PILE_GLOB to the PILE jsonl.zst files (quoted glob)}"
SOURCE=pile INPUT=$PILE_GLOB ARRAY_SIZE=${ARRAY_SIZE:-30} exec bash "$(dirname "$0")/prep_array.sh"
