"""The short conv fused in front of the gated FFT conv (kernels/fftconv_front.py) against the torch reference:
the models' causal short conv on z + in_bias, split, then the torch FFT long conv with its gates. Every kernel
layout takes the fused loads: one program per sequence, the three-level single pass (R <= 4) and two passes
(R = 8, or any R with the single pass off). Interpreter-sized shapes (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from m2train.kernels import fft_monarch, fftconv, fftconv_front, fftconv_long, shortconv
from m2train.kernels.fft_monarch import fft_layout, kernel_fft_size, monarch_kernel_spectrum
from m2train.models import mixer as mixer_module
from m2train.models.longconv import long_conv
from m2train.models.mixer import M2SequenceMixer
from m2train.models.short_conv import causal_short_conv
from tests.kernel_helpers import ran_kernel, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not fftconv.INTERPRET,
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_rows(monkeypatch):
    """The three-level layout at interpreter-sized shapes (as in test_kernels_fftconv.py): rows of 256
    points from N = 512 on, so L = 300 runs R = 4 rows and L = 600 R = 8."""
    monkeypatch.setattr(fft_monarch, "ONE_PROGRAM_MAX_FFT", 256)
    monkeypatch.setattr(fft_monarch, "ROW_FFT_SIZE", 256)
    monkeypatch.setattr(fftconv_long, "COLUMN_TILE", 128)


def independent_reference(z, in_bias, weight, k_fwd, k_rev, bias, skip, addend=None, keep_scale=None):
    """The mixer's math spelled out with the models' functions (not fftconv_front's reference); keep_scale:
    the dropout factors on v ⊙ x1."""
    C = z.shape[1]
    x = causal_short_conv(z + in_bias[:, None], weight.reshape(C, -1), bias)
    x1, x2, v = x.split(C // 3, dim=1)
    u = v * x1 if keep_scale is None else v * x1 * keep_scale
    y = (long_conv(u, k_fwd, k_rev) + u * skip[:, None]) * x2
    return y + addend if addend is not None else y


def _check(B, H, L, K, bidirectional, with_addend):
    mk = lambda *shape: torch.randn(*shape, device=DEVICE, requires_grad=True)  # noqa: E731
    z, in_bias, weight, bias = mk(B, 3 * H, L), mk(3 * H), mk(3 * H, 1, K), mk(3 * H)
    k_fwd, k_rev, skip = mk(H, L), (mk(H, L) if bidirectional else None), mk(H)
    addend = mk(B, H, L) if with_addend else None
    spec_re, spec_im = monarch_kernel_spectrum(k_fwd, k_rev, kernel_fft_size(L))
    y = fftconv_front.front_gated_fft_conv(z, in_bias, weight, bias, spec_re, spec_im, skip, addend)
    assert ran_kernel(y, "_FrontGatedFFTConv")
    want = independent_reference(z, in_bias, weight, k_fwd, k_rev, bias, skip, addend)
    assert y.shape == want.shape == (B, H, L) and y.dtype == want.dtype
    assert rel_err(y, want) < 1e-5
    inputs = [t for t in (z, in_bias, weight, bias, k_fwd, k_rev, skip, addend) if t is not None]
    dy = torch.randn_like(want)
    got = torch.autograd.grad(y, inputs, dy)
    exp = torch.autograd.grad(want, inputs, dy)
    for name, g, e in zip(("z", "in_bias", "weight", "bias", "k_fwd", "k_rev", "skip", "addend"), got, exp):
        assert g.shape == e.shape, name
        assert rel_err(g, e) < 1e-5, name


@pytest.mark.parametrize("B,H,L,K,bidirectional,with_addend", [
    (2, 3, 100, 3, False, False),    # causal, L not a power of two
    (2, 2, 37, 3, True, True),       # bidirectional, L far below one tile row, with an addend
    (1, 2, 5, 4, False, False),      # L barely past the taps, K = 4
    (3, 1, 2, 3, False, False),      # L shorter than the short conv
])
def test_one_program_matches_reference(B, H, L, K, bidirectional, with_addend):
    assert fft_layout(kernel_fft_size(L))[0] == 1
    _check(B, H, L, K, bidirectional, with_addend)


@pytest.mark.parametrize("L,max_rows,bidirectional", [
    (300, 4, False),                 # R = 4: single pass, both accumulators
    (129, 4, True),                  # R = 2: single pass, L one past a row
    (300, 0, True),                  # R = 4 in two passes (single pass off)
    (600, 4, False),                 # R = 8: two passes
])
def test_three_level_matches_reference(small_rows, monkeypatch, L, max_rows, bidirectional):
    monkeypatch.setattr(fftconv_long, "SINGLE_PASS_MAX_ROWS", max_rows)
    assert fft_layout(kernel_fft_size(L))[0] > 1
    _check(2, 2, L, 3, bidirectional, with_addend=L == 300)


def test_short_conv_backward_with_input_bias():
    """kernels/shortconv.short_conv_backward with the folded input bias: every gradient equals autograd's
    through the reference short conv of x + b_in, on a channels-last view like the mixer's."""
    B, C, L, K = 2, 6, 45, 3
    x = torch.randn(B, L, C, device=DEVICE).transpose(1, 2).requires_grad_()
    w, b, b_in = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((C, K), (C,), (C,)))
    y = causal_short_conv(x + b_in[:, None], w, b)
    dy = torch.randn_like(y)
    want = torch.autograd.grad(y, (x, w, b, b_in), dy)
    got = shortconv.short_conv_backward(dy, x.detach(), w.detach(), in_bias=b_in.detach())
    for name, g, e in zip(("dx", "dw", "db", "d_in_bias"), got, want):
        assert rel_err(g, e) < 1e-5, name
    assert shortconv.short_conv_backward(dy, x.detach(), w.detach())[3] is None


def test_no_grad_keeps_nothing_and_fp64_falls_back():
    B, H, L = 1, 2, 40
    z = torch.randn(B, 3 * H, L, device=DEVICE, requires_grad=True)
    params = [torch.randn(3 * H, device=DEVICE), torch.randn(3 * H, 1, 3, device=DEVICE),
              torch.randn(3 * H, device=DEVICE)]
    spec = monarch_kernel_spectrum(torch.randn(H, L, device=DEVICE), None, kernel_fft_size(L))
    skip = torch.randn(H, device=DEVICE)
    with torch.no_grad():
        y = fftconv_front.front_gated_fft_conv(z, *params, *spec, skip)
    assert y.grad_fn is None
    want = fftconv_front.front_gated_fft_conv_reference(z, *params, *spec, skip)
    assert rel_err(y, want) < 1e-5
    with pytest.warns(UserWarning, match="fp64"):
        y64 = fftconv_front.front_gated_fft_conv(z.double(), *(p.double() for p in params), *spec, skip.double())
    assert y64.dtype == torch.float64 and rel_err(y64, want) < 1e-5
    with pytest.raises(ValueError, match="addend shape"):
        fftconv_front.front_gated_fft_conv(z, *params, *spec, skip, addend=torch.zeros(B, 3 * H, L))


def test_bf16_activations():
    """bf16 z (as under autocast) with fp32 parameters: within bf16 rounding of the fp32 reference."""
    B, H, L = 2, 2, 70
    z = torch.randn(B, 3 * H, L, device=DEVICE)
    params = [torch.randn(3 * H, device=DEVICE), torch.randn(3 * H, 1, 3, device=DEVICE) / 2,
              torch.randn(3 * H, device=DEVICE)]
    spec = monarch_kernel_spectrum(torch.randn(H, L, device=DEVICE) / L, None, kernel_fft_size(L))
    skip = torch.randn(H, device=DEVICE)
    y = fftconv_front.front_gated_fft_conv(z.bfloat16(), *params, *spec, skip)
    want = fftconv_front.front_gated_fft_conv_reference(z.bfloat16().float(), *params, *spec, skip)
    assert y.dtype == torch.bfloat16 and rel_err(y, want) < 2e-2


def _mixer_pair(bidirectional: bool, L: int):
    torch.manual_seed(0)
    ref = M2SequenceMixer(8, L, bidirectional=bidirectional, filter_order=16).to(DEVICE)
    fused = M2SequenceMixer(8, L, bidirectional=bidirectional, filter_order=16).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    for module in fused.modules():
        if hasattr(module, "kernels"):
            module.kernels = "triton"
    for module in ref.modules():
        if hasattr(module, "kernels"):
            module.kernels = "torch"
    return ref, fused


@pytest.mark.parametrize("bidirectional,L", [(False, 50), (True, 33)])
def test_mixer_runs_the_fused_front_and_matches_torch(bidirectional, L):
    """With the kernels on, the mixer's training forward takes the fused front (in_linear channels-first
    without its bias, the short conv inside the FFT-conv kernel) and equals the torch path, forward and
    every parameter gradient."""
    ref, fused = _mixer_pair(bidirectional, L)
    u = torch.randn(2, L, 8, device=DEVICE)
    y_ref, y = ref(u), fused(u)
    assert ran_kernel(y, "_FrontGatedFFTConv") and not ran_kernel(y_ref, "_FrontGatedFFTConv")
    assert rel_err(y, y_ref) < 1e-5
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) < 1e-5, name


def test_mixer_fused_front_keeps_fewer_activations(monkeypatch):
    """What autograd keeps for the backward of one mixer: with the short conv fused in front, the short
    conv's (B, 3H, L) output is not among the activations it keeps: exactly that many bytes fewer than with
    the two kernels (the unfused kernel path: `_fused_front` off)."""
    B, L, H = 2, 64, 8
    _, fused = _mixer_pair(False, L)
    u = torch.randn(B, L, H, device=DEVICE)

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t):
            if t.numel() >= B * L * H:                   # activations, not parameters
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused(u)
        return sum(seen.values())

    with_front = saved_bytes()
    monkeypatch.setattr(M2SequenceMixer, "_fused_front", lambda self, u: False)
    without = saved_bytes()
    assert without - with_front == B * 3 * H * L * 4, (with_front, without)


def test_front_kernel_limit_matches_the_short_conv_kernel():
    assert mixer_module.FRONT_MAX_KERNEL == shortconv.MAX_KERNEL


def _recording_seeds(monkeypatch) -> list:
    drawn, draw = [], fftconv_front.draw_seeds

    def record(H, device):
        drawn.append(draw(H, device))
        return drawn[-1]
    monkeypatch.setattr(fftconv_front, "draw_seeds", record)
    return drawn


@pytest.mark.parametrize("L,max_rows", [(100, 4), (300, 4), (600, 4), (300, 0)])
def test_in_kernel_dropout_matches_reference_with_its_mask(small_rows_if_long, monkeypatch, L, max_rows):
    """Dropout on v ⊙ x1 inside the kernels (one program, single pass, two passes): forward and every
    gradient equal the reference computed with the kernels' own mask (dropout_scale of the seeds the call
    drew), so the backward kernels apply exactly the forward's mask."""
    monkeypatch.setattr(fftconv_long, "SINGLE_PASS_MAX_ROWS", max_rows)
    drawn = _recording_seeds(monkeypatch)
    B, H, p = 2, 2, 0.3
    mk = lambda *shape: torch.randn(*shape, device=DEVICE, requires_grad=True)  # noqa: E731
    z, in_bias, weight, bias = mk(B, 3 * H, L), mk(3 * H), mk(3 * H, 1, 3), mk(3 * H)
    k_fwd, skip = mk(H, L), mk(H)
    spec_re, spec_im = monarch_kernel_spectrum(k_fwd, None, kernel_fft_size(L))
    y = fftconv_front.front_gated_fft_conv(z, in_bias, weight, bias, spec_re, spec_im, skip, dropout_p=p)
    assert len(drawn) == 1 and drawn[0].shape == (H,) and drawn[0].dtype == torch.int64
    scale = fftconv_front.dropout_scale(drawn[0], B, L, p)
    assert 0.1 < (scale == 0).float().mean().item() < 0.5
    want = independent_reference(z, in_bias, weight, k_fwd, None, bias, skip, keep_scale=scale)
    assert rel_err(y, want) < 1e-5
    inputs = (z, in_bias, weight, bias, k_fwd, skip)
    dy = torch.randn_like(want)
    for name, g, e in zip(("z", "in_bias", "weight", "bias", "k_fwd", "skip"), torch.autograd.grad(y, inputs, dy),
                          torch.autograd.grad(want, inputs, dy)):
        assert rel_err(g, e) < 1e-5, name


@pytest.fixture
def small_rows_if_long(request, monkeypatch):
    """small_rows for the parametrized L > 256 (three-level), nothing for one-program lengths."""
    if request.node.callspec.params["L"] > 256:
        monkeypatch.setattr(fft_monarch, "ONE_PROGRAM_MAX_FFT", 256)
        monkeypatch.setattr(fft_monarch, "ROW_FFT_SIZE", 256)
        monkeypatch.setattr(fftconv_long, "COLUMN_TILE", 128)


def test_dropout_mask_statistics_and_determinism():
    """The in-kernel mask keeps each element with probability 1 - p, scales kept ones by 1 / (1 - p),
    differs between channels and samples, and is a function of the seeds alone."""
    p = 0.25
    seeds = torch.tensor([11, 12, 13], dtype=torch.int64, device=DEVICE)
    scale = fftconv_front.dropout_scale(seeds, 2, 3000, p)
    values = torch.unique(scale).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
    assert abs((scale == 0).float().mean().item() - p) < 0.02
    assert not torch.equal(scale[0, 0], scale[0, 1]) and not torch.equal(scale[0, 0], scale[1, 0])
    assert torch.equal(scale, fftconv_front.dropout_scale(seeds.clone(), 2, 3000, p))
    with pytest.raises(ValueError, match="dropout probability"):
        fftconv_front.front_gated_fft_conv(torch.zeros(1, 3, 8), *[torch.zeros(3)] * 3, *[torch.zeros(1, 256)] * 2,
                                           torch.zeros(1), dropout_p=1.0)


def test_mixer_training_with_dropout_runs_the_fused_front(monkeypatch):
    """A training mixer with dropout and kernels on keeps the fused front (the dropout on v ⊙ x1 inside
    the kernel): reproducible under torch.manual_seed and different from the eval-mode output (the
    op-level tests above check the values against the kernel's own mask)."""
    L = 40
    _, fused = _mixer_pair(False, L)
    fused.dropout.p = 0.2
    fused.train()
    u = torch.randn(2, L, 8, device=DEVICE)
    torch.manual_seed(3)
    y1 = fused(u)
    torch.manual_seed(3)
    y2 = fused(u)
    assert ran_kernel(y1, "_FrontGatedFFTConv") and torch.equal(y1, y2)
    fused.eval()
    assert rel_err(y1, fused(u)) > 1e-2


def test_given_dropout_seeds_decide_the_mask_per_channel():
    """Seeds passed in (as a tensor-parallel rank passes its slice of the model's) decide the mask: the op on
    channels 2..3 with seeds[2:4] gives exactly channels 2..3 of the op on all 4 channels with all seeds, the
    torch fallback (fp64 here) applies the same mask, and malformed seeds are refused."""
    B, H, L, p = 2, 4, 40, 0.3
    gen = torch.Generator().manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    z, in_bias, weight, bias = mk(B, 3 * H, L), mk(3 * H), mk(3 * H, 1, 3), mk(3 * H)
    z.requires_grad_()                                                     # (so ran_kernel can tell)
    k_fwd, skip = mk(H, L), mk(H)
    spec_re, spec_im = monarch_kernel_spectrum(k_fwd, None, kernel_fft_size(L))
    seeds = torch.tensor([5, 6, 7, 8], dtype=torch.int64, device=DEVICE)
    full = fftconv_front.front_gated_fft_conv(z, in_bias, weight, bias, spec_re, spec_im, skip, dropout_p=p,
                                              dropout_seeds=seeds)
    assert ran_kernel(full, "_FrontGatedFFTConv")
    rows = torch.cat([torch.arange(2, 4) + s * H for s in range(3)])       # channels 2..3 of x1, x2, v
    part = fftconv_front.front_gated_fft_conv(z[:, rows], in_bias[rows], weight[rows], bias[rows], spec_re[2:],
                                              spec_im[2:], skip[2:], dropout_p=p, dropout_seeds=seeds[2:])
    assert torch.equal(part, full[:, 2:])
    scale = fftconv_front.dropout_scale(seeds, B, L, p)
    assert 0.1 < (scale == 0).float().mean().item() < 0.5
    assert rel_err(full, independent_reference(z, in_bias, weight, k_fwd, None, bias, skip, keep_scale=scale)) < 1e-5
    with pytest.warns(UserWarning, match="falls back to torch"):
        fallback = fftconv_front.front_gated_fft_conv(*(t.double() for t in (z, in_bias, weight, bias)), spec_re,
                                                      spec_im, skip.double(), dropout_p=p, dropout_seeds=seeds)
    assert rel_err(fallback.float(), full) < 1e-5
    for bad in (seeds[:3], seeds.int()):
        with pytest.raises(ValueError, match="dropout_seeds must be int64 of shape \\(4,\\)"):
            fftconv_front.front_gated_fft_conv(z, in_bias, weight, bias, spec_re, spec_im, skip, dropout_p=p,
                                               dropout_seeds=bad)



def test_dropout_seeds_without_triton_are_refused(monkeypatch):
    """Seeds on a CPU tensor without the interpreter: the torch fallback cannot draw their mask, so it says
    so instead of silently using torch's dropout (without seeds it runs torch's dropout, as before)."""
    from m2train.kernels import fftconv

    monkeypatch.setattr(fftconv, "INTERPRET", False)
    B, H, L = 1, 2, 16
    z, in_bias, weight = torch.randn(B, 3 * H, L), torch.randn(3 * H), torch.randn(3 * H, 1, 3)
    bias = torch.randn(3 * H)
    spec_re, spec_im = monarch_kernel_spectrum(torch.randn(H, L), None, kernel_fft_size(L))
    args = (z, in_bias, weight, bias, spec_re, spec_im, torch.randn(H))
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    with pytest.warns(UserWarning, match="without TRITON_INTERPRET"), pytest.raises(ValueError, match="Triton kernel"):
        fftconv_front.front_gated_fft_conv(*args, dropout_p=0.5, dropout_seeds=seeds)
    with pytest.warns(UserWarning, match="without TRITON_INTERPRET"):
        y = fftconv_front.front_gated_fft_conv(*args, dropout_p=0.5)
    assert y.shape == (B, H, L)
    with pytest.warns(UserWarning, match="without TRITON_INTERPRET"):        # seeds mean nothing at p = 0
        assert torch.equal(fftconv_front.front_gated_fft_conv(*args, dropout_seeds=seeds),
                           fftconv_front.front_gated_fft_conv_reference(*args))
