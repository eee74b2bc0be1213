"""The fused gated FFT convolution (kernels/fftconv.py) against the torch reference (models/longconv.py).

Without CUDA the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are tiny: every launch is B·H (forward) or H (backward) program instances."""

from __future__ import annotations

import warnings

import pytest
import torch

from m2train.kernels import fft_monarch, fftconv, fftconv_long
from m2train.kernels.fft_monarch import (MAX_FFT_SIZE, ONE_PROGRAM_MAX_FFT, fft_layout, kernel_fft_size, monarch_dft,
                                         monarch_idft_real, monarch_kernel_spectrum, natural_spectrum,
                                         permuted_spectrum, split_fft_size)
from m2train.models.longconv import long_conv
from m2train.models.mixer import M2SequenceMixer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not fftconv.INTERPRET,
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(v, k_fwd, k_rev, skip, x1=None, x2=None):
    """What the mixer computed before the kernel: torch FFT long conv + gating."""
    u = v * x1 if x1 is not None else v
    y = long_conv(u, k_fwd, k_rev) + u * skip[:, None]
    return y * x2 if x2 is not None else y


@pytest.mark.parametrize("n", [256, 512, 2048])
def test_monarch_dft_is_the_permuted_fft(n):
    x = torch.randn(3, n // 2 - 7, dtype=torch.float64)
    spec = monarch_dft(x, n)
    want = permuted_spectrum(torch.fft.fft(x, n=n), n)
    assert rel(torch.view_as_real(spec), torch.view_as_real(want)) < 1e-6
    back = monarch_idft_real(spec, n)
    assert rel(back[..., :x.shape[-1]], x) < 1e-6 and back[..., x.shape[-1]:].abs().max() < 1e-5


def test_fft_sizes():
    assert kernel_fft_size(1) == 256 and kernel_fft_size(128) == 256 and kernel_fft_size(129) == 512
    assert kernel_fft_size(1024) == ONE_PROGRAM_MAX_FFT == 2048 and kernel_fft_size(8192) == 16384
    assert split_fft_size(256) == (16, 16) and split_fft_size(8192) == (64, 128)
    with pytest.raises(ValueError, match="power of two"):
        split_fft_size(384)
    # one program per sequence up to 2048, then rows of 2048 = 32 x 64 points
    assert fft_layout(2048) == (1, 32, 64) and fft_layout(4096) == (2, 32, 64) and fft_layout(8192) == (4, 32, 64)
    assert fft_layout(32768) == (16, 32, 64) and fft_layout(MAX_FFT_SIZE) == (64, 32, 64)


@pytest.fixture
def small_rows(monkeypatch):
    """The three-level layout at interpreter-sized shapes: rows of 256 = 16 x 16 points from N = 512 on, and
    column tiles of 128 (two per row), so L = 300 runs R = 4 rows, L = 600 R = 8."""
    monkeypatch.setattr(fft_monarch, "ONE_PROGRAM_MAX_FFT", 256)
    monkeypatch.setattr(fft_monarch, "ROW_FFT_SIZE", 256)
    monkeypatch.setattr(fftconv_long, "COLUMN_TILE", 128)


@pytest.mark.parametrize("n", [512, 2048])
def test_three_level_monarch_dft_is_the_permuted_fft(small_rows, n):
    assert fft_layout(n) == (n // 256, 16, 16)
    x = torch.randn(3, n // 2 - 5, dtype=torch.float64)
    natural = torch.fft.fft(x, n=n)
    want = permuted_spectrum(natural, n)
    assert torch.equal(natural_spectrum(want, n), natural)
    # frequency k_r + R·(k1 + M1·k2) sits at position k_r·M + k1·M2 + k2
    r = n // 256
    assert torch.equal(want[..., 1 * 256 + 2 * 16 + 3], natural[..., 1 + r * (2 + 16 * 3)])
    spec = monarch_dft(x, n)
    assert rel(torch.view_as_real(spec), torch.view_as_real(want)) < 1e-6
    back = monarch_idft_real(spec, n)
    assert rel(back[..., :x.shape[-1]], x) < 1e-6 and back[..., x.shape[-1]:].abs().max() < 1e-5


CASES = [  # (B, H, L, bidirectional, gate_in, gate_out)
    (2, 3, 100, False, True, True),      # causal, gated, L not a power of two
    (2, 3, 37, True, True, True),        # bidirectional, L far below one tile row
    (3, 2, 130, True, False, False),     # residual form (no gates), N = 512 (16 x 32 factors)
    (1, 2, 200, False, False, True),     # output gate only (the mixer's dropout / pad-mask path)
    (2, 1, 5, False, True, False),       # tiny L, input gate only
]


LONG_CASES = [  # three-level layout with small_rows: (B, H, L, bidirectional, gate_in, gate_out)
    (2, 2, 300, False, True, True),      # causal, gated, R = 4, L ends inside the second row
    (1, 2, 129, True, False, False),     # bidirectional residual form, R = 2 (one non-zero time row)
    (2, 1, 600, False, False, True),     # output gate only, R = 8
    (1, 1, 520, True, True, False),      # bidirectional, input gate only, L just past two rows
]


@pytest.mark.parametrize("B,H,L,bidirectional,gate_in,gate_out", CASES)
def test_kernel_matches_reference_fwd_bwd(B, H, L, bidirectional, gate_in, gate_out):
    _check_against_reference(B, H, L, bidirectional, gate_in, gate_out)


@pytest.mark.parametrize("B,H,L,bidirectional,gate_in,gate_out", LONG_CASES)
def test_three_level_kernel_matches_reference_fwd_bwd(small_rows, B, H, L, bidirectional, gate_in, gate_out):
    assert fft_layout(kernel_fft_size(L))[0] > 1
    _check_against_reference(B, H, L, bidirectional, gate_in, gate_out)


@pytest.mark.parametrize("max_rows", [0, 2, 8])
def test_three_level_in_one_or_two_passes(small_rows, monkeypatch, max_rows):
    """The three-level kernels run in a single pass (no scratch) up to SINGLE_PASS_MAX_ROWS rows and in two
    passes beyond: at R = 2 (L = 129), R = 4 (L = 300, both accumulators) and R = 8 (two passes whatever
    the setting: the single-pass kernels hold two accumulators), with every gate and an addend, forward
    and every gradient equal the reference. The single-pass forward keeps the pre-gate output for dx2
    only when a gradient is wanted."""
    monkeypatch.setattr(fftconv_long, "SINGLE_PASS_MAX_ROWS", max_rows)
    B, H = 2, 2
    for L, r in ((129, 2), (300, 4), (600, 8)):
        assert fft_layout(kernel_fft_size(L))[0] == r
        single = r <= min(max_rows, fftconv_long.SINGLE_PASS_ROW_LIMIT)
        mk = lambda *shape: torch.randn(*shape, device=DEVICE, requires_grad=True)  # noqa: E731
        v, x1, x2, addend = (mk(B, H, L) for _ in range(4))
        k_fwd, k_rev, skip = mk(H, L), mk(H, L), mk(H)
        spec_re, spec_im = monarch_kernel_spectrum(k_fwd, k_rev, kernel_fft_size(L))
        with torch.no_grad():
            y, conv = fftconv_long.forward(v, x1, x2, spec_re, spec_im, skip, addend, save_conv=True)
        assert (conv is not None) == single, (L, r)
        want = reference(v, k_fwd, k_rev, skip, x1, x2) + addend
        assert rel(y, want) < 1e-5, (L, r)
        saved, forward = [], fftconv_long.forward
        monkeypatch.setattr(fftconv_long, "forward", _recording(forward, saved))
        with torch.no_grad():                 # inference keeps nothing, though the inputs require grad
            assert rel(fftconv.gated_fft_conv(v, spec_re, spec_im, skip, x1, x2, addend), want) < 1e-5
        y = fftconv.gated_fft_conv(v, spec_re, spec_im, skip, x1, x2, addend)
        monkeypatch.setattr(fftconv_long, "forward", forward)
        assert saved == [False, single], (L, r)
        assert rel(y, want) < 1e-5, (L, r)
        inputs = (v, x1, x2, addend, k_fwd, k_rev, skip)
        dy = torch.randn_like(want)
        for g, e in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(want, inputs, dy)):
            assert rel(g, e) < 1e-5, (L, r)


def _recording(forward, saved: list):
    """fftconv_long.forward that appends whether it kept the pre-gate output for the backward."""
    def wrapped(*args, **kwargs):
        y, conv = forward(*args, **kwargs)
        saved.append(conv is not None)
        return y, conv
    return wrapped


def _check_against_reference(B, H, L, bidirectional, gate_in, gate_out):
    mk = lambda *shape: torch.randn(*shape, device=DEVICE, requires_grad=True)  # noqa: E731
    v = mk(B, H, L)
    x1 = mk(B, H, L) if gate_in else None
    x2 = mk(B, H, L) if gate_out else None
    k_fwd, k_rev = mk(H, L), (mk(H, L) if bidirectional else None)
    skip = mk(H)
    inputs = [t for t in (v, x1, x2, k_fwd, k_rev, skip) if t is not None]

    y = fftconv.fused_long_conv(v, k_fwd, k_rev, skip, x1, x2)
    want = reference(v, k_fwd, k_rev, skip, x1, x2)
    assert y.shape == want.shape and y.dtype == want.dtype
    assert rel(y, want) < 1e-5
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, dy)
    exp = torch.autograd.grad(want, inputs, dy)
    for g, e in zip(got, exp):
        assert g.shape == e.shape
        assert rel(g, e) < 1e-5


@pytest.mark.parametrize("L,gate_out", [(100, False), (60, True), (300, False), (300, True)])
def test_addend_is_added_as_the_result_is_stored(small_rows_if_long, L, gate_out):
    """The mixer's residual long conv adds the main branch's output inside the kernel; its gradient is dy,
    and the other gradients are those of the conv alone. A strided (transposed) addend is read as is."""
    B, H = 2, 3
    mk = lambda *shape: torch.randn(*shape, device=DEVICE, requires_grad=True)  # noqa: E731
    v, k, skip = mk(B, H, L), mk(H, L), mk(H)
    x2 = mk(B, H, L) if gate_out else None
    addend = mk(B, L, H).transpose(1, 2)
    spec_re, spec_im = monarch_kernel_spectrum(k, None, kernel_fft_size(L))
    y = fftconv.gated_fft_conv(v, spec_re, spec_im, skip, gate_out=x2, addend=addend)
    want = reference(v, k, None, skip, x2=x2) + addend
    assert rel(y, want) < 1e-5
    inputs = [t for t in (v, k, skip, x2, addend) if t is not None]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, dy)
    exp = torch.autograd.grad(want, inputs, dy)
    for g, e in zip(got, exp):
        assert g.shape == e.shape and rel(g, e) < 1e-5


def test_addend_dtype_and_shape_rules():
    B, H, L = 1, 2, 40
    v = torch.randn(B, H, L, device=DEVICE)
    spec_re, spec_im = monarch_kernel_spectrum(torch.randn(H, L, device=DEVICE), None, kernel_fft_size(L))
    skip = torch.randn(H, device=DEVICE)
    base = fftconv.gated_fft_conv(v, spec_re, spec_im, skip)
    # a narrower addend is read and widened by the kernel; the result keeps v's dtype, as torch's sum would
    low = torch.randn(B, H, L, device=DEVICE).bfloat16()
    y = fftconv.gated_fft_conv(v, spec_re, spec_im, skip, addend=low)
    assert y.dtype == torch.float32 and rel(y, base + low.float()) < 1e-6
    # a wider addend makes the sum wider: the kernel's result is widened, then added
    wide = torch.randn(B, H, L, device=DEVICE, dtype=torch.float64)
    y = fftconv.gated_fft_conv(v, spec_re, spec_im, skip, addend=wide)
    assert y.dtype == torch.float64 and rel(y, base.double() + wide) < 1e-6
    with pytest.raises(ValueError, match="addend shape"):
        fftconv.gated_fft_conv(v, spec_re, spec_im, skip, addend=torch.randn(B, H, L - 1, device=DEVICE))


@pytest.mark.parametrize("L", [50, 300])
def test_strided_inputs_like_the_mixer_split(small_rows_if_long, L):
    """The mixer passes x1, x2, v as channel slices of one (B, 3H, L) tensor (non-contiguous views)."""
    B, H = 2, 3
    z = torch.randn(B, 3 * H, L, device=DEVICE, requires_grad=True)
    k = torch.randn(H, L, device=DEVICE)
    skip = torch.randn(H, device=DEVICE)
    x1, x2, v = z.split(H, dim=1)
    y = fftconv.fused_long_conv(v, k, None, skip, x1, x2)
    want = reference(v, k, None, skip, x1, x2)
    assert rel(y, want) < 1e-5
    dy = torch.randn_like(y)
    assert rel(torch.autograd.grad(y, z, dy)[0], torch.autograd.grad(want, z, dy)[0]) < 1e-5


@pytest.fixture
def small_rows_if_long(request):
    """small_rows for the parametrised L >= 256 (the three-level kernels), nothing for shorter L."""
    if request.getfixturevalue("L") >= 256:
        request.getfixturevalue("small_rows")


@pytest.mark.parametrize("L", [60, 300])
def test_bf16_activations_fp32_spectrum(small_rows_if_long, L):
    B, H = 2, 2
    v, x1, x2 = (torch.randn(B, H, L, device=DEVICE).bfloat16() for _ in range(3))
    k_fwd, k_rev = torch.randn(H, L, device=DEVICE) * 0.1, torch.randn(H, L, device=DEVICE) * 0.1
    skip = torch.randn(H, device=DEVICE)
    spec_re, spec_im = monarch_kernel_spectrum(k_fwd, k_rev, kernel_fft_size(L))
    assert spec_re.dtype == torch.float32
    y = fftconv.gated_fft_conv(v, spec_re, spec_im, skip, x1, x2)
    assert y.dtype == torch.bfloat16
    want = reference(v.float(), k_fwd, k_rev, skip, x1.float(), x2.float())
    assert rel(y.float(), want) < 1e-2        # bf16 output rounding (2^-8) bounds the error


def test_unsupported_inputs_fall_back_with_the_reason():
    H, L = 1, MAX_FFT_SIZE // 2 + 1
    v = torch.randn(1, H, L, dtype=torch.float64)
    assert "float64" in fftconv.unsupported_reason(v)
    long_v = torch.randn(1, H, L)
    assert str(MAX_FFT_SIZE) in fftconv.unsupported_reason(long_v)
    k = torch.randn(H, L)
    skip = torch.randn(H)
    with pytest.warns(UserWarning, match="falls back to torch.*MAX_FFT_SIZE"):
        y = fftconv.fused_long_conv(long_v, k, None, skip)
    assert rel(y, reference(long_v, k, None, skip)) < 1e-5


def _mixer_pair(bidirectional: bool, max_len: int = 48, **kw):
    torch.manual_seed(0)
    ref = M2SequenceMixer(16, max_len, bidirectional=bidirectional, filter_order=8, **kw).to(DEVICE)
    ker = M2SequenceMixer(16, max_len, bidirectional=bidirectional, filter_order=8, **kw).to(DEVICE)
    ker.load_state_dict(ref.state_dict())
    for m in ref.modules():
        if hasattr(type(m), "kernels"):
            m.kernels = "torch"
    for m in ker.modules():
        if hasattr(type(m), "kernels"):
            m.kernels = "triton"
    return ref, ker


@pytest.mark.parametrize("bidirectional,dropout,pad_mask", [(True, 0.0, False), (False, 0.0, False),
                                                            (False, 0.0, True), (True, 0.2, True)])
def test_mixer_with_kernels_matches_torch_path(bidirectional, dropout, pad_mask):
    ref, ker = _mixer_pair(bidirectional, dropout=dropout, pad_masking=pad_mask)
    if dropout:
        # Dropout draws its mask in memory order; the short-conv kernel's output is laid out channels-first,
        # the torch one follows its transposed input, so identical masks need the same short conv here.
        ker.short_conv.kernels = "torch"
    assert ker.long_conv.use_kernel(torch.randn(1, 16, 30, device=DEVICE))
    assert not ref.long_conv.use_kernel(torch.randn(1, 16, 30, device=DEVICE))
    u = torch.randn(2, 30, 16, device=DEVICE)
    mask = torch.ones(2, 30, device=DEVICE)
    mask[1, 20:] = 0
    kw = dict(pad_mask=mask) if pad_mask else {}
    torch.manual_seed(1)                  # same dropout masks on both paths (drawn in the same order)
    y_ref = ref(u, **kw)
    torch.manual_seed(1)
    y_ker = ker(u, **kw)
    assert rel(y_ker, y_ref) < 1e-5
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ker.backward(dy)
    for (name, p_ref), p_ker in zip(ref.named_parameters(), ker.parameters()):
        if p_ref.grad is None:
            assert p_ker.grad is None, name
            continue
        assert rel(p_ker.grad, p_ref.grad) < 1e-5, name


def test_mixer_three_level_kernels_match_torch_path(small_rows):
    """A whole causal mixer at L = 300 (three-level layout, R = 4) with kernels forced: output and every
    parameter gradient equal the torch path's."""
    ref, ker = _mixer_pair(False, max_len=320)
    u = torch.randn(2, 300, 16, device=DEVICE)
    assert ker.long_conv.use_kernel(u.transpose(1, 2))
    y_ref, y_ker = ref(u), ker(u)
    assert rel(y_ker, y_ref) < 1e-5
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ker.backward(dy)
    for (name, p_ref), p_ker in zip(ref.named_parameters(), ker.parameters()):
        assert rel(p_ker.grad, p_ref.grad) < 1e-5, name


def test_mixer_no_grad_uses_kernel_and_matches():
    """Without autograd the torch reference takes its CPU fast path; with kernels on it must not, and the
    kernel result (and its cached spectrum) must still match."""
    ref, ker = _mixer_pair(True)
    u = torch.randn(2, 30, 16, device=DEVICE)
    with torch.no_grad():
        assert not ker._can_fuse(u)
        first = ker(u)
        again = ker(u)                    # spectrum from the no-grad cache
        want = ref(u)
    assert rel(first, want) < 1e-5 and torch.equal(first, again)


class _ActivationTraffic:
    """Counts, under a TorchDispatchMode, the torch ops of a forward that copy or combine whole (B, ·, L)
    activations, and the ones that wait for the device (a Python bool or scalar from a tensor). The Triton
    kernels are not torch ops and are not seen; in the interpreter their internal copies are flat (1-D)."""

    COPIES = {"aten.clone.default", "aten.copy_.default", "aten._to_copy.default"}
    SYNCS = {"aten.equal.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default"}

    def __init__(self, numel: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {"copies": 0, "adds": 0, "syncs": 0}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                big = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 3 and a.numel() >= numel]
                name = str(func)
                if name in _ActivationTraffic.COPIES and big:
                    counts["copies"] += 1
                if name.startswith("aten.add") and len(big) == 2:
                    counts["adds"] += 1
                if name in _ActivationTraffic.SYNCS:
                    counts["syncs"] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def test_mixer_kernel_path_moves_no_needless_activation_copies():
    """What a GPU forward pays for besides the kernels and GEMMs: the mixer with kernels on makes exactly
    one copy of an activation - u channels-first for the residual long conv - no transposed copy for
    out_linear, no separate sum of the two long-conv branches (the residual conv's kernel adds it), and
    validates each cached spectrum with one device wait rather than one per filter tensor."""
    _, ker = _mixer_pair(True)
    ker.eval()
    B, L, H = 2, 40, 16
    u = torch.randn(B, L, H, device=DEVICE)
    with torch.no_grad():
        ker(u)                                            # fills the spectrum caches
        traffic = _ActivationTraffic(B * L * H)
        with traffic.mode:
            ker(u)
    assert traffic.counts == {"copies": 1, "adds": 0, "syncs": 2}


@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt"])
def test_layer_kernel_path_sums_no_branches_in_torch(arch, monkeypatch):
    """A whole M2-BERT layer / M2-GPT block (inference, kernels forced) forms none of its sums of two
    activations as a separate torch op: the two long-conv branches meet in the residual conv's kernel, and
    the residual around the GLU (y + GLU(y), x + GLU(LN(x))) is added in Wo's epilogue; only the GPT
    block's residual around the mixer remains. Same output as the torch path."""
    from conftest import tiny_model_cfg
    from m2train.kernels.dispatch import ENV_VAR
    from m2train.models import build_model

    torch.manual_seed(0)
    cfg = tiny_model_cfg(arch, hidden_size=16, intermediate_size=32, max_seq_len=40, filter_order=8)
    model = build_model(cfg).to(DEVICE).eval()
    layer = model.bert.layers[0] if arch == "m2_bert" else model.blocks[0]
    B, L = 2, 40
    h = torch.randn(B, L, cfg.hidden_size, device=DEVICE)
    monkeypatch.setenv(ENV_VAR, "torch")
    with torch.no_grad():
        want = layer(h)
    monkeypatch.setenv(ENV_VAR, "triton")
    with torch.no_grad():
        layer(h)                                          # fills the spectrum caches
        traffic = _ActivationTraffic(B * L * cfg.hidden_size)
        with traffic.mode:
            got = layer(h)
    assert rel(got, want) < 1e-5
    assert traffic.counts["adds"] == (0 if arch == "m2_bert" else 1)


def test_env_override_forces_torch(monkeypatch):
    _, ker = _mixer_pair(False)
    x = torch.randn(1, 16, 30, device=DEVICE)
    assert ker.long_conv.use_kernel(x)
    monkeypatch.setenv("M2TRAIN_KERNELS", "torch")
    assert not ker.long_conv.use_kernel(x)


def test_mixer_warns_and_runs_torch_for_fp64():
    _, ker = _mixer_pair(False)
    ker.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ker.long_conv.use_kernel(torch.randn(1, 16, 30, dtype=torch.float64, device=DEVICE))
    assert any("float64" in str(w.message) for w in caught)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode is for machines without a GPU")
def test_bench_smoke_mode_runs_every_section(tmp_path, capsys):
    """kernels/bench.py's plumbing (peaks, every section, markdown, JSON) on a tiny interpreted shape."""
    import json

    from m2train.kernels import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["peaks"]["matmul_tflops"] > 0 and result["peaks"]["copy_gbs"] > 0
    assert {r["op"] for r in result["monarch"]} == {"glu_up (H->2I, gelu*gate)", "blockdiag (I->H)",
                                                    "monarch (H->H)", "glu mlp (H->I->H), one kernel"}
    conv = result["fftconv"][0]
    assert conv["triton_fwdbwd_ms"] > 0 and conv["speedup_fwdbwd"] > 0 and "tflops" in conv
    rows = [r for r in result["fftconv"] if r["layout"].startswith("rows")]     # L = 300: three-level kernels
    assert rows and rows[0]["speedup_fwdbwd"] > 0 and rows[0]["L"] == 300
    assert fft_monarch.ONE_PROGRAM_MAX_FFT == 2048 and fft_monarch.ROW_FFT_SIZE == 2048      # restored
    assert result["models"][0]["bert_base_sdpa_tokens_per_ms"] > 0
    assert "| gated FFT conv |" in table and "BERT-base SDPA tok/ms" in table
    # the longest L's forwards profiled: ops (kernels on a GPU) by self time, shares of one call
    profile = result["models"][-1]["m2_bert_80m_kernels_profile"]
    assert profile and all(e["ms"] > 0 and 0 < e["share"] <= 100 for e in profile)
    assert sum(e["share"] for e in profile) <= 100.01 and "top kernels by self time" in table


def test_bench_refuses_without_a_gpu(capsys):
    from m2train.kernels import bench

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_size_that_does_not_fit_the_gpu_runs_torch(monkeypatch):
    """When no config of a kernel compiles for an FFT size on this device (registers/shared memory), that
    size is remembered and runs the torch path - including the backward of a forward already taken."""
    B, H, L = 1, 2, 40
    v = torch.randn(B, H, L, device=DEVICE, requires_grad=True)
    k = torch.randn(H, L, device=DEVICE, requires_grad=True)
    skip = torch.randn(H, device=DEVICE, requires_grad=True)
    y = fftconv.fused_long_conv(v, k, None, skip)                 # forward through the kernel
    monkeypatch.setattr(fftconv, "_TOO_LARGE", {(kernel_fft_size(L), fftconv._device_name(v))})
    assert "did not fit" in fftconv.unsupported_reason(v)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (v, k, skip), dy)                # backward through _reference_backward
    want = reference(v, k, None, skip)
    for g, e in zip(got, torch.autograd.grad(want, (v, k, skip), dy)):
        assert rel(g, e) < 1e-5


@pytest.mark.parametrize("B,C,L,K,transposed", [(2, 20, 37, 3, True), (3, 5, 2, 3, False), (1, 17, 40, 4, False)])
def test_short_conv_kernel_matches_reference(B, C, L, K, transposed):
    """kernels/shortconv.py vs models/short_conv.py: channels not filling a block, L below one tile, the
    mixer's transposed (channel-contiguous) input; the output is contiguous channels-first."""
    from m2train.kernels import shortconv
    from m2train.models.short_conv import causal_short_conv as reference_short_conv

    x = torch.randn(B, L, C, device=DEVICE).transpose(1, 2) if transposed else torch.randn(B, C, L, device=DEVICE)
    x.requires_grad_()
    w = torch.randn(C, 1, K, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    assert shortconv.unsupported_reason(x, w) is None
    y = shortconv.causal_short_conv(x, w, b)
    want = reference_short_conv(x, w[:, 0], b)
    assert y.is_contiguous() and rel(y, want) < 1e-5
    dy = torch.randn_like(want)
    for g, e in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)):
        assert g.shape == e.shape and rel(g, e) < 1e-5


@pytest.mark.parametrize("bidirectional", [False, True])
def test_taps_instead_of_the_spectrum_for_the_backward(bidirectional):
    """Given the filter taps the spectrum came from, the gated conv and the fused front keep those ((H, L)
    each) instead of the two (H, N) fp32 spectrum halves, recompute the spectrum in the backward, and give
    the very same gradients; taps that cannot have made the spectrum are refused."""
    from m2train.kernels import fftconv_front
    from m2train.parallel.activation_checkpointing import saved_activation_bytes

    B, H, L = 2, 3, 40
    n = kernel_fft_size(L)
    gen = torch.Generator().manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()  # noqa: E731
    v, x1, x2, k_fwd, k_rev, skip = mk(B, H, L), mk(B, H, L), mk(B, H, L), mk(H, L), mk(H, L), mk(H)
    z, in_bias, w_sc, b_sc = mk(B, 3 * H, L), mk(3 * H), mk(3 * H, 1, 3), mk(3 * H)
    k_rev = k_rev if bidirectional else None
    leaves = [t for t in (v, x1, x2, k_fwd, k_rev, skip, z, in_bias, w_sc, b_sc) if t is not None]
    ops = {"gated": lambda s, taps: fftconv.gated_fft_conv(v, *s, skip, x1, x2, taps=taps),
           "front": lambda s, taps: fftconv_front.front_gated_fft_conv(z, in_bias, w_sc, b_sc, *s, skip, taps=taps)}
    for name, op in ops.items():
        grads, saved = [], []
        for use_taps in (False, True):
            def step():
                spec = monarch_kernel_spectrum(k_fwd, k_rev, n)
                return op(spec, (k_fwd, k_rev) if use_taps else None)
            saved.append(saved_activation_bytes(torch.nn.Module(), lambda: step().square().sum()))
            y = step()
            wanted = [t for t in leaves if t.requires_grad]
            grads.append(torch.autograd.grad(y, wanted, torch.ones_like(y), allow_unused=True))
        for a, b in zip(*grads):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
        taps_bytes = H * L * 4 * (2 if bidirectional else 1)
        assert saved[0] - saved[1] == 2 * H * n * 4 - taps_bytes, (name, saved)
    with pytest.raises(ValueError, match="cannot have made"):
        fftconv.gated_fft_conv(v, *monarch_kernel_spectrum(k_fwd, None, n), skip, taps=(k_fwd[:2], None))
