"""Implicit long-convolution filter (Hyena-style, DESIGN.md §4.2).

k[t, c] = MLP(z[t])[c] · exp(-t·|δ_c|): positional features z (time + cos/sin bands) go through a small
MLP with sine activations that share ONE learnable frequency vector, and an exponential decay per channel
makes distant taps small. A bidirectional filter has a second MLP (own weights, same shared frequency)
for the anti-causal taps.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class Sin(nn.Module):
    """sin(freq ⊙ x) with a learnable frequency per feature; one instance is shared by every activation."""

    def __init__(self, dim: int, init_freq: float = 10.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), float(init_freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


def positional_features(max_len: int, emb_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (max_len, emb_dim) = [t, cos(f_b·w), -sin(f_b·w)] with t = linspace(0, 1), w = 2π·n/max_len,
    f = linspace(1e-4, bands-1, bands); and t (max_len, 1), the time used by the decay."""
    bands = (emb_dim - 1) // 2
    t = torch.linspace(0, 1, max_len, dtype=torch.float64)[:, None]
    w = 2 * math.pi * torch.arange(max_len, dtype=torch.float64)[:, None] / max_len
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, :]
    z = torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1)
    return z.float(), t.float()


class FilterMLP(nn.Module):
    """Linear(emb→O) → Sin → [Linear(O→O) → Sin] × depth → Linear(O→H, no bias); `sin` is shared."""

    def __init__(self, emb_dim: int, order: int, channels: int, sin: Sin, inner_layers: int = 2):
        super().__init__()
        dims = [emb_dim] + [order] * (inner_layers + 1)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(order, channels, bias=False)
        # Held outside the module tree so the shared frequency is registered once, by the filter.
        self._sin = [sin]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        sin = self._sin[0]
        for lin in self.linears:
            z = sin(lin(z))
        return self.out(z)


class ImplicitFilter(nn.Module):
    """Produces the long-convolution kernels for `channels` channels at any length L ≤ max_len."""

    def __init__(self, channels: int, max_len: int, order: int = 128, emb_dim: int = 5,
                 sin_freq: float = 10.0, bidirectional: bool = False,
                 fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        self.channels = channels
        self.max_len = max_len
        self.bidirectional = bidirectional
        z, t = positional_features(max_len, emb_dim)
        self.z = nn.Parameter(z)                      # trained with its own tiny lr (optimizer groups)
        self.register_buffer("t", t)
        self.sin = Sin(order, sin_freq)
        self.mlp = FilterMLP(emb_dim, order, channels, self.sin)
        self.mlp_rev = FilterMLP(emb_dim, order, channels, self.sin) if bidirectional else None
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, channels))

    def _kernel(self, mlp: FilterMLP, L: int, decay: torch.Tensor) -> torch.Tensor:
        return (mlp(self.z[:L]) * decay).transpose(0, 1)          # (L, H) decayed along time -> (H, L)

    def forward(self, L: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k_fwd, k_rev), each (H, L); k_rev is None for a causal filter."""
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the filter's max_seq_len {self.max_len}")
        # exp(-t·|δ|) over (L, H) is as costly as a filter MLP at long L: compute it once for both MLPs.
        decay = torch.exp(-self.t[:L] * self.deltas.abs())
        k_fwd = self._kernel(self.mlp, L, decay)
        k_rev = self._kernel(self.mlp_rev, L, decay) if self.mlp_rev is not None else None
        return k_fwd, k_rev
