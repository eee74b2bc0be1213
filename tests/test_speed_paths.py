"""The no-grad fast paths (fused/chunked mixer, cached kernel spectra, chunked GLU, short conv) compute exactly
the reference math: checked in fp64 against direct O(L²) formulas and against the autograd path."""

import pytest
import torch
import torch.nn.functional as F

import m2train.models.glu as glu_mod
import m2train.models.mixer as mixer_mod
from m2train.models.glu import MonarchGLU
from m2train.models.longconv import fft_size, padded_fft_conv
from m2train.models.mixer import M2SequenceMixer
from m2train.models.short_conv import causal_short_conv


def direct_long_conv(v, k_fwd, k_rev=None):
    """y[n] = Σ_{i≤n} k_fwd[n-i]·v[i] + Σ_{i>n} k_rev[i-n-1]·v[i], as an explicit (L, L) Toeplitz matrix."""
    L = v.shape[-1]
    n = torch.arange(L)[:, None]
    i = torch.arange(L)[None, :]
    lag = n - i                                                       # (L, L)
    T = torch.where(lag >= 0, k_fwd[:, lag.clamp(min=0)], torch.zeros((), dtype=v.dtype))
    if k_rev is not None:
        T = T + torch.where(lag < 0, k_rev[:, (-lag - 1).clamp(min=0)], torch.zeros((), dtype=v.dtype))
    return torch.einsum("hni,bhi->bhn", T, v)                        # T (H, L, L)


def direct_mixer(mixer, u):
    """DESIGN.md §4.2 step by step, with the long convolutions as O(L²) sums (no FFT anywhere)."""
    H, L = mixer.hidden_size, u.shape[1]
    if mixer.input_norm is not None:
        u = mixer.input_norm(u)
    z = (u @ mixer.in_linear.weight.T + mixer.in_linear.bias).transpose(1, 2)
    ref_conv = torch.nn.functional.conv1d(z, mixer.short_conv.weight, mixer.short_conv.bias,
                                          padding=mixer.short_conv.kernel_size - 1, groups=3 * H)[..., :L]
    x1, x2, v = ref_conv.split(H, dim=1)
    v = v * x1
    k_fwd, k_rev = mixer.long_conv.filter(L)
    y = (direct_long_conv(v, k_fwd, k_rev) + mixer.long_conv.skip[:, None] * v) * x2
    if mixer.residual_conv is not None:
        u_t = u.transpose(1, 2)
        k2_fwd, k2_rev = mixer.residual_conv.filter(L)
        y = y + direct_long_conv(u_t, k2_fwd, k2_rev) + mixer.residual_conv.skip[:, None] * u_t
    return mixer.out_linear(y.transpose(1, 2))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks smaller than the channel / row counts, so that every loop runs several (and ragged) blocks."""
    monkeypatch.setattr(mixer_mod, "CHANNEL_CHUNK", 4)
    monkeypatch.setattr(glu_mod, "ROW_CHUNK", 5)


@pytest.mark.parametrize("L", [1, 2, 5, 16, 37])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padded_fft_conv_equals_direct(L, bidirectional):
    H, n = 3, fft_size(L)
    v = torch.randn(2, H, L, dtype=torch.float64)
    k_fwd = torch.randn(H, L, dtype=torch.float64)
    k_rev = torch.randn(H, L, dtype=torch.float64) if bidirectional else None
    kernel = torch.zeros(H, n, dtype=torch.float64)
    kernel[:, :L] = k_fwd
    if k_rev is not None:
        kernel[:, n - L:] = k_rev.flip(-1)
    padded = torch.zeros(2, H, n, dtype=torch.float64)
    padded[..., :L] = v
    y = padded_fft_conv(padded, torch.fft.rfft(kernel))[..., :L]
    torch.testing.assert_close(y, direct_long_conv(v, k_fwd, k_rev), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("input_norm", [True, False])
@pytest.mark.parametrize("L", [1, 2, 7, 24])
def test_fused_mixer_equals_direct_formula(small_chunks, bidirectional, residual, input_norm, L):
    torch.manual_seed(0)
    mixer = M2SequenceMixer(10, 32, bidirectional=bidirectional, residual_long_conv=residual,
                            input_norm=input_norm, filter_order=8).double().eval()
    u = torch.randn(3, L, 10, dtype=torch.float64)
    with torch.no_grad():
        assert mixer._can_fuse(u)
        fused = mixer(u)
        assert fused.dtype == torch.float64
        torch.testing.assert_close(fused, direct_mixer(mixer, u), rtol=1e-9, atol=1e-9)
    # the autograd (reference) path gives the same numbers
    torch.testing.assert_close(mixer(u), fused, rtol=1e-10, atol=1e-10)


def test_fused_path_fp32_matches_reference_path():
    torch.manual_seed(0)
    mixer = M2SequenceMixer(300, 64, bidirectional=True, input_norm=True, filter_order=16).eval()
    u = torch.randn(2, 64, 300)
    with torch.inference_mode():
        fused = mixer(u)                                   # 300 channels: a full and a ragged block
        ref = mixer._forward_reference(mixer.input_norm(u), None)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def test_fused_path_not_used_under_autograd_autocast_dropout_or_masking():
    mixer = M2SequenceMixer(8, 16, bidirectional=True, filter_order=8, dropout=0.1)
    u = torch.randn(2, 16, 8)
    assert not mixer._can_fuse(u)                            # grad mode on
    with torch.no_grad():
        assert not mixer.train()._can_fuse(u)                # active dropout
        assert mixer.eval()._can_fuse(u)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not mixer._can_fuse(u)
            y = mixer(u)                                     # bf16 autocast: FFTs still run in fp32
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        ref = mixer(u)
        # bf16 matmuls on unnormalised features: ~13% relative error, as before the fast paths existed
        assert ((y.float() - ref).norm() / ref.norm()) < 0.3


def test_spectrum_cache_reused_and_invalidated():
    torch.manual_seed(0)
    mixer = M2SequenceMixer(6, 32, bidirectional=True, filter_order=8).double().eval()
    conv = mixer.long_conv
    u = torch.randn(2, 20, 6, dtype=torch.float64)
    with torch.no_grad():
        y0 = mixer(u)
        spec = conv.spectrum(20)
        assert conv.spectrum(20) is spec                                 # reused while unchanged
        assert conv.spectrum(12) is not spec                             # other length: recomputed
        # an in-place parameter update (what an optimizer step does) must invalidate the cache
        conv.filter.mlp.out.weight.mul_(1.5)
        y1 = mixer(u)
        assert not torch.allclose(y0, y1)
        torch.testing.assert_close(y1, direct_mixer(mixer, u), rtol=1e-9, atol=1e-9)
        # so must a change of a buffer, the shared frequency, the positional features...
        for tensor in (conv.filter.sin.freq, conv.filter.z, conv.filter.deltas):
            before = mixer(u)
            tensor.add_(0.01)
            after = mixer(u)
            assert not torch.allclose(before, after)
            torch.testing.assert_close(after, direct_mixer(mixer, u), rtol=1e-9, atol=1e-9)
    # ... and load_state_dict, and a swap of .data
    other = M2SequenceMixer(6, 32, bidirectional=True, filter_order=8).double().eval()
    with torch.no_grad():
        mixer.load_state_dict(other.state_dict())
        torch.testing.assert_close(mixer(u), other(u), rtol=1e-10, atol=1e-10)
        conv.filter.mlp.linears[0].weight.data = torch.randn_like(conv.filter.mlp.linears[0].weight)
        torch.testing.assert_close(mixer(u), direct_mixer(mixer, u), rtol=1e-9, atol=1e-9)
    # with autograd on, the spectrum is always rebuilt from the parameters, so gradients reach them
    mixer.train()
    mixer(u).sum().backward()
    assert conv.filter.mlp.out.weight.grad is not None and conv.filter.mlp.out.weight.grad.abs().sum() > 0
    # the cache can be turned off per module
    conv.cache_spectrum = False
    with torch.no_grad():
        assert conv.spectrum(20) is not conv.spectrum(20)


def test_spectrum_cache_follows_dtype_change():
    mixer = M2SequenceMixer(6, 16, bidirectional=False, filter_order=8).eval()
    u = torch.randn(1, 16, 6)
    with torch.no_grad():
        mixer(u)
        mixer.double()
        y = mixer(u.double())
        assert y.dtype == torch.float64 and mixer.long_conv.spectrum(16).dtype == torch.complex128
        torch.testing.assert_close(y, direct_mixer(mixer, u.double()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["blockdiag", "dense", "monarch"])
def test_chunked_glu_equals_reference(small_chunks, kind):
    torch.manual_seed(0)
    glu = MonarchGLU(16, 32, kind=kind, nblocks=4).double().eval()
    y = torch.randn(3, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        fast = glu(y)
        assert fast.shape == (3, 7, 16) and fast.dtype == torch.float64
    h = glu.gated_layers(y)                                  # autograd on: the whole-tensor reference
    ref = glu.wo(F.gelu(h[..., :32]) * h[..., 32:])
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


def test_blockdiag_glu_uses_the_blockwise_path_and_handles_unaligned_sizes(small_chunks):
    assert MonarchGLU(768, 3072, nblocks=4)._blockdiag_aligned()
    glu = MonarchGLU(10, 14, nblocks=4).double().eval()      # padded blocks: falls back to the module calls
    assert not glu._blockdiag_aligned()
    y = torch.randn(2, 5, 10, dtype=torch.float64)
    with torch.no_grad():
        fast = glu(y)
    torch.testing.assert_close(fast, glu._glu(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 3, 9])
def test_short_conv_equals_conv1d_for_any_channel_shape(K, L):
    x = torch.randn(2, 3, 4, L, dtype=torch.float64)
    w = torch.randn(3, 4, K, dtype=torch.float64)
    b = torch.randn(3, 4, dtype=torch.float64)
    ref = F.conv1d(x.reshape(2, 12, L), w.reshape(12, 1, K), b.reshape(12), padding=K - 1, groups=12)[..., :L]
    torch.testing.assert_close(causal_short_conv(x, w, b), ref.reshape(2, 3, 4, L), rtol=1e-12, atol=1e-12)


def test_m2_bert_inference_equals_autograd_path():
    from m2train.config import load_config
    from m2train.models import build_model
    cfg = load_config("configs/m2_bert_80m.yaml", ["model.max_seq_len=32", "model.hidden_size=48",
                                                   "model.intermediate_size=96", "model.num_layers=2",
                                                   "model.filter_order=8"]).model
    model = build_model(cfg).double().eval()
    ids = torch.randint(1, 1000, (2, 32))
    with torch.inference_mode():
        fast = model.bert(ids)
        again = model.bert(ids)                              # cached spectra
    ref = model.bert(ids)                                    # grad mode: reference paths everywhere
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, ref, rtol=1e-10, atol=1e-10)
