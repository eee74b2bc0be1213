"""Monarch GLU dimension mixer: Wo(dropout(gelu(A·y) ⊙ (B·y))).

[A; B] is one H→2I structured layer without bias (first I outputs = the gate A, exact-erf GELU) and Wo an
I→H structured layer with bias. "Structured" is block-diagonal (released M2-BERT), a full order-2 Monarch
(the paper's form) or dense (for ablations), chosen per config.

No-grad forwards (inference, evaluation) run in row chunks: the (N, 2I) and (N, I) intermediates are the
largest tensors in the model, and on CPU allocating them fresh each layer costs more in page faults than
the GELU; a chunk of rows stays in cache instead. For the block-diagonal layers the chunked path also
multiplies block by block so that no transposed copy of the activations is ever made.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import ops
from .base import kernel_mode
from .blockdiag import BlockDiagonalLinear
from .monarch import MonarchLinear

# Rows per chunk of the no-grad path: (ROW_CHUNK, 2I) fp32 at I=3072 is 24 MiB, under the 32 MiB mmap
# threshold (reused, not page-faulted) and large enough for few, efficient GEMM calls.
ROW_CHUNK = 1024


def structured_linear(kind: str, in_features: int, out_features: int, nblocks: int, bias: bool) -> nn.Module:
    if kind == "blockdiag":
        return BlockDiagonalLinear(in_features, out_features, nblocks, bias=bias)
    if kind == "monarch":
        return MonarchLinear(in_features, out_features, nblocks, bias=bias)
    if kind == "dense":
        return nn.Linear(in_features, out_features, bias=bias)
    raise ValueError(f"unknown structured linear kind {kind!r}: use blockdiag, monarch or dense")


class MonarchGLU(nn.Module):
    kernels = "auto"        # ModelConfig.kernels, set by the model (see base.kernel_mode)

    def __init__(self, hidden_size: int, intermediate_size: int, kind: str = "blockdiag",
                 nblocks: int = 4, dropout: float = 0.0):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gated_layers = structured_linear(kind, hidden_size, 2 * intermediate_size, nblocks, bias=False)
        self.wo = structured_linear(kind, intermediate_size, hidden_size, nblocks, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """GLU(y) [+ residual]. With the kernels on and a block-diagonal Wo the residual is added in Wo's
        epilogue (M2-BERT's y + GLU(y) without a separate pass over the activations)."""
        mode = kernel_mode(self)
        if ops.kernels_enabled(y, mode):
            # Kernels on: the block-diagonal up-projection, GELU and gate run as one fused op, and the
            # CPU-cache row chunking below has nothing to offer.
            if isinstance(self.gated_layers, BlockDiagonalLinear):
                if isinstance(self.wo, BlockDiagonalLinear) and not (self.training and self.dropout.p > 0):
                    # Inference: the whole MLP in one kernel, the (tokens, I) activation kept on chip.
                    # Training: one op that recomputes that activation in its backward instead of keeping it.
                    op = ops.glu_mlp if torch.is_grad_enabled() else ops.glu_mlp_inference
                    fused = op(y, self.gated_layers.weight, self.wo.weight, self.wo.bias, self.intermediate_size,
                               mode, residual, out_features=self.wo.out_features)
                    if fused is not None:
                        return fused
                act = ops.glu_blockdiag(y, self.gated_layers.weight, self.intermediate_size, mode)
                if isinstance(self.wo, BlockDiagonalLinear):
                    return self.wo(self.dropout(act), residual)
                out = self.wo(self.dropout(act))
            else:
                out = self._glu(y)
        elif self._can_chunk(y):
            out = self._forward_chunked(y)
        else:
            out = self._glu(y)
        return out + residual if residual is not None else out

    def _glu(self, y: torch.Tensor) -> torch.Tensor:
        """The reference formula on whole tensors (used under autograd and autocast)."""
        h = self.gated_layers(y)
        gate, value = h.split(self.intermediate_size, dim=-1)
        return self.wo(self.dropout(F.gelu(gate) * value))

    def _can_chunk(self, y: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(y.device.type)
                and not (self.training and self.dropout.p > 0))

    def _forward_chunked(self, y: torch.Tensor) -> torch.Tensor:
        rows = y.reshape(-1, y.shape[-1])
        out = y.new_empty(rows.shape[0], self.wo.out_features)
        glu = self._blockdiag_glu if self._blockdiag_aligned() else self._glu
        for r0 in range(0, rows.shape[0], ROW_CHUNK):
            out[r0:r0 + ROW_CHUNK] = glu(rows[r0:r0 + ROW_CHUNK])
        return out.view(*y.shape[:-1], -1)

    def _blockdiag_aligned(self) -> bool:
        """Block-diagonal layers whose blocks line up with the gate/value halves and with Wo's input
        blocks (true for every released size): gate block k pairs with value block k + nblocks/2, and each
        gated output block holds exactly two of Wo's input blocks."""
        g, o = self.gated_layers, self.wo
        if not (isinstance(g, BlockDiagonalLinear) and isinstance(o, BlockDiagonalLinear)):
            return False
        nb, I = g.nblocks, self.intermediate_size
        return (o.nblocks == nb and nb % 2 == 0 and g.out_blk * nb == 2 * I and o.in_blk * nb == I
                and g.in_blk * nb == g.in_features and o.out_blk * nb == o.out_features
                and g.out_blk == 2 * o.in_blk)

    def _blockdiag_glu(self, y: torch.Tensor) -> torch.Tensor:
        """The GLU on (R, H) rows, one block at a time: each GEMM reads a column slice of its input in
        place and writes a fresh contiguous block, so nothing is transposed or copied."""
        wg, wo = self.gated_layers.weight, self.wo.weight          # (nb, 2I/nb, H/nb), (nb, H/nb, I/nb)
        nb, _, in_g = wg.shape
        in_o = wo.shape[-1]
        half = nb // 2
        outs = []
        for k in range(half):
            gate = y[:, k * in_g:(k + 1) * in_g] @ wg[k].t()                    # gate columns of block k
            value = y[:, (k + half) * in_g:(k + half + 1) * in_g] @ wg[k + half].t()
            act = F.gelu(gate).mul_(value)                         # (R, 2·in_o): Wo blocks 2k, 2k+1
            outs.append(act[:, :in_o] @ wo[2 * k].t())
            outs.append(act[:, in_o:] @ wo[2 * k + 1].t())
        out = torch.cat(outs, dim=-1)
        return out.add_(self.wo.bias.to(out.dtype)) if self.wo.bias is not None else out
