"""Causal depthwise short convolution in Triton: y[b, c, t] = bias[c] + Σ_j w[c, j]·x[b, c, t-(K-1)+j].

The M2 mixer's kernel-3 conv in front of the long convolution (models/short_conv.py is the reference).
In the mixer its input is the in_linear output viewed channels-first - a transposed view whose channel
stride is 1 - so the kernel reads any (B, C, L) strides and writes a contiguous (B, C, L) result: the
x1 / x2 / v channel slices the fused FFT conv then reads have unit time stride without a copy.

Backward: dx[t] = Σ_j w[j]·dy[t+(K-1)-j]; dw and dbias are reduced over the batch inside a program and
over time blocks by a torch sum of per-block partials (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import on_device_of
from .dispatch import interpreting

INTERPRET = interpreting()
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (channels, time steps) per program: both sides >= 32 so a channel-contiguous (the mixer's transposed
# view) and a time-contiguous input are both read in coalesced runs; 8 warps keep it at 8 elements per
# thread (an offline sm_90a compile of 64 x 64 with 4 warps spilled: general strides make every address a
# 64-bit register pair). Small in the interpreter (test shapes).
BLOCK_C, BLOCK_T = (16, 16) if INTERPRET else (32, 64)
NUM_WARPS = 8
MAX_KERNEL = 8


@triton.jit
def _shortconv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, L, s_xb, s_xc, s_xt, s_yb, s_yc,
                          K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    bid = tl.program_id(2).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
    cm = c < C
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32) + tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    x_row = x_ptr + bid * s_xb + c * s_xc
    for j in tl.static_range(K):
        src = t - (K - 1) + j                                   # tap j reads K-1-j steps back
        xv = tl.load(x_row + src * s_xt, mask=cm & (src >= 0) & (src < L), other=0.0).to(tl.float32)
        acc += xv * tl.load(w_ptr + c * K + j, mask=cm, other=0.0).to(tl.float32)
    tl.store(y_ptr + bid * s_yb + c * s_yc + t, acc.to(y_ptr.dtype.element_ty), mask=cm & (t < L))


@triton.jit
def _shortconv_bwd_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr, db_part_ptr, bin_ptr, dbin_part_ptr, B, C, L,
                          s_dyb, s_dyc, s_xb, s_xc, s_xt, s_dxb, s_dxc,
                          K: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                          IN_BIAS: tl.constexpr):
    # IN_BIAS: the conv's input is x + bin (a per-channel bias folded in by the caller, see
    # kernels/fftconv_front.py); its gradient Σ dx is reduced here like db.
    tb = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
    cm = c < C
    tm = cm & (t < L)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw = tl.zeros((BLOCK_C, KP), dtype=tl.float32)           # column j: this block's share of dw[:, j]
    dbin = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if IN_BIAS:
        b_in = tl.load(bin_ptr + c, mask=cm, other=0.0).to(tl.float32)
    kcol = tl.arange(0, KP)[None, :]
    dyp = dy_ptr + c * s_dyc
    xp = x_ptr + c * s_xc
    dxp = dx_ptr + c * s_dxc
    for _ in range(B):
        dy = tl.load(dyp + t, mask=tm, other=0.0).to(tl.float32)
        db += tl.sum(dy, axis=1)
        dx = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
        for j in tl.static_range(K):
            # dx[t] gets w[j]·dy[t + (K-1) - j]; dw[j] gets Σ_t dy[t]·x[t - (K-1) + j]
            dst = t + (K - 1) - j
            dyj = tl.load(dyp + dst, mask=cm & (dst < L), other=0.0).to(tl.float32)
            dx += dyj * tl.load(w_ptr + c * K + j, mask=cm, other=0.0).to(tl.float32)
            src = t - (K - 1) + j
            xj = tl.load(xp + src * s_xt, mask=tm & (src >= 0), other=0.0).to(tl.float32)
            if IN_BIAS:
                xj = tl.where(tm & (src >= 0), xj + b_in, 0.0)
            dw += tl.where(kcol == j, tl.sum(dy * xj, axis=1)[:, None], 0.0)
        tl.store(dxp + t, dx.to(dx_ptr.dtype.element_ty), mask=tm)
        if IN_BIAS:
            dbin += tl.sum(tl.where(tm, dx, 0.0), axis=1)
        dyp += s_dyb
        xp += s_xb
        dxp += s_dxb
    c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(db_part_ptr + tb * C + c1, db, mask=c1 < C)
    if IN_BIAS:
        tl.store(dbin_part_ptr + tb * C + c1, dbin, mask=c1 < C)
    tl.store(dw_part_ptr + (tb * C + c) * K + kcol, dw, mask=cm & (kcol < K))


class _CausalShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        B, C, L = x.shape
        K = weight.shape[-1]
        w = weight.reshape(C, K).contiguous()
        b = bias.contiguous()
        y = torch.empty(B, C, L, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(C, BLOCK_C), triton.cdiv(L, BLOCK_T), B)
        with on_device_of(x):
            _shortconv_fwd_kernel[grid](x, w, b, y, C, L, x.stride(0), x.stride(1), x.stride(2),
                                        y.stride(0), y.stride(1), K=K, BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T,
                                        num_warps=NUM_WARPS)
        ctx.save_for_backward(x, w)
        ctx.shapes = (weight.shape, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        w_shape, b_dtype = ctx.shapes
        dx, dw, db, _ = short_conv_backward(dy, x, w)
        return dx, dw.to(w.dtype).reshape(w_shape), db.to(b_dtype)


def short_conv_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, in_bias: torch.Tensor | None = None):
    """Gradients of y = short_conv(x [+ in_bias], w, b) (any bias b) for dy (B, C, L): (dx in x's dtype, dw
    (C, K) fp32, db fp32, d in_bias fp32 or None). x (B, C, L) any strides, w (C, K) contiguous. Partial
    sums per time block are reduced by a torch sum: deterministic, no atomics."""
    B, C, L = x.shape
    K = w.shape[-1]
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    n_tb = triton.cdiv(L, BLOCK_T)
    dx = torch.empty(B, C, L, dtype=x.dtype, device=x.device)
    dw_part = torch.empty(n_tb, C, K, dtype=torch.float32, device=x.device)
    db_part = torch.empty(n_tb, C, dtype=torch.float32, device=x.device)
    dbin_part = torch.empty(n_tb, C, dtype=torch.float32, device=x.device) if in_bias is not None else db_part
    with on_device_of(x):
        _shortconv_bwd_kernel[(triton.cdiv(C, BLOCK_C), n_tb)](
            dy, x, w, dx, dw_part, db_part, in_bias if in_bias is not None else w, dbin_part, B, C, L,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), x.stride(2), dx.stride(0), dx.stride(1),
            K=K, KP=triton.next_power_of_2(K), BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, IN_BIAS=in_bias is not None,
            num_warps=NUM_WARPS)
    return dx, dw_part.sum(0), db_part.sum(0), dbin_part.sum(0) if in_bias is not None else None


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the Triton short conv cannot take this input (None when it can)."""
    if x.dim() != 3:
        return f"expected a (batch, channels, length) input, got shape {tuple(x.shape)}"
    if x.dtype not in KERNEL_DTYPES:
        return f"{x.dtype} input (the kernel takes fp32/bf16/fp16)"
    if weight.shape[-1] > MAX_KERNEL:
        return f"kernel size {weight.shape[-1]} > {MAX_KERNEL} (the taps are unrolled)"
    if x.numel() == 0:
        return "empty input"
    if not x.is_cuda and not INTERPRET:
        return "a CPU tensor without TRITON_INTERPRET=1"
    return None


def causal_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, C, L) any strides, weight (C, 1, K) or (C, K), bias (C,) -> contiguous (B, C, L) in x's dtype.
    Call only when `unsupported_reason` is None."""
    return _CausalShortConv.apply(x, weight, bias)


__all__ = ["unsupported_reason", "causal_short_conv", "short_conv_backward"]
