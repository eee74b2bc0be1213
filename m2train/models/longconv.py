"""Long convolution by FFT, causal or bidirectional (DESIGN.md §4.2).

Causal:        y[n] = Σ_{i≤n} k[n-i]·v[i]
Bidirectional: y[n] = Σ_{i≤n} k_fwd[n-i]·v[i] + Σ_{i>n} k_rev[i-n-1]·v[i]

Both are linear (not circular) convolutions: any FFT size N ≥ 2L gives the same result, so we take the
next power of two (fast radix-2 paths) instead of the reference's 2L. The kernel spectrum is computed once
per forward and broadcast over the batch. FFTs run in fp32 (or fp64 for fp64 inputs) even under bf16
autocast, because torch.fft rejects bf16 and the reduced precision would hurt long filters anyway.
"""

from __future__ import annotations

import torch


def fft_size(L: int) -> int:
    """Smallest power of two ≥ 2L: a linear convolution of two length-L signals without wrap-around."""
    return 1 << (2 * L - 1).bit_length()


def fft_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_spectrum(k_fwd: torch.Tensor, k_rev: torch.Tensor | None, n: int) -> torch.Tensor:
    """rfft of the length-n circular kernel: k_fwd at taps 0..L-1 and, for a bidirectional filter,
    k_rev[j] at tap n-1-j (i.e. lag -(j+1)). Shapes (H, L) -> (H, n//2 + 1) complex."""
    H, L = k_fwd.shape
    dtype = fft_dtype(k_fwd.dtype)
    with torch.autocast(device_type=k_fwd.device.type, enabled=False):
        kernel = k_fwd.to(dtype)
        if k_rev is not None:
            pad = torch.zeros(H, n - 2 * L, dtype=dtype, device=k_fwd.device)
            kernel = torch.cat([kernel, pad, k_rev.to(dtype).flip(-1)], dim=-1)
        return torch.fft.rfft(kernel, n=n)


def fft_conv(v: torch.Tensor, k_spec: torch.Tensor, n: int) -> torch.Tensor:
    """Convolve v (..., H, L) with a kernel spectrum (H, n//2+1); returns (..., H, L) in v's dtype."""
    L = v.shape[-1]
    with torch.autocast(device_type=v.device.type, enabled=False):
        v_f = torch.fft.rfft(v.to(fft_dtype(v.dtype)), n=n)
        y = torch.fft.irfft(v_f * k_spec, n=n)[..., :L]
    return y.to(v.dtype)


def long_conv(v: torch.Tensor, k_fwd: torch.Tensor, k_rev: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (k_rev None) or bidirectional long convolution of v (..., H, L) with kernels (H, L)."""
    n = fft_size(v.shape[-1])
    return fft_conv(v, kernel_spectrum(k_fwd, k_rev, n), n)


def padded_fft_conv(x_padded: torch.Tensor, k_spec: torch.Tensor) -> torch.Tensor:
    """Circular convolution of x_padded (..., H, n), already zero-padded (x in the first L ≤ n/2 taps), with
    a kernel spectrum (H, n//2+1); returns the full (..., H, n) result, of which [..., :L] is the linear
    convolution. For no-grad fast paths: the caller pads into a reused buffer (torch.fft would otherwise
    allocate and copy a padded input) and the spectrum product is done in place. Same dtype in and out
    (fp32 or fp64)."""
    return torch.fft.irfft(torch.fft.rfft(x_padded).mul_(k_spec), n=x_padded.shape[-1])
