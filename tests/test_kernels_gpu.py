"""GPU-only checks of every Triton kernel at real model sizes, fp32 and bf16, against the PyTorch reference,
and of whole M2-BERT-80M / M2-GPT-360M forward+backward passes with kernels on vs the torch path.

Run on a GPU node (one call does all kernel tests, then the benchmark):
    pytest -m gpu tests/test_kernels_gpu.py tests/test_kernels_*.py && python -m m2train.kernels.bench
Without CUDA every test here is skipped (tests/conftest.py skips @pytest.mark.gpu).

Tolerances: fp32 kernels compute with fp32 accumulation (the FFT conv's DFT products as "tf32x3", ~fp32
accurate; the block-diagonal products in IEEE fp32, as torch.bmm does by default), so fp32 results are
held to rel < 1e-4 (error accumulates over 2L-point transforms and 12-24 layers). bf16 results are
compared with the fp32 reference on the same bf16-rounded inputs, rel < 2e-2 (a handful of bf16
roundings, 2^-8 each).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.gpu
DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _no_tf32():
    """The fp32 references must be fp32 (torch's default), whatever a previous test switched on."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# --------------------------------------------------------------------------------------- gated FFT conv
def _conv_reference(v, k_fwd, k_rev, skip, x1, x2):
    from m2train.models.longconv import long_conv

    u = v * x1
    return (long_conv(u, k_fwd, k_rev) + u * skip[:, None]) * x2


# Few sizes on purpose: each (FFT size, dtype, direction) is a separate compile of a large kernel (up to
# ~20 s on a 2-core CPU, benchmarks/DEVICE.md).
# 1000 runs one program per sequence; 2048, 4096 and 16384 the three-level kernels (R = 2, 4 and 16 rows).
@pytest.mark.parametrize("L,bidirectional", [(1000, True), (2048, False), (4096, True), (16384, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fftconv_real_sizes(L, bidirectional, dtype):
    from m2train.kernels.fftconv import fused_long_conv

    B, H = 2, 768
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=DEV, generator=g) * scale)  # noqa: E731
    acts = [mk(B, H, L).to(dtype).requires_grad_() for _ in range(3)]
    v, x1, x2 = acts
    k_fwd = mk(H, L, scale=0.05).requires_grad_()
    k_rev = mk(H, L, scale=0.05).requires_grad_() if bidirectional else None
    skip = mk(H).requires_grad_()
    params = [t for t in (k_fwd, k_rev, skip) if t is not None]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fused FFT conv.*")     # no fallback to torch here
        y = fused_long_conv(v, k_fwd, k_rev, skip, x1, x2)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, acts + params, dy)
    assert y.dtype == dtype
    # Reference in fp32 on the same (rounded) inputs.
    ref_in = [a.detach().float().requires_grad_() for a in acts]
    want = _conv_reference(ref_in[0], k_fwd, k_rev, skip, ref_in[1], ref_in[2])
    exp = torch.autograd.grad(want, ref_in + params, dy.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel(y, want) < tol
    for gk, ge in zip(got, exp):
        assert rel(gk, ge) < tol


# The short conv fused in front (kernels/fftconv_front.py) at the two sizes the whole-model tests (L = 2048)
# do not reach: one program per sequence, and the single pass at its largest R = 4. bf16 only (compile time).
@pytest.mark.parametrize("L,bidirectional", [(1000, True), (4096, False)])
def test_front_real_sizes(L, bidirectional):
    from m2train.kernels.fft_monarch import kernel_fft_size, monarch_kernel_spectrum
    from m2train.kernels.fftconv_front import front_gated_fft_conv, front_gated_fft_conv_reference

    B, H = 2, 768
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=DEV, generator=g) * scale)  # noqa: E731
    z = mk(B, 3 * H, L).bfloat16().requires_grad_()
    params = [mk(3 * H).requires_grad_(), mk(3 * H, 1, 3, scale=0.5).requires_grad_(), mk(3 * H).requires_grad_()]
    k_fwd = mk(H, L, scale=0.05).requires_grad_()
    k_rev = mk(H, L, scale=0.05).requires_grad_() if bidirectional else None
    skip = mk(H).requires_grad_()
    leaves = [z, *params, *(t for t in (k_fwd, k_rev, skip) if t is not None)]
    spec = monarch_kernel_spectrum(k_fwd, k_rev, kernel_fft_size(L))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falls back.*")          # no fallback to torch here
        y = front_gated_fft_conv(z, *params, *spec, skip)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, leaves, dy)
    z32 = z.detach().float().requires_grad_()
    want = front_gated_fft_conv_reference(z32, *params, *monarch_kernel_spectrum(k_fwd, k_rev, kernel_fft_size(L)),
                                          skip)
    exp = torch.autograd.grad(want, [z32, *leaves[1:]], dy.float())
    assert y.dtype == torch.bfloat16 and rel(y, want) < 2e-2
    for gk, ge in zip(got, exp):
        assert rel(gk, ge) < 2e-2


def test_fftconv_longest_falls_back_cleanly():
    """L = 65,537 needs a 262,144-point FFT, beyond fft_monarch.MAX_FFT_SIZE: torch path, same result."""
    from m2train.kernels.fftconv import fused_long_conv, unsupported_reason

    L = 65537
    v = torch.randn(1, 2, L, device=DEV)
    assert "MAX_FFT_SIZE" in unsupported_reason(v)
    k = torch.randn(2, L, device=DEV) * 0.01
    skip = torch.randn(2, device=DEV)
    with pytest.warns(UserWarning, match="falls back"):
        y = fused_long_conv(v, k, None, skip)
    from m2train.models.longconv import long_conv
    assert rel(y, long_conv(v, k, None) + v * skip[:, None]) < 1e-5


@pytest.mark.parametrize("L,one_program_max", [(1024, None), (2048, 4096), (65536, None)])
def test_fftconv_largest_size_fits_this_gpu(L, one_program_max, monkeypatch):
    """The largest default one-program size (N = 2048, L = 1024), the largest one program can hold at all
    (N = 4096, which kernels/bench.py times against the rows layout; offline sm_90a compiles say 96-128 KiB of
    shared memory) and the largest three-level size (N = 131072, R = 64 rows) must launch on this card
    without falling back, forward and backward, fp32 and bf16."""
    from m2train.kernels import fft_monarch, fftconv

    if one_program_max:
        monkeypatch.setattr(fft_monarch, "ONE_PROGRAM_MAX_FFT", one_program_max)
    assert fft_monarch.fft_layout(fft_monarch.kernel_fft_size(L))[0] == (64 if L == 65536 else 1)
    for dtype in (torch.float32, torch.bfloat16):
        v = torch.randn(2, 4, L, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(4, L, device=DEV) * 0.01
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*fused FFT conv.*")
            y = fftconv.fused_long_conv(v, k, k, torch.randn(4, device=DEV), v, v)
            y.sum().backward()
        assert not fftconv._TOO_LARGE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_real_size(dtype):
    """The mixer's short conv on the in_linear output of M2-BERT-80M (3H = 2304 channels, transposed view)."""
    from m2train.kernels import shortconv
    from m2train.models.short_conv import causal_short_conv as reference_short_conv

    B, C, L = 2, 2304, 4096 + 3
    x = torch.randn(B, L, C, device=DEV).to(dtype).transpose(1, 2).requires_grad_()
    w = (torch.randn(C, 1, 3, device=DEV) * 0.5).requires_grad_()
    b = torch.randn(C, device=DEV).requires_grad_()
    y = shortconv.causal_short_conv(x, w, b)
    xr = x.detach().float().requires_grad_()
    want = reference_short_conv(xr, w[:, 0], b)
    dy = torch.randn_like(want)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and rel(y, want) < tol
    got = torch.autograd.grad(y, (x, w, b), dy.to(dtype))
    exp = torch.autograd.grad(want, (xr, w, b), dy)
    for g, e in zip(got, exp):
        assert rel(g, e) < tol


# ------------------------------------------------------------------------ block-diagonal / Monarch / GLU
@pytest.mark.parametrize("H", [768, 1792])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monarch_family_real_sizes(H, dtype):
    from m2train.kernels import ops

    I, nb, M = 4 * H, 4, 4096 + 7                              # rows that do not fill a tile
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=DEV, generator=g) * scale).to(dtype)  # noqa: E731
    x, xi = mk(M, H), mk(M, I)
    w_up, w_dn = mk(nb, 2 * I // nb, H // nb, scale=0.05), mk(nb, H // nb, I // nb, scale=0.05)
    b_dn = mk(H, scale=0.1)
    w1, w2 = mk(nb, H // nb, H // nb, scale=0.05), mk(nb, H // nb, H // nb, scale=0.05)
    cases = {
        "glu": (lambda m, a, w: ops.glu_blockdiag(a[0], w[0], I, m), [x], [w_up]),
        "blockdiag": (lambda m, a, w: ops.blockdiag_linear(a[0], w[0], w[1], I, H, m), [xi], [w_dn, b_dn]),
        "monarch": (lambda m, a, w: ops.monarch_linear(a[0], w[0], w[1], None, H, H, m), [x], [w1, w2]),
    }
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, (fn, acts, weights) in cases.items():
        outs = {}
        for mode, cast in (("triton", dtype), ("torch", torch.float32)):
            a = [t.detach().to(cast).requires_grad_() for t in acts]
            w = [t.detach().to(cast).requires_grad_() for t in weights]
            y = fn(mode, a, w)
            dy = torch.randn(y.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
            outs[mode] = (y, torch.autograd.grad(y, a + w, dy.to(y.dtype)))
        (yk, gk), (yr, gr) = outs["triton"], outs["torch"]
        assert yk.dtype == dtype, name
        assert rel(yk, yr) < tol, name
        for a, b in zip(gk, gr):
            assert rel(a, b) < tol, name


# ------------------------------------------------------------------------------------------ whole models
def _model_pair(config: str, overrides: list[str]):
    from m2train.config import load_config
    from m2train.models import build_model

    torch.manual_seed(0)
    ref = build_model(load_config(config, overrides + ["model.kernels=torch"]).model).to(DEV).eval()
    ker = build_model(load_config(config, overrides + ["model.kernels=triton"]).model).to(DEV).eval()
    ker.load_state_dict(ref.state_dict())
    return ref, ker


def _loss(model, ids):
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float().square().mean(), logits


# The whole-model tests hold two models and their activations (up to ~20 GB each for M2-GPT-360M): under
# pytest-xdist (benchmarks/device_check.sh, --dist loadgroup) they run one at a time, on one worker.
@pytest.mark.xdist_group("whole_model")
@pytest.mark.parametrize("config,L,B", [("m2_bert_80m", 2048, 2), ("m2_gpt_360m", 2048, 1)])
def test_whole_model_fp32_kernels_match_torch(config, L, B):
    ref, ker = _model_pair(config, [f"model.max_seq_len={L}", "model.hidden_dropout=0.0"])
    ids = torch.randint(5, 1000, (B, L), device=DEV)
    loss_r, logits_r = _loss(ref, ids)
    loss_k, logits_k = _loss(ker, ids)
    assert rel(logits_k, logits_r) < 1e-4
    loss_r.backward()
    loss_k.backward()
    pairs = [(pr.grad, pk.grad) for pr, pk in zip(ref.parameters(), ker.parameters()) if pr.grad is not None]
    total = torch.cat([g.flatten() for g, _ in pairs]).norm()
    # Parameters whose gradient is ~0 in exact arithmetic (e.g. cancelled by a LayerNorm) carry only
    # rounding noise; their relative error means nothing, so they are held to the global scale instead.
    worst = max((gk - gr).double().norm().item() / max(gr.double().norm().item(), 1e-6 * total.item())
                for gr, gk in pairs)
    assert worst < 1e-3


@pytest.mark.xdist_group("whole_model")
@pytest.mark.parametrize("config,L,B", [("m2_bert_80m", 2048, 2), ("m2_gpt_360m", 2048, 2)])
def test_whole_model_bf16_autocast_kernels_match_torch(config, L, B):
    ref, ker = _model_pair(config, [f"model.max_seq_len={L}", "model.hidden_dropout=0.0"])
    ids = torch.randint(5, 1000, (B, L), device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_r, logits_r = _loss(ref, ids)
        loss_k, logits_k = _loss(ker, ids)
    assert torch.isfinite(loss_k)
    assert rel(logits_k, logits_r) < 3e-2
    loss_r.backward()
    loss_k.backward()
    # Summed over the whole model, bf16 rounding differences reach a few percent per parameter gradient.
    g_r = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
    g_k = torch.cat([p.grad.flatten() for p in ker.parameters() if p.grad is not None])
    assert rel(g_k, g_r) < 5e-2
