"""Benchmark the fused Triton kernels against the PyTorch reference paths, on one GPU.

    python -m m2train.kernels.bench            # full table (M2-BERT-80M / M2-GPT-360M shapes, L = 512..16384)
    python -m m2train.kernels.bench --quick    # ~1 minute subset
    python -m m2train.kernels.bench --smoke    # no GPU: a tiny CPU run through TRITON_INTERPRET (plumbing only)

What it measures, all on the same card in the same run:
1. The card's peaks, measured (not the datasheet): a large bf16 matmul (TFLOP/s) and a large device copy
   (GB/s, bytes read + written). Every kernel's achieved rate is reported against them.
2. Block-diagonal / Monarch layers (m2train.kernels.ops, bf16): the GLU up-projection H -> 2I fused with
   GELU and the gate, the block-diagonal down-projection I -> H, and an order-2 Monarch H -> H, vs the
   torch.bmm reference path, at H = 768, 960, 1536, 1792 (M2-BERT sizes) and 1280 (M2-GPT-360M); and the
   whole GLU MLP's inference forward in one kernel (kernels/glu_mlp.py) vs the torch path and vs the two
   kernels it replaces, and its forward+backward as the models train it (ops.glu_mlp, the activation
   recomputed in the backward) vs torch and vs the two differentiable kernels.
3. The gated FFT long convolution y = (conv(v ⊙ x1, k) + D ⊙ v ⊙ x1) ⊙ x2 (kernels/fftconv.py, bf16
   activations, fp32 spectrum) vs the torch.fft reference (models/longconv.py + the gating in torch), for
   H = 768 (M2-BERT-80M) and 1280 (M2-GPT-360M) at L = 512 ... 16384, forward and forward+backward.
   Up to L = 1024 one program holds a whole sequence (fft_monarch.ONE_PROGRAM_MAX_FFT); longer sequences run
   the three-level kernels (kernels/fftconv_long.py, rows of 2048 points), and at L = 2048 (N = 4096, the
   largest size one program can hold) both layouts are timed. The three-level kernels run in a single pass
   up to R = 4 rows (L <= 4096, fftconv_long.SINGLE_PASS_MAX_ROWS) and in two passes through scratch
   buffers beyond; at L = 4096 both are timed. Sequences beyond fft_monarch.MAX_FFT_SIZE / 2
   time the torch path only ("fallback").
   FLOP/s counts the DFT matrix products the kernels execute; GB/s counts the activations read and written
   once, the spectrum, and the three-level kernels' scratch rows. A second table times the mixer's short
   conv + gated conv as two kernels vs fused into one (kernels/fftconv_front.py), at every (model, L).
4. M2-BERT-80M encoder forward (bf16 weights, inference, filters cached) with kernels and with the torch
   path vs BERT-base with SDPA attention (FlashAttention backend) at the same L: tokens/ms. At the longest
   L one more call of the kernels model and of BERT-base runs under torch.profiler: the top GPU kernels by
   self time and their share, i.e. where each forward spends its time.

Prints markdown tables and writes everything as JSON (--json). Shapes are chosen so every row moves the
same number of tokens (--tokens, default 65536 = B·L).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

# Untimed calls before each measurement (Triton autotuning, cuFFT plans, caches); 1 in --smoke.
WARMUP = 3
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (2048, 4096, 16384)           # --quick (benchmarks/device_check.sh compiles these ahead)
BERT_HIDDEN = (768, 960, 1536, 1792)          # M2-BERT 80M / 110M / 260M / 341M
GPT_360M = (1280, 5632)                       # (H, I) of M2-GPT-360M
CONV_MODELS = {"M2-BERT-80M": 768, "M2-GPT-360M": 1280}
# Kernels listed per profiled model forward (the longest L of the models section).
PROFILE_TOP = 15


# ----------------------------------------------------------------------------------------------- timing
def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() in ms (CUDA events on a GPU). Warm-up runs absorb Triton's autotuning."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_peaks(device: torch.device, smoke: bool) -> dict:
    """Best-case matmul TFLOP/s (bf16 on a GPU, fp32 on the CPU smoke run) and copy GB/s on this device."""
    n = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=3 if smoke else 20)
    numel = (1 << 16) if smoke else (1 << 30)                    # 2 GiB of bf16 on a GPU
    src = torch.empty(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, reps=3 if smoke else 20)
    return {"matmul_tflops": 2 * n ** 3 / ms / 1e9, "copy_gbs": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
            "matmul_shape": [n, n, n], "dtype": str(dtype)}


def _rates(flops: float, nbytes: float, ms: float, peaks: dict) -> dict:
    tflops, gbs = flops / ms / 1e9, nbytes / ms / 1e6
    return {"tflops": tflops, "gbs": gbs, "pct_peak_flops": 100 * tflops / peaks["matmul_tflops"],
            "pct_peak_bw": 100 * gbs / peaks["copy_gbs"]}


# ---------------------------------------------------------------------------------- block-diagonal/Monarch
def bench_monarch(device, dtype, tokens: int, hidden_sizes, peaks, reps: int) -> list[dict]:
    from m2train.kernels import ops

    rows = []
    nb = 4
    for H, I in hidden_sizes:
        x = torch.randn(tokens, H, device=device, dtype=dtype, requires_grad=True)
        xi = torch.randn(tokens, I, device=device, dtype=dtype, requires_grad=True)
        w_up = (torch.randn(nb, 2 * I // nb, H // nb, device=device, dtype=dtype) * 0.02).requires_grad_()
        w_dn = (torch.randn(nb, H // nb, I // nb, device=device, dtype=dtype) * 0.02).requires_grad_()
        b_dn = torch.zeros(H, device=device, dtype=dtype, requires_grad=True)
        w1 = (torch.randn(nb, H // nb, H // nb, device=device, dtype=dtype) * 0.02).requires_grad_()
        w2 = (torch.randn(nb, H // nb, H // nb, device=device, dtype=dtype) * 0.02).requires_grad_()
        el = x.element_size()
        cases = {
            "glu_up (H->2I, gelu*gate)": (lambda m: ops.glu_blockdiag(x, w_up, I, m), x,
                                          2 * tokens * H * 2 * I / nb, el * (tokens * (H + I) + w_up.numel())),
            "blockdiag (I->H)": (lambda m: ops.blockdiag_linear(xi, w_dn, b_dn, I, H, m), xi,
                                 2 * tokens * I * H / nb, el * (tokens * (H + I) + w_dn.numel())),
            "monarch (H->H)": (lambda m: ops.monarch_linear(x, w1, w2, None, H, H, m), x,
                               2 * 2 * tokens * H * H / nb, el * (tokens * 2 * H + w1.numel() + w2.numel())),
        }
        for name, (fn, inp, flops, nbytes) in cases.items():
            row = {"op": name, "H": H, "I": I, "tokens": tokens, "dtype": str(dtype)}
            for mode in ("torch", "triton"):
                with torch.no_grad():
                    row[f"{mode}_fwd_ms"] = time_ms(lambda: fn(mode), device, reps)
                grad = None

                def fwd_bwd():
                    nonlocal grad
                    y = fn(mode)
                    if grad is None:
                        grad = torch.randn_like(y)
                    y.backward(grad)
                    inp.grad = None
                row[f"{mode}_fwdbwd_ms"] = time_ms(fwd_bwd, device, reps)
            row["speedup_fwd"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
            row["speedup_fwdbwd"] = row["torch_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
            row.update(_rates(flops, nbytes, row["triton_fwd_ms"], peaks))
            rows.append(row)
            print(f"  {name:28s} H={H:5d}  speed-up fwd {row['speedup_fwd']:.2f}x  fwd+bwd "
                  f"{row['speedup_fwdbwd']:.2f}x", file=sys.stderr)
        rows.append(_bench_glu_mlp(x, w_up, w_dn, b_dn, I, peaks, reps, device))
    return rows


def _bench_glu_mlp(x, w_up, w_dn, b_dn, I: int, peaks, reps: int, device) -> dict:
    """The whole GLU MLP forward without autograd (inference): the torch path, the two kernels (GLU
    up-projection, then Wo; the (tokens, I) activation goes through memory) and the one kernel
    (kernels/glu_mlp.py, the activation stays on chip). fwd+bwd: the training op the models run
    (ops.glu_mlp: the two kernels' forward, the activation recomputed in the backward), and the two
    differentiable kernels it replaced."""
    from m2train.kernels import ops
    from m2train.kernels.glu_mlp import glu_mlp_forward

    tokens, H = x.shape
    nb = w_up.shape[0]

    def two_step(mode):
        return ops.blockdiag_linear(ops.glu_blockdiag(x, w_up, I, mode), w_dn, b_dn, I, H, mode)

    row = {"op": "glu mlp (H->I->H), one kernel", "H": H, "I": I, "tokens": tokens, "dtype": str(x.dtype)}
    with torch.no_grad():
        row["torch_fwd_ms"] = time_ms(lambda: two_step("torch"), device, reps)
        row["two_kernel_fwd_ms"] = time_ms(lambda: two_step("triton"), device, reps)
        row["triton_fwd_ms"] = time_ms(lambda: glu_mlp_forward(x, w_up, w_dn, b_dn), device, reps)

    def fwd_bwd(forward):
        def run():
            forward().backward(grad)
            x.grad = None
        return run
    grad = torch.randn(tokens, H, device=device, dtype=x.dtype)
    row["torch_fwdbwd_ms"] = time_ms(fwd_bwd(lambda: two_step("torch")), device, reps)
    row["two_kernel_fwdbwd_ms"] = time_ms(fwd_bwd(lambda: two_step("triton")), device, reps)
    row["triton_fwdbwd_ms"] = time_ms(fwd_bwd(lambda: ops.glu_mlp(x, w_up, w_dn, b_dn, I, "triton")), device, reps)
    row["speedup_fwd"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
    row["speedup_fwd_vs_two_kernels"] = row["two_kernel_fwd_ms"] / row["triton_fwd_ms"]
    row["speedup_fwdbwd"] = row["torch_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
    flops = 2 * tokens * H * 2 * I / nb + 2 * tokens * I * H / nb
    row.update(_rates(flops, x.element_size() * (2 * tokens * H + w_up.numel() + w_dn.numel()),
                      row["triton_fwd_ms"], peaks))
    print(f"  glu mlp one kernel           H={H:5d}  fwd vs torch {row['speedup_fwd']:.2f}x, vs two kernels "
          f"{row['speedup_fwd_vs_two_kernels']:.2f}x", file=sys.stderr)
    return row


# ------------------------------------------------------------------------------------------- FFT conv
def conv_flops(L: int, backward: bool) -> float:
    """FLOPs the fused kernels execute per (sample, channel) at the current layout (fft_monarch.fft_layout).
    One program per sequence (R = 1, N = N1·N2): a transform is 2 real products with F1 (N1·N1·N2 each, the
    input is real) and 3 with F2 (N1·N2·N2 each, Gauss's complex product). Three levels (N = R·M, M = M1·M2):
    the R row transforms are complex, 3 products with F1 and 3 with F2 each, plus the column steps (R/2
    time rows times R spectral rows, complex multiply-adds: 2·R·N each way). The forward does one transform
    each way, the gated backward two each way."""
    from m2train.kernels.fft_monarch import fft_layout, kernel_fft_size

    n = kernel_fft_size(L)
    r, m1, m2 = fft_layout(n)
    if r == 1:
        one_way = 2 * (2 * m1 * m1 * m2) + 3 * (2 * m1 * m2 * m2)
    else:
        one_way = r * 3 * 2 * m1 * m2 * (m1 + m2) + 2 * r * n
    return (4 if backward else 2) * one_way


def conv_scratch_bytes(L: int) -> tuple[int, int]:
    """Global-memory scratch traffic per (sample, channel) of the three-level kernels (forward, backward):
    complex fp32 rows written by the row pass and read by the column pass (one buffer forward, two in the
    gated backward); none in the single-pass kernels (R <= fftconv_long.SINGLE_PASS_MAX_ROWS). The
    backward's in-place kernel-gradient accumulation (an L2-resident (H, N) row per program, read and
    written once per sample) is not counted: it is not HBM traffic."""
    from m2train.kernels import fftconv_long
    from m2train.kernels.fft_monarch import fft_layout, kernel_fft_size

    n = kernel_fft_size(L)
    if fft_layout(n)[0] == 1 or fftconv_long.single_pass(n):
        return 0, 0
    return 2 * 8 * n, 2 * 2 * 8 * n


def conv_bwd_activation_arrays(L: int) -> int:
    """(B, H, L) activation arrays the gated backward reads or writes (once each): dy, v, x1, x2 in and dv,
    dx1, dx2 out; the single-pass kernels read the inputs twice (the spectrum-gradient rows kernel and the
    input-gradient kernel) plus the forward's saved pre-gate output, which the forward also wrote."""
    from m2train.kernels import fftconv_long
    from m2train.kernels.fft_monarch import fft_layout, kernel_fft_size

    n = kernel_fft_size(L)
    return 13 if fft_layout(n)[0] > 1 and fftconv_long.single_pass(n) else 7


# The FFT size (L = 2048) where both layouts are timed: the largest one program can hold (fft_monarch), and
# the smallest the three-level layout takes by default, since which is faster there can only be measured.
LAYOUT_CHOICE_FFT = 4096
# The FFT size (L = 4096, R = 4) where the three-level kernels are timed both in a single pass (the default up
# to fftconv_long.SINGLE_PASS_MAX_ROWS rows) and in two passes through scratch buffers.
PASSES_CHOICE_FFT = 8192


def bench_fftconv(device, tokens: int, models: dict, lengths, peaks, reps: int, smoke: bool) -> list[dict]:
    """Every (model, L) row; at FFT size LAYOUT_CHOICE_FFT the other layout is timed too (a second row), and
    at PASSES_CHOICE_FFT the other three-level kernels (single pass / two passes)."""
    from m2train.kernels import fft_monarch, fftconv_long

    rows = []
    for model, H in models.items():
        for L in lengths:
            rows.append(_bench_conv_row(device, tokens, model, H, L, peaks, reps, smoke))
            rows[-1].update(_bench_front(device, tokens, H, L, reps, smoke))
            n = fft_monarch.kernel_fft_size(L)
            if n == LAYOUT_CHOICE_FFT and not smoke:
                saved = fft_monarch.ONE_PROGRAM_MAX_FFT
                # one program when the default runs rows at n, rows (R = 2) when it runs one program
                fft_monarch.ONE_PROGRAM_MAX_FFT = n if saved < n else n // 2
                try:
                    rows.append(_bench_conv_row(device, tokens, model, H, L, peaks, reps, smoke))
                finally:
                    fft_monarch.ONE_PROGRAM_MAX_FFT = saved
            if n == PASSES_CHOICE_FFT and fft_monarch.fft_layout(n)[0] > 1 and not smoke:
                saved = fftconv_long.SINGLE_PASS_MAX_ROWS
                # the other kernels: two passes where the default runs one, and the other way round
                r = fft_monarch.fft_layout(n)[0]
                fftconv_long.SINGLE_PASS_MAX_ROWS = 0 if saved >= r else r
                try:
                    rows.append(_bench_conv_row(device, tokens, model, H, L, peaks, reps, smoke))
                finally:
                    fftconv_long.SINGLE_PASS_MAX_ROWS = saved
    return rows


def _bench_conv_row(device, tokens: int, model: str, H: int, L: int, peaks, reps: int, smoke: bool) -> dict:
    from m2train.kernels.fft_monarch import fft_layout, kernel_fft_size, monarch_kernel_spectrum
    from m2train.kernels.fftconv import gated_fft_conv, unsupported_reason
    from m2train.models.longconv import fft_conv, fft_size, kernel_spectrum

    act = torch.float32 if smoke else torch.bfloat16
    B = max(1, tokens // L)
    mk = lambda: torch.randn(B, H, L, device=device, dtype=act, requires_grad=True)  # noqa: E731
    v, x1, x2 = mk(), mk(), mk()
    k_fwd = torch.randn(H, L, device=device) * 0.01
    k_rev = torch.randn(H, L, device=device) * 0.01
    skip = torch.randn(H, device=device)
    n_ref = fft_size(L)
    spec_ref = kernel_spectrum(k_fwd, k_rev, n_ref)
    n = kernel_fft_size(L)
    spec_re, spec_im = monarch_kernel_spectrum(k_fwd, k_rev, n)
    spec_re.requires_grad_(True)
    spec_im.requires_grad_(True)
    skip.requires_grad_(True)

    def reference():       # what the mixer's torch path does (spectrum precomputed, as in a layer)
        u = v * x1
        return (fft_conv(u, spec_ref, n_ref) + u * skip.to(u.dtype)[:, None]) * x2

    def fused():
        return gated_fft_conv(v, spec_re, spec_im, skip, x1, x2)

    from m2train.kernels.fftconv_long import single_pass

    r = fft_layout(n)[0]
    passes = "single pass" if single_pass(n) else "two passes"
    row = {"model": model, "H": H, "L": L, "B": B, "dtype": str(act),
           "layout": "one program" if r == 1 else f"rows (R={r}), {passes}"}
    reason = unsupported_reason(v, spec_re)
    if reason is not None:
        row["kernel"] = f"fallback: {reason}"
    for name, fn in (("torch", reference), ("triton", fused)):
        if name == "triton" and reason is not None:
            continue
        dy = torch.randn(B, H, L, device=device, dtype=act)
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = time_ms(fn, device, reps)

        def fwd_bwd():
            fn().backward(dy)
            for t in (v, x1, x2, skip, spec_re, spec_im):
                t.grad = None
        row[f"{name}_fwdbwd_ms"] = time_ms(fwd_bwd, device, reps)
    if reason is None:
        row["speedup_fwd"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
        row["speedup_fwdbwd"] = row["torch_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
        el = v.element_size()
        scratch_fwd, scratch_bwd = conv_scratch_bytes(L)
        fwd_bytes = el * 4 * B * H * L + 8 * H * n + B * H * scratch_fwd
        row.update(_rates(B * H * conv_flops(L, False), fwd_bytes, row["triton_fwd_ms"], peaks))
        bwd_rates = _rates(B * H * (conv_flops(L, False) + conv_flops(L, True)),
                           fwd_bytes + el * conv_bwd_activation_arrays(L) * B * H * L + 16 * H * n
                           + B * H * scratch_bwd,
                           row["triton_fwdbwd_ms"], peaks)
        row.update({f"fwdbwd_{k}": val for k, val in bwd_rates.items()})
        print(f"  fftconv {model} L={L:6d} {row['layout']:12s} speed-up fwd {row['speedup_fwd']:.2f}x  fwd+bwd "
              f"{row['speedup_fwdbwd']:.2f}x", file=sys.stderr)
    del v, x1, x2
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _bench_front(device, tokens: int, H: int, L: int, reps: int, smoke: bool) -> dict:
    """The mixer's short conv + gated conv as two kernels (the short conv reading the in_linear output's
    channels-last layout, as in the mixer, and writing x1, x2, v) vs fused (kernels/fftconv_front.py: the
    short conv inside the FFT-conv kernel's loads of the channels-first z), forward and forward+backward."""
    from m2train.kernels import fftconv_front, shortconv
    from m2train.kernels.fft_monarch import kernel_fft_size, monarch_kernel_spectrum
    from m2train.kernels.fftconv import gated_fft_conv

    act = torch.float32 if smoke else torch.bfloat16
    B = max(1, tokens // L)
    z_last = torch.randn(B, L, 3 * H, device=device, dtype=act, requires_grad=True)   # in_linear output
    z_first = torch.randn(B, 3 * H, L, device=device, dtype=act, requires_grad=True)  # channels-first, no bias
    mk = lambda *shape: torch.randn(*shape, device=device, requires_grad=True)  # noqa: E731
    w, b, b_in, skip = mk(3 * H, 1, 3), mk(3 * H), mk(3 * H), mk(H)
    spec_re, spec_im = (t.detach().requires_grad_() for t in
                        monarch_kernel_spectrum(torch.randn(H, L, device=device) * 0.01, None, kernel_fft_size(L)))
    if fftconv_front.unsupported_reason(z_first, w, spec_re) is not None:
        return {}

    def separate():
        x1, x2, v = shortconv.causal_short_conv(z_last.transpose(1, 2), w, b).split(H, dim=1)
        return gated_fft_conv(v, spec_re, spec_im, skip, x1, x2)

    def fused():
        return fftconv_front.front_gated_fft_conv(z_first, b_in, w, b, spec_re, spec_im, skip)

    out = {}
    dy = torch.randn(B, H, L, device=device, dtype=act)
    for name, fn in (("separate", separate), ("fused", fused)):
        with torch.no_grad():
            out[f"front_{name}_fwd_ms"] = time_ms(fn, device, reps)

        def fwd_bwd():
            fn().backward(dy)
            for t in (z_last, z_first, w, b, b_in, skip, spec_re, spec_im):
                t.grad = None
        out[f"front_{name}_fwdbwd_ms"] = time_ms(fwd_bwd, device, reps)
    out["front_speedup_fwd"] = out["front_separate_fwd_ms"] / out["front_fused_fwd_ms"]
    out["front_speedup_fwdbwd"] = out["front_separate_fwdbwd_ms"] / out["front_fused_fwdbwd_ms"]
    print(f"  short conv fused in front, H={H} L={L:6d}: fwd {out['front_speedup_fwd']:.2f}x  fwd+bwd "
          f"{out['front_speedup_fwdbwd']:.2f}x", file=sys.stderr)
    del z_last, z_first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------- models
def _encoder(config_name: str, L: int, kernels: str, device, dtype, smoke: bool):
    from m2train.config import load_config
    from m2train.models import build_model

    overrides = [f"model.max_seq_len={L}", f"model.kernels={kernels}", "model.hidden_dropout=0.0"]
    if smoke:
        overrides += ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
                      "model.filter_order=8", "model.num_heads=2", "model.vocab_size=128"]
    model = build_model(load_config(config_name, overrides).model)
    return model.bert.to(device=device, dtype=dtype).eval()


def profile_call(fn, device, top: int = PROFILE_TOP) -> list[dict]:
    """One call of fn under torch.profiler: the `top` GPU kernels (CPU ops without a GPU) by self time, with
    their share of the call's total, so a single GPU run shows where a model's forward spends its time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        events = [(e, e.self_device_time_total) for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    else:
        events = [(e, e.self_cpu_time_total) for e in prof.key_averages()]
    events = [(e, us) for e, us in events if us > 0]
    total = sum(us for _, us in events) or 1.0
    events.sort(key=lambda pair: -pair[1])
    return [{"name": e.key[:90], "calls": e.count, "ms": us / 1e3, "share": 100 * us / total}
            for e, us in events[:top]]


def bench_models(device, tokens: int, lengths, reps: int, smoke: bool) -> list[dict]:
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for L in lengths:
        B = max(1, tokens // L)
        ids = torch.randint(1, 100, (B, L), device=device)
        row = {"L": L, "B": B, "dtype": str(dtype)}
        for label, cfg, kernels in (("m2_bert_80m_kernels", "m2_bert_80m", "triton"),
                                    ("m2_bert_80m_torch", "m2_bert_80m", "torch"),
                                    ("bert_base_sdpa", "bert_base", "torch")):
            enc = _encoder(cfg, L, kernels, device, dtype, smoke)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")      # the long-sequence fallback warning, once is enough
                ms = time_ms(lambda: enc(ids), device, reps)
                if L == max(lengths) and label != "m2_bert_80m_torch":
                    row[f"{label}_profile"] = profile_call(lambda: enc(ids), device)
            row[f"{label}_ms"] = ms
            row[f"{label}_tokens_per_ms"] = B * L / ms
            del enc
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["m2_kernels_vs_bert"] = row["m2_bert_80m_kernels_tokens_per_ms"] / row["bert_base_sdpa_tokens_per_ms"]
        print(f"  M2-BERT-80M L={L:6d}  {row['m2_bert_80m_kernels_tokens_per_ms']:.1f} tok/ms vs BERT-base "
              f"{row['bert_base_sdpa_tokens_per_ms']:.1f} ({row['m2_kernels_vs_bert']:.2f}x)", file=sys.stderr)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- reporting
def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    p = result["peaks"]
    out = [f"Device: {result['device']} - measured peaks: {p['matmul_tflops']:.1f} TFLOP/s "
           f"({p['dtype']} matmul {p['matmul_shape'][0]}^3), {p['copy_gbs']:.0f} GB/s (copy, read+write)", ""]
    if result["monarch"]:
        out += ["| op | H | torch fwd ms | triton fwd ms | speed-up fwd | speed-up fwd+bwd | TFLOP/s (% peak) | GB/s (% peak) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in result["monarch"]:
            op = r["op"] + (f" (two kernels: {r['two_kernel_fwd_ms']:.3f} ms fwd, {r['two_kernel_fwdbwd_ms']:.3f} ms "
                            "fwd+bwd)" if "two_kernel_fwd_ms" in r else "")
            out.append(f"| {op} | {r['H']} | {r['torch_fwd_ms']:.3f} | {r['triton_fwd_ms']:.3f} | "
                       f"{r['speedup_fwd']:.2f}x | {r['speedup_fwdbwd']:.2f}x | {r['tflops']:.1f} "
                       f"({r['pct_peak_flops']:.0f}%) | {r['gbs']:.0f} ({r['pct_peak_bw']:.0f}%) |")
        out.append("")
    if result["fftconv"]:
        out += ["| gated FFT conv | L | layout | B | torch fwd ms | triton fwd ms | speed-up fwd | torch fwd+bwd ms | "
                "triton fwd+bwd ms | speed-up fwd+bwd | fwd TFLOP/s (% peak) | fwd GB/s (% peak) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["fftconv"]:
            head = f"| {r['model']} H={r['H']} | {r['L']} | {r.get('layout', '-')} | {r['B']} |"
            if "speedup_fwd" not in r:
                out.append(f"{head} {r['torch_fwd_ms']:.3f} | - | - | "
                           f"{r['torch_fwdbwd_ms']:.3f} | - | - | {r['kernel']} | |")
                continue
            out.append(f"{head} {r['torch_fwd_ms']:.3f} | "
                       f"{r['triton_fwd_ms']:.3f} | {r['speedup_fwd']:.2f}x | {r['torch_fwdbwd_ms']:.3f} | "
                       f"{r['triton_fwdbwd_ms']:.3f} | {r['speedup_fwdbwd']:.2f}x | {r['tflops']:.1f} "
                       f"({r['pct_peak_flops']:.0f}%) | {r['gbs']:.0f} ({r['pct_peak_bw']:.0f}%) |")
        out.append("")
        fronts = [r for r in result["fftconv"] if "front_speedup_fwd" in r]
        if fronts:
            out += ["| short conv + gated conv | L | B | two kernels fwd ms | fused fwd ms | speed-up fwd | "
                    "two kernels fwd+bwd ms | fused fwd+bwd ms | speed-up fwd+bwd |",
                    "|---|---|---|---|---|---|---|---|---|"]
            out += [f"| {r['model']} H={r['H']} | {r['L']} | {r['B']} | {r['front_separate_fwd_ms']:.3f} | "
                    f"{r['front_fused_fwd_ms']:.3f} | {r['front_speedup_fwd']:.2f}x | "
                    f"{r['front_separate_fwdbwd_ms']:.3f} | {r['front_fused_fwdbwd_ms']:.3f} | "
                    f"{r['front_speedup_fwdbwd']:.2f}x |" for r in fronts]
            out.append("")
    if result["models"]:
        out += ["| L | B | M2-BERT-80M kernels tok/ms | M2-BERT-80M torch tok/ms | BERT-base SDPA tok/ms | "
                "M2 (kernels) / BERT |", "|---|---|---|---|---|---|"]
        for r in result["models"]:
            out.append(f"| {r['L']} | {r['B']} | {r['m2_bert_80m_kernels_tokens_per_ms']:.1f} | "
                       f"{r['m2_bert_80m_torch_tokens_per_ms']:.1f} | {r['bert_base_sdpa_tokens_per_ms']:.1f} | "
                       f"{r['m2_kernels_vs_bert']:.2f}x |")
        for r in result["models"]:
            for label, title in (("m2_bert_80m_kernels", "M2-BERT-80M (kernels)"), ("bert_base_sdpa", "BERT-base SDPA")):
                if f"{label}_profile" in r:
                    out += ["", f"{title} forward at L = {r['L']}, B = {r['B']}: top kernels by self time "
                                f"(one profiled call)", "", "| kernel | calls | ms | share |", "|---|---|---|---|"]
                    out += [f"| `{e['name']}` | {e['calls']} | {e['ms']:.3f} | {e['share']:.1f}% |"
                            for e in r[f"{label}_profile"]]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2train.kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="~2 minute subset: H = 768 and 1280 only, L = 2048, 4096 (and 16384 for the FFT "
                        "conv), fewer repetitions")
    p.add_argument("--smoke", action="store_true",
                   help="no GPU needed: tiny shapes on the CPU through Triton's interpreter (sets "
                        "TRITON_INTERPRET=1); checks the plumbing, its timings mean nothing")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"sequence lengths for the FFT conv and model sections (default {' '.join(map(str, LENGTHS))})")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per measured call, B = tokens // L (default 65536; 16384 for the model section)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (median reported; "
                   "default 20, 5 with --quick)")
    p.add_argument("--sections", nargs="+", choices=("monarch", "fftconv", "models"),
                   default=["monarch", "fftconv", "models"], help="which parts to run (default all)")
    p.add_argument("--json", default="benchmarks/kernels_bench.json",
                   help="where to write the results as JSON (default benchmarks/kernels_bench.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if torch.cuda.is_available():
            print("--smoke is the no-GPU plumbing check; run without it on a GPU", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules:
            print("--smoke needs TRITON_INTERPRET=1 before Triton is imported; set it in the environment",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        global WARMUP
        WARMUP = 1
    elif not torch.cuda.is_available():
        print("m2train.kernels.bench needs a CUDA GPU (it times Triton kernels against cuBLAS/cuFFT and "
              "FlashAttention). Without one, `--smoke` runs a tiny CPU plumbing check.", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False     # fp32 references stay fp32 (the kernels' own choice)

    if args.smoke:
        lengths = args.lengths or [64, 300]
        tokens, model_tokens, reps = args.tokens or 64, args.tokens or 64, args.reps or 1
        hidden = [(16, 32)]
        conv_models = {"tiny": 4}
    elif args.quick:
        lengths = args.lengths or list(QUICK_LENGTHS)
        tokens, model_tokens, reps = args.tokens or 65536, args.tokens or 16384, args.reps or 5
        hidden = [(768, 3072), GPT_360M]
        conv_models = CONV_MODELS
    else:
        lengths = args.lengths or list(LENGTHS)
        tokens, model_tokens, reps = args.tokens or 65536, args.tokens or 16384, args.reps or 20
        hidden = [(h, 4 * h) for h in BERT_HIDDEN] + [GPT_360M]
        conv_models = CONV_MODELS

    from m2train.kernels import fft_monarch

    saved_layout = fft_monarch.ONE_PROGRAM_MAX_FFT, fft_monarch.ROW_FFT_SIZE
    if args.smoke:
        # Rows of 256 points from L = 129 on, so the three-level kernels run too (at interpreter-sized shapes).
        fft_monarch.ONE_PROGRAM_MAX_FFT = fft_monarch.ROW_FFT_SIZE = 256
    try:
        return _run(args, device, lengths, tokens, model_tokens, reps, hidden, conv_models)
    finally:
        fft_monarch.ONE_PROGRAM_MAX_FFT, fft_monarch.ROW_FFT_SIZE = saved_layout


def _run(args, device, lengths, tokens, model_tokens, reps, hidden, conv_models) -> int:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, smoke)"
    print(f"measuring peaks on {name} ...", file=sys.stderr)
    peaks = measure_peaks(device, args.smoke)
    result = {"device": name, "torch": torch.__version__, "peaks": peaks, "argv": sys.argv[1:],
              "monarch": [], "fftconv": [], "models": []}
    if "monarch" in args.sections:
        dtype = torch.float32 if args.smoke else torch.bfloat16
        result["monarch"] = bench_monarch(device, dtype, tokens, hidden, peaks, reps)
    if "fftconv" in args.sections:
        result["fftconv"] = bench_fftconv(device, tokens, conv_models, lengths, peaks, reps, args.smoke)
    if "models" in args.sections:
        model_lengths = [4096] if args.quick and not args.lengths else lengths
        result["models"] = bench_models(device, model_tokens, model_lengths, reps, args.smoke)
    print(markdown(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
