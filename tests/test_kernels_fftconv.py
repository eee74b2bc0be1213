"""The fused gated FFT convolution (kernels/fftconv.py) against the torch reference (models/longconv.py).

Without CUDA the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are tiny: every launch is B·H (forward) or H (backward) program instances."""

from __future__ import annotations

import warnings

import pytest
import torch

from m2train.kernels import fftconv
from m2train.kernels.fft_monarch import (MAX_FFT_SIZE, kernel_fft_size, monarch_dft, monarch_idft_real,
                                         monarch_kernel_spectrum, permuted_spectrum, split_fft_size)
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
    assert kernel_fft_size(2048) == MAX_FFT_SIZE == 4096 and kernel_fft_size(8192) == 16384
    assert split_fft_size(256) == (16, 16) and split_fft_size(8192) == (64, 128)
    with pytest.raises(ValueError, match="power of two"):
        split_fft_size(384)


CASES = [  # (B, H, L, bidirectional, gate_in, gate_out)
    (2, 3, 100, False, True, True),      # causal, gated, L not a power of two
    (2, 3, 37, True, True, True),        # bidirectional, L far below one tile row
    (3, 2, 130, True, False, False),     # residual form (no gates), N = 512 (16 x 32 factors)
    (1, 2, 200, False, False, True),     # output gate only (the mixer's dropout / pad-mask path)
    (2, 1, 5, False, True, False),       # tiny L, input gate only
]


@pytest.mark.parametrize("B,H,L,bidirectional,gate_in,gate_out", CASES)
def test_kernel_matches_reference_fwd_bwd(B, H, L, bidirectional, gate_in, gate_out):
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


def test_strided_inputs_like_the_mixer_split():
    """The mixer passes x1, x2, v as channel slices of one (B, 3H, L) tensor (non-contiguous views)."""
    B, H, L = 2, 3, 50
    z = torch.randn(B, 3 * H, L, device=DEVICE, requires_grad=True)
    k = torch.randn(H, L, device=DEVICE)
    skip = torch.randn(H, device=DEVICE)
    x1, x2, v = z.split(H, dim=1)
    y = fftconv.fused_long_conv(v, k, None, skip, x1, x2)
    want = reference(v, k, None, skip, x1, x2)
    assert rel(y, want) < 1e-5
    dy = torch.randn_like(y)
    assert rel(torch.autograd.grad(y, z, dy)[0], torch.autograd.grad(want, z, dy)[0]) < 1e-5


def test_bf16_activations_fp32_spectrum():
    B, H, L = 2, 2, 60
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
    with pytest.warns(UserWarning, match="falls back to torch.*3-level"):
        y = fftconv.fused_long_conv(long_v, k, None, skip)
    assert rel(y, reference(long_v, k, None, skip)) < 1e-5


def _mixer_pair(bidirectional: bool, **kw):
    torch.manual_seed(0)
    ref = M2SequenceMixer(16, 48, bidirectional=bidirectional, filter_order=8, **kw).to(DEVICE)
    ker = M2SequenceMixer(16, 48, bidirectional=bidirectional, filter_order=8, **kw).to(DEVICE)
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
                                                    "monarch (H->H)"}
    conv = result["fftconv"][0]
    assert conv["triton_fwdbwd_ms"] > 0 and conv["speedup_fwdbwd"] > 0 and "tflops" in conv
    assert result["models"][0]["bert_base_sdpa_tokens_per_ms"] > 0
    assert "| gated FFT conv |" in table and "BERT-base SDPA tok/ms" in table


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


_AOT_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from m2train.kernels import fftconv, shortconv
from m2train.kernels.fft_monarch import split_fft_size

ACTS = {"dy_ptr", "v_ptr", "x1_ptr", "x2_ptr", "y_ptr", "dv_ptr", "dx1_ptr", "dx2_ptr", "x_ptr", "dx_ptr"}

def build(fn, act, constexprs, warps):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = act if name in ACTS else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]          # what a launch with aligned tensors compiles
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    return k.metadata.shared

n = int(sys.argv[1])
n1, n2 = split_fft_size(n)
for act, prec in (("*bf16", "tf32"), ("*fp32", "tf32x3")):
    for gates in ((True, True), (False, False), (False, True)):
        for name, fn in (("fwd", fftconv._fftconv_fwd_kernel), ("bwd", fftconv._fftconv_bwd_kernel)):
            c = {"N1": n1, "N2": n2, "GATE_IN": gates[0], "GATE_OUT": gates[1], "PREC": prec}
            print("fftconv", name, act, gates, build(fn, act, c, fftconv.NUM_WARPS), flush=True)
for act in ("*bf16", "*fp32"):
    c = {"K": 3, "BLOCK_C": 32, "BLOCK_T": 64}
    print("shortconv fwd", act, build(shortconv._shortconv_fwd_kernel, act, c, shortconv.NUM_WARPS))
    print("shortconv bwd", act, build(shortconv._shortconv_bwd_kernel, act, {**c, "KP": 4}, shortconv.NUM_WARPS))
'''


@pytest.mark.slow       # 16 sm_90 compiles through Triton's bundled ptxas, ~1 min on a busy 2-core machine
def test_fftconv_and_shortconv_compile_for_h100_without_a_gpu(tmp_path):
    """The interpreter checks none of the GPU lowering; Triton's compiler does, for sm_90, on this CPU:
    every gate variant of the FFT-conv kernels in bf16 (tf32 products) and fp32 (tf32x3), and the short
    conv, with shared memory inside an H100/H200 SM (227 KiB)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, "512"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 16, proc.stdout
    assert all(int(line.split()[-1]) <= 227 * 1024 for line in lines), proc.stdout
