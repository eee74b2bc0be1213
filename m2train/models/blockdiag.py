"""Block-diagonal linear layer: the dimension mixer of the released M2-BERT ("BlockdiagLinear").

The input is split into `nblocks` contiguous chunks; chunk k is multiplied by block k and the outputs are
concatenated. When a size does not divide by `nblocks`, the input is zero-padded and the output truncated
(the reference semantics), so the weight is always (nblocks, ceil(out/nblocks), ceil(in/nblocks)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import ops
from .base import kernel_mode


def blockdiag_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[..., k, :] = weight[k] @ x[..., k, :] for x (..., nblocks * in_blk), weight (nblocks, out_blk, in_blk)."""
    nblocks, out_blk, in_blk = weight.shape
    batch_shape = x.shape[:-1]
    x = x.reshape(-1, nblocks, in_blk).transpose(0, 1)           # (nblocks, N, in_blk)
    y = torch.bmm(x, weight.transpose(1, 2))                      # (nblocks, N, out_blk)
    return y.transpose(0, 1).reshape(*batch_shape, nblocks * out_blk)


def blockdiag_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               in_features: int, out_features: int) -> torch.Tensor:
    """The layer's PyTorch path (and the kernels' reference): zero-pad the input to nblocks * in_blk,
    multiply block by block, truncate to out_features, add the bias."""
    nblocks, _, in_blk = weight.shape
    return padded_structured_linear(x, lambda z: blockdiag_matmul(z, weight), nblocks * in_blk, in_features,
                                    out_features, bias)


def padded_structured_linear(x: torch.Tensor, matmul, in_ext: int, in_features: int, out_features: int,
                             bias: torch.Tensor | None) -> torch.Tensor:
    """matmul(x zero-padded from in_features to in_ext features), truncated to out_features, plus the bias:
    the shape handling that the block-diagonal and Monarch layers' PyTorch paths share (their factors
    work on a whole number of blocks)."""
    if in_ext != in_features:
        x = F.pad(x, (0, in_ext - in_features))
    y = matmul(x)
    if y.shape[-1] != out_features:
        y = y[..., :out_features]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


class BlockDiagonalLinear(nn.Module):
    kernels = "auto"        # ModelConfig.kernels, set by the model (see base.kernel_mode)

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.in_blk = math.ceil(in_features / nblocks)
        self.out_blk = math.ceil(out_features / nblocks)
        self.weight = nn.Parameter(torch.empty(nblocks, self.out_blk, self.in_blk))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Reference init: a dense kaiming-uniform(a=sqrt(5)) matrix rescaled by sqrt(nblocks) because
        # only 1/nblocks of it is kept, i.e. U(+-1/sqrt(in_blk)) per block; bias U(+-1/sqrt(out)).
        bound = 1.0 / math.sqrt(self.in_blk)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            b = 1.0 / math.sqrt(self.out_features)
            nn.init.uniform_(self.bias, -b, b)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) [+ residual] (added in the kernel's epilogue when the
        Triton path runs)."""
        return ops.blockdiag_linear(x, self.weight, self.bias, self.in_features, self.out_features,
                                    kernel_mode(self), residual)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense (out_features, in_features) matrix: y = x @ W.T + b."""
        w = torch.block_diag(*self.weight.unbind(0))
        return w[: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nblocks={self.nblocks}, bias={self.bias is not None}")
