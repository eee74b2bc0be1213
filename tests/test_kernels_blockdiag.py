"""Triton block-diagonal and order-2 Monarch kernels vs the PyTorch reference layers (interpreted on CPU).

Sizes are chosen so blocks are not multiples of the 32-wide interpreter tile, features do not divide by
nblocks (the reference's zero-pad / truncate semantics), and rows span several row tiles."""

import os
import re
import subprocess
import sys

import pytest
import torch

from m2train.kernels import ops
from m2train.kernels.dispatch import ENV_VAR
from m2train.models.blockdiag import BlockDiagonalLinear, blockdiag_linear_reference
from m2train.models.monarch import MonarchLinear, monarch_linear_reference

from kernel_helpers import on_gpu, ran_kernel, rel_err

TOL = 1e-5

# (in_features, out_features, nblocks, bias, batch shape)
CASES = [
    (30, 50, 4, True, (2, 37)),       # 3-D input; blocks 8 -> 13 with padding and truncation; 74 rows
    (64, 128, 4, False, (45,)),       # 2-D; exact blocks 16 -> 32
    (37, 21, 3, True, (5, 7)),        # odd everything
    (96, 80, 2, True, (33,)),         # blocks wider than a tile (48 -> 40): several K and N tiles
]


def _layer_params(layer):
    return [p for p in layer.parameters()]


def _fwd_bwd(fn, x, params, grad_out=None):
    y = fn(x)
    g = torch.randn_like(y) if grad_out is None else grad_out
    grads = torch.autograd.grad(y, [x, *params], g)
    return y, grads, g


def _check_against_reference(layer, kernel_fn, reference_fn, batch):
    x = torch.randn(*batch, layer.in_features, requires_grad=True)
    params = _layer_params(layer)
    y, grads, g = _fwd_bwd(kernel_fn, x, params)
    y_ref, grads_ref, _ = _fwd_bwd(reference_fn, x, params, g)
    assert y.shape == y_ref.shape == (*batch, layer.out_features)
    assert rel_err(y, y_ref) < TOL
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, grads_ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < TOL, f"grad of {name}: rel err {rel_err(a, b):.2e}"
    return y


@pytest.mark.parametrize("fin,fout,nb,bias,batch", CASES)
def test_blockdiag_residual_is_added_in_the_epilogue(fin, fout, nb, bias, batch):
    """layer(x) + residual with the residual in the kernel's epilogue (M2-BERT's y + GLU(y)): output and
    every gradient, the residual's being dy, equal the reference sum."""
    layer = BlockDiagonalLinear(fin, fout, nb, bias=bias)
    x = torch.randn(*batch, fin, requires_grad=True)
    residual = torch.randn(*batch, fout, requires_grad=True)
    inputs = [x, residual, *layer.parameters()]
    y = ops.blockdiag_linear(x, layer.weight, layer.bias, fin, fout, "triton", residual)
    assert ran_kernel(y, "BlockdiagFunction")
    want = blockdiag_linear_reference(x, layer.weight, layer.bias, fin, fout) + residual
    assert rel_err(y, want) < TOL
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert a.shape == b.shape and rel_err(a, b) < TOL
    # a residual of a wider dtype is added outside the kernel, so the sum keeps torch's promoted dtype
    wide = ops.blockdiag_linear(x, layer.weight, layer.bias, fin, fout, "triton", residual.double())
    assert wide.dtype == torch.float64 and rel_err(wide, want) < TOL
    # a residual of another shape is refused on every path, even one with as many elements
    for mode in ("triton", "torch"):
        for bad in (residual.detach().reshape(-1)[None], torch.zeros(fout)):
            with pytest.raises(ValueError, match="residual shape"):
                ops.blockdiag_linear(x, layer.weight, layer.bias, fin, fout, mode, bad)


@pytest.mark.parametrize("fin,fout,nb,bias,batch", CASES)
def test_blockdiag_kernel_matches_reference_fwd_bwd(fin, fout, nb, bias, batch):
    layer = BlockDiagonalLinear(fin, fout, nb, bias=bias)
    y = _check_against_reference(
        layer,
        lambda x: ops.blockdiag_linear(x, layer.weight, layer.bias, fin, fout, "triton"),
        lambda x: blockdiag_linear_reference(x, layer.weight, layer.bias, fin, fout), batch)
    assert ran_kernel(y, "BlockdiagFunction")       # the kernel really ran


@pytest.mark.parametrize("fin,fout,nb,bias,batch", CASES)
def test_monarch_kernel_matches_reference_fwd_bwd(fin, fout, nb, bias, batch):
    layer = MonarchLinear(fin, fout, nb, bias=bias)
    y = _check_against_reference(
        layer,
        lambda x: ops.monarch_linear(x, layer.blkdiag1, layer.blkdiag2, layer.bias, fin, fout, "triton"),
        lambda x: monarch_linear_reference(x, layer.blkdiag1, layer.blkdiag2, layer.bias, fin, fout), batch)
    assert ran_kernel(y, "MonarchFunction")


def test_monarch_kernel_is_not_just_blockdiag():
    """The permutation matters: the Monarch kernel matches its dense matrix, which is not block-diagonal."""
    layer = MonarchLinear(32, 32, 4, bias=False)
    x = torch.randn(9, 32)
    dense = layer.dense_weight()
    assert (dense[:8, 8:].abs() > 0).any()                      # off-block entries: mixing across blocks
    y = ops.monarch_linear(x, layer.blkdiag1, layer.blkdiag2, None, 32, 32, "triton")
    assert rel_err(y, x @ dense.T) < TOL


def test_modules_follow_the_environment_switch(monkeypatch):
    layer = BlockDiagonalLinear(30, 50, 4)
    x = torch.randn(3, 30, requires_grad=True)
    monkeypatch.setenv(ENV_VAR, "torch")
    y_ref = layer(x)
    assert not ran_kernel(y_ref, "BlockdiagFunction")
    assert torch.equal(y_ref, blockdiag_linear_reference(x, layer.weight, layer.bias, 30, 50))
    monkeypatch.setenv(ENV_VAR, "triton")
    y = layer(x)
    assert ran_kernel(y, "BlockdiagFunction")
    assert rel_err(y, y_ref) < TOL
    mon = MonarchLinear(30, 50, 4)
    assert ran_kernel(mon(x), "MonarchFunction")


def test_unsupported_calls_fall_back_to_the_reference():
    layer = BlockDiagonalLinear(30, 50, 4).double()
    x = torch.randn(4, 30, dtype=torch.float64, requires_grad=True)
    assert "float64" in ops.unsupported_reason(x, layer.weight)
    ops._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="blockdiag_linear runs the PyTorch reference.*float64"):
        y = ops.blockdiag_linear(x, layer.weight, layer.bias, 30, 50, "triton")
    assert torch.equal(y, blockdiag_linear_reference(x, layer.weight, layer.bias, 30, 50))
    empty = torch.randn(0, 30)
    assert ops.unsupported_reason(empty) == "empty input"
    assert ops.blockdiag_linear(empty, layer.weight.float(), None, 30, 50, "triton").shape == (0, 50)


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 operands, fp32 accumulation: the error is the bf16 rounding of inputs and output only."""
    layer = BlockDiagonalLinear(64, 96, 4)
    x = torch.randn(40, 64)
    y = ops.blockdiag_linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16(), 64, 96, "triton")
    assert y.dtype == torch.bfloat16
    exact = blockdiag_linear_reference(x.bfloat16().float(), layer.weight.bfloat16().float(),
                                       layer.bias.bfloat16().float(), 64, 96)
    assert rel_err(y, exact) < 4e-3                     # one bf16 rounding of the output (2^-8)


# ---------------------------------------------------------------------------------------------- GPU
@on_gpu
@pytest.mark.parametrize("hidden", [768])       # M2-BERT-80M's up-projection (the GLU test takes 1792)
def test_gpu_blockdiag_bf16_and_fp32(hidden):
    torch.manual_seed(0)
    layer = BlockDiagonalLinear(hidden, 2 * 4 * hidden, 4).cuda()
    x = torch.randn(4, 1024, hidden, device="cuda", requires_grad=True)
    params = list(layer.parameters())
    ref = lambda t: blockdiag_linear_reference(t, layer.weight, layer.bias, hidden, 8 * hidden)
    y_ref, g_ref, g = _fwd_bwd(ref, x, params)
    y, grads, _ = _fwd_bwd(lambda t: ops.blockdiag_linear(t, layer.weight, layer.bias, hidden, 8 * hidden,
                                                          "triton"), x, params, g)
    assert rel_err(y, y_ref) < TOL and all(rel_err(a, b) < TOL for a, b in zip(grads, g_ref))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb, gb, _ = _fwd_bwd(lambda t: ops.blockdiag_linear(t, layer.weight, layer.bias, hidden, 8 * hidden,
                                                            "triton"), x, params, g)
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb, y_ref) < 1e-2 and all(rel_err(a, b) < 2e-2 for a, b in zip(gb, g_ref))


@on_gpu
@pytest.mark.parametrize("hidden,nblocks", [(768, 4), (1024, 32)])
def test_gpu_monarch_bf16_and_fp32(hidden, nblocks):
    torch.manual_seed(0)
    layer = MonarchLinear(hidden, hidden, nblocks).cuda()
    x = torch.randn(2, 2048, hidden, device="cuda", requires_grad=True)
    params = list(layer.parameters())
    ref = lambda t: monarch_linear_reference(t, layer.blkdiag1, layer.blkdiag2, layer.bias, hidden, hidden)
    y_ref, g_ref, g = _fwd_bwd(ref, x, params)
    kern = lambda t: ops.monarch_linear(t, layer.blkdiag1, layer.blkdiag2, layer.bias, hidden, hidden, "triton")
    y, grads, _ = _fwd_bwd(kern, x, params, g)
    assert rel_err(y, y_ref) < TOL and all(rel_err(a, b) < TOL for a, b in zip(grads, g_ref))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb, gb, _ = _fwd_bwd(kern, x, params, g)
    assert rel_err(yb, y_ref) < 1e-2 and all(rel_err(a, b) < 2e-2 for a, b in zip(gb, g_ref))


@pytest.mark.slow       # 18 sm_90 compiles through ptxas: ~1 min on a busy 2-core machine
def test_kernels_compile_for_h100_without_a_gpu(tmp_path):
    """The interpreter checks none of the GPU lowering; Triton's own compiler (with its bundled ptxas) does,
    for sm_90, on this CPU: every kernel, bf16 and fp32, with the launch-time specialisations."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "m2train.kernels.autotune", "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok  sm_90")]
    assert len(lines) == 18, proc.stdout
    names = [re.match(r"ok  sm_90 \w+\s+(.+?)\s+\{", line).group(1) for line in lines]
    for name in ("blockdiag (bias)", "blockdiag (bias+res)", "blockdiag dX", "monarch L factor", "blockdiag dW",
                 "glu forward", "glu backward", "glu backward + act", "glu mlp (inference)"):
        assert names.count(name) == 2, name         # bf16 and fp32


def test_autotune_cli_help_and_interpreter_guard():
    proc = subprocess.run([sys.executable, "-m", "m2train.kernels.autotune", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--all-configs" in proc.stdout and "--arch" in proc.stdout
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "m2train.kernels.autotune"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "TRITON_INTERPRET" in proc.stderr
