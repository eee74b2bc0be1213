"""Fused GLU up-projection kernel (gelu(A·y) ⊙ (B·y) in the block-diagonal matmul's epilogue) and the
MonarchGLU module with kernels on, vs the PyTorch reference (interpreted on CPU)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from m2train.kernels import ops
from m2train.kernels.dispatch import ENV_VAR
from m2train.models.blockdiag import BlockDiagonalLinear, blockdiag_linear_reference
from m2train.models.glu import MonarchGLU

from kernel_helpers import on_gpu, ran_kernel, rel_err

TOL = 1e-5


def reference_glu(x, weight, inter):
    h = blockdiag_linear_reference(x, weight, None, x.shape[-1], 2 * inter)
    gate, value = h.split(inter, dim=-1)
    return F.gelu(gate) * value


# (hidden, intermediate, nblocks, batch shape): blocks not multiples of the 32-wide tile, rows spanning
# several row tiles, 2-D and 3-D inputs
CASES = [(32, 64, 4, (3, 13)), (24, 40, 2, (37,)), (80, 72, 4, (2, 21))]


@pytest.mark.parametrize("hidden,inter,nb,batch", CASES)
def test_fused_glu_matches_reference_fwd_bwd(hidden, inter, nb, batch):
    up = BlockDiagonalLinear(hidden, 2 * inter, nb, bias=False)
    x = torch.randn(*batch, hidden, requires_grad=True)
    y = ops.glu_blockdiag(x, up.weight, inter, "triton")
    assert ran_kernel(y, "GLUBlockdiagFunction")
    y_ref = reference_glu(x, up.weight, inter)
    assert y.shape == y_ref.shape == (*batch, inter)
    assert rel_err(y, y_ref) < TOL
    g = torch.randn_like(y)
    for a, b, name in zip(torch.autograd.grad(y, [x, up.weight], g),
                          torch.autograd.grad(y_ref, [x, up.weight], g), ["x", "weight"]):
        assert rel_err(a, b) < TOL, name


def test_no_grad_forward_skips_the_saved_preactivation_and_agrees():
    up = BlockDiagonalLinear(32, 128, 4, bias=False)
    x = torch.randn(50, 32)
    with torch.no_grad():
        y = ops.glu_blockdiag(x, up.weight, 64, "triton")
    assert rel_err(y, reference_glu(x, up.weight, 64)) < TOL


def test_unpaired_blocks_fall_back_but_keep_the_matmul_kernel():
    """nblocks odd: gate and value blocks do not pair up, so the fused kernel does not apply; the
    projection still runs the block-diagonal kernel and the result is the reference's."""
    up = BlockDiagonalLinear(30, 2 * 45, 3, bias=False)
    x = torch.randn(7, 30, requires_grad=True)
    ops._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="glu_blockdiag runs the PyTorch reference.*even nblocks"):
        y = ops.glu_blockdiag(x, up.weight, 45, "triton")
    assert not ran_kernel(y, "GLUBlockdiagFunction") and ran_kernel(y, "BlockdiagFunction")
    assert rel_err(y, reference_glu(x, up.weight, 45)) < TOL


@pytest.mark.parametrize("kind", ["blockdiag", "monarch", "dense"])
def test_monarch_glu_module_with_kernels_on_equals_reference(kind, monkeypatch):
    glu = MonarchGLU(48, 96, kind=kind, nblocks=4)
    x = torch.randn(2, 11, 48, requires_grad=True)
    params = list(glu.parameters())
    monkeypatch.setenv(ENV_VAR, "torch")
    y_ref = glu(x)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], g)
    monkeypatch.setenv(ENV_VAR, "triton")
    y = glu(x)
    expected = {"blockdiag": "GLUMLPFunction", "monarch": "MonarchFunction"}.get(kind)
    if expected:
        assert ran_kernel(y, expected)
    assert rel_err(y, y_ref) < TOL
    for (name, _), a, b in zip([("x", None), *glu.named_parameters()], torch.autograd.grad(y, [x, *params], g),
                               grads_ref):
        assert rel_err(a, b) < TOL, name
    with torch.no_grad():                                     # the no-grad (inference) path too
        assert rel_err(glu(x), y_ref) < TOL


# (hidden, intermediate, nblocks, rows): Wo blocks of 6 outputs (padded to the 16-wide accumulator), rows
# not filling a row tile, several activation chunks per Wo block, two blocks
MLP_CASES = [(24, 48, 4, 37), (64, 256, 4, 50), (40, 80, 2, 21)]


@pytest.mark.parametrize("hidden,inter,nb,rows", MLP_CASES)
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_one_kernel_glu_mlp_matches_reference(hidden, inter, nb, rows, bias, residual):
    """kernels/glu_mlp.py: Wo·(gelu(A·x) ⊙ (B·x)) + bo [+ r] with the activation never stored, vs the
    reference GLU: fp32 within 1e-5; bf16 rounds where the two-kernel bf16 path rounds, so it agrees with it."""
    from m2train.kernels.glu_mlp import glu_mlp_forward, supported

    glu = MonarchGLU(hidden, inter, "blockdiag", nb)
    if not bias:
        glu.wo.bias = None
    g, o = glu.gated_layers.weight, glu.wo.weight
    assert supported(g, o, hidden, inter, hidden)
    x = torch.randn(rows, hidden)
    r = torch.randn(rows, hidden) if residual else None
    with torch.no_grad():
        want = glu._glu(x) + (r if residual else 0)
        assert rel_err(glu_mlp_forward(x, g, o, glu.wo.bias, r), want) < TOL
        xb, rb = x.bfloat16(), (r.bfloat16() if residual else None)
        fused = glu_mlp_forward(xb, g, o, glu.wo.bias, rb)
        act = ops.glu_blockdiag(xb, g.bfloat16(), inter, "triton")
        two_step = ops.blockdiag_linear(act, o.bfloat16(), glu.wo.bias.bfloat16() if bias else None, inter, hidden,
                                        "triton", rb)
    assert fused.dtype == torch.bfloat16
    # bf16: ~1.3% from fp32 (as the two-kernel path: test_bf16_fused_glu_close_to_fp32 allows 1.5% for the
    # GLU alone); vs the two-kernel path only accumulation order differs (identical in the interpreter)
    assert rel_err(fused, want) < 2e-2 and rel_err(fused, two_step) < 4e-3


@pytest.mark.parametrize("hidden,inter,nb,rows", MLP_CASES)
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_training_glu_mlp_recomputes_the_activation(hidden, inter, nb, rows, bias, residual):
    """ops.glu_mlp (kernels/glu.py GLUMLPFunction): the MLP with its (rows, I) activation recomputed in the
    backward instead of kept equals the reference forward and backward (fp32, every input's gradient), and
    what it keeps for the backward is exactly x and the (rows, 2I) pre-activation."""
    from m2train.parallel.activation_checkpointing import saved_activation_bytes

    glu = MonarchGLU(hidden, inter, "blockdiag", nb)
    if not bias:
        glu.wo.bias = None
    g, o = glu.gated_layers.weight, glu.wo.weight
    x = torch.randn(rows, hidden, requires_grad=True)
    r = torch.randn(rows, hidden, requires_grad=True) if residual else None
    want = glu._glu(x) + (r if residual else 0)
    y = ops.glu_mlp(x, g, o, glu.wo.bias, inter, "triton", r)
    assert ran_kernel(y, "GLUMLPFunction") and not ran_kernel(y, "GLUBlockdiagFunction")
    assert rel_err(y, want) < TOL
    inputs = [x, *glu.parameters(), *([r] if residual else [])]
    dy = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        assert a.shape == b.shape and rel_err(a, b) < TOL
    kept = saved_activation_bytes(glu, lambda: ops.glu_mlp(x, g, o, glu.wo.bias, inter, "triton", r).sum())
    assert kept == rows * (hidden + 2 * inter) * 4, kept
    # Blocks that do not tile the output exactly (the layer truncates) are not this op's: the caller's
    # two-step path runs instead.
    assert ops.glu_mlp(x, g, o[:, :, :-1], glu.wo.bias, inter, "triton") is None


def test_glu_module_runs_the_one_kernel_mlp_only_without_autograd(monkeypatch):
    """MonarchGLU (kernels forced, block-diagonal) takes the one-kernel MLP for no-grad forwards, the
    training MLP op (activation recomputed in its backward) under autograd, and the two differentiable
    kernels when dropout acts between the layers; all equal the torch path, residual included."""
    from m2train.kernels import glu_mlp

    calls = []
    real = glu_mlp.glu_mlp_forward
    monkeypatch.setattr(glu_mlp, "glu_mlp_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    glu = MonarchGLU(48, 96, "blockdiag", nblocks=4)
    x, r = torch.randn(2, 11, 48), torch.randn(2, 11, 48)
    monkeypatch.setenv(ENV_VAR, "torch")
    want = glu(x, residual=r)
    monkeypatch.setenv(ENV_VAR, "triton")
    got = glu(x, residual=r)
    assert calls == [] and ran_kernel(got, "GLUMLPFunction") and rel_err(got, want) < TOL
    glu.train()
    glu.dropout.p = 0.5
    dropped = glu(x, residual=r)
    assert ran_kernel(dropped, "GLUBlockdiagFunction") and ran_kernel(dropped, "BlockdiagFunction")
    glu.dropout.p = 0.0
    glu.eval()
    with torch.no_grad():
        assert rel_err(glu(x, residual=r), want) < TOL and calls == [1]
        glu.train()
        glu.dropout.p = 0.5                                   # active dropout sits between the two layers
        glu(x)
        glu.eval()
        with pytest.raises(ValueError, match="residual shape"):
            glu(x, residual=r.transpose(0, 1).contiguous())      # as many elements, another shape
    assert calls == [1]


def test_glu_module_whose_wo_blocks_overhang_its_output_takes_the_two_step_path(monkeypatch):
    """H = 30 with 4 blocks: Wo's blocks (4 x 8 rows) overhang its 30 outputs, which the one-kernel MLP and
    the training MLP op do not take; with a residual of the layer's real shape both step aside (no shape
    error) and the two-step path equals the torch path, with and without autograd."""
    glu = MonarchGLU(30, 64, "blockdiag", nblocks=4)
    x, r = torch.randn(2, 5, 30, requires_grad=True), torch.randn(2, 5, 30)
    monkeypatch.setenv(ENV_VAR, "torch")
    want = glu(x, residual=r)
    monkeypatch.setenv(ENV_VAR, "triton")
    ops._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="glu_blockdiag runs the PyTorch reference"):
        got = glu(x, residual=r)
    assert not ran_kernel(got, "GLUMLPFunction") and rel_err(got, want) < TOL
    with torch.no_grad():
        assert rel_err(glu(x, residual=r), want) < TOL


# ---------------------------------------------------------------------------------------------- GPU
@on_gpu
@pytest.mark.parametrize("hidden", [1792])      # M2-GPT-360M-class width; 768 is in the blockdiag GPU test
def test_gpu_fused_glu_bf16_and_fp32(hidden):
    torch.manual_seed(0)
    inter = 4 * hidden
    up = BlockDiagonalLinear(hidden, 2 * inter, 4, bias=False).cuda()
    x = torch.randn(4, 1024, hidden, device="cuda", requires_grad=True)
    y_ref = reference_glu(x, up.weight, inter)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, [x, up.weight], g)
    y = ops.glu_blockdiag(x, up.weight, inter, "triton")
    assert ran_kernel(y, "GLUBlockdiagFunction") and rel_err(y, y_ref) < TOL
    assert all(rel_err(a, b) < TOL for a, b in zip(torch.autograd.grad(y, [x, up.weight], g), grads_ref))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb = ops.glu_blockdiag(x, up.weight, inter, "triton")
    assert yb.dtype == torch.bfloat16 and rel_err(yb, y_ref) < 2e-2
    assert all(rel_err(a, b) < 3e-2 for a, b in zip(torch.autograd.grad(yb, [x, up.weight], g), grads_ref))


@on_gpu
@pytest.mark.parametrize("hidden", [768, 1280])     # Wo blocks of 192 and 320: 256- and 512-wide accumulators
def test_gpu_one_kernel_glu_mlp(hidden):
    """The inference MLP in one kernel at real sizes, compiled: fp32 equals the reference, bf16 agrees with
    the two-kernel path it replaces, residual included."""
    from m2train.kernels.glu_mlp import glu_mlp_forward

    torch.manual_seed(0)
    inter = 4 * hidden
    glu = MonarchGLU(hidden, inter, "blockdiag", 4).cuda()
    g, o, b = glu.gated_layers.weight, glu.wo.weight, glu.wo.bias
    x, r = torch.randn(4096, hidden, device="cuda"), torch.randn(4096, hidden, device="cuda")
    with torch.no_grad():
        want = glu._glu(x) + r
        assert rel_err(glu_mlp_forward(x, g, o, b, r), want) < 1e-4
        xb, rb = x.bfloat16(), r.bfloat16()
        fused = glu_mlp_forward(xb, g, o, b, rb)
        two_step = ops.blockdiag_linear(ops.glu_blockdiag(xb, g.bfloat16(), inter, "triton"), o.bfloat16(),
                                        b.bfloat16(), inter, hidden, "triton", rb)
    assert fused.dtype == torch.bfloat16 and rel_err(fused, two_step) < 4e-3 and rel_err(fused, want) < 2e-2


@on_gpu
def test_gpu_training_glu_mlp_recomputes_the_activation():
    """The training MLP op (GLUMLPFunction) at M2-GPT-360M's width, compiled: fp32 forward and every gradient
    equal the torch path, bf16 under autocast stays close; it keeps x and the pre-activation only."""
    from m2train.parallel.activation_checkpointing import saved_activation_bytes

    torch.manual_seed(0)
    hidden, rows = 1280, 4096
    inter = 4 * hidden
    glu = MonarchGLU(hidden, inter, "blockdiag", 4).cuda()
    g, o, b = glu.gated_layers.weight, glu.wo.weight, glu.wo.bias
    x = torch.randn(rows, hidden, device="cuda", requires_grad=True)
    r = torch.randn(rows, hidden, device="cuda", requires_grad=True)
    want = glu._glu(x) + r
    dy = torch.randn_like(want)
    inputs = [x, g, o, b, r]
    grads_ref = torch.autograd.grad(want, inputs, dy)
    y = ops.glu_mlp(x, g, o, b, inter, "triton", r)
    assert ran_kernel(y, "GLUMLPFunction") and rel_err(y, want) < 1e-4
    assert all(rel_err(a, c) < 1e-4 for a, c in zip(torch.autograd.grad(y, inputs, dy), grads_ref))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb = ops.glu_mlp(x, g, o, b, inter, "triton", r.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel_err(yb, want) < 2e-2
    assert all(rel_err(a, c) < 3e-2 for a, c in zip(torch.autograd.grad(yb, inputs, dy.bfloat16()), grads_ref))
    kept = saved_activation_bytes(glu, lambda: ops.glu_mlp(x, g, o, b, inter, "triton", r).sum())
    assert kept == rows * (hidden + 2 * inter) * 4, kept


def test_bf16_fused_glu_close_to_fp32():
    up = BlockDiagonalLinear(64, 256, 4, bias=False)
    x = torch.randn(40, 64)
    y = ops.glu_blockdiag(x.bfloat16(), up.weight.bfloat16(), 128, "triton")
    assert y.dtype == torch.bfloat16
    exact = reference_glu(x.bfloat16().float(), up.weight.bfloat16().float(), 128)
    # three bf16 roundings (gate, value, output); the interpreter rounds toward zero (GPUs round to
    # nearest even), so its errors add up one-sidedly to ~1e-2
    assert rel_err(y, exact) < 1.5e-2


def test_cpu_models_on_auto_never_import_triton():
    """kernels=auto on CPU tensors is the reference path, and does not even import Triton."""
    code = ("import sys, torch\n"
            "from m2train.models.glu import MonarchGLU\n"
            "MonarchGLU(32, 64)(torch.randn(2, 5, 32)).sum().backward()\n"
            "print('triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
