"""The whole block-diagonal GLU MLP in one Triton kernel, for inference: y = Wo·(gelu(A·x) ⊙ (B·x)) + bo (+ r).

The unfused kernels (kernels/glu.py, then kernels/blockdiag.py for Wo) write the (rows, I) activation and
read it back: with I = 4H that is 8 of the ~38 activation-sized passes of an M2-BERT layer. Here one program
owns BLOCK_M rows and one output block j of Wo; it walks the I/nblocks activation columns that block reads in
chunks of BLOCK_N, computing each chunk from x (the gate and value halves, exact-erf GELU, rounded to the
activation dtype exactly like the unfused path) and immediately multiplying it into the (BLOCK_M, OUT_BLK)
output accumulator. The activation never leaves the SM.

Layout (`supported`): the layers are the released aligned block-diagonal ones (models/glu.py
`_blockdiag_aligned`): gate block k pairs with value block k + nblocks/2, and each up-projection block's
2·(I/nblocks) gate columns are exactly Wo's input blocks 2k and 2k + 1. So Wo block j reads gate block j // 2
at column offset (j % 2)·I/nblocks. No backward: training keeps the activation for Wo's weight gradient and
runs the unfused kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_dtype, dot_precision, glu_mlp_configs, on_device_of
from .glu import gate_value_tile, gelu_gate


@triton.autotune(configs=glu_mlp_configs(), key=["IN_BLK", "ACT_BLK", "OUT_BLK"], cache_results=True)
@triton.jit
def _glu_mlp_fwd_kernel(x_ptr, wg_ptr, wo_ptr, bo_ptr, r_ptr, y_ptr, M, stride_xm, stride_rm, stride_ym,
                        s_gb, s_gn, s_gk, s_ob, s_on, s_ok, HALF, IN_BLK, ACT_BLK, OUT_BLK,
                        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, CAST_FP32: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    j = tl.program_id(1)                          # Wo block: output columns j·OUT_BLK ..
    gate_blk = j // 2                             # the up-projection block whose gate columns it reads
    col0 = (j % 2) * ACT_BLK                      # ... from this column of that block on
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rows64 = rm.to(tl.int64)[:, None]
    rn = tl.arange(0, BLOCK_N)
    ro = tl.arange(0, BLOCK_O)
    o_ok = ro < OUT_BLK
    out = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for n0 in range(0, ACT_BLK, BLOCK_N):
        n_ok = n0 + rn < ACT_BLK
        wcol = col0 + n0 + rn                     # gate / value column inside the up-projection block
        acc_a, acc_b = gate_value_tile(x_ptr + rows64 * stride_xm, wg_ptr + gate_blk * s_gb + wcol[None, :] * s_gn,
                                       gate_blk, HALF, s_gb, s_gk, row_ok, n_ok, IN_BLK, BLOCK_M, BLOCK_N, BLOCK_K,
                                       CAST_FP32, PRECISION)
        # Rounded where the unfused path rounds: the pre-activations and the activation it would store.
        a = acc_a.to(y_ptr.dtype.element_ty).to(tl.float32)
        b = acc_b.to(y_ptr.dtype.element_ty).to(tl.float32)
        act = gelu_gate(a, b).to(y_ptr.dtype.element_ty)
        wo = tl.load(wo_ptr + j * s_ob + ro[None, :] * s_on + (n0 + rn)[:, None] * s_ok,
                     mask=n_ok[:, None] & o_ok[None, :], other=0.0)          # (BLOCK_N, BLOCK_O) = Wo[j]ᵀ
        if CAST_FP32:
            act = act.to(tl.float32)
            wo = wo.to(tl.float32)
        out = tl.dot(act, wo, out, input_precision=PRECISION)
    ycol = j * OUT_BLK + ro
    if HAS_BIAS:
        out += tl.load(bo_ptr + ycol, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & o_ok[None, :]
    if HAS_RES:
        out += tl.load(r_ptr + rows64 * stride_rm + ycol[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows64 * stride_ym + ycol[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


def supported(w_up: torch.Tensor, w_out: torch.Tensor, in_features: int, intermediate_size: int,
              out_features: int) -> bool:
    """The aligned block-diagonal layout the kernel assumes (see the module docstring)."""
    nb, up_blk, in_blk = w_up.shape
    nbo, out_blk, act_blk = w_out.shape
    return (nb == nbo and nb % 2 == 0 and nb * in_blk == in_features and nb * up_blk == 2 * intermediate_size
            and nb * act_blk == intermediate_size and up_blk == 2 * act_blk and nb * out_blk == out_features)


def glu_mlp_forward(x: torch.Tensor, w_up: torch.Tensor, w_out: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """Wo·(gelu(A·x) ⊙ (B·x)) + bias [+ residual] for x (..., H): the GLU MLP's forward in one kernel.
    Call without autograd (the result has no graph); `supported` must hold."""
    dtype = compute_dtype(x)
    if residual is not None and residual.dtype != dtype:
        return glu_mlp_forward(x, w_up, w_out, bias) + residual
    nb, out_blk, act_blk = w_out.shape
    in_blk = w_up.shape[2]
    out_features = nb * out_blk
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    r2 = residual.reshape(-1, out_features).contiguous() if residual is not None else None
    wg, wo = w_up.to(dtype).contiguous(), w_out.to(dtype).contiguous()
    b = bias.to(dtype) if bias is not None else None
    rows = x2.shape[0]
    y = torch.empty(rows, out_features, device=x.device, dtype=dtype)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), nb)  # noqa: E731
    with on_device_of(x), torch.autocast(x.device.type, enabled=False):
        _glu_mlp_fwd_kernel[grid](
            x2, wg, wo, b if b is not None else x2, r2 if r2 is not None else x2, y, rows, x2.stride(0),
            r2.stride(0) if r2 is not None else 0, y.stride(0), *wg.stride(), *wo.stride(), nb // 2, in_blk,
            act_blk, out_blk, HAS_BIAS=b is not None, HAS_RES=r2 is not None, CAST_FP32=INTERPRET,
            PRECISION=dot_precision(dtype), BLOCK_O=max(16, triton.next_power_of_2(out_blk)))
    return y.view(*batch_shape, out_features)


__all__ = ["supported", "glu_mlp_forward"]
