#!/usr/bin/env bash
# The GPU checks of the Triton kernels in ONE command, for a session lent a GPU machine (benchmarks/DEVICE.md):
#
#     bash benchmarks/device_check.sh [BUDGET_SECONDS]        # default 480: everything ends inside it
#
# Steps, each under its own `timeout` cut to what is left of the budget, none stopping the later ones:
#   env           nvidia-smi, python / torch / triton / numpy versions, CUDA visibility
#   install       carried wheels (.whl/*.whl -> /tmp/site on PYTHONPATH), then m2train importable from this
#                 tree: already importable -> nothing; else `pip install --no-index --no-deps
#                 --no-build-isolation -e .`; else a symlink shim mapping m2train.kernels/launch/data_prep
#   gpu_tests     pytest -m gpu over tests/test_kernels_*.py (real model sizes, compiled kernels)
#   kernel_tests  the other tests of tests/test_kernels_*.py (on CUDA they run compiled, not interpreted);
#                 the offline sm_90 compile tests are left out there (CPU CI runs them)
#   bench_warm    (background, from the start) the bench's kernels compiled in parallel processes while
#                 the tests run; their autotune results are dropped before the timed runs
#   bench_*       python -m m2train.kernels.bench --quick, one process per section (monarch, fftconv,
#                 models) so a section that runs out of time keeps the others; merged into
#                 kernels_bench.json
# Logs, the merged kernels_bench.json and summary.md go to $OUT (./device_out when unset); at most 8 files
# (what the device tool brings back). Exit status: 0 only if every step passed.
#
# Without CUDA (or with DEVICE_CHECK_DRY=1) it is a dry run: the same steps on a tiny subset - the gpu tests
# collected and skipped, one small interpreted kernel test, `bench --smoke --sections monarch` - which
# tests/test_device_check.py runs on the CPU. Knobs (environment):
#   DEVICE_CHECK_PYTHON   interpreter (default python3: the device image's /opt/torch/.venv)
#   DEVICE_CHECK_DRY      1 = dry run, 0 = full run, unset = full run iff torch sees CUDA
#   DEVICE_CHECK_WORKERS  pytest-xdist workers for the test steps when xdist is installed (default 4; 0 = off)
#   DEVICE_CHECK_BENCH    bench mode flag: --quick (default) or --full
#   DEVICE_CHECK_DRY_TESTS  the dry run's kernel test selection (pytest node ids, space separated)
#   DEVICE_CHECK_STEPS    which of gpu_tests kernel_tests bench to run (default all three; env and install
#                         always run), e.g. "bench" to rerun the bench alone on a still-warm machine
#   DEVICE_CHECK_PYTEST_ARGS  extra arguments for both pytest steps (e.g. "-k fftconv -x")
#   DEVICE_CHECK_BENCH_SECTIONS  bench sections (default "monarch fftconv models")
#   DEVICE_CHECK_WARM_LENGTHS  FFT-conv lengths compiled ahead by bench_warm (default: bench --quick's)
set -uo pipefail
export PYTHONUNBUFFERED=1

BUDGET=${1:-480}
T0=$SECONDS
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
OUT=${OUT:-$REPO/device_out}
mkdir -p "$OUT"
PY=${DEVICE_CHECK_PYTHON:-python3}
WORKERS=${DEVICE_CHECK_WORKERS:-4}
BENCH_MODE=${DEVICE_CHECK_BENCH:---quick}
DRY_TESTS=${DEVICE_CHECK_DRY_TESTS:-tests/test_kernels_glu.py::test_no_grad_forward_skips_the_saved_preactivation_and_agrees}
SUMMARY=$OUT/summary.md
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${HOME:-/root}/.triton/cache}
BENCH_TMP=$(mktemp -d)
trap 'rm -rf "$BENCH_TMP"' EXIT

SELECTED=" ${DEVICE_CHECK_STEPS:-gpu_tests kernel_tests bench} "
STEPS=()
declare -A RESULT SECS
FAILED=0

left() { echo $(( BUDGET - (SECONDS - T0) )); }

# run_step NAME CAP RESERVE LOG CMD...: CMD under `timeout` (SIGINT first, so pytest still prints its
# summary; SIGKILL 15 s later) for min(CAP, budget left - RESERVE) seconds, output appended to $OUT/LOG.
# A CMD that is a function of this script runs in this shell instead (its exports must stay), untimed.
run_step() {
    local name=$1 cap=$2 reserve=$3 log=$OUT/$4
    shift 4
    local t rc start
    case $name in
        env|install) ;;
        *) [[ $SELECTED == *" ${name%%_[a-z]*} "* || $SELECTED == *" $name "* ]] || return 0 ;;
    esac
    t=$(( $(left) - reserve ))
    (( t > cap )) && t=$cap
    STEPS+=("$name")
    if (( t < 10 )); then
        echo "=== $name: skipped, only $(left) s of the budget left" | tee -a "$log"
        RESULT[$name]=skipped SECS[$name]=0 FAILED=1
        return
    fi
    echo "=== $name (timeout ${t}s, $(left)s of the budget left): $*" | tee -a "$log"
    start=$SECONDS
    if declare -F "$1" >/dev/null; then
        # a function of this script (env, install): runs in this shell, so its exports stay; no timeout
        "$@" > >(tee -a "$log") 2>&1
        rc=$?
    else
        timeout -s INT -k 15 "$t" "$@" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
    fi
    SECS[$name]=$(( SECONDS - start ))
    if (( rc == 0 )); then
        RESULT[$name]=pass
    elif (( rc == 124 || rc == 137 )); then
        RESULT[$name]="TIMEOUT (${t}s)" FAILED=1
    else
        RESULT[$name]="FAIL (exit $rc)" FAILED=1
    fi
    echo "=== $name: ${RESULT[$name]} in ${SECS[$name]}s" | tee -a "$log"
}

# ------------------------------------------------------------------------------------------------ env
env_info() {
    echo "date: $(date -u +%FT%TZ)  host: $(uname -n)  budget: ${BUDGET}s  dry: $DRY"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import sys, importlib
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "numpy", "pytest", "xdist", "pytest_timeout", "setuptools", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:15s}", getattr(mod, "__version__", "(no __version__)"))
    except Exception as exc:
        print(f"{name:15s} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
EOF
}

# ---------------------------------------------------------------------------------------------- install
importable() {
    (cd / && "$PY" -P -c "import m2train.kernels.ops, m2train.models, m2train.config; import os, sys
sys.exit(0 if os.path.realpath(m2train.config.CONFIG_DIR) == os.path.realpath('$REPO/configs') else 1)") 2>/dev/null
}

install_m2train() {
    local wheels=("$REPO"/.whl/*.whl)
    if [[ -e ${wheels[0]} ]]; then
        echo "installing ${#wheels[@]} carried wheel(s) into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}" || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if importable; then
        echo "m2train already importable from $REPO"
        return 0
    fi
    echo "pip install --no-index --no-deps --no-build-isolation -e ."
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" && importable && return 0
    echo "editable install failed: symlink shim in /tmp/m2shim (m2train + kernels/launch/data_prep)"
    rm -rf /tmp/m2shim && mkdir -p /tmp/m2shim/m2train || return 1
    local f
    for f in "$REPO"/m2train/*; do ln -s "$f" /tmp/m2shim/m2train/; done
    ln -s "$REPO/kernels" /tmp/m2shim/m2train/kernels
    ln -s "$REPO/launch" /tmp/m2shim/m2train/launch
    ln -s "$REPO/data_prep" /tmp/m2shim/m2train/data_prep
    export PYTHONPATH=/tmp/m2shim${PYTHONPATH:+:$PYTHONPATH}
    importable
}

# -------------------------------------------------------------------------------------------- the steps
if [[ -z ${DEVICE_CHECK_DRY:-} ]]; then
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        DRY=0
    else
        DRY=1
    fi
else
    DRY=$DEVICE_CHECK_DRY
fi

: > "$SUMMARY"
run_step env 60 0 env.txt env_info
run_step install 120 0 env.txt install_m2train

# -P: the working directory is not put on sys.path, so `m2train` is always the installed/shimmed package.
# shellcheck disable=SC2206
PYTEST=("$PY" -P -m pytest -p no:cacheprovider -rA --durations=20 ${DEVICE_CHECK_PYTEST_ARGS:-})
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST+=(--timeout=240)
fi
if (( WORKERS > 0 )) && (( DRY == 0 )) && "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST+=(-n "$WORKERS" --dist loadgroup)      # loadgroup: the whole-model GPU tests on one worker
fi
KERNEL_FILES=(tests/test_kernels_*.py)

# bench_warm: without a GPU nothing to compile. On one, the bench's Triton kernels (the FFT conv's take up to
# ~20 s to compile each, one at a time in a process) are compiled while the tests run, in parallel processes - one
# per bench section, the FFT conv's one per sequence length - into the shared on-disk Triton cache; the timed
# bench then only loads them. Their autotuning (timed while other processes share the GPU) is thrown away
# before the timed runs: Triton caches autotune results on disk (*.autotune.json) and would reuse them.
WARM_PIDS=()
warm_bench() {
    local t=$1 len s
    echo "=== bench_warm: ${#WARM_LENGTHS[@]} FFT-conv lengths + other sections in parallel, timeout ${t}s"
    for s in "${BENCH_SECTIONS[@]}"; do
        if [[ $s == fftconv ]]; then
            for len in "${WARM_LENGTHS[@]}"; do
                timeout -s INT -k 15 "$t" "$PY" -P -m m2train.kernels.bench "${BENCH_ARGS[@]}" --reps 1 \
                    --sections fftconv --lengths "$len" --json /dev/null > "$BENCH_TMP/warm_fftconv_$len.log" 2>&1 &
                WARM_PIDS+=($!)
            done
        else
            timeout -s INT -k 15 "$t" "$PY" -P -m m2train.kernels.bench "${BENCH_ARGS[@]}" --reps 1 \
                --sections "$s" --json /dev/null > "$BENCH_TMP/warm_$s.log" 2>&1 &
            WARM_PIDS+=($!)
        fi
    done
}

finish_warm() {
    local pid rc=0 start=$SECONDS
    for pid in "${WARM_PIDS[@]}"; do
        wait "$pid" || rc=1
    done
    {
        echo "=== bench_warm: done (exit ${rc}; waited $(( SECONDS - start ))s after the tests); last lines of each:"
        for f in "$BENCH_TMP"/warm_*.log; do
            [[ -f $f ]] && { echo "--- ${f##*/}"; tail -n 4 "$f"; }
        done
        local n
        n=$(find "$TRITON_CACHE_DIR" -name '*.autotune.json' 2>/dev/null | wc -l)
        echo "removing $n cached autotune result(s) so the timed bench autotunes alone on the GPU"
        find "$TRITON_CACHE_DIR" -name '*.autotune.json' -delete 2>/dev/null
    } 2>&1 | tee -a "$OUT/bench.log"
}

# shellcheck disable=SC2206
BENCH_SECTIONS=(${DEVICE_CHECK_BENCH_SECTIONS:-monarch fftconv models})
# The FFT-conv lengths of `bench --quick` (kernels/bench.py QUICK_LENGTHS; a literal copy if that import fails).
# shellcheck disable=SC2206
WARM_LENGTHS=(${DEVICE_CHECK_WARM_LENGTHS:-$("$PY" -c 'from m2train.kernels.bench import QUICK_LENGTHS
print(*QUICK_LENGTHS)' 2>/dev/null || echo 2048 4096 16384)})
if (( DRY )); then
    # shellcheck disable=SC2206
    DRY_SELECTION=($DRY_TESTS)
    BENCH_SECTIONS=(monarch)
    BENCH_ARGS=(--smoke)
    run_step gpu_tests 120 60 gpu_tests.log "${PYTEST[@]}" -m gpu tests/test_kernels_gpu.py
    run_step kernel_tests 120 40 kernel_tests.log "${PYTEST[@]}" "${DRY_SELECTION[@]}"
else
    BENCH_ARGS=()
    [[ $BENCH_MODE == --quick ]] && BENCH_ARGS=(--quick)
    # Budget 480 s: the warm-up during the tests (until ~200 s before the end), gpu_tests <= 200 s,
    # kernel_tests <= 90 s, then the timed bench sections share what is left (>= 150 s).
    warm_t=$(( $(left) - 200 ))
    if [[ $SELECTED == *" bench "* ]] && (( warm_t >= 30 )); then
        warm_bench "$warm_t" > >(tee -a "$OUT/bench.log") 2>&1      # in this shell: WARM_PIDS must stay
    fi
    run_step gpu_tests 200 240 gpu_tests.log "${PYTEST[@]}" -m gpu "${KERNEL_FILES[@]}"
    run_step kernel_tests 90 150 kernel_tests.log "${PYTEST[@]}" -m "not gpu" -k "not compile_for_h100" \
        "${KERNEL_FILES[@]}"
    (( ${#WARM_PIDS[@]} )) && finish_warm
fi

# Bench: one process per section; each keeps 30 s of the budget per later section (and 10 s for the end).
n=${#BENCH_SECTIONS[@]}
for i in "${!BENCH_SECTIONS[@]}"; do
    s=${BENCH_SECTIONS[$i]}
    case $s in monarch) cap=60 ;; fftconv) cap=100 ;; *) cap=60 ;; esac
    (( DRY )) && cap=240
    run_step "bench_$s" "$cap" $(( 30 * (n - i - 1) + 10 )) bench.log \
        "$PY" -P -m m2train.kernels.bench "${BENCH_ARGS[@]}" --sections "$s" --json "$BENCH_TMP/$s.json"
done

# Merge the sections' JSON (the first one's device/peaks; each section's rows) into kernels_bench.json.
[[ $SELECTED == *" bench "* ]] && "$PY" - "$BENCH_TMP" "$OUT/kernels_bench.json" "${BENCH_SECTIONS[@]}" <<'EOF' 2>&1 | tee -a "$OUT/bench.log"
import json, os, sys
tmp, dest, sections = sys.argv[1], sys.argv[2], sys.argv[3:]
merged = None
for s in sections:
    path = os.path.join(tmp, f"{s}.json")
    if not os.path.exists(path):
        print(f"bench section {s}: no JSON (failed or timed out)")
        continue
    part = json.load(open(path))
    if merged is None:
        merged = part
        merged["sections_run"] = []
    else:
        merged[s] = part.get(s, [])
    merged["sections_run"].append(s)
if merged is not None:
    with open(dest, "w") as f:
        json.dump(merged, f, indent=1)
    print(f"wrote {dest} (sections: {', '.join(merged['sections_run'])})")
EOF
if [[ -f $OUT/kernels_bench.json ]] && (( ! DRY )); then
    cp "$OUT/kernels_bench.json" "$REPO/benchmarks/kernels_bench.json"
fi

# ---------------------------------------------------------------------------------------------- summary
{
    echo "# device_check summary ($( (( DRY )) && echo "DRY RUN, no GPU" || echo "GPU run"), budget ${BUDGET}s, used $((SECONDS - T0))s)"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    for s in "${STEPS[@]}"; do
        echo "| $s | ${RESULT[$s]} | ${SECS[$s]} |"
    done
    echo
    for log in gpu_tests kernel_tests; do
        [[ -f $OUT/$log.log ]] || continue
        echo "$log: $(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$OUT/$log.log" | tail -1)"
        grep -E '^(FAILED|ERROR) ' "$OUT/$log.log" | head -30
    done
    echo
    if [[ -f $OUT/bench.log ]]; then
        echo "## bench tables"
        grep -E '^(\||Device: )' "$OUT/bench.log"
    fi
    echo
    echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} > "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
