"""The M2 sequence mixer (DESIGN.md §4.2), causal or bidirectional.

    z = in_linear(u)                     (B, L, 3H) -> channels-first (B, 3H, L)
    x1, x2, v = split(short_conv(z))     causal depthwise kernel-3 conv
    y = (longconv(v ⊙ x1, k) + D ⊙ (v ⊙ x1)) ⊙ x2
    y += longconv(u, k2) + D2 ⊙ u        residual long conv on the raw (or normalised) input
    out = out_linear(y)

Every step is either per-position, depthwise causal, or a long convolution whose kernel is causal when
`bidirectional=False`, so the causal mixer is causal as a whole.

Three implementations of the same math:
- `_forward_reference`: whole-tensor ops, used whenever autograd records (training) or under autocast.
  When the fused Triton kernels are on (ModelConfig.kernels / M2TRAIN_KERNELS, kernels.dispatch), the two
  long convolutions with their gates and D skips run as m2train.kernels.fftconv instead (forward and
  backward), and - without a pad mask between them - the short conv and the dropout on v ⊙ x1 run inside
  the gated conv's kernel (kernels/fftconv_front.py: in_linear becomes a bias-free channels-first GEMM, the
  kernel adds the bias and computes the short conv in its loads, so the short conv's output is never
  written and only z is kept for the backward; the dropout mask is drawn in-kernel from per-channel seeds,
  so its random stream differs from nn.Dropout's); everything else stays the same torch code.
- `_forward_fused`: for no-grad fp32/fp64 forwards (inference, evaluation). It walks the channels in
  blocks (CHANNEL_CHUNK), doing in_linear rows → short conv → gating → both FFT convolutions for one block
  while it is in L3, and lets the matmuls absorb the (B, L, H) <-> (B, H, L) transposes. Measured on a
  2-core CPU at L=4096 it takes about two thirds of the reference path's time: no intermediate is larger
  than a block (large fresh tensors cost more in page faults than the arithmetic on them), no padded copy
  is made for the FFTs, and no bias is broadcast-copied before a GEMM.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .base import kernel_mode
from .filter import ImplicitFilter
from .longconv import fft_conv, fft_size, kernel_spectrum, padded_fft_conv
from .short_conv import CausalShortConv, causal_short_conv

# Channels per block of the fused path. Big enough that the in_linear GEMM (3x this many rows) runs near
# peak and that a forward is a few dozen large ops rather than hundreds of small ones (each op is a parallel
# region; on a loaded machine every region can wait for a descheduled thread); small enough that the
# block's temporaries stay under glibc's 32 MiB mmap threshold at 8k tokens per batch, so they are reused
# instead of page-faulted in anew for every block.
CHANNEL_CHUNK = 256
# The fused short conv unrolls its taps (kernels/shortconv.py MAX_KERNEL); longer ones run it separately.
FRONT_MAX_KERNEL = 8


class LongConv(nn.Module):
    """y = longconv(x, k) + D ⊙ x with an implicit filter k and a per-channel skip D."""

    # Reuse the kernel spectrum across no-grad forwards while the filter is unchanged (see `spectrum`).
    cache_spectrum: bool = True
    # "auto" | "triton" | "torch": ModelConfig.kernels, stored by the model's init_weights (base.kernel_mode).
    kernels: str = "auto"

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
        return self._cached("rfft", L, n, lambda: self._compute_spectrum(L, n))

    def kernel_spectrum(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused kernel's spectrum: real and imaginary fp32 (H, N) full-length DFT of the kernel in the
        Monarch-permuted frequency order (m2train.kernels.fft_monarch), N = kernel_fft_size(L). Cached
        across no-grad forwards like `spectrum`."""
        from ..kernels.fft_monarch import kernel_fft_size, monarch_kernel_spectrum

        n = kernel_fft_size(L)
        return self._cached("monarch", L, n, lambda: monarch_kernel_spectrum(*self.filter(L), n))

    def kernel_inputs(self, L: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """`kernel_spectrum`, plus - when autograd records - the filter taps (k_fwd, k_rev) it was made from:
        given those, the kernels' backward recomputes the spectrum instead of keeping 2 x (H, N) fp32 per
        conv (kernels/fftconv.py save_spectrum)."""
        if not torch.is_grad_enabled():
            return (*self.kernel_spectrum(L), None)
        from ..kernels.fft_monarch import kernel_fft_size, monarch_kernel_spectrum

        taps = self.filter(L)
        return (*monarch_kernel_spectrum(*taps, kernel_fft_size(L)), taps)

    def _cached(self, kind: str, L: int, n: int, compute):
        if torch.is_grad_enabled() or not self.cache_spectrum:
            return compute()
        tensors = [*self.filter.parameters(), *self.filter.buffers()]
        key = (kind, L, n, torch.is_autocast_enabled(tensors[0].device.type),
               torch.get_autocast_dtype(tensors[0].device.type))
        cache = self._spectrum_cache
        if cache is not None and cache[0] == key and _same_values(cache[1], tensors):
            return cache[2]
        spec = compute()
        self._spectrum_cache = (key, _snapshot(tensors), spec)
        return spec

    def _compute_spectrum(self, L: int, n: int) -> torch.Tensor:
        k_fwd, k_rev = self.filter(L)
        return kernel_spectrum(k_fwd, k_rev, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, L) -> (B, H, L)."""
        if self.use_kernel(x):
            return self.gated(x)
        L = x.shape[-1]
        return fft_conv(x, self.spectrum(L), fft_size(L)) + x * self.skip.to(x.dtype)[:, None]

    def use_kernel(self, x: torch.Tensor) -> bool:
        """Whether the fused Triton kernel (m2train.kernels.fftconv) takes this input: the configured kernel
        mode says so (kernels.dispatch.use_triton) and the kernel supports the shape/dtype; otherwise the
        torch path runs, with a warning naming the reason when the kernels were forced ("triton")."""
        from ..kernels.dispatch import resolve_mode, use_triton

        if not use_triton(x, kernel_mode(self)):
            return False
        from ..kernels.fftconv import unsupported_reason

        reason = unsupported_reason(x)
        if reason is not None and resolve_mode(kernel_mode(self)) == "triton":
            warnings.warn(f"LongConv runs the torch FFT path: {reason}", stacklevel=3)
        return reason is None

    def gated(self, v: torch.Tensor, gate_in: torch.Tensor | None = None,
              gate_out: torch.Tensor | None = None, addend: torch.Tensor | None = None) -> torch.Tensor:
        """(longconv(u, k) + D ⊙ u) [⊙ gate_out] [+ addend] with u = v [⊙ gate_in], in one fused kernel
        (forward and backward). Call only when `use_kernel(v)` is True."""
        from ..kernels.fftconv import gated_fft_conv

        spec_re, spec_im, taps = self.kernel_inputs(v.shape[-1])
        return gated_fft_conv(v, spec_re, spec_im, self.skip, gate_in, gate_out, addend, taps=taps)

    def gated_front(self, z: torch.Tensor, in_bias: torch.Tensor, short_conv: CausalShortConv,
                    dropout_p: float = 0.0, dropout_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(longconv(u, k) + D ⊙ u) ⊙ x2 with u = dropout(v ⊙ x1, dropout_p) and x1, x2, v =
        split(short_conv(z + in_bias)), z (B, 3H, L); the short conv and the dropout (its mask drawn from the
        per-channel `dropout_seeds`, fresh ones when None) run inside the fused kernel (forward and backward).
        Call only when `use_kernel` is True for a (B, H, L) input."""
        from ..kernels.fftconv_front import front_gated_fft_conv

        spec_re, spec_im, taps = self.kernel_inputs(z.shape[-1])
        return front_gated_fft_conv(z, in_bias, short_conv.weight, short_conv.bias, spec_re, spec_im, self.skip,
                                    dropout_p=dropout_p, dropout_seeds=dropout_seeds, taps=taps)


def _snapshot(tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    """The tensors' (dtype, shape, device) and their values, flattened into one copy per (dtype, device).
    One flat tensor per group is what keeps `_same_values` cheap on a GPU: each torch.equal waits for the
    device, and comparing the ~18 filter tensors one by one stalled the launch queue 18 times per conv."""
    meta = tuple((t.dtype, t.shape, t.device) for t in tensors)
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t.detach().reshape(-1))
    return meta, {key: torch.cat(parts) for key, parts in groups.items()}


def _same_values(snapshot: tuple[tuple, dict], tensors: list[torch.Tensor]) -> bool:
    """Exact equality (same dtype, shape, device and values) of every tensor with its snapshot."""
    meta, flat = snapshot
    if meta != tuple((t.dtype, t.shape, t.device) for t in tensors):
        return False
    now = _snapshot(tensors)[1]
    return all(torch.equal(flat[key], now[key]) for key in flat)


def long_conv_class(kind: str) -> type[nn.Module]:
    """The long-convolution module for `model.sequence_mixer`: the FFT conv or the learned causal Monarch
    conv (same constructor, forward and filter/skip parameter names)."""
    if kind == "fft":
        return LongConv
    if kind == "monarch_causal":
        from .causal_monarch import CausalMonarchLongConv
        return CausalMonarchLongConv
    raise ValueError(f"unknown sequence mixer {kind!r}: use 'fft' or 'monarch_causal'")


class ChannelsFirstLinear(nn.Linear):
    """nn.Linear (same parameters, init and state-dict keys) that can also take a channels-first input:
    forward(y, channels_first=True) maps y (B, H_in, L) to (B, L, H_out). The GEMM reads y transposed
    (y[b]ᵀ @ Wᵀ, one batched call) instead of a contiguous copy of y.transpose(1, 2) being made first: one
    full read and write of the activations less per mixer. Being the module's own forward, hooks and
    FLOP counters still see the projection."""

    def forward(self, x: torch.Tensor, channels_first: bool = False, out_channels_first: bool = False,
                add_bias: bool = True) -> torch.Tensor:
        if out_channels_first:
            return self._to_channels_first(x, add_bias)
        if not channels_first:
            return super().forward(x)
        if x.dim() != 3 or x.dtype != self.weight.dtype:          # e.g. autocast: let F.linear cast
            return super().forward(x.transpose(1, 2))
        out = torch.bmm(x.mT, self.weight.t().expand(x.shape[0], -1, -1))
        return out.add_(self.bias) if self.bias is not None else out

    # The output can be channels-first (`_fused_front` asks; so does the TP column-parallel in_linear).
    channels_first_output = True

    def _to_channels_first(self, x: torch.Tensor, add_bias: bool) -> torch.Tensor:
        return linear_to_channels_first(x, self.weight, self.bias if add_bias else None)


def linear_to_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, H_in) -> contiguous (B, H_out, L) = W @ x[b]ᵀ (+ b), one batched GEMM (torch.matmul would
    fold the batch and return a transposed view, not a unit time stride). A caller passes no bias when a
    consumer folds it in (the fused short conv + FFT conv, kernels/fftconv_front.py)."""
    out = torch.bmm(weight.expand(x.shape[0], -1, -1), x.mT)
    return out + bias[:, None] if bias is not None else out


class M2SequenceMixer(nn.Module):
    # ModelConfig.kernels (see LongConv.kernels); decides whether the gates fuse into the long-conv kernel.
    kernels: str = "auto"

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
        self.in_linear = ChannelsFirstLinear(H, 3 * H)
        self.short_conv = CausalShortConv(3 * H, short_conv_kernel)
        conv_args = dict(max_len=max_len, order=filter_order, emb_dim=filter_emb_dim,
                         sin_freq=filter_sin_freq, bidirectional=bidirectional)
        conv_cls = long_conv_class(long_conv)
        self.long_conv = conv_cls(H, **conv_args)
        self.residual_conv = conv_cls(H, **conv_args) if residual_long_conv else None
        self.dropout = nn.Dropout(dropout)
        self.out_linear = ChannelsFirstLinear(H, H)

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
        if keep is None and self._fused_front(u):
            # The short conv runs inside the FFT-conv kernels' loads, and so does the dropout on v ⊙ x1;
            # in_linear is a channels-first GEMM whose bias those loads add (kernels/fftconv_front.py).
            z = self.in_linear(u, out_channels_first=True, add_bias=False)
            p = self.dropout.p if self.training else 0.0
            seeds = self._dropout_seeds(z.device) if p > 0 else None
            y = self.long_conv.gated_front(z, self.in_linear.bias, self.short_conv, dropout_p=p, dropout_seeds=seeds)
            return self._residual_and_out(u, y, keep)
        z = self.in_linear(u).transpose(1, 2)                      # (B, 3H, L)
        if keep is not None:
            z = z * keep
        z = self.short_conv(z)
        x1, x2, v = z.split(self.hidden_size, dim=1)
        if self._fused_gates(v):
            # Gate, long conv, D skip and output gate in one kernel; the input gate fuses too unless dropout
            # or a pad mask has to act on v ⊙ x1 first.
            if keep is None and not (self.training and self.dropout.p > 0):
                y = self.long_conv.gated(v, x1, x2)
            else:
                v = self._drop_channels(v * x1)
                if keep is not None:
                    v = v * keep
                y = self.long_conv.gated(v, None, x2)
        else:
            v = self._drop_channels(v * x1)
            if keep is not None:
                v = v * keep
            y = self.long_conv(v) * x2
        return self._residual_and_out(u, y, keep)

    def _residual_and_out(self, u: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """y + the residual long conv of u (when there is one), then out_linear: the mixer's last steps."""
        if self.residual_conv is not None:
            u_t = self._own_channels(u.transpose(1, 2))
            if keep is not None:
                u_t = u_t * keep
            if self._fused_residual(u_t):
                y = self.residual_conv.gated(u_t, addend=y)       # the sum is formed as the kernel stores
            else:
                y = y + self.residual_conv(u_t)
        return self._project_out(self._drop_channels(y))

    # The steps a channel-sharded mixer (m2train.parallel.tensor_parallel.TensorParallelMixer) overrides; the
    # rest of `_forward_reference` is the same on H channels or on a rank's H/T.
    def _drop_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer's dropout on a channels-first (B, H, L) activation."""
        return self.dropout(x)

    def _dropout_seeds(self, device) -> torch.Tensor:
        """The in-kernel dropout's per-channel seeds (kernels/fftconv_front.py draw_seeds)."""
        from ..kernels.fftconv_front import draw_seeds

        return draw_seeds(self.hidden_size, device)

    def _own_channels(self, u_t: torch.Tensor) -> torch.Tensor:
        """The channels of the (B, H, L) mixer input that this mixer's long convs hold."""
        return u_t

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        """out_linear on the channels-first y (B, H, L) -> (B, L, H)."""
        return self.out_linear(y, channels_first=True)

    def _fused_residual(self, u_t: torch.Tensor) -> bool:
        """The residual long conv runs the Triton kernel, which then adds the main branch's output."""
        return isinstance(self.residual_conv, LongConv) and self.residual_conv.use_kernel(u_t)

    def _fused_front(self, u: torch.Tensor) -> bool:
        """The short conv fuses into the gated FFT-conv kernel (kernels/fftconv_front.py): the kernels are on
        for both and the FFT-conv kernel takes this input."""
        from ..kernels.dispatch import use_triton

        return (isinstance(self.short_conv, CausalShortConv) and getattr(self.in_linear, "channels_first_output", False)
                and self.short_conv.kernel_size <= FRONT_MAX_KERNEL and u.dim() == 3
                and use_triton(u, kernel_mode(self.short_conv)) and self._fused_gates(u.transpose(1, 2)))

    def _fused_gates(self, v: torch.Tensor) -> bool:
        """The Triton path: the kernels are on and the FFT long conv's kernel takes v."""
        return isinstance(self.long_conv, LongConv) and self.long_conv.use_kernel(v)

    def _can_fuse(self, u: torch.Tensor) -> bool:
        """The fused path skips autograd bookkeeping, autocast casts and dropout, so it runs only when
        none of them would do anything. It is the CPU no-grad fast path of the torch reference, so it
        stands aside when the Triton kernels are on."""
        from ..kernels.dispatch import use_triton

        return (not torch.is_grad_enabled()
                and not use_triton(u, kernel_mode(self))
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
        return self.out_linear(y, channels_first=True)

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
