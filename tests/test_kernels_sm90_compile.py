"""The FFT-conv and short-conv kernels compiled for an H100 (sm_90) on this CPU, no GPU needed: Triton's own
compiler and its bundled ptxas check what the interpreter cannot - that every kernel lowers for the GPU,
fits an SM's shared memory (227 KiB) and, at the launch configs chosen, spills (almost) no registers.

Each test compiles in a subprocess (TRITON_INTERPRET unset there; this process may have it set) with a
fresh Triton cache and reads one line per kernel from _AOT_SCRIPT."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import triton

from m2train.kernels import fft_monarch

SM90_SHARED_BYTES = 227 * 1024
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])

# Triton 3.8's ptxas spills nothing in the kernels the spill tests compile; 3.6 (the GPU image's) spills
# 8 bytes per thread in the three-level backward rows kernel and in the one-program backward at N = 2048.
ALLOWED_SPILLS_TRITON_3_6 = 16
# Spill stores per thread allowed in the three-level backward rows kernel (bf16, gated): 48 measured on
# Triton 3.8, 56 on 3.6 (the batch loop's price, see test_three_level_kernels_compile_for_h100_without_spilling).
ROWS_BWD_SPILL_BUDGET = 64
# ... and in the one-program backward with the output gate only (the mixer's dropout / pad-mask path) at
# N = 2048: 8 bytes on Triton 3.8 since its loads go through fftconv._load_act (the same loads inline
# compiled to 0; 3.6 spilled 8 either way).
OUT_GATE_BWD_SPILL_BUDGET = 8
# ... and in the single-pass three-level forward at R = 4 (its two accumulators): 0-16 bytes measured on
# Triton 3.8, 0-12 on 3.6, over the gate / addend variants and N = 4096, 8192.
SINGLE_PASS_SPILL_BUDGET = 16

_AOT_SCRIPT = r'''
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from m2train.kernels import fftconv, fftconv_long, shortconv
from m2train.kernels.fft_monarch import fft_layout, split_fft_size

ACTS = {"dy_ptr", "v_ptr", "x1_ptr", "x2_ptr", "y_ptr", "dv_ptr", "dx1_ptr", "dx2_ptr", "x_ptr", "dx_ptr", "add_ptr",
        "c_ptr"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def build(fn, act, constexprs, warps):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "seed_ptr":
            sig[name] = "*i64"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            sig[name] = act if name in ACTS else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]          # what a launch with aligned tensors compiles
        elif name == "p_drop":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    return k

def spills(k):
    # ptxas -v on the kernel's PTX: bytes of register spill stores per thread
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", log).group(1))

n = int(sys.argv[1])
# SC_K > 0: the short conv fused in front (kernels/fftconv_front.py), K = 3 taps as in M2
SC_K = int(sys.argv[3]) if len(sys.argv) > 3 else 0
# "drop": the dropout on v ⊙ x1 inside the kernels too (M2-BERT training)
DROP = len(sys.argv) > 4 and sys.argv[4] == "drop"
if sys.argv[2] in ("one", "one-bf16"):
    # the one-program kernels, every gate variant: shared memory and register spills
    n1, n2 = split_fft_size(n)
    acts = (("*bf16", "tf32"),) if sys.argv[2] == "one-bf16" else (("*bf16", "tf32"), ("*fp32", "tf32x3"))
    for act, prec in acts:
        for gates in ((True, True),) if SC_K else ((True, True), (False, False), (False, True)):
            for name, fn in (("fwd", fftconv._fftconv_fwd_kernel), ("bwd", fftconv._fftconv_bwd_kernel)):
                c = {"N1": n1, "N2": n2, "GATE_IN": gates[0], "GATE_OUT": gates[1], "PREC": prec, "SC_K": SC_K,
                     "DROP": DROP}
                if name == "fwd":             # the ungated form is the mixer's residual conv: it adds
                    c["ADD"] = gates == (False, False)
                k = build(fn, act, c, fftconv.one_program_warps(n))
                print("fftconv", name, act, *gates, k.metadata.shared, spills(k), flush=True)
    if sys.argv[2] == "one-bf16":
        sys.exit(0)
    for act in ("*bf16", "*fp32"):
        c = {"K": 3, "BLOCK_C": 32, "BLOCK_T": 64}
        print("shortconv fwd", act, build(shortconv._shortconv_fwd_kernel, act, c, shortconv.NUM_WARPS).metadata.shared)
        print("shortconv bwd", act, build(shortconv._shortconv_bwd_kernel, act, {**c, "KP": 4, "IN_BIAS": True},
                                          shortconv.NUM_WARPS).metadata.shared)
else:
    # the three-level kernels at the default row size, bf16 activations (training) and gated (the most live
    # values): shared memory and register spills
    r, m1, m2, bm = fftconv_long._plan(n)
    gates = {"GATE_IN": True, "GATE_OUT": True, "SC_K": SC_K, "DROP": DROP}
    for name, fn, c, warps in (
            ("rows fwd", fftconv_long._rows_fwd_kernel,
             {"R": r, "M1": m1, "M2": m2, "GATE_IN": True, "SC_K": SC_K, "DROP": DROP, "PREC": "tf32"},
             fftconv_long.ROW_WARPS),
            ("rows bwd", fftconv_long._rows_bwd_kernel,
             {"R": r, "M1": m1, "M2": m2, **gates, "SCRATCH": True, "PREC": "tf32"}, fftconv_long.ROW_WARPS),
            ("cols fwd", fftconv_long._cols_fwd_kernel,
             {"R": r, "R_HALF": r // 2, "M": m1 * m2, "BM": bm, **gates, "ADD": True}, fftconv_long.COLUMN_WARPS),
            ("cols bwd", fftconv_long._cols_bwd_kernel, {"R": r, "R_HALF": r // 2, "M": m1 * m2, "BM": bm, **gates},
             fftconv_long.COLUMN_WARPS)):
        k = build(fn, "*bf16", c, warps)
        print("fftconv_long", name.replace(" ", "_"), k.metadata.shared, spills(k), flush=True)
    # the single-pass kernels at their largest size (R = SINGLE_PASS_ROW_LIMIT rows): the forward gated
    # (keeping the pre-gate output for dx2) and in the mixer's residual form (ungated, adding the other
    # branch), the backward's input-gradient kernel and its scratch-free spectrum-gradient rows kernel
    r = fftconv_long.SINGLE_PASS_ROW_LIMIT
    gated = {"R": r, "M1": m1, "M2": m2, **gates, "PREC": "tf32"}
    for name, fn, c in (
            ("single_fwd", fftconv_long._single_pass_fwd_kernel, {**gated, "ADD": False, "SAVE_C": True}),
            ("single_fwd_add", fftconv_long._single_pass_fwd_kernel,
             {**gated, "GATE_IN": False, "GATE_OUT": False, "ADD": True, "SAVE_C": False, "SC_K": 0, "DROP": False}),
            ("single_dx", fftconv_long._single_pass_input_grad_kernel, gated),
            ("single_dk", fftconv_long._rows_bwd_kernel, {**gated, "SCRATCH": False})):
        k = build(fn, "*bf16", c, fftconv_long.ROW_WARPS)
        print("fftconv_long", name, k.metadata.shared, spills(k), flush=True)
'''


def _compile_lines(tmp_path, *args: str) -> tuple[list[list[str]], str]:
    """Run _AOT_SCRIPT with `args`; its output lines split into fields, and the raw output for messages."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split() for line in proc.stdout.splitlines()], proc.stdout


def _allowed_spills() -> int:
    return 0 if TRITON_VERSION >= (3, 8) else ALLOWED_SPILLS_TRITON_3_6


@pytest.mark.slow       # 16 sm_90 compiles through Triton's bundled ptxas, ~1 min on a busy 2-core machine
def test_fftconv_and_shortconv_compile_for_h100_without_a_gpu(tmp_path):
    """The interpreter checks none of the GPU lowering; Triton's compiler does, for sm_90, on this CPU:
    every gate variant of the FFT-conv kernels in bf16 (tf32 products) and fp32 (tf32x3), and the short
    conv, with shared memory inside an H100/H200 SM (227 KiB)."""
    lines, out = _compile_lines(tmp_path, "512", "one")
    assert len(lines) == 16, out
    # "fftconv <dir> <act> <gate in> <gate out> <shared> <spills>", "shortconv <dir> <act> <shared>"
    assert all(int(line[-2] if line[0] == "fftconv" else line[-1]) <= SM90_SHARED_BYTES for line in lines), out


@pytest.mark.slow       # 6 sm_90 compiles + ptxas, ~30 s on a 2-core machine
def test_one_program_kernels_compile_for_h100_without_spilling(tmp_path):
    """The one-program kernels at their largest default size (N = fft_monarch.ONE_PROGRAM_MAX_FFT = 2048,
    L = 1024), bf16, every gate variant, forward and backward: at one_program_warps(N) = 8 ptxas spills no
    registers, except 8 bytes in the output-gate-only backward (OUT_GATE_BWD_SPILL_BUDGET; the backward
    holding its spectrum gradient and inputs in registers spilled 1.2 KB per thread here; at N = 4096 it
    still spills ~3 KB, the reason the three-level kernels take over there)."""
    lines, out = _compile_lines(tmp_path, str(fft_monarch.ONE_PROGRAM_MAX_FFT), "one-bf16")
    assert len(lines) == 6 and {line[1] for line in lines} == {"fwd", "bwd"}, out
    for line in lines:
        out_gate_bwd = line[1] == "bwd" and line[3:5] == ["False", "True"]
        budget = max(_allowed_spills(), OUT_GATE_BWD_SPILL_BUDGET) if out_gate_bwd else _allowed_spills()
        assert int(line[-2]) <= SM90_SHARED_BYTES and int(line[-1]) <= budget, out


@pytest.mark.slow       # 8 sm_90 compiles + ptxas, ~1 min on a 2-core machine
def test_three_level_kernels_compile_for_h100_without_spilling(tmp_path):
    """The three-level kernels at the default row size (N = 32768: R = 16 rows of 32 x 64 points), bf16:
    they compile for sm_90 within an SM's shared memory and, at the chosen warps and column tile, ptxas
    spills no registers (the reason for ROW_WARPS = 8 and TILE_ELEMENTS) - except a small, measured budget in
    the backward rows kernel: its batch loop (which accumulates dK in place of a per-sample (B, H, N) buffer)
    costs 48 / 64 bytes per thread (stores / loads) on Triton 3.8, 56 / 80 on 3.6, where the version without
    the loop spilled none; and the single-pass kernels at R = 4 (N = 8192): the forwards within
    SINGLE_PASS_SPILL_BUDGET, the backward's two kernels without spilling."""
    lines, out = _compile_lines(tmp_path, "32768", "long")
    assert [line[1] for line in lines] == ["rows_fwd", "rows_bwd", "cols_fwd", "cols_bwd", "single_fwd",
                                           "single_fwd_add", "single_dx", "single_dk"], out
    for _, name, shared, spilled in lines:
        budget = {"rows_bwd": ROWS_BWD_SPILL_BUDGET, "single_fwd": SINGLE_PASS_SPILL_BUDGET,
                  "single_fwd_add": SINGLE_PASS_SPILL_BUDGET}.get(name, _allowed_spills())
        assert int(shared) <= SM90_SHARED_BYTES and int(spilled) <= budget, out


# Spill stores per thread allowed in the two-pass column backward with the short conv fused in front (three
# shifted loads per input): 4-8 bytes measured on Triton 3.8, and 28 on 3.6 with the in-kernel dropout too
# (0 without the front). A memory-bound kernel that runs only beyond L = 4096.
FRONT_COLS_BWD_SPILL_BUDGET = 32
# ... and in the one-program backward with the in-kernel dropout too (M2-BERT training, L <= 1024): 28 bytes
# measured on Triton 3.8, 16 on 3.6 (two Philox draws per element and sample; 0 without the dropout).
FRONT_DROP_ONE_BWD_SPILL_BUDGET = 32


@pytest.mark.slow       # 20 sm_90 compiles + ptxas, ~6 min on a 2-core machine
@pytest.mark.parametrize("dropout", [False, True])
def test_kernels_with_the_short_conv_in_front_compile_for_h100(tmp_path, dropout):
    """The gated FFT-conv kernels computing the short conv inside their loads (SC_K = 3, bf16;
    kernels/fftconv_front.py), with and without the in-kernel dropout, compile for sm_90 within an SM's
    shared memory and spill no more than the kernels without them, or a small measured budget: one program
    at its largest size (N = 2048) forward and backward, and every three-level kernel (rows and columns at
    N = 32768, the single-pass ones at R = 4)."""
    extra = ["3", "drop"] if dropout else ["3"]
    lines, out = _compile_lines(tmp_path, str(fft_monarch.ONE_PROGRAM_MAX_FFT), "one-bf16", *extra)
    assert [line[1] for line in lines] == ["fwd", "bwd"], out
    for line in lines:
        budget = FRONT_DROP_ONE_BWD_SPILL_BUDGET if dropout and line[1] == "bwd" else _allowed_spills()
        assert int(line[-2]) <= SM90_SHARED_BYTES and int(line[-1]) <= budget, out
    lines, out = _compile_lines(tmp_path, "32768", "long", *extra)
    assert len(lines) == 8, out
    for _, name, shared, spilled in lines:
        budget = {"rows_bwd": ROWS_BWD_SPILL_BUDGET, "single_fwd": SINGLE_PASS_SPILL_BUDGET,
                  "single_fwd_add": SINGLE_PASS_SPILL_BUDGET,
                  "cols_bwd": FRONT_COLS_BWD_SPILL_BUDGET}.get(name, _allowed_spills())
        assert int(shared) <= SM90_SHARED_BYTES and int(spilled) <= budget, out
