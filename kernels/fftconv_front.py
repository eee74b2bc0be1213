"""The M2 mixer's short conv fused in front of its gated long convolution (issue 6, item 4):

    x1, x2, v = split(short_conv(z + b_in))        z (B, 3H, L): the in_linear output without its bias
    y = (conv(v ⊙ x1, k) + D ⊙ (v ⊙ x1)) ⊙ x2 [+ addend]

Run as two kernels, the short conv writes its (B, 3H, L) output and the FFT conv reads it back: 6
activations per position of traffic between them, and autograd keeps both z (for the short conv's weight
gradient) and the conv's output (for the FFT conv's backward). Here the FFT-conv kernels compute the short
conv inside their loads (fftconv._load_act: K shifted reads of z, which hit the lines the unshifted read
brought in), so its output never reaches memory and only z is kept for the backward (3 activations per
position instead of 6). The in_linear bias b_in is folded into those loads, so the projection can be a
bias-free channels-first GEMM (its output then has the unit time stride the FFT kernels read; the torch
path's channels-last output would not).

Dropout (the mixer's, on v ⊙ x1, in training) runs inside the kernels too (fftconv._dropped): one int64
seed per channel is drawn from torch's generator per call, and every kernel, forward and backward, draws
the keep decision of element (b, h, t) as tl.rand(seed_h, b·L + t), so the mask is never stored or read.
`dropout_scale` writes the same mask out (tests and the fallback backward).

Backward: the FFT-conv backward kernels, reading z through the same loads, write the gradients of x1, x2, v
into one (B, 3H, L) buffer; the short conv's backward kernel (kernels/shortconv.py, with the input bias)
turns it into dz, dw, db and d b_in. Every kernel layout of kernels/fftconv.py and kernels/fftconv_long.py
takes the fused loads (SC_K > 0), so this covers every sequence length the gated conv does.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import fftconv
from ._common import on_device_of
from .fftconv import (_RESOURCE_ERRORS, _TOO_LARGE, _device_name, _dropped, _give_up_on, _one_program, _seq_view,
                      check_taps, gated_fft_conv_reference, launch_backward, launch_forward, save_spectrum,
                      saved_spectrum)
from .fftconv import unsupported_reason as conv_unsupported_reason
from .shortconv import MAX_KERNEL, short_conv_backward


def pack_front(weight: torch.Tensor, in_bias: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The kernels' parameter rows: (3, H, K + 2) fp32, row (s, h) = [w_0 .. w_{K-1}, b_in, b_sc] of channel
    s·H + h (s = 0, 1, 2: x1, x2, v). weight (3H, 1, K) or (3H, K); in_bias and bias (3H,)."""
    C = bias.shape[0]
    w = weight.detach().reshape(C, -1).float()
    packed = torch.cat([w, in_bias.detach().float()[:, None], bias.detach().float()[:, None]], dim=1)
    return packed.view(3, C // 3, -1).contiguous()


@triton.jit
def _dropout_scale_kernel(out_ptr, seed_ptr, p, L, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    out_ptr += (b * tl.num_programs(1) + h) * L
    for t0 in range(0, L, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        ones = tl.full((BLOCK,), 1.0, dtype=tl.float32)
        tl.store(out_ptr + t, _dropped(ones, seed_ptr + h, b, t, L, p, True), mask=t < L)


def dropout_scale(seeds: torch.Tensor, B: int, L: int, p: float) -> torch.Tensor:
    """The in-kernel dropout's (B, H, L) fp32 factors (0 or 1 / (1 - p)) for per-channel `seeds` (H,)."""
    out = torch.empty(B, seeds.shape[0], L, dtype=torch.float32, device=seeds.device)
    with on_device_of(seeds):
        _dropout_scale_kernel[(B, seeds.shape[0])](out, seeds, float(p), L, BLOCK=min(1024, triton.next_power_of_2(L)))
    return out


def draw_seeds(H: int, device) -> torch.Tensor:
    """One seed per channel for the in-kernel dropout, from torch's generator on `device` (so
    torch.manual_seed and activation checkpointing's RNG replay reproduce the mask); no host sync."""
    return torch.randint(0, 2 ** 31 - 1, (H,), device=device, dtype=torch.int64)


class _FrontGatedFFTConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, in_bias, weight, bias, spec_re, spec_im, skip, addend, grad_wanted, dropout_p, seeds, taps):
        z = _seq_view(z)
        H = z.shape[1] // 3
        drop = (seeds if seeds is not None else draw_seeds(H, z.device), dropout_p) if dropout_p > 0 else None
        x1, x2, v = z[:, :H], z[:, H:2 * H], z[:, 2 * H:]
        front = pack_front(weight, in_bias, bias)
        spec_re, spec_im, skip = spec_re.contiguous(), spec_im.contiguous(), skip.contiguous()
        addend = _seq_view(addend) if addend is not None else None
        ctx.one_program = _one_program(spec_re.shape[-1])
        y, conv = launch_forward(ctx.one_program, v, x1, x2, spec_re, spec_im, skip, addend, save_conv=grad_wanted,
                                 front=front, drop=drop)
        ctx.meta = (weight.shape, weight.dtype, in_bias.dtype, bias.dtype,
                    addend.dtype if addend is not None else None)
        ctx.drop = drop
        if grad_wanted:
            ctx.save_for_backward(z, front, skip, conv, *save_spectrum(ctx, spec_re, spec_im, taps))
        return y

    @staticmethod
    def backward(ctx, dy):
        z, front, skip, conv, *kept = ctx.saved_tensors
        spec_re, spec_im = saved_spectrum(ctx, *kept)
        w_shape, w_dtype, bin_dtype, b_dtype, add_dtype = ctx.meta
        d_addend = dy.to(add_dtype) if add_dtype is not None else None
        n = spec_re.shape[-1]
        if (n, _device_name(z)) in _TOO_LARGE:
            return (*_reference_backward(dy, z, front, spec_re, spec_im, skip, ctx.meta, ctx.drop), d_addend,
                    None, None, None, None)
        dy = _seq_view(dy)
        H = z.shape[1] // 3
        K = front.shape[-1] - 2
        x1, x2, v = z[:, :H], z[:, H:2 * H], z[:, 2 * H:]
        d_post = torch.empty_like(z, memory_format=torch.contiguous_format)   # d(x1, x2, v), z's channel order
        grads = (d_post[:, 2 * H:], d_post[:, :H], d_post[:, H:2 * H])
        try:
            *_, dkr, dki, dd = launch_backward(ctx.one_program, dy, v, x1, x2, spec_re, spec_im, skip, conv,
                                               front=front, grads=grads, drop=ctx.drop)
        except _RESOURCE_ERRORS as err:
            _give_up_on(n, z, err)
            return (*_reference_backward(dy, z, front, spec_re, spec_im, skip, ctx.meta, ctx.drop), d_addend,
                    None, None, None, None)
        rows = front.view(3 * H, K + 2)
        dz, dw, db, dbin = short_conv_backward(d_post, z, rows[:, :K].contiguous(), in_bias=rows[:, K].contiguous())
        return (dz, dbin.to(bin_dtype), dw.to(w_dtype).reshape(w_shape), db.to(b_dtype), dkr, dki, dd, d_addend,
                None, None, None, None)


def _reference_backward(dy, z, front, spec_re, spec_im, skip, meta, drop):
    """Gradients by autograd through the torch reference (when a backward kernel does not fit this GPU),
    with the forward's dropout mask (dropout_scale of its seeds)."""
    w_shape, w_dtype, bin_dtype, b_dtype, _ = meta
    K = front.shape[-1] - 2
    rows = front.view(-1, K + 2)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in
                  (z, rows[:, K].to(bin_dtype), rows[:, :K].to(w_dtype).reshape(w_shape),
                   rows[:, K + 1].to(b_dtype), spec_re, spec_im, skip)]
        scale = dropout_scale(drop[0], z.shape[0], z.shape[-1], drop[1]) if drop is not None else None
        y = front_gated_fft_conv_reference(*leaves, keep_scale=scale)
        return torch.autograd.grad(y, leaves, dy)


def unsupported_reason(z: torch.Tensor, weight: torch.Tensor, spec_re: torch.Tensor | None = None) -> str | None:
    """Why the fused short conv + gated FFT conv cannot take this input (None when it can)."""
    if z.dim() != 3 or z.shape[1] % 3:
        return f"expected a (batch, 3·channels, length) input, got shape {tuple(z.shape)}"
    if weight.shape[-1] > MAX_KERNEL:
        return f"short conv kernel size {weight.shape[-1]} > {MAX_KERNEL} (the taps are unrolled)"
    return conv_unsupported_reason(z[:, : z.shape[1] // 3], spec_re)


def front_gated_fft_conv(z: torch.Tensor, in_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         spec_re: torch.Tensor, spec_im: torch.Tensor, skip: torch.Tensor,
                         addend: torch.Tensor | None = None, dropout_p: float = 0.0,
                         dropout_seeds: torch.Tensor | None = None, taps: tuple | None = None) -> torch.Tensor:
    """y = (conv(u, k) + skip ⊙ u) ⊙ x2 [+ addend] with u = dropout(v ⊙ x1, dropout_p), (B, H, L) in z's
    dtype, where x1, x2, v = split(short_conv(z + in_bias)) along the channels: z (B, 3H, L) with unit time
    stride (e.g. a channels-first projection without its bias), in_bias and the short conv's bias (3H,), its
    weight (3H, 1, K) or (3H, K); the kernel spectrum as in fftconv.gated_fft_conv. Differentiable in every
    tensor argument. The dropout mask comes from `dropout_seeds`, int64 (H,) on z's device, one per channel
    (a tensor-parallel rank passes its slice of the whole model's seeds, so its channels get the masks they
    would get unsharded); fresh ones (draw_seeds) when None. Falls back to the torch reference (with torch's
    dropout when no seeds are given), with a warning naming why, for inputs the kernels do not take. `taps`:
    the (k_fwd, k_rev) the spectrum was computed from, so that the backward recomputes it instead of keeping
    it (fftconv.save_spectrum)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability {dropout_p} is not in [0, 1)")
    out_shape = (z.shape[0], z.shape[1] // 3, z.shape[-1]) if z.dim() == 3 else None
    H = out_shape[1] if out_shape else None
    if dropout_seeds is not None and (dropout_seeds.shape != (H,) or dropout_seeds.dtype != torch.int64
                                      or dropout_seeds.device != z.device):
        raise ValueError(f"dropout_seeds must be int64 of shape ({H},) on {z.device}, got "
                         f"{dropout_seeds.dtype} {tuple(dropout_seeds.shape)} on {dropout_seeds.device}")
    check_taps(taps, spec_re)
    if addend is not None and addend.shape != out_shape:
        raise ValueError(f"addend shape {tuple(addend.shape)} is not the output's {out_shape}")
    if addend is not None and torch.promote_types(addend.dtype, z.dtype) != z.dtype:
        # The sum must take the wider dtype, which the kernel (storing in z's dtype) would not.
        return front_gated_fft_conv(z, in_bias, weight, bias, spec_re, spec_im, skip, dropout_p=dropout_p,
                                    dropout_seeds=dropout_seeds, taps=taps) + addend
    reason = unsupported_reason(z, weight, spec_re)
    if reason is not None:
        warnings.warn(f"fused short conv + FFT conv falls back to torch: {reason}", stacklevel=2)
        return _fallback(z, in_bias, weight, bias, spec_re, spec_im, skip, addend, dropout_p, dropout_seeds)
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (z, in_bias, weight, bias, spec_re, spec_im, skip, addend))
    try:
        return _FrontGatedFFTConv.apply(z, in_bias, weight, bias, spec_re, spec_im, skip, addend, grad_wanted,
                                        float(dropout_p), dropout_seeds, taps)
    except _RESOURCE_ERRORS as err:
        _give_up_on(spec_re.shape[-1], z, err)
        return _fallback(z, in_bias, weight, bias, spec_re, spec_im, skip, addend, dropout_p, dropout_seeds)


def _fallback(z, in_bias, weight, bias, spec_re, spec_im, skip, addend, dropout_p, seeds):
    """The torch reference in place of the kernels; given seeds still decide the dropout mask (drawn by a
    Triton kernel, so they need a GPU or the interpreter: without either they are refused, not ignored)."""
    scale = None
    if seeds is not None and dropout_p > 0:
        if not (z.is_cuda or fftconv.INTERPRET):
            raise ValueError("dropout_seeds draw their mask with a Triton kernel: pass a CUDA tensor (or set "
                             "TRITON_INTERPRET=1), or no seeds for torch's dropout")
        scale = dropout_scale(seeds, z.shape[0], z.shape[-1], dropout_p)
    return front_gated_fft_conv_reference(z, in_bias, weight, bias, spec_re, spec_im, skip, addend, dropout_p,
                                          keep_scale=scale)


def front_gated_fft_conv_reference(z, in_bias, weight, bias, spec_re, spec_im, skip, addend=None, dropout_p=0.0,
                                   keep_scale=None) -> torch.Tensor:
    """The same function from the models' short conv and the gated conv's torch reference. The dropout on
    v ⊙ x1: the given (B, H, L) factors `keep_scale` (the kernels' mask, dropout_scale), else torch's
    F.dropout with dropout_p."""
    from m2train.models.short_conv import causal_short_conv

    C = z.shape[1]
    x = causal_short_conv(z + in_bias.to(z.dtype)[:, None], weight.reshape(C, -1), bias)
    x1, x2, v = x.split(C // 3, dim=1)
    u = v * x1
    if keep_scale is not None:
        u = u * keep_scale.to(u.dtype)
    elif dropout_p > 0:
        u = F.dropout(u, dropout_p)
    return gated_fft_conv_reference(u, spec_re, spec_im, skip, None, x2, addend)


__all__ = ["pack_front", "dropout_scale", "draw_seeds", "unsupported_reason", "front_gated_fft_conv",
           "front_gated_fft_conv_reference"]
