"""Fused gated long convolution: y = (conv(v ⊙ x1, k) + D ⊙ (v ⊙ x1)) ⊙ x2, as a Monarch-decomposed FFT.

The M2 sequence mixer's two long convolutions (DESIGN.md §4.2) in one Triton kernel each way:
- gated:    y = (conv(u, k) + D ⊙ u) ⊙ x2 with u = v ⊙ x1     (`gate_in=x1`, `gate_out=x2`)
- residual: y = conv(u, k2) + D2 ⊙ u                             (no gates)
Either gate can be left out on its own (the mixer applies dropout or pad masks to v ⊙ x1 in torch and
passes only the output gate). An `addend` (the mixer's residual conv takes the gated branch's output) is
added as the result is stored; its gradient is dy.

One program owns one whole zero-padded sequence of length N = N1·N2 (kernel_fft_size(L) <= 2048, i.e.
L <= 1024: the whole sequence lives in registers and shared memory; see fft_monarch.ONE_PROGRAM_MAX_FFT;
longer sequences run the three-level kernels of kernels/fftconv_long.py through this same entry point) as an
(N1, N2) fp32 matrix and does the FFT, the pointwise product with the kernel spectrum and the inverse FFT
as the four-step (Monarch) factorisation of kernels/fft_monarch.py: dense DFT-matrix products on the
tensor cores (tl.dot on real and imaginary parts; 3 real products per complex one), twiddle multiplies, and no transposes at all because the
kernel spectrum is stored in the permuted frequency order the factorisation produces. Gates, the D skip and
the dtype casts happen in registers around it, so a sequence is read once and written once.

The kernel spectrum (fp32, full length N, permuted; fft_monarch.monarch_kernel_spectrum) is made with
torch from the implicit filter, so causal (k_fwd zero padded) and bidirectional (the 2L layout) kernels are
the same code here, and the spectrum's gradient flows back into the filter through torch.fft.

Backward (per channel, looping over the batch so the spectrum and D gradients are reduced in program order,
deterministically, without atomics: dK in the channel's own output rows, dD in a register). With
gc = dy ⊙ x2 (or dy), U = FFT(u), G = FFT(gc):
    du = Re IFFT(G ⊙ conj(K)) + D ⊙ gc,   dv = du ⊙ x1,   dx1 = du ⊙ v
    dx2 = dy ⊙ (Re IFFT(U ⊙ K) + D ⊙ u)   (recomputed here; the single-pass three-level forward stores it)
    dK = Σ_b conj(U) ⊙ G / N,             dD = Σ_{b,t} gc ⊙ u
(dK is the gradient of Re IFFT(U ⊙ K) with respect to K's real and imaginary parts, which is what torch's
fft backward expects.)

Precision: activations fp32/bf16/fp16 are loaded and converted to fp32; every product accumulates in
fp32. On a GPU the DFT products run as "tf32x3" for fp32 activations (three TF32 products, ~fp32
accuracy - cuFFT, the reference, is fp32-accurate) and "tf32" for 16-bit activations (whose own rounding
dominates). Triton's interpreter computes every dot in plain fp32.

Unsupported inputs (`unsupported_reason`) run the PyTorch reference instead; the reason says why.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError

from ._common import on_device_of
from .dispatch import interpreting
from .fft_monarch import (MAX_FFT_SIZE, dft_factors, fft_layout, kernel_fft_size, monarch_kernel_spectrum,
                          natural_spectrum, split_fft_size)

INTERPRET = interpreting()
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A GPU whose shared memory cannot hold one whole sequence at some FFT size (the launch raised
# OutOfResources): that size runs the torch path from then on. (FFT size, device name) pairs.
_TOO_LARGE: set[tuple[int, str]] = set()
_RESOURCE_ERRORS = (OutOfResources, PTXASError)


# Launch config, fixed rather than autotuned: each compile of these large unrolled kernels takes up to ~20 s
# on a 2-core CPU (Triton 3.6 and 3.8), so autotuning several configs for every (FFT size, gates,
# precision) would spend minutes compiling on first use. Warps from an offline sm_90a compile (Triton 3.8 +
# ptxas, no GPU needed; bf16, every gate variant): at N = 1024 and 2048 8 warps spill nothing either way,
# where 4 spilled 68 B (forward) and 100-500 B (backward) per thread; up to N = 512 4 warps spill nothing
# either (<= 148 registers), and keep three programs per SM resident where 8 warps (~170 registers) keep
# one; at N = 4096 (one program only when fft_monarch.ONE_PROGRAM_MAX_FFT is raised) 4 warps spill a little
# less than 8 (16 warps cap registers at 128 and spill most). num_stages=1: the backward's batch loop must
# not be software-pipelined (that would multi-buffer whole sequences in shared memory).
NUM_STAGES = 1


def one_program_warps(n: int) -> int:
    """Warps of the one-program kernels at FFT size n (see the launch-config note above)."""
    return 8 if 1024 <= n <= 2048 else 4


@triton.jit
def _load_mat(ptr, R: tl.constexpr, C: tl.constexpr):
    return tl.load(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@triton.jit
def _store_mat(ptr, x, R: tl.constexpr, C: tl.constexpr):
    tl.store(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], x)


@triton.jit
def _fft(a, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
         N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr):
    """Real (N1, N2) signal matrix -> its spectrum (re, im) in permuted order: ((F1 @ a) ⊙ T) @ F2."""
    br = tl.dot(_load_mat(f1r_ptr, N1, N1), a, input_precision=PREC)
    bi = tl.dot(_load_mat(f1i_ptr, N1, N1), a, input_precision=PREC)
    tr = _load_mat(tr_ptr, N1, N2)
    ti = _load_mat(ti_ptr, N1, N2)
    cr = br * tr - bi * ti
    ci = br * ti + bi * tr
    return _cmul_f2(cr, ci, f2r_ptr, f2i_ptr, N2, PREC)


@triton.jit
def _cmul_f2(ar, ai, f2r_ptr, f2i_ptr, N2: tl.constexpr, PREC: tl.constexpr):
    """(ar + i·ai) @ (F2r + i·F2i) with three real products instead of four (Gauss): the N2 x N2 products
    are most of the FLOPs of a transform."""
    f2r = _load_mat(f2r_ptr, N2, N2)
    f2i = _load_mat(f2i_ptr, N2, N2)
    p1 = tl.dot(ar, f2r, input_precision=PREC)
    p2 = tl.dot(ai, f2i, input_precision=PREC)
    p3 = tl.dot(ar + ai, f2r + f2i, input_precision=PREC)
    return p1 - p2, p3 - p1 - p2


@triton.jit
def _ifft_real(zr, zi, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr,
               N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr):
    """Permuted spectrum (N1, N2) -> real part of the inverse DFT: Re(conj(F1) @ ((Z @ conj(F2)) ⊙ conj(T))) / N."""
    # Z @ conj(F2) = conj(conj(Z) @ F2)
    wr, wi = _cmul_f2(zr, -zi, f2r_ptr, f2i_ptr, N2, PREC)
    wi = -wi
    tr = _load_mat(tr_ptr, N1, N2)
    ti = _load_mat(ti_ptr, N1, N2)
    vr = wr * tr + wi * ti
    vi = wi * tr - wr * ti
    out = tl.dot(_load_mat(f1r_ptr, N1, N1), vr, input_precision=PREC)
    out = tl.dot(_load_mat(f1i_ptr, N1, N1), vi, acc=out, input_precision=PREC)
    return out * (1.0 / (N1 * N2))


@triton.jit
def _load_act(ptr, t, m, L, sc_ptr, K: tl.constexpr):
    """One sequence's activation at time offsets t (any tile shape) as fp32, zero where the caller's mask
    m = t < L is false (the FFT's zero padding). K = 0: the values at ptr. K > 0: the causal short conv the
    M2 mixer runs in front of the long conv (kernels/fftconv_front.py), computed here from its input instead
    of read from a tensor it wrote: b_sc + Σ_j w_j·(x[t-(K-1)+j] + b_in), taps before t = 0 being the conv's
    zero padding; sc_ptr holds this channel's [w_0 .. w_{K-1}, b_in, b_sc] in fp32 (b_in: the in_linear
    bias, folded in here so the projection can be a bias-free channels-first GEMM). The shifted loads hit
    the lines the unshifted one brought in."""
    if K == 0:
        return tl.load(ptr + t, mask=m, other=0.0).to(tl.float32)
    else:
        b_in = tl.load(sc_ptr + K)
        acc = tl.zeros(t.shape, dtype=tl.float32) + tl.load(sc_ptr + K + 1)
        for j in tl.static_range(K):
            src = t - (K - 1) + j
            ok = (src >= 0) & (src < L)
            x = tl.load(ptr + src, mask=ok, other=0.0).to(tl.float32)
            acc += tl.load(sc_ptr + j) * tl.where(ok, x + b_in, 0.0)
        return tl.where(m, acc, 0.0)


@triton.jit
def _dropped(u, seed_ptr, b, t, L, p, DROP: tl.constexpr):
    """u = v ⊙ x1 with the mixer's dropout applied inside the kernels (kernels/fftconv_front.py): element
    (b, t) of this channel kept with probability 1 - p and scaled by 1 / (1 - p). The draw is
    tl.rand(this channel's seed at seed_ptr, b·L + t), the same in every kernel, forward and backward, so no
    mask is stored (b may be int32 or int64: Philox takes the counter's high word as 0 either way below
    2^31, so every kernel draws the same numbers). DROP false: u unchanged."""
    if DROP:
        keep = tl.rand(tl.load(seed_ptr), b * L + t) >= p
        return tl.where(keep, u * (1.0 / (1.0 - p)), 0.0)
    else:
        return u


@triton.jit
def _fftconv_fwd_kernel(v_ptr, x1_ptr, x2_ptr, y_ptr, add_ptr, kr_ptr, ki_ptr, d_ptr,
                        f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, sc_ptr, sc_s, seed_ptr, p_drop,
                        L, s_vb, s_vh, s_x1b, s_x1h, s_x2b, s_x2h, s_yb, s_yh, s_ab, s_ah,
                        N1: tl.constexpr, N2: tl.constexpr, GATE_IN: tl.constexpr, GATE_OUT: tl.constexpr,
                        ADD: tl.constexpr, SC_K: tl.constexpr, DROP: tl.constexpr, PREC: tl.constexpr):
    # Batch on axis 0 (launched fastest), so the programs sharing one channel's spectrum run together and
    # read it from L2. SC_K > 0: v, x1, x2 are the short conv's inputs (_load_act; sc_ptr + h·(SC_K+2) is
    # x1's parameter row, x2's and v's follow at sc_s and 2·sc_s).
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]     # time index n = N2·n1 + n2
    m = t < L                                                          # zero padding beyond L
    p1 = sc_ptr + h * (SC_K + 2)
    u = _load_act(v_ptr + b * s_vb + h * s_vh, t, m, L, p1 + 2 * sc_s, SC_K)
    if GATE_IN:
        u = u * _load_act(x1_ptr + b * s_x1b + h * s_x1h, t, m, L, p1, SC_K)
    u = _dropped(u, seed_ptr + h, b, t, L, p_drop, DROP)
    xr, xi = _fft(u, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2, PREC)
    kr = tl.load(kr_ptr + h * (N1 * N2) + t)
    ki = tl.load(ki_ptr + h * (N1 * N2) + t)
    y = _ifft_real(xr * kr - xi * ki, xr * ki + xi * kr,
                   f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2, PREC)
    y = y + tl.load(d_ptr + h).to(tl.float32) * u
    if GATE_OUT:
        y = y * _load_act(x2_ptr + b * s_x2b + h * s_x2h, t, m, L, p1 + sc_s, SC_K)
    if ADD:
        y = y + tl.load(add_ptr + b * s_ab + h * s_ah + t, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * s_yb + h * s_yh + t, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fftconv_bwd_kernel(dy_ptr, v_ptr, x1_ptr, x2_ptr, kr_ptr, ki_ptr, d_ptr,
                        dv_ptr, dx1_ptr, dx2_ptr, dkr_ptr, dki_ptr, dd_ptr,
                        f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, sc_ptr, sc_s, seed_ptr, p_drop,
                        B, L, s_dyb, s_dyh, s_vb, s_vh, s_x1b, s_x1h, s_x2b, s_x2h, s_gb, s_gh,
                        N1: tl.constexpr, N2: tl.constexpr, GATE_IN: tl.constexpr, GATE_OUT: tl.constexpr,
                        SC_K: tl.constexpr, DROP: tl.constexpr, PREC: tl.constexpr):
    # One program per channel; dv/dx1/dx2 share the strides s_gb, s_gh (unit time stride; fresh (B, H, L)
    # tensors or slices of one (B, 3H, L) buffer, fftconv.input_grads).
    # Registers are the limit (an (N1, N2) fp32 matrix is N/128 registers per thread at 4 warps), so the
    # loop keeps as little alive across its transforms as it can: the spectrum gradient accumulates in this
    # channel's own rows of dkr/dki (global memory, L2-resident: only this program touches them, in program
    # order, so the sum stays deterministic), and the inputs are re-read where they are needed again rather
    # than held. An offline sm_90a compile (bf16, gated, 4 warps) of the version that held dK and the inputs
    # in registers spilled 1.2 KB per thread at N = 2048 and 4.4 KB / 7 KB (stores / loads) at N = 4096;
    # this one, at one_program_warps(N), spills nothing at N <= 2048.
    h = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    m = t < L
    d = tl.load(d_ptr + h).to(tl.float32)
    kr_ptr += h * (N1 * N2)
    ki_ptr += h * (N1 * N2)
    dkr_ptr += h * (N1 * N2)
    dki_ptr += h * (N1 * N2)
    tl.store(dkr_ptr + t, tl.zeros((N1, N2), dtype=tl.float32))
    tl.store(dki_ptr + t, tl.zeros((N1, N2), dtype=tl.float32))
    dd = tl.zeros((1,), dtype=tl.float32)
    p1 = sc_ptr + h * (SC_K + 2)                          # short-conv parameters of x1, x2, v (SC_K > 0)
    p2 = p1 + sc_s
    pv = p1 + 2 * sc_s
    # Per-sample pointers advance by the batch strides (64-bit pointer arithmetic: b * stride can pass 2^31).
    v_ptr += h * s_vh
    x1_ptr += h * s_x1h
    x2_ptr += h * s_x2h
    dy_ptr += h * s_dyh
    dv_ptr += h * s_gh
    dx1_ptr += h * s_gh
    dx2_ptr += h * s_gh
    seed_ptr += h
    for bi in range(B):
        u = _load_act(v_ptr, t, m, L, pv, SC_K)
        if GATE_IN:
            u = u * _load_act(x1_ptr, t, m, L, p1, SC_K)
        u = _dropped(u, seed_ptr, bi, t, L, p_drop, DROP)
        gc = tl.load(dy_ptr + t, mask=m, other=0.0).to(tl.float32)
        if GATE_OUT:
            gc = gc * _load_act(x2_ptr, t, m, L, p2, SC_K)
        dd += tl.sum(tl.sum(gc * u, axis=1), axis=0)
        ur, ui = _fft(u, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2, PREC)
        gr, gi = _fft(gc, f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2, PREC)
        tl.store(dkr_ptr + t, tl.load(dkr_ptr + t) + (ur * gr + ui * gi))
        tl.store(dki_ptr + t, tl.load(dki_ptr + t) + (ur * gi - ui * gr))
        kr = tl.load(kr_ptr + t)
        ki = tl.load(ki_ptr + t)
        if GATE_OUT:
            c = _ifft_real(ur * kr - ui * ki, ur * ki + ui * kr,
                           f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2, PREC) + d * u
            dy = tl.load(dy_ptr + t, mask=m, other=0.0).to(tl.float32)
            tl.store(dx2_ptr + t, (dy * c).to(dx2_ptr.dtype.element_ty), mask=m)
        du = _ifft_real(gr * kr + gi * ki, gi * kr - gr * ki,
                        f1r_ptr, f1i_ptr, f2r_ptr, f2i_ptr, tr_ptr, ti_ptr, N1, N2, PREC) + d * gc
        du = _dropped(du, seed_ptr, bi, t, L, p_drop, DROP)   # through the dropout to v ⊙ x1
        if GATE_IN:
            x1 = _load_act(x1_ptr, t, m, L, p1, SC_K)
            tl.store(dv_ptr + t, (du * x1).to(dv_ptr.dtype.element_ty), mask=m)
            v = _load_act(v_ptr, t, m, L, pv, SC_K)
            tl.store(dx1_ptr + t, (du * v).to(dx1_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(dv_ptr + t, du.to(dv_ptr.dtype.element_ty), mask=m)
        v_ptr += s_vb
        x1_ptr += s_x1b
        x2_ptr += s_x2b
        dy_ptr += s_dyb
        dv_ptr += s_gb
        dx1_ptr += s_gb
        dx2_ptr += s_gb
    scale = 1.0 / (N1 * N2)
    tl.store(dkr_ptr + t, tl.load(dkr_ptr + t) * scale)
    tl.store(dki_ptr + t, tl.load(dki_ptr + t) * scale)
    tl.store(dd_ptr + h + tl.arange(0, 1), dd)


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def placeholder(x: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """x, or `stand_in` for an absent gate or addend: the kernel still takes a pointer (and strides) but
    never dereferences it (GATE_IN / GATE_OUT / ADD false)."""
    return x if x is not None else stand_in


def _seq_view(x: torch.Tensor) -> torch.Tensor:
    """The kernels index (B, H, L) tensors with batch/channel strides and a unit time stride."""
    return x if x.stride(-1) == 1 else x.contiguous()


def save_spectrum(ctx, spec_re: torch.Tensor, spec_im: torch.Tensor, taps) -> tuple:
    """What a kernel op keeps of its spectrum for the backward: the spectrum itself, or - given the filter
    taps (k_fwd, k_rev) it was computed from (monarch_kernel_spectrum) - only those, (H, L) each instead of
    2 x (H, N) fp32 with N >= 2L, at the cost of one more kernel FFT in the backward. Returns the tensors for
    save_for_backward; `saved_spectrum` undoes it."""
    ctx.fft_size = spec_re.shape[-1]
    if taps is None:
        return spec_re, spec_im, None, None
    k_fwd, k_rev = taps
    return None, None, k_fwd.detach(), (k_rev.detach() if k_rev is not None else None)


def saved_spectrum(ctx, spec_re, spec_im, k_fwd, k_rev) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectrum `save_spectrum` kept, or recomputed from the taps (the same values: the same FFT)."""
    if spec_re is not None:
        return spec_re, spec_im
    with torch.no_grad():
        return monarch_kernel_spectrum(k_fwd, k_rev, ctx.fft_size)


def check_taps(taps, spec_re: torch.Tensor) -> None:
    """Taps must be the (H, L) filter the (H, N) spectrum was made from (shape-checked; values trusted)."""
    if taps is None:
        return
    k_fwd, k_rev = taps
    H, n = spec_re.shape
    for k in (k_fwd, k_rev):
        if k is not None and (k.dim() != 2 or k.shape[0] != H or 2 * k.shape[1] > n):
            raise ValueError(f"taps of shape {tuple(k.shape)} cannot have made a ({H}, {n}) kernel spectrum")


class _GatedFFTConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, x1, x2, spec_re, spec_im, skip, addend, grad_wanted, taps):
        v = _seq_view(v)
        x1 = _seq_view(x1) if x1 is not None else None
        x2 = _seq_view(x2) if x2 is not None else None
        addend = _seq_view(addend) if addend is not None else None
        spec_re, spec_im = spec_re.contiguous(), spec_im.contiguous()
        skip = skip.contiguous()
        ctx.addend_dtype = addend.dtype if addend is not None else None
        # The layout is read once, here: the backward must use the one the spectrum was permuted for.
        ctx.one_program = _one_program(spec_re.shape[-1])
        y, conv = launch_forward(ctx.one_program, v, x1, x2, spec_re, spec_im, skip, addend, save_conv=grad_wanted)
        ctx.save_for_backward(v, x1, x2, skip, conv, *save_spectrum(ctx, spec_re, spec_im, taps))
        return y

    @staticmethod
    def backward(ctx, dy):
        v, x1, x2, skip, conv, *kept = ctx.saved_tensors
        spec_re, spec_im = saved_spectrum(ctx, *kept)
        n = spec_re.shape[-1]
        # The addend passes straight through: its gradient is dy itself (no copy).
        d_addend = dy.to(ctx.addend_dtype) if ctx.addend_dtype is not None else None
        dy = _seq_view(dy)
        if (n, _device_name(v)) not in _TOO_LARGE:
            try:
                return (*launch_backward(ctx.one_program, dy, v, x1, x2, spec_re, spec_im, skip, conv), d_addend,
                        None, None)
            except _RESOURCE_ERRORS as err:
                _give_up_on(n, v, err)
        return (*_reference_backward(dy, v, x1, x2, spec_re, spec_im, skip), d_addend, None, None)


def _one_program(n: int) -> bool:
    """Whether FFT size n runs as one program per sequence (here) or in rows (kernels/fftconv_long.py)."""
    return fft_layout(n)[0] == 1


def launch_forward(one_program: bool, v, x1, x2, spec_re, spec_im, skip, addend=None, save_conv: bool = False,
                   front=None, drop=None):
    """(y, c) from the forward kernels of the layout: one program per sequence (here) or three levels
    (fftconv_long.forward). c, the pre-gate output, comes only from the single-pass three-level kernels when
    save_conv: they keep it for dx2 (one (B, H, L) activation) rather than recompute it through a scratch
    buffer in the backward. `front` / `drop`: the short conv and dropout inside the kernels (front_args,
    drop_args)."""
    if one_program:
        return _launch_fwd(v, x1, x2, spec_re, spec_im, skip, addend, front=front, drop=drop), None
    from . import fftconv_long
    return fftconv_long.forward(v, x1, x2, spec_re, spec_im, skip, addend, save_conv=save_conv, front=front,
                                drop=drop)


def launch_backward(one_program: bool, dy, v, x1, x2, spec_re, spec_im, skip, conv=None, front=None, grads=None,
                    drop=None):
    """(dv, dx1, dx2, d spec_re, d spec_im, d skip) from the backward kernels of the forward's layout; `conv`
    the forward's c, `grads` optional input-gradient buffers (input_grads)."""
    if one_program:
        return _launch_bwd(dy, v, x1, x2, spec_re, spec_im, skip, front=front, grads=grads, drop=drop)
    from . import fftconv_long
    return fftconv_long.backward(dy, v, x1, x2, spec_re, spec_im, skip, conv, front=front, grads=grads, drop=drop)


def front_args(front: torch.Tensor | None, stand_in: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(parameter tensor, stream stride, SC_K) kernel arguments for the short conv in front: `front` is the
    packed (3, H, K + 2) fp32 parameters of x1, x2, v (kernels/fftconv_front.py), None for none (SC_K = 0,
    the pointer never read)."""
    if front is None:
        return stand_in, 0, 0
    return front, front.stride(0), front.shape[-1] - 2


def drop_args(drop: tuple[torch.Tensor, float] | None, stand_in: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(seed tensor, p, DROP) kernel arguments for dropout on v ⊙ x1 inside the kernels: `drop` is (seeds,
    p), one int64 seed per channel (kernels/fftconv_front.py), None for no dropout."""
    if drop is None:
        return stand_in, 0.0, False
    seeds, p = drop
    return seeds, float(p), True


def _launch_fwd(v, x1, x2, spec_re, spec_im, skip, addend=None, front=None, drop=None):
    B, H, L = v.shape
    n = spec_re.shape[-1]
    n1, n2 = split_fft_size(n)
    factors = dft_factors(n, v.device)
    y = torch.empty(B, H, L, dtype=v.dtype, device=v.device)
    a1, a2, ad = placeholder(x1, v), placeholder(x2, v), placeholder(addend, v)
    sc, sc_s, sc_k = front_args(front, spec_re)
    seeds, p_drop, dropping = drop_args(drop, spec_re)
    with on_device_of(v):
        _fftconv_fwd_kernel[(B, H)](
            v, a1, a2, y, ad, spec_re, spec_im, skip, *factors, sc, sc_s, seeds, p_drop,
            L, v.stride(0), v.stride(1), a1.stride(0), a1.stride(1), a2.stride(0), a2.stride(1),
            y.stride(0), y.stride(1), ad.stride(0), ad.stride(1),
            N1=n1, N2=n2, GATE_IN=x1 is not None, GATE_OUT=x2 is not None, ADD=addend is not None,
            SC_K=sc_k, DROP=dropping, PREC=_precision(v.dtype),
            num_warps=one_program_warps(n), num_stages=NUM_STAGES)
    return y


def input_grads(v, x1, x2, grads=None):
    """(dv, dx1, dx2) buffers for a backward: `grads` when given (views sharing one contiguous-in-time
    layout, e.g. slices of one (B, 3H, L) tensor), else fresh contiguous (B, H, L) tensors; None for an
    absent gate."""
    if grads is not None:
        dv, dx1, dx2 = grads
        if dx1 is not None and dx1.stride() != dv.stride() or dx2 is not None and dx2.stride() != dv.stride():
            raise ValueError("the input-gradient buffers must share one layout")
        return dv, dx1, dx2
    B, H, L = v.shape
    dv = torch.empty(B, H, L, dtype=v.dtype, device=v.device)
    return dv, torch.empty_like(dv) if x1 is not None else None, torch.empty_like(dv) if x2 is not None else None


def _launch_bwd(dy, v, x1, x2, spec_re, spec_im, skip, front=None, grads=None, drop=None):
    B, H, L = v.shape
    n = spec_re.shape[-1]
    n1, n2 = split_fft_size(n)
    dv, dx1, dx2 = input_grads(v, x1, x2, grads)
    dkr = torch.empty_like(spec_re)
    dki = torch.empty_like(spec_im)
    dd = torch.empty(H, dtype=torch.float32, device=v.device)
    a1, a2 = placeholder(x1, v), placeholder(x2, v)
    sc, sc_s, sc_k = front_args(front, spec_re)
    seeds, p_drop, dropping = drop_args(drop, spec_re)
    with on_device_of(v):
        _fftconv_bwd_kernel[(H,)](
            dy, v, a1, a2, spec_re, spec_im, skip,
            dv, placeholder(dx1, dv), placeholder(dx2, dv), dkr, dki, dd,
            *dft_factors(n, v.device), sc, sc_s, seeds, p_drop,
            B, L, dy.stride(0), dy.stride(1), v.stride(0), v.stride(1), a1.stride(0), a1.stride(1),
            a2.stride(0), a2.stride(1), dv.stride(0), dv.stride(1),
            N1=n1, N2=n2, GATE_IN=x1 is not None, GATE_OUT=x2 is not None, SC_K=sc_k, DROP=dropping,
            PREC=_precision(v.dtype), num_warps=one_program_warps(n), num_stages=NUM_STAGES)
    return dv, dx1, dx2, dkr, dki, dd.to(skip.dtype)


def _device_name(x: torch.Tensor) -> str:
    return torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"


def _give_up_on(n: int, x: torch.Tensor, err: Exception) -> None:
    _TOO_LARGE.add((n, _device_name(x)))
    warnings.warn(f"fused FFT conv: FFT size {n} does not fit on {_device_name(x)} ({type(err).__name__}: "
                  f"{str(err)[:200]}); this size runs the torch path from now on", stacklevel=3)


def _reference_backward(dy, v, x1, x2, spec_re, spec_im, skip):
    """Gradients by autograd through the torch reference (used only when the backward kernel cannot be
    compiled for this size on this GPU)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None
                  for t in (v, x1, x2, spec_re, spec_im, skip)]
        lv, l1, l2, lre, lim, ls = leaves
        y = gated_fft_conv_reference(lv, lre, lim, ls, l1, l2)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, wanted, dy))
    return tuple(next(grads) if t is not None else None for t in leaves)


def unsupported_reason(v: torch.Tensor, spec_re: torch.Tensor | None = None) -> str | None:
    """Why the fused kernel cannot take this input (None when it can). The caller falls back to torch."""
    if v.dim() != 3:
        return f"expected a (batch, channels, length) input, got shape {tuple(v.shape)}"
    if v.dtype not in KERNEL_DTYPES:
        return f"{v.dtype} activations (the kernel takes fp32/bf16/fp16; fp64 runs the torch reference)"
    n = kernel_fft_size(v.shape[-1])
    if n > MAX_FFT_SIZE:
        return (f"sequence length {v.shape[-1]} needs an FFT of size {n} > {MAX_FFT_SIZE} (fft_monarch.MAX_FFT_SIZE: "
                "the three-level kernels re-read R/2 input rows per row program, a cost growing with N)")
    if spec_re is not None and spec_re.shape[-1] != n:
        return f"spectrum length {spec_re.shape[-1]} is not kernel_fft_size(L) = {n}"
    if not v.is_cuda and not INTERPRET:
        return "a CPU tensor without TRITON_INTERPRET=1"
    if (n, _device_name(v)) in _TOO_LARGE:
        return f"FFT size {n} did not fit in registers/shared memory on {_device_name(v)} (see earlier warning)"
    return None


def gated_fft_conv(v: torch.Tensor, spec_re: torch.Tensor, spec_im: torch.Tensor, skip: torch.Tensor,
                   gate_in: torch.Tensor | None = None, gate_out: torch.Tensor | None = None,
                   addend: torch.Tensor | None = None, taps: tuple | None = None) -> torch.Tensor:
    """y = (conv(u, k) + skip ⊙ u) [⊙ gate_out] [+ addend] with u = v [⊙ gate_in], all (B, H, L); the
    kernel given by its permuted fp32 spectrum (spec_re, spec_im), each (H, kernel_fft_size(L)) from
    fft_monarch.monarch_kernel_spectrum. `addend` (a second branch's output, e.g. the mixer's other long
    conv) is added as the result is stored, saving a separate read-read-write pass; the result has v's
    dtype. `taps`: the (k_fwd, k_rev) the spectrum was computed from; then the backward recomputes the
    spectrum from them instead of keeping it (`save_spectrum`). Differentiable in every tensor argument.
    Falls back to the torch reference (`gated_fft_conv_reference`) for inputs the kernel does not take,
    with a warning naming why."""
    if addend is not None and addend.shape != v.shape:
        raise ValueError(f"addend shape {tuple(addend.shape)} differs from the input's {tuple(v.shape)}")
    check_taps(taps, spec_re)
    if addend is not None and torch.promote_types(addend.dtype, v.dtype) != v.dtype:
        # The sum must take the wider dtype, which the kernel (storing in v's dtype) would not.
        return gated_fft_conv(v, spec_re, spec_im, skip, gate_in, gate_out, taps=taps) + addend
    reason = unsupported_reason(v, spec_re)
    if reason is not None:
        warnings.warn(f"fused FFT conv falls back to torch: {reason}", stacklevel=2)
        return gated_fft_conv_reference(v, spec_re, spec_im, skip, gate_in, gate_out, addend)
    # Whether autograd will ask for a backward: decided here, since inside forward grad mode is off and
    # ctx.needs_input_grad is True under no_grad too (a no-grad forward must not keep tensors for it).
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (v, gate_in, gate_out, spec_re, spec_im, skip, addend))
    try:
        return _GatedFFTConv.apply(v, gate_in, gate_out, spec_re, spec_im, skip, addend, grad_wanted, taps)
    except _RESOURCE_ERRORS as err:
        _give_up_on(spec_re.shape[-1], v, err)
        return gated_fft_conv_reference(v, spec_re, spec_im, skip, gate_in, gate_out, addend)


def gated_fft_conv_reference(v, spec_re, spec_im, skip, gate_in=None, gate_out=None, addend=None
                             ) -> torch.Tensor:
    """The same function with torch.fft on the permuted spectrum (full complex FFTs, fp32): the fallback."""
    L = v.shape[-1]
    n = spec_re.shape[-1]
    u = v * gate_in if gate_in is not None else v
    with torch.autocast(device_type=v.device.type, enabled=False):
        spec = natural_spectrum(torch.complex(spec_re, spec_im), n)
        c = torch.fft.ifft(torch.fft.fft(u.to(torch.float32), n=n) * spec, n=n).real[..., :L]
    y = c.to(v.dtype) + u * skip.to(v.dtype)[:, None]
    y = y * gate_out if gate_out is not None else y
    return y + addend if addend is not None else y


def fused_long_conv(v: torch.Tensor, k_fwd: torch.Tensor, k_rev: torch.Tensor | None, skip: torch.Tensor,
                    gate_in: torch.Tensor | None = None, gate_out: torch.Tensor | None = None,
                    addend: torch.Tensor | None = None) -> torch.Tensor:
    """Convenience: `gated_fft_conv` from the filter taps k_fwd (and k_rev when bidirectional), both (H, L);
    the spectrum is computed here with torch (see monarch_kernel_spectrum)."""
    n = kernel_fft_size(v.shape[-1])
    spec_re, spec_im = monarch_kernel_spectrum(k_fwd, k_rev, n)
    return gated_fft_conv(v, spec_re, spec_im, skip, gate_in, gate_out, addend, taps=(k_fwd, k_rev))


__all__ = ["KERNEL_DTYPES", "unsupported_reason", "gated_fft_conv", "gated_fft_conv_reference",
           "fused_long_conv"]
