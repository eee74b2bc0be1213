"""Whole tiny M2-BERT and M2-GPT with every Triton kernel forced on (M2TRAIN_KERNELS=triton: the Monarch /
block-diagonal / GLU kernels and, where they apply, the convolution kernels) equal the same model on the
PyTorch reference path: logits and every parameter gradient, relative error < 1e-5 in fp32."""

import pytest
import torch

from m2train.kernels.dispatch import ENV_VAR
from m2train.models import build_model
from m2train.models.base import set_kernel_mode
from m2train.models.glu import MonarchGLU

from conftest import tiny_model_cfg
from kernel_helpers import on_gpu, ran_kernel, rel_err

TOL = 1e-5


def _run(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _compare(cfg, monkeypatch, batch=2, length=None, device="cpu", tol=TOL):
    model = build_model(cfg).to(device)
    length = length or cfg.max_seq_len
    ids = torch.randint(1, cfg.vocab_size, (batch, length), device=device)
    labels = ids.clone()
    labels[:, ::2] = -100
    monkeypatch.setenv(ENV_VAR, "torch")
    ref, ref_grads = _run(model, ids, labels)
    monkeypatch.setenv(ENV_VAR, "triton")
    out, grads = _run(model, ids, labels)
    return ref, ref_grads, out, grads


def _assert_equal_models(ref, ref_grads, out, grads, tol=TOL):
    assert rel_err(out.logits, ref.logits) < tol
    assert abs(out.loss.item() - ref.loss.item()) <= tol * abs(ref.loss.item())
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    bad = {n: rel_err(grads[n], ref_grads[n]) for n in grads if rel_err(grads[n], ref_grads[n]) >= tol}
    assert not bad, f"parameter grads off: {bad}"


@pytest.mark.slow      # the interpreted FFT-convolution kernels dominate (~1 min each on 2 cores)
@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt"])
def test_tiny_model_with_all_kernels_forced_on_equals_reference(arch, monkeypatch):
    cfg = tiny_model_cfg(arch, hidden_size=32, intermediate_size=64, max_seq_len=16)
    ref, ref_grads, out, grads = _compare(cfg, monkeypatch, batch=1)
    assert ran_kernel(out.loss, "GLUMLPFunction") and not ran_kernel(ref.loss, "GLUMLPFunction")
    _assert_equal_models(ref, ref_grads, out, grads)


@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt"])
def test_monarch_mlp_kernels_inside_a_model_equal_reference(arch, monkeypatch):
    """mlp_type=monarch with only the dimension mixers' kernels on (set per module, as set_kernel_mode
    does for the whole model): the Monarch kernel inside a real model, logits and all gradients."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    cfg = tiny_model_cfg(arch, hidden_size=32, intermediate_size=64, max_seq_len=24, mlp_type="monarch",
                         kernels="torch")
    model = build_model(cfg)
    ids = torch.randint(1, cfg.vocab_size, (2, 24))
    ref, ref_grads = _run(model, ids, ids)
    for layer in model.modules():
        if isinstance(layer, MonarchGLU):
            set_kernel_mode(layer, "triton")
    out, grads = _run(model, ids, ids)
    assert ran_kernel(out.loss, "MonarchFunction") and not ran_kernel(ref.loss, "MonarchFunction")
    _assert_equal_models(ref, ref_grads, out, grads)


def test_config_switch_alone_selects_the_kernels(monkeypatch):
    """model.kernels = "triton" in the config (no environment override) reaches every kernel layer."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    cfg = tiny_model_cfg("m2_gpt", kernels="triton", max_seq_len=16)
    model = build_model(cfg)
    assert {m.kernels for m in model.modules() if isinstance(getattr(type(m), "kernels", None), str)} == {"triton"}
    ids = torch.randint(1, cfg.vocab_size, (1, 16))
    assert ran_kernel(model(ids, labels=ids).loss, "GLUMLPFunction")
    cfg_torch = tiny_model_cfg("m2_gpt", kernels="torch", max_seq_len=16)
    assert not ran_kernel(build_model(cfg_torch)(ids, labels=ids).loss, "GLUMLPFunction")


# ---------------------------------------------------------------------------------------------- GPU
@on_gpu
@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt"])
def test_gpu_small_model_kernels_equal_reference(arch, monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_model_cfg(arch, hidden_size=256, intermediate_size=1024, num_layers=2, max_seq_len=512,
                         filter_order=64)
    ref, ref_grads, out, grads = _compare(cfg, monkeypatch, batch=4, device="cuda")
    # fp32 on the GPU: cuFFT vs the DFT kernels and a different summation order leave ~1e-6 of noise
    _assert_equal_models(ref, ref_grads, out, grads, tol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model = build_model(cfg).cuda()
        ids = torch.randint(1, cfg.vocab_size, (2, 512), device="cuda")
        assert torch.isfinite(model(ids).logits).all()


@on_gpu
def test_gpu_incremental_decoding_with_kernels_equals_full_forward(monkeypatch):
    """Generation on the GPU with the kernels on: the prompt runs the fused FFT-conv / GLU kernels, each step
    the short conv kernel, the GLU inference kernel and the history dot products; fp32 logits equal the full
    kernel forward's, and bf16 weights decode finitely with the fp32 histories."""
    monkeypatch.setenv(ENV_VAR, "triton")
    torch.manual_seed(0)
    cfg = tiny_model_cfg("m2_gpt", hidden_size=256, intermediate_size=1024, num_layers=2, max_seq_len=512,
                         filter_order=64)
    model = build_model(cfg).cuda().eval()
    ids = torch.randint(1, cfg.vocab_size, (2, 320), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        state = model.new_decode_state(2, 320)
        inc = torch.cat([model.decode(ids[:, :256], state)]
                        + [model.decode(ids[:, t:t + 1], state) for t in range(256, 320)], dim=1)
        assert rel_err(inc, full) < 1e-4
        model.to(torch.bfloat16)
        state = model.new_decode_state(2, 320)
        steps = [model.decode(ids[:, :256], state)] + [model.decode(ids[:, t:t + 1], state) for t in range(256, 320)]
        assert torch.isfinite(torch.cat(steps, dim=1)).all()
