"""Triton order-2 Monarch multiply y = P·L·Pᵀ·R·x (+ bias), forward and backward.

Two launches of the block-diagonal kernel (kernels/blockdiag.py): R on contiguous chunks of x, writing the
intermediate h (rows, nblocks·q) in its natural layout; then L reading h through the transposed layout
(element i of block b at column i·nblocks + b: the permutation P) and writing y through the same layout
(Pᵀ), with the bias in the epilogue. No transpose pass ever runs, forward or backward.

Shapes follow m2train.models.monarch.monarch_matmul: R = w1 (k, q, p), L = w2 (l, s, r) with l·r == k·q.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype
from .blockdiag import (bias_grad, blockdiag_forward, blockdiag_weight_grad, contiguous_input_grad, contiguous_layout,
                        contiguous_weight_grad, transposed_layout)


class MonarchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, bias, out_features):
        k, q, p = w1.shape
        l, s, r = w2.shape
        in_features = x.shape[1]
        mid = k * q
        h = blockdiag_forward(x, w1, None, contiguous_layout(p), contiguous_layout(q), in_features, mid, mid)
        y = blockdiag_forward(h, w2, bias, transposed_layout(l), transposed_layout(l), mid, out_features,
                              out_features)
        ctx.save_for_backward(x, w1, w2, h)
        ctx.has_bias = bias is not None
        ctx.out_features = out_features
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        k, q, p = w1.shape
        l = w2.shape[0]
        mid, in_features, out_features = k * q, x.shape[1], ctx.out_features
        dy = dy.contiguous()
        t_lay = transposed_layout(l)
        dx = dw1 = dw2 = db = None
        if ctx.needs_input_grad[2]:
            dw2 = blockdiag_weight_grad(dy, h, w2.shape, t_lay, t_lay, mid, out_features).to(w2.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dh = blockdiag_forward(dy, w2, None, t_lay, t_lay, out_features, mid, mid, transpose_w=True)
            if ctx.needs_input_grad[0]:
                dx = contiguous_input_grad(dh, w1, in_features)
            if ctx.needs_input_grad[1]:
                dw1 = contiguous_weight_grad(dh, x, w1)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = bias_grad(dy)
        return dx, dw1, dw2, db, None


def monarch_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """The Triton Monarch layer on x (..., in_features), in_features <= k·p (the rest reads as zero)."""
    dtype = compute_dtype(x)
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    b = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = MonarchFunction.apply(x2, w1.to(dtype).contiguous(), w2.to(dtype).contiguous(), b, out_features)
    return y.view(*batch_shape, out_features)
