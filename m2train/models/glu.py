"""Monarch GLU dimension mixer: Wo(dropout(gelu(A·y) ⊙ (B·y))).

[A; B] is one H→2I structured layer without bias (first I outputs = the gate A, exact-erf GELU) and Wo an
I→H structured layer with bias. "Structured" is block-diagonal (released M2-BERT), a full order-2 Monarch
(the paper's form) or dense (for ablations), chosen per config.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blockdiag import BlockDiagonalLinear
from .monarch import MonarchLinear


def structured_linear(kind: str, in_features: int, out_features: int, nblocks: int, bias: bool) -> nn.Module:
    if kind == "blockdiag":
        return BlockDiagonalLinear(in_features, out_features, nblocks, bias=bias)
    if kind == "monarch":
        return MonarchLinear(in_features, out_features, nblocks, bias=bias)
    if kind == "dense":
        return nn.Linear(in_features, out_features, bias=bias)
    raise ValueError(f"unknown structured linear kind {kind!r}: use blockdiag, monarch or dense")


class MonarchGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, kind: str = "blockdiag",
                 nblocks: int = 4, dropout: float = 0.0):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gated_layers = structured_linear(kind, hidden_size, 2 * intermediate_size, nblocks, bias=False)
        self.wo = structured_linear(kind, intermediate_size, hidden_size, nblocks, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.gated_layers(y)
        gate, value = h.split(self.intermediate_size, dim=-1)
        return self.wo(self.dropout(F.gelu(gate) * value))
