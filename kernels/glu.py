"""Triton fused GLU up-projection: act = gelu(A·y) ⊙ (B·y) with [A; B] one block-diagonal H -> 2I layer.

One program computes the same BLOCK_N columns of the gate (block `blk`) and of the value (block
`blk + nblocks/2`) - both halves of one output block-row - from their two input chunks, then applies the
exact-erf GELU and the product in the epilogue, so the (rows, 2I) pre-activation never has to be read
back for the forward. Under autograd it is written too (the backward needs it, as the reference's
autograd graph does). Backward: one elementwise kernel turns d(act) into d[A·y; B·y], then the
block-diagonal input/weight-gradient kernels (kernels/blockdiag.py) finish dX and dW.

Training the whole MLP (`GLUMLPFunction`, what MonarchGLU runs under autograd without dropout between the
layers): the same kernels plus Wo's block-diagonal kernel, but the activation Wo's weight gradient needs is
not kept: the backward's elementwise pass writes it again next to d[A·y; B·y] (STORE_ACT).

Supported (`supported_shape`): the layer's blocks tile the features exactly and nblocks is even, so gate
block k pairs with value block k + nblocks/2 (every released M2 size); other shapes take the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_dtype, dot_precision, elementwise_block, glu_configs, \
    on_device_of, prune_wide_tiles
from .blockdiag import bias_grad, blockdiag_forward, contiguous_input_grad, contiguous_layout, contiguous_weight_grad

def supported_shape(weight: torch.Tensor, in_features: int, intermediate_size: int) -> bool:
    nblocks, out_blk, in_blk = weight.shape
    return nblocks % 2 == 0 and nblocks * in_blk == in_features and nblocks * out_blk == 2 * intermediate_size


@triton.jit
def gate_value_tile(x_rows, wa_cols, blk, HALF, stride_wb, stride_wk, row_ok, n_ok, IN_BLK,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) gate and value pre-activations (fp32) of one tile: x_rows are the tile's row
    pointers (BLOCK_M, 1), wa_cols the gate block `blk`'s weight pointers at the tile's output columns
    (1, BLOCK_N); the value block is blk + HALF, reading input block blk + HALF."""
    wb_cols = wa_cols + HALF * stride_wb
    rk = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, IN_BLK, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < IN_BLK
        x_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & n_ok[None, :]
        xa = tl.load(x_rows + (blk * IN_BLK + kk)[None, :], mask=x_mask, other=0.0)
        xb = tl.load(x_rows + ((blk + HALF) * IN_BLK + kk)[None, :], mask=x_mask, other=0.0)
        wa = tl.load(wa_cols + kk[:, None] * stride_wk, mask=w_mask, other=0.0)
        wb = tl.load(wb_cols + kk[:, None] * stride_wk, mask=w_mask, other=0.0)
        if CAST_FP32:
            xa = xa.to(tl.float32)
            xb = xb.to(tl.float32)
            wa = wa.to(tl.float32)
            wb = wb.to(tl.float32)
        acc_a = tl.dot(xa, wa, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(xb, wb, acc_b, input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def gelu_gate(a, b):
    """gelu(a) ⊙ b with the exact-erf GELU a·Φ(a) (0.707 = 1/√2), fp32."""
    return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476)) * b


@triton.autotune(configs=glu_configs(), key=["IN_BLK", "OUT_BLK", "STORE_H"],
                 prune_configs_by={"early_config_prune": prune_wide_tiles}, cache_results=True)
@triton.jit
def _glu_fwd_kernel(x_ptr, w_ptr, h_ptr, act_ptr, M, stride_xm, stride_hm, stride_am,
                    stride_wb, stride_wn, stride_wk, HALF, IN_BLK, OUT_BLK, INTER,
                    STORE_H: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    blk = tl.program_id(2)                      # gate block; its value block is blk + HALF
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    n_ok = rn < OUT_BLK
    acc_a, acc_b = gate_value_tile(x_ptr + rm.to(tl.int64)[:, None] * stride_xm,
                                   w_ptr + blk * stride_wb + rn[None, :] * stride_wn, blk, HALF, stride_wb,
                                   stride_wk, row_ok, n_ok, IN_BLK, BLOCK_M, BLOCK_N, BLOCK_K, CAST_FP32,
                                   PRECISION)
    # The GELU sees the pre-activation rounded to the output dtype, exactly like the reference's.
    a = acc_a.to(act_ptr.dtype.element_ty).to(tl.float32)
    b = acc_b.to(act_ptr.dtype.element_ty).to(tl.float32)
    col = blk * OUT_BLK + rn
    mask = row_ok[:, None] & n_ok[None, :]
    rows64 = rm.to(tl.int64)[:, None]
    if STORE_H:
        tl.store(h_ptr + rows64 * stride_hm + col[None, :], a.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + rows64 * stride_hm + (INTER + col)[None, :], b.to(h_ptr.dtype.element_ty), mask=mask)
    act = gelu_gate(a, b)
    tl.store(act_ptr + rows64 * stride_am + col[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(dact_ptr, h_ptr, dh_ptr, act_ptr, M, INTER, stride_dm, stride_hm, stride_dhm, stride_am,
                    STORE_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """d gate = d act · value · gelu'(gate); d value = d act · gelu(gate). STORE_ACT: also the activation
    gelu(gate) ⊙ value itself, recomputed from the same rounded pre-activations as the forward (the same
    bits), for Wo's weight gradient when the forward did not keep it (GLUMLPFunction)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < INTER)[None, :]
    rows64 = rm.to(tl.int64)[:, None]
    g = tl.load(dact_ptr + rows64 * stride_dm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.load(h_ptr + rows64 * stride_hm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + rows64 * stride_hm + (INTER + rn)[None, :], mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
    pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327                # φ(a); 0.3989 = 1/√(2π)
    out_ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + rows64 * stride_dhm + rn[None, :], (g * b * (cdf + a * pdf)).to(out_ty), mask=mask)
    tl.store(dh_ptr + rows64 * stride_dhm + (INTER + rn)[None, :], (g * a * cdf).to(out_ty), mask=mask)
    if STORE_ACT:
        tl.store(act_ptr + rows64 * stride_am + rn[None, :], gelu_gate(a, b).to(act_ptr.dtype.element_ty), mask=mask)


def glu_up_forward(x: torch.Tensor, w: torch.Tensor, intermediate_size: int, store_h: bool):
    """(act (rows, I), h (rows, 2I) or None) for 2-D contiguous x."""
    nblocks, out_blk, in_blk = w.shape
    rows = x.shape[0]
    act = torch.empty(rows, intermediate_size, device=x.device, dtype=x.dtype)
    h = torch.empty(rows, 2 * intermediate_size, device=x.device, dtype=x.dtype) if store_h else act
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_blk, meta["BLOCK_N"]), nblocks // 2)
    with on_device_of(x):
        _glu_fwd_kernel[grid](x, w, h, act, rows, x.stride(0), h.stride(0), act.stride(0), *w.stride(),
                              nblocks // 2, in_blk, out_blk, intermediate_size, STORE_H=store_h,
                              CAST_FP32=INTERPRET, PRECISION=dot_precision(x.dtype))
    return act, (h if store_h else None)


def glu_grad_preactivation(dact: torch.Tensor, h: torch.Tensor, recompute_act: bool = False):
    """d[A·x; B·x] (rows, 2I) from d act (rows, I) and the saved pre-activation h; with `recompute_act`,
    (that, the activation (rows, I)) from the same pass."""
    rows, inter = dact.shape
    dh = torch.empty_like(h)
    act = torch.empty_like(dact) if recompute_act else dh
    bm, bn = elementwise_block()
    with on_device_of(h):
        _glu_bwd_kernel[(triton.cdiv(rows, bm), triton.cdiv(inter, bn))](
            dact, h, dh, act, rows, inter, dact.stride(0), h.stride(0), dh.stride(0), act.stride(0),
            STORE_ACT=recompute_act, BLOCK_M=bm, BLOCK_N=bn)
    return (dh, act) if recompute_act else dh


class GLUBlockdiagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, intermediate_size):
        # The pre-activation is only kept when a gradient will be asked for.
        store_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        act, h = glu_up_forward(x, w, intermediate_size, store_h=store_h)
        ctx.save_for_backward(x, w, h)
        return act

    @staticmethod
    def backward(ctx, dact):
        x, w, h = ctx.saved_tensors
        dh = glu_grad_preactivation(dact.contiguous(), h)
        return (*_up_projection_grads(ctx, dh, x, w), None)


def _up_projection_grads(ctx, dh: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple:
    """(dx, dw) of the up-projection h = [A; B]·x (inputs 0 and 1 of the Function) from dh; None where not
    wanted."""
    dx = contiguous_input_grad(dh, w, x.shape[1]) if ctx.needs_input_grad[0] else None
    dw = contiguous_weight_grad(dh, x, w) if ctx.needs_input_grad[1] else None
    return dx, dw


class GLUMLPFunction(torch.autograd.Function):
    """The whole GLU MLP for training, Wo·(gelu(A·x) ⊙ (B·x)) + bo [+ r], keeping x and the (rows, 2I)
    pre-activation only: the (rows, I) activation Wo's weight gradient needs is recomputed in the backward by
    the pass that forms d[A·x; B·x] anyway (one more (rows, I) store there), instead of being kept from the
    forward - I activations per token and layer less (a third of the GLU's, ~14 % of an M2-GPT-360M layer's
    with the kernels)."""

    @staticmethod
    def forward(ctx, x, w_up, w_out, bias, residual, intermediate_size, grad_wanted):
        act, h = glu_up_forward(x, w_up, intermediate_size, store_h=grad_wanted)
        ctx.save_for_backward(*((x, w_up, w_out, h) if grad_wanted else ()))
        ctx.has_bias = bias is not None
        nblocks, out_blk, act_blk = w_out.shape
        out_features = nblocks * out_blk
        return blockdiag_forward(act, w_out, bias, contiguous_layout(act_blk), contiguous_layout(out_blk),
                                 intermediate_size, out_features, out_features, residual=residual)

    @staticmethod
    def backward(ctx, dy):
        x, w_up, w_out, h = ctx.saved_tensors
        dy = dy.contiguous()
        dact = contiguous_input_grad(dy, w_out, h.shape[1] // 2)
        dw_out = None
        if ctx.needs_input_grad[2]:
            dh, act = glu_grad_preactivation(dact, h, recompute_act=True)
            del dact
            dw_out = contiguous_weight_grad(dy, act, w_out)
            del act
        else:
            dh = glu_grad_preactivation(dact, h)
        db = bias_grad(dy) if ctx.has_bias and ctx.needs_input_grad[3] else None
        dx, dw_up = _up_projection_grads(ctx, dh, x, w_up)
        # The residual passes straight through: its gradient is dy.
        return dx, dw_up, dw_out, db, (dy if ctx.needs_input_grad[4] else None), None, None


def glu_mlp_train(x: torch.Tensor, w_up: torch.Tensor, w_out: torch.Tensor, bias: torch.Tensor | None,
                  intermediate_size: int, residual: torch.Tensor | None = None, apply=None) -> torch.Tensor:
    """`GLUMLPFunction` on x (..., H): w_up (nblocks, 2I/nblocks, H/nblocks) with [A; B] stacked
    (`supported_shape`), w_out (nblocks', out/nblocks', I/nblocks') for any nblocks' tiling I exactly (a TP
    rank's Wo columns have half the blocks); residual (..., out) or None. `apply(fn, x2, *args)` instead of
    `fn.apply(x2, *args)`: see `_apply_on_rows`."""
    dtype = compute_dtype(x)
    out_features = w_out.shape[0] * w_out.shape[1]
    if residual is not None and residual.dtype != dtype:
        # The sum takes torch's promoted dtype, which the kernel (storing in `dtype`) would not.
        return glu_mlp_train(x, w_up, w_out, bias, intermediate_size, apply=apply) + residual
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    r2 = residual.reshape(-1, out_features).contiguous() if residual is not None else None
    # Whether a backward will come: decided here, since inside forward grad mode is off (a no-grad forward
    # must not write and keep the pre-activation).
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_up, w_out, bias, residual))
    with torch.autocast(x.device.type, enabled=False):
        y = _apply_on_rows(apply, GLUMLPFunction, x2, w_up.to(dtype).contiguous(), w_out.to(dtype).contiguous(),
                           bias.to(dtype) if bias is not None else None, r2, intermediate_size, grad_wanted)
    return _unflatten_rows(y, batch_shape, apply)


def _apply_on_rows(apply, fn, x2: torch.Tensor, *args) -> torch.Tensor:
    """fn.apply(x2, *args), or `apply(fn, x2, *args)` when given: a caller may run the Function on more rows
    than x2 has (sequence parallelism's gathered_apply runs it on the whole sequences of which x2 holds this
    rank's part)."""
    return fn.apply(x2, *args) if apply is None else apply(fn, x2, *args)


def _unflatten_rows(y: torch.Tensor, batch_shape: torch.Size, apply) -> torch.Tensor:
    """The (rows, features) result in x's batch shape; with a custom `apply`, the row dimension (the
    sequence) may have grown."""
    return y.view(*batch_shape, y.shape[-1]) if apply is None else y.view(*batch_shape[:-1], -1, y.shape[-1])


def glu_blockdiag(x: torch.Tensor, weight: torch.Tensor, intermediate_size: int, apply=None) -> torch.Tensor:
    """gelu(A·x) ⊙ (B·x) for x (..., H), weight (nblocks, 2I/nblocks, H/nblocks) with [A; B] stacked."""
    dtype = compute_dtype(x)
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        act = _apply_on_rows(apply, GLUBlockdiagFunction, x2, weight.to(dtype).contiguous(), intermediate_size)
    return _unflatten_rows(act, batch_shape, apply)
