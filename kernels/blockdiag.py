"""Triton block-diagonal matmul: y[:, blk·, j] = Σ_i W[blk, j, i] · x[:, blk·, i] (+ bias), forward and backward.

Columns are addressed through a *layout* (blk_stride, elem_stride): element i of block `blk` lives in
column blk·blk_stride + i·elem_stride. The plain block-diagonal layer uses (block_size, 1) - contiguous
chunks; the second factor of an order-2 Monarch uses (1, nblocks) - the "view as (q, nblocks) and
transpose" permutation - so the permutation is applied inside the loads and stores and never costs a
separate transpose pass. Columns at or past a `limit` read as zero and are not written: that is the
reference's zero-padding of the input and truncation of the output, without materialising either.

Operands are 2-D (rows, columns) with unit column stride; fp32/bf16/fp16, accumulated in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_dtype, dot_precision, matmul_configs, on_device_of, \
    prune_wide_tiles, weight_grad_configs, weight_grad_splits


class Layout(NamedTuple):
    """Column of element i of block b: b * blk + i * elem."""
    blk: int
    elem: int


def contiguous_layout(block_size: int) -> Layout:
    return Layout(block_size, 1)


def transposed_layout(nblocks: int) -> Layout:
    return Layout(1, nblocks)


@triton.autotune(configs=matmul_configs(), key=["IN_BLK", "OUT_BLK", "x_elem", "y_elem"],
                 prune_configs_by={"early_config_prune": prune_wide_tiles}, cache_results=True)
@triton.jit
def _blockdiag_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, in_limit, out_limit, stride_xm, stride_rm, stride_ym,
                      x_blk, x_elem, y_blk, y_elem, stride_wb, stride_wn, stride_wk, IN_BLK, OUT_BLK,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, CAST_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M rows) x (BLOCK_N outputs of block `blk`) tile of y; W is read as (blk, n, k). HAS_RES adds
    a residual (rows, out) in the epilogue, as y is stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    blk = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    n_ok = rn < OUT_BLK
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_base = w_ptr + blk * stride_wb + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, IN_BLK, BLOCK_K):
        kk = k0 + rk
        xcol = blk * x_blk + kk * x_elem
        k_ok = kk < IN_BLK
        x = tl.load(x_rows + xcol[None, :], mask=row_ok[:, None] & (k_ok & (xcol < in_limit))[None, :], other=0.0)
        w = tl.load(w_base + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if CAST_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    ycol = blk * y_blk + rn * y_elem
    col_ok = n_ok & (ycol < out_limit)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ycol, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + rm.to(tl.int64)[:, None] * stride_rm + ycol[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + ycol[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=weight_grad_configs(), key=["IN_BLK", "OUT_BLK", "x_elem", "dy_elem"],
                 prune_configs_by={"early_config_prune": prune_wide_tiles}, cache_results=True)
@triton.jit
def _weight_grad_kernel(dy_ptr, x_ptr, dw_ptr, M, rows_per_split, NBLOCKS, in_limit, out_limit,
                        stride_dym, stride_xm, x_blk, x_elem, dy_blk, dy_elem,
                        stride_ws, stride_wb, stride_wn, stride_wk, IN_BLK, OUT_BLK,
                        CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[split, blk, n, k] = Σ_{rows of this split} dy[:, col(blk, n)] · x[:, col(blk, k)] (fp32 partials)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    blk = tl.program_id(2) % NBLOCKS
    split = tl.program_id(2) // NBLOCKS
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dycol = blk * dy_blk + rn * dy_elem
    xcol = blk * x_blk + rk * x_elem
    n_ok = (rn < OUT_BLK) & (dycol < out_limit)
    k_ok = (rk < IN_BLK) & (xcol < in_limit)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rm64 = rm.to(tl.int64)
        dyt = tl.load(dy_ptr + rm64[None, :] * stride_dym + dycol[:, None],
                      mask=n_ok[:, None] & m_ok[None, :], other=0.0)             # (BLOCK_N, BLOCK_M)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + xcol[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)               # (BLOCK_M, BLOCK_K)
        if CAST_FP32:
            dyt = dyt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dyt, x, acc, input_precision=PRECISION)
    ptrs = dw_ptr + split * stride_ws + blk * stride_wb + rn[:, None] * stride_wn + rk[None, :] * stride_wk
    tl.store(ptrs, acc, mask=(rn < OUT_BLK)[:, None] & (rk < IN_BLK)[None, :])


def blockdiag_forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, x_layout: Layout,
                      y_layout: Layout, in_limit: int, out_limit: int, out_width: int,
                      transpose_w: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y (rows, out_width) with y[:, col_y(b, j)] = Σ_i Wb[j, i] x[:, col_x(b, i)] (+ bias[col_y])
    (+ residual[:, col_y], a (rows, out_width) tensor with unit column stride).

    `transpose_w` reads W (nblocks, out, in) as (nblocks, in, out): that is the input gradient, dy·W."""
    nblocks = w.shape[0]
    if transpose_w:
        out_blk, in_blk = w.shape[2], w.shape[1]
        s_wb, s_wn, s_wk = w.stride(0), w.stride(2), w.stride(1)
    else:
        out_blk, in_blk = w.shape[1], w.shape[2]
        s_wb, s_wn, s_wk = w.stride(0), w.stride(1), w.stride(2)
    rows = x.shape[0]
    y = torch.empty(rows, out_width, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_blk, meta["BLOCK_N"]), nblocks)
    with on_device_of(x):
        _blockdiag_kernel[grid](
            x, w, bias if bias is not None else x, residual if residual is not None else x, y, rows, in_limit,
            out_limit, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            x_layout.blk, x_layout.elem, y_layout.blk, y_layout.elem, s_wb, s_wn, s_wk, in_blk, out_blk,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, CAST_FP32=INTERPRET,
            PRECISION=dot_precision(x.dtype))
    return y


def blockdiag_weight_grad(dy: torch.Tensor, x: torch.Tensor, w_shape: torch.Size, x_layout: Layout,
                          dy_layout: Layout, in_limit: int, out_limit: int) -> torch.Tensor:
    """dW (fp32, shape w_shape = (nblocks, out_blk, in_blk)) = Σ_rows dy[:, col_dy(b, n)] x[:, col_x(b, k)]."""
    nblocks, out_blk, in_blk = w_shape
    rows = x.shape[0]
    # Long row reductions are split over row ranges so the (few) weight tiles still fill the GPU.
    splits = weight_grad_splits(rows, nblocks * triton.cdiv(out_blk, 128) * triton.cdiv(in_blk, 128), x.device)
    rows_per_split = triton.cdiv(rows, splits)
    partial = torch.empty(splits, nblocks, out_blk, in_blk, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(out_blk, meta["BLOCK_N"]), triton.cdiv(in_blk, meta["BLOCK_K"]),
                         nblocks * splits)
    with on_device_of(x):
        _weight_grad_kernel[grid](
            dy, x, partial, rows, rows_per_split, nblocks, in_limit, out_limit, dy.stride(0), x.stride(0),
            x_layout.blk, x_layout.elem, dy_layout.blk, dy_layout.elem, *partial.stride(), in_blk, out_blk,
            CAST_FP32=INTERPRET, PRECISION=dot_precision(x.dtype))
    return partial[0] if splits == 1 else partial.sum(0)


def contiguous_input_grad(dy: torch.Tensor, w: torch.Tensor, in_features: int) -> torch.Tensor:
    """dx = dy·W for y = blockdiag(W)·x with contiguous blocks on both sides: dy (rows, out) -> (rows,
    in_features)."""
    _, out_blk, in_blk = w.shape
    return blockdiag_forward(dy, w, None, contiguous_layout(out_blk), contiguous_layout(in_blk), dy.shape[1],
                             in_features, in_features, transpose_w=True)


def contiguous_weight_grad(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dW (w's dtype) for y = blockdiag(W)·x with contiguous blocks on both sides."""
    _, out_blk, in_blk = w.shape
    return blockdiag_weight_grad(dy, x, w.shape, contiguous_layout(in_blk), contiguous_layout(out_blk),
                                 x.shape[1], dy.shape[1]).to(w.dtype)


def bias_grad(dy: torch.Tensor) -> torch.Tensor:
    """Σ_rows dy, accumulated in fp32."""
    return dy.sum(0, dtype=torch.float32).to(dy.dtype)


class BlockdiagFunction(torch.autograd.Function):
    """y = blockdiag(W)·x (+ bias) on 2-D x (rows, in_features) -> (rows, out_features), the reference
    layer's zero-padding / truncation semantics when the features do not divide by nblocks."""

    @staticmethod
    def forward(ctx, x, w, bias, out_features, residual=None):
        nblocks, out_blk, in_blk = w.shape
        in_features = x.shape[1]
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        ctx.out_features = out_features
        return blockdiag_forward(x, w, bias, contiguous_layout(in_blk), contiguous_layout(out_blk),
                                 in_features, out_features, out_features, residual=residual)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()                       # (rows, out_features)
        dx = contiguous_input_grad(dy, w, x.shape[1]) if ctx.needs_input_grad[0] else None
        dw = contiguous_weight_grad(dy, x, w) if ctx.needs_input_grad[1] else None
        db = bias_grad(dy) if ctx.has_bias and ctx.needs_input_grad[2] else None
        # The residual passes straight through: its gradient is dy.
        return dx, dw, db, None, (dy if ctx.needs_input_grad[4] else None)


def blockdiag_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     out_features: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton block-diagonal layer on x (..., in_features), plus `residual` (..., out_features) added in
    the epilogue when given (saves the separate sum's read-read-write pass); see m2train.kernels.ops."""
    dtype = compute_dtype(x)
    if residual is not None and residual.dtype != dtype:
        # The sum takes torch's promoted dtype, which the kernel (storing in `dtype`) would not.
        return blockdiag_linear(x, weight, bias, out_features) + residual
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    b = bias.to(dtype) if bias is not None else None
    r2 = residual.reshape(-1, out_features).contiguous() if residual is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = BlockdiagFunction.apply(x2, weight.to(dtype).contiguous(), b, out_features, r2)
    return y.view(*batch_shape, out_features)
