"""Shared by the kernel tests: relative error, kernel detection, the GPU-only marker."""

import contextlib
import functools

import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


# GPU-only tests: selected with `pytest -m gpu` in a session with a device, skipped cleanly without one.
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on_gpu(fn):
    """Mark a test GPU-only; its body runs with IEEE fp32 matmuls (see ieee_fp32_matmuls)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with ieee_fp32_matmuls():
            return fn(*args, **kwargs)
    for mark in reversed(gpu):
        run = mark(run)
    return run


def ran_kernel(t: torch.Tensor, function_name: str) -> bool:
    """Whether the autograd graph of `t` contains a node of the autograd.Function `function_name`: the
    evidence that a kernel (not the reference path) produced it."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith(function_name):
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False



@contextlib.contextmanager
def ieee_fp32_matmuls():
    """fp32 comparisons on a GPU need IEEE fp32 matmuls on both sides: torch's TF32 switch off (the kernels
    follow it), whatever an earlier test left it at; restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def recording_fused_convs():
    """The (input shape, fused operands) of every m2train.kernels.fftconv.gated_fft_conv call inside the block
    (callers import it at call time, so the patched function is the one they run)."""
    from m2train.kernels import fftconv

    calls, real = [], fftconv.gated_fft_conv

    def counted(v, spec_re, spec_im, skip, gate_in=None, gate_out=None, addend=None, **kwargs):
        fused = [k for k, t in (("gate_in", gate_in), ("gate_out", gate_out), ("addend", addend)) if t is not None]
        calls.append((tuple(v.shape), ",".join(fused)))
        return real(v, spec_re, spec_im, skip, gate_in, gate_out, addend, **kwargs)

    fftconv.gated_fft_conv = counted
    try:
        yield calls
    finally:
        fftconv.gated_fft_conv = real
