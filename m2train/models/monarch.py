"""Order-2 Monarch linear layer M = P·L·Pᵀ·R (DESIGN.md §4.1), rectangular, with bias.

R and L are block-diagonal; between them the intermediate vector (nblocks blocks of size q) is viewed as
(q, nblocks) and transposed, so every block of L sees one entry from every block of R: two batched matmuls
give a full-rank-capable n×n map in O(n^{3/2}). Output entries are read out in the same transposed order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..kernels import ops
from .base import kernel_mode
from .blockdiag import padded_structured_linear


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x (..., k*p); w1 (k, q, p) block-diagonal R; w2 (l, s, r) block-diagonal L with l*r == k*q.

    Returns (..., s*l): out[..., j*l + b] = sum_i w2[b, j, i] * mid_T[..., b, i] where mid_T is R·x viewed
    as (r, l) and transposed (the permutation P), and the output is read out transposed again (Pᵀ)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch_shape = x.shape[:-1]
    h = x.reshape(-1, k, p).transpose(0, 1)                       # (k, N, p)
    h = torch.bmm(h, w1.transpose(1, 2))                          # (k, N, q)
    h = h.transpose(0, 1).reshape(-1, r, l).permute(2, 0, 1)      # (l, N, r)  -- the permutation
    h = torch.bmm(h, w2.transpose(1, 2))                          # (l, N, s)
    return h.permute(1, 2, 0).reshape(*batch_shape, s * l)        # read out as (s, l)


def monarch_linear_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
                             in_features: int, out_features: int) -> torch.Tensor:
    """The layer's PyTorch path (and the kernels' reference): zero-pad the input to k * p, P·L·Pᵀ·R,
    truncate to out_features, add the bias."""
    return padded_structured_linear(x, lambda z: monarch_matmul(z, w1, w2), w1.shape[0] * w1.shape[2],
                                    in_features, out_features, bias)


class MonarchLinear(nn.Module):
    kernels = "auto"        # ModelConfig.kernels, set by the model (see base.kernel_mode)

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        in_blk = math.ceil(in_features / nblocks)
        out_blk = math.ceil(out_features / nblocks)
        self.in_ext, self.out_ext = in_blk * nblocks, out_blk * nblocks
        # The intermediate width is the smaller side: the product's rank is bounded by it anyway, so a
        # wider middle would only add parameters (the convention of the Monarch reference layers).
        mid_blk = min(in_blk, out_blk)
        self.blkdiag1 = nn.Parameter(torch.empty(nblocks, mid_blk, in_blk))   # R
        self.blkdiag2 = nn.Parameter(torch.empty(nblocks, out_blk, mid_blk))  # L
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.blkdiag1, self.blkdiag2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            b = 1.0 / math.sqrt(self.out_features)
            nn.init.uniform_(self.bias, -b, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.monarch_linear(x, self.blkdiag1, self.blkdiag2, self.bias, self.in_features,
                                  self.out_features, kernel_mode(self))

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense (out_features, in_features) matrix (no bias): y = x @ W.T + b."""
        eye = torch.eye(self.in_ext, dtype=self.blkdiag1.dtype, device=self.blkdiag1.device)
        w = monarch_matmul(eye, self.blkdiag1, self.blkdiag2).T
        return w[: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nblocks={self.nblocks}, bias={self.bias is not None}")


class MonarchLinearOrderP(nn.Module):
    """Square order-p Monarch on n = b^p features: p block-diagonal factors with blocks of size b = n^{1/p}.

    View the input as a p-dimensional (b, …, b) array. Factor i multiplies along axis i by a b×b matrix
    chosen by the values of all the other axes (b^{p-1} different blocks): a block-diagonal matrix
    conjugated by the permutation that brings axis i last. p = 2 is exactly `MonarchLinear`'s P·L·Pᵀ·R
    (factor 0 = R, factor 1 = L); p = log2 n with 2×2 blocks is the butterfly/FFT structure.
    Cost O(p · n · b) per vector instead of O(n²)."""

    def __init__(self, features: int, order: int, bias: bool = True):
        super().__init__()
        b = round(features ** (1.0 / order))
        if order < 1 or b ** order != features:
            raise ValueError(f"order-{order} Monarch needs features = b^{order}, got {features}")
        self.features, self.order, self.block = features, order, b
        self.factors = nn.ParameterList(nn.Parameter(torch.empty(b ** (order - 1), b, b)) for _ in range(order))
        self.bias = nn.Parameter(torch.empty(features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.block)
        for w in self.factors:
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1.0 / math.sqrt(self.features), 1.0 / math.sqrt(self.features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p = self.block, self.order
        batch_shape = x.shape[:-1]
        h = x.reshape(-1, *([b] * p))                              # (N, b, ..., b); axis 0 most significant
        for i, w in enumerate(self.factors):
            # factor 0 acts on the least significant axis (contiguous chunks, like R), then upwards
            axis = p - i
            moved = h.movedim(axis, -1)                            # (N, ...other axes..., b)
            shape = moved.shape
            out = torch.einsum("nkj,kij->nki", moved.reshape(shape[0], -1, b), w)
            h = out.reshape(shape).movedim(-1, axis)
        y = h.reshape(*batch_shape, self.features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        eye = torch.eye(self.features, dtype=self.factors[0].dtype, device=self.factors[0].device)
        y = self.forward(eye)
        return (y - self.bias if self.bias is not None else y).T
