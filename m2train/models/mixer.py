"""The M2 sequence mixer (DESIGN.md §4.2), causal or bidirectional.

    z = in_linear(u)                     (B, L, 3H) -> channels-first (B, 3H, L)
    x1, x2, v = split(short_conv(z))     causal depthwise kernel-3 conv
    y = (longconv(v ⊙ x1, k) + D ⊙ (v ⊙ x1)) ⊙ x2
    y += longconv(u, k2) + D2 ⊙ u        residual long conv on the raw (or normalised) input
    out = out_linear(y)

Every step is either per-position, depthwise causal, or a long convolution whose kernel is causal when
`bidirectional=False`, so the causal mixer is causal as a whole.

Two implementations of the same math:
- `_forward_reference`: whole-tensor ops, used whenever autograd records (training) or under autocast.
- `_forward_fused`: for no-grad fp32/fp64 forwards (inference, evaluation). It walks the channels in
  blocks (CHANNEL_CHUNK), doing in_linear rows → short conv → gating → both FFT convolutions for one block
  while it is in L3, and lets the matmuls absorb the (B, L, H) <-> (B, H, L) transposes. Measured on a
  2-core CPU at L=4096 it takes about two thirds of the reference path's time: no intermediate is larger
  than a block (large fresh tensors cost more in page faults than the arithmetic on them), no padded copy
  is made for the FFTs, and no bias is broadcast-copied before a GEMM.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .filter import ImplicitFilter
from .longconv import fft_conv, fft_size, kernel_spectrum, padded_fft_conv
from .short_conv import CausalShortConv, causal_short_conv

# Channels per block of the fused path. Big enough that the in_linear GEMM (3x this many rows) runs near
# peak and that a forward is a few dozen large ops rather than hundreds of small ones (each op is a parallel
# region; on a loaded machine every region can wait for a descheduled thread); small enough that the
# block's temporaries stay under glibc's 32 MiB mmap threshold at 8k tokens per batch, so they are reused
# instead of page-faulted in anew for every block.
CHANNEL_CHUNK = 256


class LongConv(nn.Module):
    """y = longconv(x, k) + D ⊙ x with an implicit filter k and a per-channel skip D."""

    # Reuse the kernel spectrum across no-grad forwards while the filter is unchanged (see `spectrum`).
    cache_spectrum: bool = True

    def __init__(self, channels: int, max_len: int, order: int, emb_dim: int, sin_freq: float,
                 bidirectional: bool):
        super().__init__()
        self.filter = ImplicitFilter(channels, max_len, order=order, emb_dim=emb_dim,
                                     sin_freq=sin_freq, bidirectional=bidirectional)
        self.skip = nn.Parameter(torch.randn(channels))   # reference init N(0, 1)
        self._spectrum_cache: tuple | None = None          # (key, snapshot of the filter tensors, spectrum)

    def spectrum(self, L: int) -> torch.Tensor:
        """rfft of the (H, L) kernel at size fft_size(L), computed once per forward and shared by the batch.

        Without autograd (inference) the spectrum is also reused across forwards: the filter MLP over L
        positions plus the kernel FFT cost as much as a quarter of a layer at long L. It is reused only when
        every filter tensor (parameters and buffers) still has exactly the values it was computed from, so
        an optimizer step, load_state_dict, `.data` swap or dtype change can never yield a stale kernel."""
        n = fft_size(L)
        if torch.is_grad_enabled() or not self.cache_spectrum:
            return self._compute_spectrum(L, n)
        tensors = [*self.filter.parameters(), *self.filter.buffers()]
        key = (L, n, torch.is_autocast_enabled(tensors[0].device.type),
               torch.get_autocast_dtype(tensors[0].device.type))
        cache = self._spectrum_cache
        if cache is not None and cache[0] == key and _same_values(cache[1], tensors):
            return cache[2]
        spec = self._compute_spectrum(L, n)
        self._spectrum_cache = (key, [t.detach().clone() for t in tensors], spec)
        return spec

    def _compute_spectrum(self, L: int, n: int) -> torch.Tensor:
        k_fwd, k_rev = self.filter(L)
        return kernel_spectrum(k_fwd, k_rev, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, L) -> (B, H, L)."""
        L = x.shape[-1]
        return fft_conv(x, self.spectrum(L), fft_size(L)) + x * self.skip.to(x.dtype)[:, None]


def _same_values(snapshot: list[torch.Tensor], tensors: list[torch.Tensor]) -> bool:
    """Exact equality (same dtype, shape, device and bits) of every tensor with its snapshot."""
    return len(snapshot) == len(tensors) and all(
        s.dtype == t.dtype and s.shape == t.shape and s.device == t.device and torch.equal(s, t)
        for s, t in zip(snapshot, tensors))


def long_conv_class(kind: str) -> type[nn.Module]:
    """The long-convolution module for `model.sequence_mixer`: the FFT conv or the learned causal Monarch
    conv (same constructor, forward and filter/skip parameter names)."""
    if kind == "fft":
        return LongConv
    if kind == "monarch_causal":
        from .causal_monarch import CausalMonarchLongConv
        return CausalMonarchLongConv
    raise ValueError(f"unknown sequence mixer {kind!r}: use 'fft' or 'monarch_causal'")


class M2SequenceMixer(nn.Module):
    def __init__(self, hidden_size: int, max_len: int, *, bidirectional: bool,
                 residual_long_conv: bool = True, input_norm: bool = False, dropout: float = 0.0,
                 short_conv_kernel: int = 3, filter_order: int = 128, filter_emb_dim: int = 5,
                 filter_sin_freq: float = 10.0, pad_masking: bool = False, long_conv: str = "fft"):
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
        conv_cls = long_conv_class(long_conv)
        self.long_conv = conv_cls(H, **conv_args)
        self.residual_conv = conv_cls(H, **conv_args) if residual_long_conv else None
        self.dropout = nn.Dropout(dropout)
        self.out_linear = nn.Linear(H, H)

    def forward(self, u: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """u (B, L, H); pad_mask (B, L) with 1 for real tokens, used only when `pad_masking` is on."""
        if self.input_norm is not None:
            u = self.input_norm(u)
        keep = None
        if self.pad_masking and pad_mask is not None:
            keep = pad_mask.to(u.dtype)[:, None, :]                # (B, 1, L)
        if keep is None and self._can_fuse(u):
            return self._forward_fused(u)
        return self._forward_reference(u, keep)

    def _forward_reference(self, u: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
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

    def _can_fuse(self, u: torch.Tensor) -> bool:
        """The fused path skips autograd bookkeeping, autocast casts and dropout, so it runs only when
        none of them would do anything."""
        return (not torch.is_grad_enabled()
                and isinstance(self.long_conv, LongConv)           # the fused path is FFT-only
                and not torch.is_autocast_enabled(u.device.type)
                and u.dim() == 3 and u.dtype in (torch.float32, torch.float64)
                and u.dtype == self.in_linear.weight.dtype
                and not (self.training and self.dropout.p > 0))

    def _forward_fused(self, u: torch.Tensor) -> torch.Tensor:
        """Same result as `_forward_reference` (no mask, no dropout), one block of channels at a time."""
        B, L, H = u.shape
        spec = self.long_conv.spectrum(L)
        spec_res = self.residual_conv.spectrum(L) if self.residual_conv is not None else None
        u_t = u.transpose(1, 2)                                    # (B, H, L) view, no copy
        y = u.new_empty(B, H, L)                                   # mixer output, channels-first
        # Zero-padded FFT inputs, reused by every block: only [..., :L] is ever written.
        C = min(CHANNEL_CHUNK, H)
        pads = [u.new_zeros(B, C, fft_size(L)) for _ in range(2 if spec_res is not None else 1)]
        for c0 in range(0, H, C):
            g = slice(c0, min(c0 + C, H))
            self._mix_block(u_t, y[:, g], g, spec, spec_res, [p[:, :g.stop - g.start] for p in pads])
        # out_linear on the channels-first y: y[b]ᵀ @ Wᵀ, the transpose absorbed by the GEMM.
        out = torch.bmm(y.mT, self.out_linear.weight.t().expand(B, H, H))
        return out.add_(self.out_linear.bias)

    def _mix_block(self, u_t, out, g: slice, spec, spec_res, pads) -> None:
        """Steps 1-6 of the mixer for the channels g, written into `out` (B, C, L).
        u_t (B, H, L): the mixer input, transposed view; pads: zeroed (B, C, n) buffers of which only the
        first L taps are overwritten here."""
        B, H, L = u_t.shape
        C = g.stop - g.start
        # 1. in_linear rows [x1; x2; v] of these channels, channels-first: (3C, H) @ u[b]ᵀ per sample.
        w = self.in_linear.weight.view(3, H, H)[:, g].reshape(3 * C, H)
        z = torch.bmm(w.expand(B, 3 * C, H), u_t).view(B, 3, C, L)
        z.add_(self.in_linear.bias.view(3, H, 1)[:, g])           # (addmm would copy the bias first)
        # 2-3. short conv, split, v ⊙ x1 (written straight into the padded FFT input)
        w_sc, b_sc = self.short_conv.weight.view(3, H, -1)[:, g], self.short_conv.bias.view(3, H)[:, g]
        x1, x2, v = causal_short_conv(z, w_sc, b_sc).unbind(1)
        v = torch.mul(v, x1, out=pads[0][..., :L])
        # 4-5. (longconv(v, k) + D ⊙ v) ⊙ x2
        y = padded_fft_conv(pads[0], spec[g])[..., :L]
        torch.addcmul(y, v, self.long_conv.skip[g, None], out=out).mul_(x2)
        # 6. + longconv(u, k2) + D2 ⊙ u
        if spec_res is not None:
            u_blk = pads[1][..., :L].copy_(u_t[:, g])
            out += padded_fft_conv(pads[1], spec_res[g])[..., :L]
            out.addcmul_(u_blk, self.residual_conv.skip[g, None])
