"""The DFT as an order-2 Monarch matrix (four-step FFT), the factorisation the fused FFT convolution uses.

Write the FFT size N = N1·N2 and the time index n = N2·n1 + n2 (a row-major (N1, N2) view of the signal)
and the frequency index k = k1 + N1·k2. Then ω_N^{nk} = ω_N1^{n1·k1} · ω_N^{n2·k1} · ω_N2^{n2·k2}, so

    X[k1, k2] = Σ_n2 ( T[k1, n2] · Σ_n1 F1[k1, n1] · x[n1, n2] ) · F2[n2, k2]
              = ((F1 @ x) ⊙ T) @ F2

with F1, F2 the dense N1- and N2-point DFT matrices and T the twiddles ω_N^{k1·n2}: two small dense matrix
products (tensor-core GEMMs on a GPU) and a pointwise multiply, no data movement at all. The result comes
out as a (N1, N2) matrix indexed [k1, k2], i.e. frequency k1 + N1·k2 sits at flat position k1·N2 + k2: a
permuted frequency order. A convolution never needs the natural order - it multiplies by the kernel
spectrum pointwise and transforms back with the conjugate factors in reverse order - so the kernel spectrum
is simply stored in the same permuted order (`permuted_spectrum`).

The inverse (for real output): x = Re( conj(F1) @ ((X @ conj(F2)) ⊙ conj(T)) ) / N.

Longer sequences (N > ONE_PROGRAM_MAX_FFT) add a third level: N = R·M with M = ROW_FFT_SIZE = M1·M2, the
time index n = M·r + m and the frequency index k = k_r + R·k_m, so that

    X[k_r, k_m] = DFT_M( ω_N^{m·k_r} · Σ_r ω_R^{r·k_r} · x[r, m] )[k_m]

i.e. an R-point DFT across the rows (a "column" step, R small), a twiddle ω_N^{m·k_r}, then an M-point
DFT of each row, done as above. Row k_r's spectrum is stored at positions k_r·M + (k1·M2 + k2), which holds
frequency k_r + R·(k1 + M1·k2). kernels/fftconv_long.py runs this with one program per row (the rows do not
fit one program together) and the inverse column step as a separate pass through global memory.

Everything here is plain torch: the factors are computed once per (N, device) in fp64 and rounded to fp32
(more accurate than evaluating sin/cos in fp32 inside a kernel), and `monarch_dft` / `monarch_idft_real`
are torch versions of exactly what the Triton kernel does, for tests and for reading.
"""

from __future__ import annotations

import functools
import math

import torch

# Smallest DFT factor: a tl.dot tile on a real GPU needs every dimension >= 16.
MIN_FACTOR = 16
# The largest FFT size the one-program-per-sequence kernel (kernels/fftconv.py) takes (L <= 1024). Measured
# by compiling the kernels for sm_90a offline (Triton 3.8 + ptxas, bf16, gated): up to N = 2048 neither
# direction spills a register at 8 warps; at N = 4096 the backward spills ~3 KB / 5 KB per thread (stores /
# loads, 4 or 8 warps: four 64 x 64 complex spectra are live) while the three-level kernels at N = 4096
# (R = 2 rows of 2048) spill nothing, and N = 8192 needs 256 KiB of shared memory (> 227 KiB per H100/H200
# SM). So from N = 4096 on the three-level layout runs (kernels/fftconv_long.py); kernels/bench.py still
# times both layouts at N = 4096 (L = 2048), where the one-program kernel can run.
ONE_PROGRAM_MAX_FFT = 2048
# The row length M of the three-level layout: one program transforms one complex row of M points.
ROW_FFT_SIZE = 2048
# The longest FFT the fused kernels take (L <= 65,536). Each row program of the three-level kernels re-reads
# the R/2 non-zero input rows (R = N / ROW_FFT_SIZE), so their cost grows with R; beyond this the torch
# path runs.
MAX_FFT_SIZE = 1 << 17
MIN_FFT_SIZE = MIN_FACTOR * MIN_FACTOR


def kernel_fft_size(L: int) -> int:
    """The FFT size the fused kernel uses for sequences of length L: the smallest power of two >= 2L
    (a linear, not circular, convolution) and at least 256 (two 16-point factors). Any N >= 2L gives the
    same convolution, so padding further for short sequences changes nothing but the work."""
    return max(MIN_FFT_SIZE, 1 << (2 * L - 1).bit_length())


def split_fft_size(n: int) -> tuple[int, int]:
    """N = N1·N2 with N1 <= N2 as square as possible (both powers of two)."""
    if n < MIN_FFT_SIZE or n & (n - 1):
        raise ValueError(f"FFT size {n} must be a power of two >= {MIN_FFT_SIZE}")
    log = n.bit_length() - 1
    n1 = 1 << (log // 2)
    return n1, n // n1


def fft_layout(n: int) -> tuple[int, int, int]:
    """(R, M1, M2) with N = R·M1·M2: R = 1 (one program per sequence) up to ONE_PROGRAM_MAX_FFT, else rows
    of M = ROW_FFT_SIZE points. Read at call time, so the spectrum layout and the kernels always agree."""
    if n <= ONE_PROGRAM_MAX_FFT:
        return (1, *split_fft_size(n))
    m = min(ROW_FFT_SIZE, n)
    split_fft_size(m)                       # validates the row size
    if n % m or n & (n - 1):
        raise ValueError(f"FFT size {n} must be a power of two and a multiple of the row size {m}")
    return (n // m, *split_fft_size(m))


def _dft_matrix(m: int) -> torch.Tensor:
    idx = torch.arange(m, dtype=torch.int64)
    # Reduce k·n mod m in integers so the angle stays small and exact before the trig functions.
    return torch.exp(-2j * math.pi * ((idx[:, None] * idx[None, :]) % m).to(torch.float64) / m)


@functools.lru_cache(maxsize=32)
def _factors_cached(n: int, device: str) -> tuple[torch.Tensor, ...]:
    n1, n2 = split_fft_size(n)
    f1, f2 = _dft_matrix(n1), _dft_matrix(n2)
    k1 = torch.arange(n1, dtype=torch.int64)[:, None]
    n2_idx = torch.arange(n2, dtype=torch.int64)[None, :]
    tw = torch.exp(-2j * math.pi * ((k1 * n2_idx) % n).to(torch.float64) / n)
    out = []
    for m in (f1, f2, tw):
        out += [m.real.to(torch.float32).contiguous().to(device), m.imag.to(torch.float32).contiguous().to(device)]
    return tuple(out)


def dft_factors(n: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(F1 re, F1 im, F2 re, F2 im, T re, T im) in fp32 on `device`: F1 (N1, N1), F2 (N2, N2), T (N1, N2).
    Cached per (N, device); treat them as read-only."""
    return _factors_cached(n, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _outer_cached(n: int, r: int, device: str) -> tuple[torch.Tensor, ...]:
    m = n // r
    fr = _dft_matrix(r)
    kr = torch.arange(r, dtype=torch.int64)[:, None]
    m_idx = torch.arange(m, dtype=torch.int64)[None, :]
    tw = torch.exp(-2j * math.pi * ((kr * m_idx) % n).to(torch.float64) / n)
    out = []
    for t in (fr, tw):
        out += [t.real.to(torch.float32).contiguous().to(device), t.imag.to(torch.float32).contiguous().to(device)]
    return tuple(out)


def outer_factors(n: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """The three-level layout's column step, fp32 on `device`: (F_R re, F_R im) the R-point DFT matrix
    (R, R) and (W re, W im) the twiddles ω_N^{k_r·m}, (R, M). Cached; read-only."""
    r, m1, m2 = fft_layout(n)
    if r == 1:
        raise ValueError(f"FFT size {n} runs in one program (no column step)")
    return _outer_cached(n, r, str(torch.device(device)))


def permuted_spectrum(spec: torch.Tensor, n: int) -> torch.Tensor:
    """A full length-n spectrum (..., n) in natural frequency order -> (..., n) in the kernels' order:
    flat position k_r·M + k1·M2 + k2 holds frequency k_r + R·(k1 + M1·k2) (fft_layout; R = 1 gives
    position k1·N2 + k2 for frequency k1 + N1·k2). Differentiable (a view + copy)."""
    r, m1, m2 = fft_layout(n)
    return spec.unflatten(-1, (m2, m1, r)).permute(*range(spec.dim() - 1), -1, -2, -3).flatten(-3)


def natural_spectrum(spec: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `permuted_spectrum`."""
    r, m1, m2 = fft_layout(n)
    return spec.unflatten(-1, (r, m1, m2)).permute(*range(spec.dim() - 1), -1, -2, -3).flatten(-3)


def monarch_kernel_spectrum(k_fwd: torch.Tensor, k_rev: torch.Tensor | None, n: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts, fp32 (H, n) in permuted order, of the full DFT of the length-n circular
    kernel: k_fwd at taps 0..L-1 (zero padded: a causal linear convolution) and, when bidirectional,
    k_rev[j] at tap n-1-j (DESIGN.md §4.2). Computed with torch so the gradient flows back into the
    implicit filter through torch.fft."""
    H, L = k_fwd.shape
    with torch.autocast(device_type=k_fwd.device.type, enabled=False):
        kernel = k_fwd.to(torch.float32)
        if k_rev is not None:
            pad = torch.zeros(H, n - 2 * L, dtype=torch.float32, device=k_fwd.device)
            kernel = torch.cat([kernel, pad, k_rev.to(torch.float32).flip(-1)], dim=-1)
        # A complex input: the real-input FFT's autograd node would keep its zero-padded (H, n) fp32 input
        # for the backward (only its size is used), as much memory as one of the two spectra themselves.
        spec = permuted_spectrum(torch.fft.fft(kernel.to(torch.complex64), n=n), n)
        # Contiguous once here: the kernels need it, and a cached spectrum would otherwise be copied again
        # (two (H, n) fp32 copies) by every forward that uses it.
        return spec.real.contiguous(), spec.imag.contiguous()


def _complex_factors(m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F1, F2 and T of `dft_factors` as complex tensors (the torch models below)."""
    f1r, f1i, f2r, f2i, tr, ti = dft_factors(m, device)
    return torch.complex(f1r, f1i), torch.complex(f2r, f2i), torch.complex(tr, ti)


def _row_dft(z: torch.Tensor, m: int) -> torch.Tensor:
    """Complex (..., m) rows, natural order -> their m-point DFTs in permuted order ((F1 @ z) ⊙ T) @ F2."""
    m1, m2 = split_fft_size(m)
    f1, f2, tw = _complex_factors(m, z.device)
    a = z.unflatten(-1, (m1, m2)).to(f1.dtype)
    return ((f1 @ a) * tw @ f2).flatten(-2)


def _row_idft(z: torch.Tensor, m: int) -> torch.Tensor:
    """Permuted m-point spectra (..., m) -> complex rows: conj(F1) @ ((Z @ conj(F2)) ⊙ conj(T)) / m."""
    m1, m2 = split_fft_size(m)
    f1, f2, tw = _complex_factors(m, z.device)
    w = (z.unflatten(-1, (m1, m2)) @ f2.conj()) * tw.conj()
    return (f1.conj() @ w).flatten(-2) / m


def monarch_dft(x: torch.Tensor, n: int) -> torch.Tensor:
    """Torch model of the kernels' forward transform: real x (..., L <= n) -> complex (..., n) spectrum of
    the zero-padded signal in permuted order (fft_layout)."""
    r, m1, m2 = fft_layout(n)
    a = torch.nn.functional.pad(x.to(torch.float32), (0, n - x.shape[-1])).to(torch.complex64)
    if r == 1:
        return _row_dft(a, n)
    frr, fri, twr, twi = outer_factors(n, x.device)
    rows = (torch.complex(frr, fri) @ a.unflatten(-1, (r, m1 * m2))) * torch.complex(twr, twi)   # column step
    return _row_dft(rows, m1 * m2).flatten(-2)


def monarch_idft_real(z: torch.Tensor, n: int) -> torch.Tensor:
    """Torch model of the kernels' inverse transform: permuted spectrum (..., n) -> real signal (..., n)."""
    r, m1, m2 = fft_layout(n)
    if r == 1:
        return _row_idft(z, n).real
    frr, fri, twr, twi = outer_factors(n, z.device)
    rows = _row_idft(z.unflatten(-1, (r, m1 * m2)), m1 * m2) * torch.complex(twr, twi).conj()
    return (torch.complex(frr, fri).conj() @ rows).real.flatten(-2) / r


__all__ = ["MIN_FACTOR", "MIN_FFT_SIZE", "ONE_PROGRAM_MAX_FFT", "ROW_FFT_SIZE", "MAX_FFT_SIZE", "kernel_fft_size",
           "split_fft_size", "fft_layout", "dft_factors", "outer_factors", "permuted_spectrum", "natural_spectrum",
           "monarch_kernel_spectrum", "monarch_dft", "monarch_idft_real"]
