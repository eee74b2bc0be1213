"""The fused gated long convolution for sequences too long for one program: the three-level FFT.

kernels/fftconv.py holds a whole zero-padded sequence in one program, up to FFT size ONE_PROGRAM_MAX_FFT
(L <= 1024). Beyond that the sequence is an (R, M) matrix of rows of M = ROW_FFT_SIZE points
(kernels/fft_monarch.py, fft_layout: N = R·M, time n = M·r + m, frequency k = k_r + R·k_m) and the
convolution y = Re IDFT(DFT(u) ⊙ K) runs as two passes:

1. rows (one program per spectral row k_r of one sequence):
       z    = ω_N^{m·k_r} · Σ_{r < R/2} ω_R^{r·k_r} · u[r, :]     the column step, straight from the inputs
       w    = IDFT_M(DFT_M(z) ⊙ K[k_r, :]) · ω_N^{-m·k_r}          the row FFTs of kernels/fftconv.py, complex
   and w goes to a scratch buffer (complex fp32, N per sequence). Only the first R/2 time rows can be non-zero
   (N >= 2L), so each program reads those rows of u (shared by the R programs of a sequence through L2).
2. columns (one program per tile of BM columns of one sequence):
       y[r, tile] = Re Σ_k ω_R^{-r·k} · w[k, tile] / R  for the R/2 time rows that hold the output,
   an R-point inverse DFT across rows that reads every scratch element once, then the D skip and the gates.

Up to R = 4 rows (L <= 4096, SINGLE_PASS_MAX_ROWS) the forward fuses both passes: one program per sequence
loops over its R spectral rows and adds each row's share of the inverse column DFT to the R/2 output time
rows held in registers, so nothing goes through the scratch buffer (whose 8·N bytes per sequence written
and read back were four times the activations' traffic at L = 4096).

Gates and dtypes are as in kernels/fftconv.py (u = v ⊙ x1 in, ⊙ x2 out, fp32 arithmetic, tf32 / tf32x3 DFT
products). The backward runs the same two passes: the row pass (one program per spectral row of one
channel, looping over the batch) computes U and G = DFT(dy ⊙ x2) rows, accumulates Σ_b conj(U) ⊙ G (the
kernel-spectrum gradient) in that row of dK (no atomics, deterministic) and writes the rows of
IDFT(G ⊙ conj K) (and IDFT(U ⊙ K) for dx2) to scratch; the column pass turns those into dv, dx1, dx2 and
per-tile partial sums of dD.

Extra memory: the two-pass forward's scratch is 8·N bytes per (sample, channel), the backward's two buffers
16·N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import on_device_of
from .fft_monarch import dft_factors, fft_layout, outer_factors
from .fftconv import (NUM_STAGES, _cmul_f2, _dropped, _load_act, _load_mat, _precision, _store_mat, drop_args,
                      front_args, input_grads, placeholder)

# Columns per program of the column pass (a divisor of the row size M; both powers of two), at most: the
# pass is memory-bound (each program reads R·BM complex scratch values and writes R/2·BM outputs), and the
# tile shrinks for large R so the backward's two (R/2, BM) accumulators and four input tiles stay in
# registers (sm_90 offline compile, R = 16, BM = 256: 179 registers, no spills).
COLUMN_TILE = 256
TILE_ELEMENTS = 2048
# Warps of the row pass. An offline sm_90a compile (Triton 3.8 + ptxas) of the row kernels at M = 2048
# (32 x 64 factors), bf16 activations: 4 warps spill 156 / 812 bytes per thread (forward / backward), 8 warps
# none. fp32 activations (tf32x3 products) spill with either (736 / 3668 bytes at 8 warps).
ROW_WARPS = 8
# Warps of the column pass (small (R/2, BM) tiles; 4 warps spill nothing up to R = 64, see COLUMN_TILE).
COLUMN_WARPS = 4
# Up to this many rows (R <= 4: L <= 4096) the forward runs in a single pass, one program per sequence
# looping over its R spectral rows and accumulating the inverse column DFT of each row's result into the
# R/2 output time rows in registers: no scratch buffer at all. The two-pass forward writes and reads back
# 8·N bytes of complex fp32 scratch per (sample, channel) - 128 KiB at L = 4096, four times the 32 KiB of
# activations the conv reads and writes. Beyond R = 4 the R/2 accumulators would not fit beside the row
# FFT's working set (one (M1, M2) fp32 tile is 8 registers per thread at 8 warps). An offline sm_90a
# compile (ptxas -v, 8 warps, N = 4096 and 8192) spills 0-16 bytes per thread in bf16 on Triton 3.6 and
# 3.8, and ~0.4-0.6 KB in fp32 (tf32x3), where the two-pass row kernel spilled 0 and 736.
# Set 0 to run every three-level forward in two passes; the kernel holds at most two accumulators, so
# values above SINGLE_PASS_ROW_LIMIT act as that limit.
SINGLE_PASS_MAX_ROWS = 4
SINGLE_PASS_ROW_LIMIT = 4


@triton.jit
def _column_row(a_ptr, g_ptr, pa_ptr, pg_ptr, seed_ptr, b, p_drop, k, L, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                R: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, GATE: tl.constexpr,
                KA: tl.constexpr, KG: tl.constexpr, DROP: tl.constexpr):
    """Row k of the column step: ω_N^{m·k} · Σ_r ω_R^{r·k} · (a ⊙ g)[r·M + m], as (M1, M2) re, im.
    KA / KG > 0: a / g is the short conv in front of the values there (fftconv._load_act, parameters at
    pa_ptr / pg_ptr).
    DROP: a ⊙ g through the in-kernel dropout of sample b (fftconv._dropped)."""
    M = M1 * M2
    t = _time_row(0, M1, M2)
    zr = tl.zeros((M1, M2), dtype=tl.float32)
    zi = tl.zeros((M1, M2), dtype=tl.float32)
    for r in range(0, tl.cdiv(L, M)):                  # rows at or beyond L are zero padding
        pos = r * M + t
        msk = pos < L
        x = _load_act(a_ptr, pos, msk, L, pa_ptr, KA)
        if GATE:
            x = x * _load_act(g_ptr, pos, msk, L, pg_ptr, KG)
        x = _dropped(x, seed_ptr, b, pos, L, p_drop, DROP)
        zr += tl.load(frr_ptr + k * R + r) * x
        zi += tl.load(fri_ptr + k * R + r) * x
    twr = _load_mat(twr_ptr + k * M, M1, M2)
    twi = _load_mat(twi_ptr + k * M, M1, M2)
    return zr * twr - zi * twi, zr * twi + zi * twr


@triton.jit
def _row_fft(zr, zi, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
             M1: tl.constexpr, M2: tl.constexpr, PREC: tl.constexpr):
    """Complex (M1, M2) row -> its M-point spectrum in permuted order: ((F1 @ z) ⊙ T) @ F2."""
    f1r = _load_mat(f1r_ptr, M1, M1)
    f1i = _load_mat(f1i_ptr, M1, M1)
    p1 = tl.dot(f1r, zr, input_precision=PREC)
    p2 = tl.dot(f1i, zi, input_precision=PREC)
    p3 = tl.dot(f1r + f1i, zr + zi, input_precision=PREC)
    br = p1 - p2
    bi = p3 - p1 - p2
    tr = _load_mat(tr_ptr, M1, M2)
    ti = _load_mat(ti_ptr, M1, M2)
    return _cmul_f2(br * tr - bi * ti, br * ti + bi * tr, f2r_ptr, f2i_ptr, M2, PREC)


@triton.jit
def _row_spectrum(a_ptr, g_ptr, pa_ptr, pg_ptr, seed_ptr, b, p_drop, k, L, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr,
                  tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                  R: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr,
                  KA: tl.constexpr, KG: tl.constexpr, DROP: tl.constexpr):
    """Spectral row k of the zero-padded N-point DFT of a [⊙ g] (the row's M points in permuted order)."""
    zr, zi = _column_row(a_ptr, g_ptr, pa_ptr, pg_ptr, seed_ptr, b, p_drop, k, L, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                         R, M1, M2, GATE, KA, KG, DROP)
    return _row_fft(zr, zi, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, M1, M2, PREC)


@triton.jit
def _row_ifft(zr, zi, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
              M1: tl.constexpr, M2: tl.constexpr, PREC: tl.constexpr):
    """Permuted M-point spectrum -> complex row: conj(F1) @ ((Z @ conj(F2)) ⊙ conj(T)) / M."""
    wr, wi = _cmul_f2(zr, -zi, f2r_ptr, f2i_ptr, M2, PREC)      # Z @ conj(F2) = conj(conj(Z) @ F2)
    wi = -wi
    tr = _load_mat(tr_ptr, M1, M2)
    ti = _load_mat(ti_ptr, M1, M2)
    vr = wr * tr + wi * ti
    vi = wi * tr - wr * ti
    f1r = _load_mat(f1r_ptr, M1, M1)
    f1i = _load_mat(f1i_ptr, M1, M1)
    # (F1r - i·F1i)(vr + i·vi) with three real products
    p1 = tl.dot(f1r, vr, input_precision=PREC)
    p2 = tl.dot(f1i, vi, input_precision=PREC)
    p3 = tl.dot(f1r - f1i, vr + vi, input_precision=PREC)
    scale = 1.0 / (M1 * M2)
    return (p1 + p2) * scale, (p3 - p1 + p2) * scale


@triton.jit
def _inverse_row_to_scratch(zr, zi, re_ptr, im_ptr, k, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                            twr_ptr, twi_ptr, M1: tl.constexpr, M2: tl.constexpr, PREC: tl.constexpr):
    """Row k's inverse M-point FFT times conj(ω_N^{m·k}) (the inverse column step's twiddle), stored as
    (M1, M2) fp32 re / im at re_ptr / im_ptr (this row of a scratch buffer)."""
    wr, wi = _row_ifft(zr, zi, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, M1, M2, PREC)
    twr = _load_mat(twr_ptr + k * (M1 * M2), M1, M2)
    twi = _load_mat(twi_ptr + k * (M1 * M2), M1, M2)
    _store_mat(re_ptr, wr * twr + wi * twi, M1, M2)
    _store_mat(im_ptr, wi * twr - wr * twi, M1, M2)


@triton.jit
def _rows_fwd_kernel(v_ptr, x1_ptr, sr_ptr, si_ptr, kr_ptr, ki_ptr,
                     f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                     sc_ptr, sc_s, seed_ptr, p_drop, L, H, s_vb, s_vh, s_x1b, s_x1h,
                     R: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, GATE_IN: tl.constexpr,
                     SC_K: tl.constexpr, DROP: tl.constexpr, PREC: tl.constexpr):
    # Spectral row on axis 0 (launched fastest): the R programs of one sequence run together and share
    # its input rows through L2.
    k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    M = M1 * M2
    p1 = sc_ptr + h * (SC_K + 2)
    xr, xi = _row_spectrum(v_ptr + b * s_vb + h * s_vh, x1_ptr + b * s_x1b + h * s_x1h, p1 + 2 * sc_s, p1,
                           seed_ptr + h, b, p_drop, k, L, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                           frr_ptr, fri_ptr, twr_ptr, twi_ptr, R, M1, M2, GATE_IN, PREC, SC_K, SC_K, DROP)
    kr = _load_mat(kr_ptr + h * (R * M) + k * M, M1, M2)
    ki = _load_mat(ki_ptr + h * (R * M) + k * M, M1, M2)
    row = (b * H + h) * (R * M) + k * M
    _inverse_row_to_scratch(xr * kr - xi * ki, xr * ki + xi * kr, sr_ptr + row, si_ptr + row, k,
                            f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, twr_ptr, twi_ptr, M1, M2, PREC)


@triton.jit
def _inverse_columns(sr_ptr, si_ptr, base, frr_ptr, fri_ptr, cols,
                     R: tl.constexpr, R_HALF: tl.constexpr, M: tl.constexpr, BM: tl.constexpr):
    """(R/2, BM) time rows of Re Σ_k ω_R^{-r·k} · s[k, cols] / R: the inverse column step of one tile."""
    rows = tl.arange(0, R_HALF)
    acc = tl.zeros((R_HALF, BM), dtype=tl.float32)
    for k in range(0, R):
        sr = tl.load(sr_ptr + base + k * M + cols)
        si = tl.load(si_ptr + base + k * M + cols)
        cr = tl.load(frr_ptr + rows * R + k)
        ci = tl.load(fri_ptr + rows * R + k)
        acc += cr[:, None] * sr[None, :] + ci[:, None] * si[None, :]
    return acc * (1.0 / R)


@triton.jit
def _gated_epilogue(acc, t, v_ptr, x1_ptr, x2_ptr, y_ptr, add_ptr, c_ptr, d, L, p1_ptr, sc_s, seed_ptr, b, p_drop,
                    GATE_IN: tl.constexpr, GATE_OUT: tl.constexpr, ADD: tl.constexpr, SAVE_C: tl.constexpr,
                    SC_K: tl.constexpr, DROP: tl.constexpr):
    """The forward's output at time offsets t (any tile shape) from acc = the conv there: c = acc + D ⊙ u,
    y = c [⊙ x2] [+ addend], stored (and c too when SAVE_C, for the backward's dx2). Pointers are this
    sequence's rows (batch and channel offsets applied); c has y's strides. SC_K > 0: v, x1, x2 are read
    through the short conv in front (parameter rows p1_ptr, + sc_s, + 2·sc_s); DROP: u through the in-kernel
    dropout of sample b (seed_ptr: this channel's seed)."""
    m = t < L
    u = _load_act(v_ptr, t, m, L, p1_ptr + 2 * sc_s, SC_K)
    if GATE_IN:
        u = u * _load_act(x1_ptr, t, m, L, p1_ptr, SC_K)
    u = _dropped(u, seed_ptr, b, t, L, p_drop, DROP)
    y = acc + d * u
    if SAVE_C:
        tl.store(c_ptr + t, y.to(c_ptr.dtype.element_ty), mask=m)
    if GATE_OUT:
        y = y * _load_act(x2_ptr, t, m, L, p1_ptr + sc_s, SC_K)
    if ADD:
        y = y + tl.load(add_ptr + t, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + t, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _time_row(r, M1: tl.constexpr, M2: tl.constexpr):
    """Time offsets of row r of a sequence (M = M1·M2 points) as the row FFTs' (M1, M2) tile."""
    return r * (M1 * M2) + tl.arange(0, M1)[:, None] * M2 + tl.arange(0, M2)[None, :]


@triton.jit
def _cols_fwd_kernel(sr_ptr, si_ptr, v_ptr, x1_ptr, x2_ptr, y_ptr, add_ptr, d_ptr, frr_ptr, fri_ptr, sc_ptr, sc_s,
                     seed_ptr, p_drop, L, H, s_vb, s_vh, s_x1b, s_x1h, s_x2b, s_x2h, s_yb, s_yh, s_ab, s_ah,
                     R: tl.constexpr, R_HALF: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
                     GATE_IN: tl.constexpr, GATE_OUT: tl.constexpr, ADD: tl.constexpr, SC_K: tl.constexpr,
                     DROP: tl.constexpr):
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    cols = j * BM + tl.arange(0, BM)
    conv = _inverse_columns(sr_ptr, si_ptr, (b * H + h) * (R * M), frr_ptr, fri_ptr, cols, R, R_HALF, M, BM)
    y_ptr += b * s_yb + h * s_yh
    _gated_epilogue(conv, tl.arange(0, R_HALF)[:, None] * M + cols[None, :], v_ptr + b * s_vb + h * s_vh,
                    x1_ptr + b * s_x1b + h * s_x1h, x2_ptr + b * s_x2b + h * s_x2h, y_ptr,
                    add_ptr + b * s_ab + h * s_ah, y_ptr, tl.load(d_ptr + h).to(tl.float32), L,
                    sc_ptr + h * (SC_K + 2), sc_s, seed_ptr + h, b, p_drop, GATE_IN, GATE_OUT, ADD, False, SC_K, DROP)


@triton.jit
def _single_pass_conv(a_ptr, g_ptr, pa_ptr, pg_ptr, seed_ptr, b, p_drop, kr_ptr, ki_ptr, L, f1r_ptr, f1i_ptr,
                      f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr, R: tl.constexpr,
                      M1: tl.constexpr, M2: tl.constexpr, GATE: tl.constexpr, CONJ: tl.constexpr, PREC: tl.constexpr,
                      KA: tl.constexpr, KG: tl.constexpr, DROP: tl.constexpr):
    """Time rows 0 and 1 (the second zero when R = 2) of the circular convolution of a [⊙ g] with this
    channel's kernel spectrum (kr_ptr, ki_ptr: its R rows), or with the conjugate spectrum when CONJ (the
    adjoint: a correlation, for the backward). Spectral row k's inverse row FFT w_k, times the inverse
    column twiddle, contributes Re(ω_R^{-r·k} · w_k) / R to time row r; R <= 4, so the R/2 time rows that
    hold the output are two (M1, M2) accumulators."""
    M = M1 * M2
    acc0 = tl.zeros((M1, M2), dtype=tl.float32)
    acc1 = tl.zeros((M1, M2), dtype=tl.float32)
    for k in range(0, R):
        xr, xi = _row_spectrum(a_ptr, g_ptr, pa_ptr, pg_ptr, seed_ptr, b, p_drop, k, L, f1r_ptr, f1i_ptr, f2r_ptr,
                               f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr, R, M1, M2, GATE, PREC,
                               KA, KG, DROP)
        kr = _load_mat(kr_ptr + k * M, M1, M2)
        ki = _load_mat(ki_ptr + k * M, M1, M2)
        if CONJ:
            ki = -ki
        wr, wi = _row_ifft(xr * kr - xi * ki, xr * ki + xi * kr, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr,
                           tr_ptr, ti_ptr, M1, M2, PREC)
        twr = _load_mat(twr_ptr + k * M, M1, M2)
        twi = _load_mat(twi_ptr + k * M, M1, M2)
        sr = wr * twr + wi * twi                       # w_k · conj(ω_N^{m·k}), as the two-pass scratch holds
        si = wi * twr - wr * twi
        acc0 += tl.load(frr_ptr + k) * sr + tl.load(fri_ptr + k) * si
        if R > 2:
            acc1 += tl.load(frr_ptr + R + k) * sr + tl.load(fri_ptr + R + k) * si
    return acc0 * (1.0 / R), acc1 * (1.0 / R)


@triton.jit
def _single_pass_fwd_kernel(v_ptr, x1_ptr, x2_ptr, y_ptr, add_ptr, c_ptr, kr_ptr, ki_ptr, d_ptr,
                            f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                            sc_ptr, sc_s, seed_ptr, p_drop, L, s_vb, s_vh, s_x1b, s_x1h, s_x2b, s_x2h, s_yb, s_yh,
                            s_ab, s_ah, R: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, GATE_IN: tl.constexpr,
                            GATE_OUT: tl.constexpr, ADD: tl.constexpr, SAVE_C: tl.constexpr, SC_K: tl.constexpr,
                            DROP: tl.constexpr, PREC: tl.constexpr):
    # One program per sequence (batch on axis 0, launched fastest: the programs sharing one channel's
    # spectrum run together and read it from L2).
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    v_ptr += b * s_vb + h * s_vh
    x1_ptr += b * s_x1b + h * s_x1h
    x2_ptr += b * s_x2b + h * s_x2h
    y_ptr += b * s_yb + h * s_yh
    c_ptr += b * s_yb + h * s_yh
    add_ptr += b * s_ab + h * s_ah
    p1 = sc_ptr + h * (SC_K + 2)
    seed_ptr += h
    acc0, acc1 = _single_pass_conv(v_ptr, x1_ptr, p1 + 2 * sc_s, p1, seed_ptr, b, p_drop, kr_ptr + h * (R * M1 * M2),
                                   ki_ptr + h * (R * M1 * M2), L, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                                   frr_ptr, fri_ptr, twr_ptr, twi_ptr, R, M1, M2, GATE_IN, False, PREC, SC_K, SC_K,
                                   DROP)
    d = tl.load(d_ptr + h).to(tl.float32)
    _gated_epilogue(acc0, _time_row(0, M1, M2), v_ptr, x1_ptr, x2_ptr, y_ptr, add_ptr, c_ptr, d, L, p1, sc_s,
                    seed_ptr, b, p_drop, GATE_IN, GATE_OUT, ADD, SAVE_C, SC_K, DROP)
    if R > 2:
        _gated_epilogue(acc1, _time_row(1, M1, M2), v_ptr, x1_ptr, x2_ptr, y_ptr, add_ptr, c_ptr, d, L, p1, sc_s,
                        seed_ptr, b, p_drop, GATE_IN, GATE_OUT, ADD, SAVE_C, SC_K, DROP)


@triton.jit
def _input_grad_epilogue(acc, r, dy_ptr, v_ptr, x1_ptr, x2_ptr, c_ptr, dv_ptr, dx1_ptr, dx2_ptr, d, L, p1_ptr, sc_s,
                         seed_ptr, b, p_drop, M1: tl.constexpr, M2: tl.constexpr, GATE_IN: tl.constexpr,
                         GATE_OUT: tl.constexpr, SC_K: tl.constexpr, DROP: tl.constexpr):
    """Time row r of the input gradients from acc = the adjoint conv of gc = dy [⊙ x2]: du = acc + D ⊙ gc,
    dv = du [⊙ x1], dx1 = du ⊙ v, dx2 = dy ⊙ c (c: the forward's saved pre-gate output). Returns this
    row's share of dD = Σ gc ⊙ u. Pointers are this sequence's (offsets applied); SC_K > 0: v, x1, x2
    through the short conv in front and DROP the in-kernel dropout, as in _gated_epilogue."""
    t = _time_row(r, M1, M2)
    m = t < L
    v = _load_act(v_ptr, t, m, L, p1_ptr + 2 * sc_s, SC_K)
    u = v
    if GATE_IN:
        x1 = _load_act(x1_ptr, t, m, L, p1_ptr, SC_K)
        u = v * x1
    u = _dropped(u, seed_ptr, b, t, L, p_drop, DROP)
    g = tl.load(dy_ptr + t, mask=m, other=0.0).to(tl.float32)
    gc = g
    if GATE_OUT:
        gc = g * _load_act(x2_ptr, t, m, L, p1_ptr + sc_s, SC_K)
        c = tl.load(c_ptr + t, mask=m, other=0.0).to(tl.float32)
        tl.store(dx2_ptr + t, (g * c).to(dx2_ptr.dtype.element_ty), mask=m)
    du = _dropped(acc + d * gc, seed_ptr, b, t, L, p_drop, DROP)     # through the dropout to v ⊙ x1
    if GATE_IN:
        tl.store(dv_ptr + t, (du * x1).to(dv_ptr.dtype.element_ty), mask=m)
        tl.store(dx1_ptr + t, (du * v).to(dx1_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(dv_ptr + t, du.to(dv_ptr.dtype.element_ty), mask=m)
    return tl.sum(tl.sum(gc * u, axis=1), axis=0)


@triton.jit
def _single_pass_input_grad_kernel(dy_ptr, v_ptr, x1_ptr, x2_ptr, c_ptr, kr_ptr, ki_ptr, d_ptr,
                                   dv_ptr, dx1_ptr, dx2_ptr, ddp_ptr,
                                   f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr,
                                   twr_ptr, twi_ptr, sc_ptr, sc_s, seed_ptr, p_drop, L, H, s_dyb, s_dyh, s_vb, s_vh,
                                   s_x1b, s_x1h,
                                   s_x2b, s_x2h, s_gb, s_gh, s_cb, s_ch, R: tl.constexpr, M1: tl.constexpr,
                                   M2: tl.constexpr, GATE_IN: tl.constexpr, GATE_OUT: tl.constexpr, SC_K: tl.constexpr,
                                   DROP: tl.constexpr, PREC: tl.constexpr):
    # The single-pass backward's input gradients, one program per sequence: the adjoint conv of dy ⊙ x2
    # (the conjugate spectrum) accumulated in registers like the forward, then the gates. The spectrum
    # gradient is _rows_bwd_kernel's (SCRATCH=False); the forward saved its pre-gate output c for dx2, so
    # neither U ⊙ K nor any scratch row is needed here.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    dy_ptr += b * s_dyb + h * s_dyh
    v_ptr += b * s_vb + h * s_vh
    x1_ptr += b * s_x1b + h * s_x1h
    x2_ptr += b * s_x2b + h * s_x2h
    go = b * s_gb + h * s_gh
    c_ptr += b * s_cb + h * s_ch
    p1 = sc_ptr + h * (SC_K + 2)
    seed_ptr += h
    acc0, acc1 = _single_pass_conv(dy_ptr, x2_ptr, p1, p1 + sc_s, seed_ptr, b, p_drop, kr_ptr + h * (R * M1 * M2),
                                   ki_ptr + h * (R * M1 * M2), L, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
                                   frr_ptr, fri_ptr, twr_ptr, twi_ptr, R, M1, M2, GATE_OUT, True, PREC, 0, SC_K, False)
    d = tl.load(d_ptr + h).to(tl.float32)
    dd = _input_grad_epilogue(acc0, 0, dy_ptr, v_ptr, x1_ptr, x2_ptr, c_ptr, dv_ptr + go, dx1_ptr + go,
                              dx2_ptr + go, d, L, p1, sc_s, seed_ptr, b, p_drop, M1, M2, GATE_IN, GATE_OUT, SC_K, DROP)
    if R > 2:
        dd += _input_grad_epilogue(acc1, 1, dy_ptr, v_ptr, x1_ptr, x2_ptr, c_ptr, dv_ptr + go, dx1_ptr + go,
                                   dx2_ptr + go, d, L, p1, sc_s, seed_ptr, b, p_drop, M1, M2, GATE_IN, GATE_OUT,
                                   SC_K, DROP)
    tl.store(ddp_ptr + b * H + h + tl.arange(0, 1), tl.zeros((1,), dtype=tl.float32) + dd)


@triton.jit
def _rows_bwd_kernel(dy_ptr, v_ptr, x1_ptr, x2_ptr, kr_ptr, ki_ptr, dkr_ptr, dki_ptr,
                     dur_ptr, dui_ptr, cr_ptr, ci_ptr,
                     f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                     sc_ptr, sc_s, seed_ptr, p_drop, B, L, H, s_dyb, s_dyh, s_vb, s_vh, s_x1b, s_x1h, s_x2b, s_x2h,
                     R: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, GATE_IN: tl.constexpr,
                     GATE_OUT: tl.constexpr, SCRATCH: tl.constexpr, SC_K: tl.constexpr, DROP: tl.constexpr,
                     PREC: tl.constexpr):
    # One program per (spectral row, channel), looping over the batch: row k of the channel's spectrum
    # gradient, Σ_b conj(U) ⊙ G, accumulates in its own rows of dkr/dki (only this program touches them, in
    # program order: deterministic, no atomics, and no per-sample (B, H, N) buffer to sum afterwards).
    k = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    M = M1 * M2
    spec = h * (R * M) + k * M                            # this row of the channel's spectrum (and of dK)
    kr_ptr += spec
    ki_ptr += spec
    dkr_ptr += spec
    dki_ptr += spec
    t = _time_row(0, M1, M2)
    tl.store(dkr_ptr + t, tl.zeros((M1, M2), dtype=tl.float32))
    tl.store(dki_ptr + t, tl.zeros((M1, M2), dtype=tl.float32))
    v_ptr += h * s_vh
    x1_ptr += h * s_x1h
    dy_ptr += h * s_dyh
    x2_ptr += h * s_x2h
    row = h * (R * M) + k * M                             # this row of sample 0's scratch rows
    p1 = sc_ptr + h * (SC_K + 2)
    seed_ptr += h
    for bi in range(B):
        ur, ui = _row_spectrum(v_ptr, x1_ptr, p1 + 2 * sc_s, p1, seed_ptr, bi, p_drop, k, L, f1r_ptr,
                               f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                               R, M1, M2, GATE_IN, PREC, SC_K, SC_K, DROP)
        gr, gi = _row_spectrum(dy_ptr, x2_ptr, p1, p1 + sc_s, seed_ptr, bi, p_drop, k, L, f1r_ptr,
                               f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, frr_ptr, fri_ptr, twr_ptr, twi_ptr,
                               R, M1, M2, GATE_OUT, PREC, 0, SC_K, False)
        tl.store(dkr_ptr + t, tl.load(dkr_ptr + t) + (ur * gr + ui * gi))
        tl.store(dki_ptr + t, tl.load(dki_ptr + t) + (ur * gi - ui * gr))
        if SCRATCH:                                        # False: the single-pass backward wants dK only
            kr = tl.load(kr_ptr + t)
            ki = tl.load(ki_ptr + t)
            _inverse_row_to_scratch(gr * kr + gi * ki, gi * kr - gr * ki, dur_ptr + row, dui_ptr + row, k,
                                    f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, twr_ptr, twi_ptr,
                                    M1, M2, PREC)
            if GATE_OUT:                                   # the forward's conv output, for dx2
                _inverse_row_to_scratch(ur * kr - ui * ki, ur * ki + ui * kr, cr_ptr + row, ci_ptr + row, k,
                                        f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, twr_ptr, twi_ptr,
                                        M1, M2, PREC)
        v_ptr += s_vb
        x1_ptr += s_x1b
        dy_ptr += s_dyb
        x2_ptr += s_x2b
        row += H * (R * M)
    scale = 1.0 / (R * M)
    tl.store(dkr_ptr + t, tl.load(dkr_ptr + t) * scale)
    tl.store(dki_ptr + t, tl.load(dki_ptr + t) * scale)


@triton.jit
def _cols_bwd_kernel(dur_ptr, dui_ptr, cr_ptr, ci_ptr, dy_ptr, v_ptr, x1_ptr, x2_ptr, d_ptr,
                     dv_ptr, dx1_ptr, dx2_ptr, ddp_ptr, frr_ptr, fri_ptr, sc_ptr, sc_s, seed_ptr, p_drop,
                     L, H, s_dyb, s_dyh, s_vb, s_vh, s_x1b, s_x1h, s_x2b, s_x2h, s_gb, s_gh,
                     R: tl.constexpr, R_HALF: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
                     GATE_IN: tl.constexpr, GATE_OUT: tl.constexpr, SC_K: tl.constexpr, DROP: tl.constexpr):
    j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    cols = j * BM + tl.arange(0, BM)
    base = (b * H + h) * (R * M)
    t = tl.arange(0, R_HALF)[:, None] * M + cols[None, :]
    m = t < L
    d = tl.load(d_ptr + h).to(tl.float32)
    p1 = sc_ptr + h * (SC_K + 2)
    v = _load_act(v_ptr + b * s_vb + h * s_vh, t, m, L, p1 + 2 * sc_s, SC_K)
    u = v
    if GATE_IN:
        x1 = _load_act(x1_ptr + b * s_x1b + h * s_x1h, t, m, L, p1, SC_K)
        u = v * x1
    u = _dropped(u, seed_ptr + h, b, t, L, p_drop, DROP)
    g = tl.load(dy_ptr + b * s_dyb + h * s_dyh + t, mask=m, other=0.0).to(tl.float32)
    gc = g
    if GATE_OUT:
        gc = g * _load_act(x2_ptr + b * s_x2b + h * s_x2h, t, m, L, p1 + sc_s, SC_K)
        c = _inverse_columns(cr_ptr, ci_ptr, base, frr_ptr, fri_ptr, cols, R, R_HALF, M, BM)
        tl.store(dx2_ptr + b * s_gb + h * s_gh + t, (g * (c + d * u)).to(dx2_ptr.dtype.element_ty), mask=m)
    du = _inverse_columns(dur_ptr, dui_ptr, base, frr_ptr, fri_ptr, cols, R, R_HALF, M, BM) + d * gc
    du = _dropped(du, seed_ptr + h, b, t, L, p_drop, DROP)                # through the dropout to v ⊙ x1
    go = b * s_gb + h * s_gh + t
    if GATE_IN:
        tl.store(dv_ptr + go, (du * x1).to(dv_ptr.dtype.element_ty), mask=m)
        tl.store(dx1_ptr + go, (du * v).to(dx1_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(dv_ptr + go, du.to(dv_ptr.dtype.element_ty), mask=m)
    # This tile's share of dD (summed in torch: deterministic, no atomics).
    tl.store(ddp_ptr + (b * H + h) * tl.num_programs(0) + j, tl.sum(tl.sum(gc * u, axis=1), axis=0))


def _plan(n: int) -> tuple[int, int, int, int]:
    """(R, M1, M2, BM) for FFT size n in the three-level layout."""
    r, m1, m2 = fft_layout(n)
    return r, m1, m2, min(COLUMN_TILE, m1 * m2, max(16, TILE_ELEMENTS // (r // 2)))


def single_pass(n: int) -> bool:
    """Whether FFT size n (three-level layout) runs the single-pass kernels (SINGLE_PASS_MAX_ROWS)."""
    return fft_layout(n)[0] <= min(SINGLE_PASS_MAX_ROWS, SINGLE_PASS_ROW_LIMIT)


def forward(v, x1, x2, spec_re, spec_im, skip, addend=None, save_conv: bool = False, front=None, drop=None):
    """y = (conv(u, k) + skip ⊙ u) [⊙ x2] [+ addend], u = v [⊙ x1], all (B, H, L) with unit time stride;
    spectrum (H, N) fp32 contiguous in the three-level permuted order. Returns (y, c): c is the pre-gate
    output conv(u, k) + skip ⊙ u (v's dtype), written only when save_conv, x2 is given and the forward runs
    in a single pass - the single-pass backward reads it for dx2 instead of recomputing U ⊙ K - else None.
    `front`: the short conv in front of v, x1, x2 (fftconv.front_args), None for none; `drop`: dropout on
    v ⊙ x1 inside the kernels (fftconv.drop_args), None for none.
    Raises triton's OutOfResources if a kernel does not fit this GPU."""
    B, H, L = v.shape
    n = spec_re.shape[-1]
    r, m1, m2, bm = _plan(n)
    m = m1 * m2
    a1, a2, ad = placeholder(x1, v), placeholder(x2, v), placeholder(addend, v)
    y = torch.empty(B, H, L, dtype=v.dtype, device=v.device)
    row_factors = dft_factors(m, v.device)
    frr, fri, twr, twi = outer_factors(n, v.device)
    prec = _precision(v.dtype)
    sc, sc_s, sc_k = front_args(front, spec_re)
    seeds, p_drop, dropping = drop_args(drop, spec_re)
    if single_pass(n):
        c = torch.empty_like(y) if save_conv and x2 is not None else None
        with on_device_of(v):
            _single_pass_fwd_kernel[(B, H)](
                v, a1, a2, y, ad, placeholder(c, y), spec_re, spec_im, skip, *row_factors, frr, fri, twr, twi,
                sc, sc_s, seeds, p_drop, L, v.stride(0), v.stride(1), a1.stride(0), a1.stride(1), a2.stride(0),
                a2.stride(1), y.stride(0), y.stride(1), ad.stride(0), ad.stride(1),
                R=r, M1=m1, M2=m2, GATE_IN=x1 is not None, GATE_OUT=x2 is not None, ADD=addend is not None,
                SAVE_C=c is not None, SC_K=sc_k, DROP=dropping, PREC=prec, num_warps=ROW_WARPS,
                num_stages=NUM_STAGES)
        return y, c
    scratch_re = torch.empty(B, H, n, dtype=torch.float32, device=v.device)
    scratch_im = torch.empty_like(scratch_re)
    with on_device_of(v):
        _rows_fwd_kernel[(r, B, H)](
            v, a1, scratch_re, scratch_im, spec_re, spec_im, *row_factors, frr, fri, twr, twi,
            sc, sc_s, seeds, p_drop, L, H, v.stride(0), v.stride(1), a1.stride(0), a1.stride(1),
            R=r, M1=m1, M2=m2, GATE_IN=x1 is not None, SC_K=sc_k, DROP=dropping, PREC=prec, num_warps=ROW_WARPS,
            num_stages=NUM_STAGES)
        _cols_fwd_kernel[(m // bm, B, H)](
            scratch_re, scratch_im, v, a1, a2, y, ad, skip, frr, fri, sc, sc_s, seeds, p_drop,
            L, H, v.stride(0), v.stride(1), a1.stride(0), a1.stride(1), a2.stride(0), a2.stride(1),
            y.stride(0), y.stride(1), ad.stride(0), ad.stride(1),
            R=r, R_HALF=r // 2, M=m, BM=bm, GATE_IN=x1 is not None, GATE_OUT=x2 is not None,
            ADD=addend is not None, SC_K=sc_k, DROP=dropping, num_warps=COLUMN_WARPS, num_stages=NUM_STAGES)
    return y, None


def backward(dy, v, x1, x2, spec_re, spec_im, skip, conv=None, front=None, grads=None, drop=None):
    """Gradients (dv, dx1, dx2, d spec_re, d spec_im, d skip) of `forward`; None for an absent gate. `conv`
    is the forward's saved pre-gate output (forward(..., save_conv=True)); with it (or without an output
    gate) a single-pass size runs the single-pass backward, which writes no scratch: the spectrum gradient
    from _rows_bwd_kernel alone, the input gradients from one program per sequence. `front` as in
    `forward` (the input gradients are then those of the short conv's outputs), `drop` the forward's
    dropout (same seeds: the same mask); `grads`: optional (dv, dx1,
    dx2) buffers to write into (fftconv.input_grads)."""
    B, H, L = v.shape
    n = spec_re.shape[-1]
    r, m1, m2, bm = _plan(n)
    m = m1 * m2
    a1, a2 = placeholder(x1, v), placeholder(x2, v)
    f32 = dict(dtype=torch.float32, device=v.device)
    dk_re, dk_im = torch.empty_like(spec_re), torch.empty_like(spec_im)
    dv, dx1, dx2 = input_grads(v, x1, x2, grads)
    row_factors = dft_factors(m, v.device)
    frr, fri, twr, twi = outer_factors(n, v.device)
    gates = dict(GATE_IN=x1 is not None, GATE_OUT=x2 is not None)
    prec = _precision(v.dtype)
    sc, sc_s, sc_k = front_args(front, spec_re)
    seeds, p_drop, dropping = drop_args(drop, spec_re)
    fused = dict(SC_K=sc_k, DROP=dropping)
    strides = (dy.stride(0), dy.stride(1), v.stride(0), v.stride(1), a1.stride(0), a1.stride(1),
               a2.stride(0), a2.stride(1))
    if single_pass(n) and (x2 is None or conv is not None):
        dd_part = torch.empty(B, H, **f32)
        with on_device_of(v):
            _rows_bwd_kernel[(r, H)](
                dy, v, a1, a2, spec_re, spec_im, dk_re, dk_im, dk_re, dk_im, dk_re, dk_im,   # no scratch
                *row_factors, frr, fri, twr, twi, sc, sc_s, seeds, p_drop, B, L, H, *strides,
                R=r, M1=m1, M2=m2, PREC=prec, **gates, SCRATCH=False, **fused, num_warps=ROW_WARPS,
                num_stages=NUM_STAGES)
            _single_pass_input_grad_kernel[(B, H)](
                dy, v, a1, a2, placeholder(conv, dv), spec_re, spec_im, skip,
                dv, placeholder(dx1, dv), placeholder(dx2, dv), dd_part,
                *row_factors, frr, fri, twr, twi, sc, sc_s, seeds, p_drop, L, H, *strides, dv.stride(0),
                dv.stride(1), *(conv.stride()[:2] if conv is not None else (0, 0)),
                R=r, M1=m1, M2=m2, **gates, **fused, PREC=prec, num_warps=ROW_WARPS, num_stages=NUM_STAGES)
        return dv, dx1, dx2, dk_re, dk_im, dd_part.sum(0).to(skip.dtype)
    du_re, du_im = torch.empty(B, H, n, **f32), torch.empty(B, H, n, **f32)
    c_re, c_im = (torch.empty(B, H, n, **f32), torch.empty(B, H, n, **f32)) if x2 is not None else (du_re, du_im)
    dd_part = torch.empty(B, H, m // bm, **f32)
    with on_device_of(v):
        _rows_bwd_kernel[(r, H)](
            dy, v, a1, a2, spec_re, spec_im, dk_re, dk_im, du_re, du_im, c_re, c_im,
            *row_factors, frr, fri, twr, twi, sc, sc_s, seeds, p_drop, B, L, H, *strides,
            R=r, M1=m1, M2=m2, PREC=prec, **gates, SCRATCH=True, **fused, num_warps=ROW_WARPS,
            num_stages=NUM_STAGES)
        _cols_bwd_kernel[(m // bm, B, H)](
            du_re, du_im, c_re, c_im, dy, v, a1, a2, skip,
            dv, placeholder(dx1, dv), placeholder(dx2, dv), dd_part, frr, fri, sc, sc_s, seeds, p_drop,
            L, H, *strides, dv.stride(0), dv.stride(1),
            R=r, R_HALF=r // 2, M=m, BM=bm, **gates, **fused, num_warps=COLUMN_WARPS, num_stages=NUM_STAGES)
    dd = dd_part.sum((0, 2)).to(skip.dtype)
    return dv, dx1, dx2, dk_re, dk_im, dd


__all__ = ["COLUMN_TILE", "TILE_ELEMENTS", "ROW_WARPS", "SINGLE_PASS_MAX_ROWS", "single_pass", "forward",
           "backward"]
