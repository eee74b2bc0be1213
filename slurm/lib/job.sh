# Shared tail of every training/eval sbatch script in slurm/ (sourced, not run): pick the checkout and the
# Python, then hand over to the Python driver, which does the real work (see
# `python -m m2train.launch.job batch --help`). `exec` matters: the driver becomes the batch process, the
# one Slurm signals with --signal=B:USR1@300 and `scancel --signal=USR1 --batch`.
#
# Usage (last line of a script): source "${M2_REPO:-$SLURM_SUBMIT_DIR}/slurm/lib/job.sh" train|eval
#   M2_REPO    checkout to run from (default: the folder sbatch was called from, SLURM_SUBMIT_DIR)
#   M2_PYTHON  interpreter with m2train installed (default: M2_REPO/.venv/bin/python if present, else python3)
set -euo pipefail
m2_mode=${1:?slurm/lib/job.sh: give train or eval}
m2_repo=${M2_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$m2_repo" || { echo "slurm/lib/job.sh: M2_REPO=$m2_repo is not a folder" >&2; exit 2; }
if [ -n "${M2_PYTHON:-}" ]; then
    m2_python=$M2_PYTHON
elif [ -x "$m2_repo/.venv/bin/python" ]; then
    m2_python=$m2_repo/.venv/bin/python
else
    m2_python=python3
fi
if ! "$m2_python" -c "import m2train" 2>/dev/null; then
    echo "slurm/lib/job.sh: $m2_python cannot import m2train; set M2_PYTHON to the interpreter of the venv" \
         "where m2train is installed (pip install -e .)" >&2
    exit 2
fi
exec "$m2_python" -m m2train.launch.job batch "$m2_mode"
