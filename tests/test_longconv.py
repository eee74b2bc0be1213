"""The FFT long convolution equals a direct O(L²) evaluation of the formulas in DESIGN.md §4.2."""

import pytest
import torch

from m2train.models.longconv import fft_size, long_conv


def direct_conv(v, k_fwd, k_rev=None):
    """y[n] = Σ_{i≤n} k_fwd[n-i]·v[i] + Σ_{i>n} k_rev[i-n-1]·v[i]."""
    B, H, L = v.shape
    y = torch.zeros_like(v)
    for n in range(L):
        for i in range(L):
            if i <= n:
                y[..., n] += k_fwd[:, n - i] * v[..., i]
            elif k_rev is not None:
                y[..., n] += k_rev[:, i - n - 1] * v[..., i]
    return y


@pytest.mark.parametrize("L", [1, 2, 7, 16, 33, 50])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_long_conv_equals_direct(L, bidirectional):
    H = 3
    v = torch.randn(2, H, L, dtype=torch.float64)
    k_fwd = torch.randn(H, L, dtype=torch.float64)
    k_rev = torch.randn(H, L, dtype=torch.float64) if bidirectional else None
    torch.testing.assert_close(long_conv(v, k_fwd, k_rev), direct_conv(v, k_fwd, k_rev), rtol=1e-10, atol=1e-10)


def test_reference_2L_kernel_layout():
    """The reference builds [k_fwd, 0_L] + [0_L, flip(k_rev)] and convolves circularly at size 2L."""
    H, L = 4, 12
    v = torch.randn(1, H, L, dtype=torch.float64)
    k_fwd = torch.randn(H, L, dtype=torch.float64)
    k_rev = torch.randn(H, L, dtype=torch.float64)
    kernel = torch.nn.functional.pad(k_fwd, (0, L)) + torch.nn.functional.pad(k_rev.flip(-1), (L, 0))
    y_ref = torch.fft.irfft(torch.fft.rfft(v, n=2 * L) * torch.fft.rfft(kernel, n=2 * L), n=2 * L)[..., :L]
    torch.testing.assert_close(long_conv(v, k_fwd, k_rev), y_ref, rtol=1e-10, atol=1e-10)


def test_fft_size_is_power_of_two_at_least_2L():
    for L in [1, 2, 3, 100, 128, 129, 4096, 5000]:
        n = fft_size(L)
        assert n >= 2 * L and n & (n - 1) == 0 and n < 4 * L


def test_bf16_input_runs_fft_in_fp32():
    v = torch.randn(2, 3, 20).bfloat16()
    k = torch.randn(3, 20)
    y = long_conv(v, k)
    assert y.dtype == torch.bfloat16
    ref = direct_conv(v.double(), k.double())
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2
