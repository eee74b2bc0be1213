"""The M2 sequence mixer (DESIGN.md §4.2), causal or bidirectional.

    z = in_linear(u)                     (B, L, 3H) -> channels-first (B, 3H, L)
    x1, x2, v = split(short_conv(z))     causal depthwise kernel-3 conv
    y = (longconv(v ⊙ x1, k) + D ⊙ (v ⊙ x1)) ⊙ x2
    y += longconv(u, k2) + D2 ⊙ u        residual long conv on the raw (or normalised) input
    out = out_linear(y)

Every step is either per-position, depthwise causal, or a long convolution whose kernel is causal when
`bidirectional=False`, so the causal mixer is causal as a whole.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .filter import ImplicitFilter
from .longconv import fft_size, fft_conv, kernel_spectrum
from .short_conv import CausalShortConv


class LongConv(nn.Module):
    """y = longconv(x, k) + D ⊙ x with an implicit filter k and a per-channel skip D."""

    def __init__(self, channels: int, max_len: int, order: int, emb_dim: int, sin_freq: float,
                 bidirectional: bool):
        super().__init__()
        self.filter = ImplicitFilter(channels, max_len, order=order, emb_dim=emb_dim,
                                     sin_freq=sin_freq, bidirectional=bidirectional)
        self.skip = nn.Parameter(torch.randn(channels))   # reference init N(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, L) -> (B, H, L)."""
        L = x.shape[-1]
        n = fft_size(L)
        k_fwd, k_rev = self.filter(L)
        spec = kernel_spectrum(k_fwd, k_rev, n)            # once per forward, shared by the batch
        return fft_conv(x, spec, n) + x * self.skip.to(x.dtype)[:, None]


class M2SequenceMixer(nn.Module):
    def __init__(self, hidden_size: int, max_len: int, *, bidirectional: bool,
                 residual_long_conv: bool = True, input_norm: bool = False, dropout: float = 0.0,
                 short_conv_kernel: int = 3, filter_order: int = 128, filter_emb_dim: int = 5,
                 filter_sin_freq: float = 10.0, pad_masking: bool = False):
        super().__init__()
        H = hidden_size
        self.hidden_size = H
        self.bidirectional = bidirectional
        self.pad_masking = pad_masking
        # Legacy 80M variant: LayerNorm with torch's default eps on the mixer input.
        self.input_norm = nn.LayerNorm(H) if input_norm else None
        self.in_linear = nn.Linear(H, 3 * H)
        self.short_conv = CausalShortConv(3 * H, short_conv_kernel)
        conv_args = dict(max_len=max_len, order=filter_order, emb_dim=filter_emb_dim,
                         sin_freq=filter_sin_freq, bidirectional=bidirectional)
        self.long_conv = LongConv(H, **conv_args)
        self.residual_conv = LongConv(H, **conv_args) if residual_long_conv else None
        self.dropout = nn.Dropout(dropout)
        self.out_linear = nn.Linear(H, H)

    def forward(self, u: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """u (B, L, H); pad_mask (B, L) with 1 for real tokens, used only when `pad_masking` is on."""
        if self.input_norm is not None:
            u = self.input_norm(u)
        keep = None
        if self.pad_masking and pad_mask is not None:
            keep = pad_mask.to(u.dtype)[:, None, :]                # (B, 1, L)
        z = self.in_linear(u).transpose(1, 2)                      # (B, 3H, L)
        if keep is not None:
            z = z * keep
        z = self.short_conv(z)
        x1, x2, v = z.split(self.hidden_size, dim=1)
        v = self.dropout(v * x1)
        if keep is not None:
            v = v * keep
        y = self.long_conv(v) * x2
        if self.residual_conv is not None:
            u_t = u.transpose(1, 2)
            if keep is not None:
                u_t = u_t * keep
            y = y + self.residual_conv(u_t)
        y = self.dropout(y.transpose(1, 2))
        return self.out_linear(y)
