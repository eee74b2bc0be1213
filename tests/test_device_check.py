"""benchmarks/device_check.sh, the one command a session with a GPU machine runs (benchmarks/DEVICE.md), checked
here without a GPU: its syntax (every branch, the GPU-only ones too), a dry run of every step on a tiny subset
in this environment, and the time-budget / failure bookkeeping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "device_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(out: Path, budget: int, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "M2TRAIN_KERNELS")}
    full_env.update(OUT=str(out), DEVICE_CHECK_PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), str(budget)], env=full_env, capture_output=True, text=True,
                          timeout=budget + 60, cwd="/")


def test_script_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow       # ~30 s: interpreter start-ups, one interpreted kernel test, bench --smoke (monarch)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the no-GPU mode")
def test_dry_run_runs_every_step_and_writes_the_outputs(tmp_path):
    proc = _run(tmp_path, 240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in summary
    for step in ("env", "install", "gpu_tests", "kernel_tests", "bench_monarch"):
        assert f"| {step} | pass |" in summary, summary
    assert "skipped in" in summary and "1 passed" in summary            # gpu tests skipped, one kernel test
    assert "| monarch (H->H) | 16 |" in summary                           # the bench's markdown table
    assert {p.name for p in tmp_path.iterdir()} == {"env.txt", "gpu_tests.log", "kernel_tests.log", "bench.log",
                                                    "kernels_bench.json", "summary.md"}
    assert len(list(tmp_path.iterdir())) <= 8                             # what the device tool brings back
    env = (tmp_path / "env.txt").read_text()
    assert "torch" in env and "triton" in env and "cuda available: False" in env
    result = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert result["sections_run"] == ["monarch"]
    assert [r["op"] for r in result["monarch"]] == ["glu_up (H->2I, gelu*gate)", "blockdiag (I->H)", "monarch (H->H)",
                                                    "glu mlp (H->I->H), one kernel"]
    assert summary in proc.stdout                                         # printed at the end too


def test_budget_exhausted_skips_every_step_and_fails(tmp_path):
    """No time left: every step is still listed (a skipped or failed step never hides the later ones), as
    skipped, and the exit status says the check did not pass."""
    proc = _run(tmp_path, 0, DEVICE_CHECK_DRY="0")
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "GPU run" in summary
    for step in ("env", "install", "gpu_tests", "kernel_tests", "bench_monarch", "bench_fftconv", "bench_models"):
        assert f"| {step} | skipped | 0 |" in summary, summary
    assert "no JSON" in (tmp_path / "bench.log").read_text()
    assert not (tmp_path / "kernels_bench.json").exists()


def test_step_selection_for_a_rerun(tmp_path):
    """DEVICE_CHECK_STEPS=bench (a rerun on a warm machine) lists env, install and the bench sections only."""
    proc = _run(tmp_path, 0, DEVICE_CHECK_DRY="0", DEVICE_CHECK_STEPS="bench",
                DEVICE_CHECK_BENCH_SECTIONS="fftconv")
    assert proc.returncode == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| env |" in summary and "| install |" in summary and "| bench_fftconv |" in summary
    assert "gpu_tests" not in summary and "kernel_tests" not in summary and "bench_monarch" not in summary


@pytest.mark.slow       # ~20 s: three interpreter start-ups in parallel, then one more
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals without a GPU")
def test_full_mode_without_a_gpu_fails_cleanly_and_keeps_going(tmp_path):
    """The GPU branch run on this CPU machine (DEVICE_CHECK_DRY=0): the bench warm-up processes and the timed
    bench both refuse without CUDA, each failure is recorded, every later step still runs, exit 1."""
    proc = _run(tmp_path, 300, DEVICE_CHECK_DRY="0", DEVICE_CHECK_STEPS="bench",
                DEVICE_CHECK_BENCH_SECTIONS="fftconv", DEVICE_CHECK_WARM_LENGTHS="2048 4096")
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| install | pass |" in summary
    assert "| bench_fftconv | FAIL (exit 2) |" in summary
    log = (tmp_path / "bench.log").read_text()
    assert "--- warm_fftconv_2048.log" in log and "--- warm_fftconv_4096.log" in log and "needs a CUDA GPU" in log
    assert "removing 0 cached autotune result(s)" in log
