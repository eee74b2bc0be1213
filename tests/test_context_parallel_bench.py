"""benchmarks/parallel.py: its traffic formulas equal the collectives a real gloo step makes (TP=2 and CP=2
on 2 ranks, TP=2 x CP=2 on 4; tiny M2-GPT, counted by wrapping torch.distributed), a wrong formula is caught,
and the CP activation-memory formula equals the bytes autograd saves."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # after everything else: shadows nothing
import parallel as bench  # noqa: E402  (benchmarks/ is scripts, not a package)
import parallel_memory as memory  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "configs/m2_gpt_tiny.yaml")


@pytest.mark.slow  # one 2-process gloo run of both layouts: ~30-60 s on 2 busy cores
def test_traffic_formula_equals_measured_and_catches_errors():
    cfg = bench.load_model_config(TINY)
    B, L = 1, 32
    layouts = [(2, 1), (1, 2)]
    for (tp, cp), measured in zip(layouts, bench.measure_layouts(TINY, layouts, B, L)):
        formula = bench.tp_traffic(cfg, B, L, tp, 4) if cp == 1 else bench.cp_traffic(cfg, B, L, cp, 4)
        rows, ok = bench.compare_traffic(measured, formula, f"TP={tp} CP={cp}")
        assert ok, "\n".join(rows)
        kinds = {k for m in measured for k, v in m["kinds"].items() if v[0]}
        assert kinds == ({("fwd", "all_reduce"), ("bwd", "all_reduce")} if tp > 1 else
                         {("fwd", "all_reduce"), ("fwd", "all_to_all"), ("bwd", "all_to_all"),
                          ("fwd", "send_recv"), ("bwd", "send_recv")})
        # The comparison has teeth: one layer fewer, or halo of a kernel-2 conv, is a mismatch.
        wrong = (bench.tp_traffic(replace(cfg, num_layers=cfg.num_layers - 1), B, L, tp, 4) if cp == 1 else
                 bench.cp_traffic(replace(cfg, short_conv_kernel=2), B, L, cp, 4))
        assert not bench.compare_traffic(measured, wrong, "wrong")[1]
        saved = measured[0]["saved"]
        if cp > 1:
            # CP activation memory: the formula from the shapes equals what autograd saved (the token ids
            # are views of the whole batch's storage: that batch-sized int64 difference is all).
            f = memory.model_activation_bytes(cfg, B, L, cp, 4)
            assert abs(saved - f) <= B * L * 8 + 16, (saved, f)
        else:
            # TP activation memory: the formula (channels split by T, norms and filter MLPs whole) within
            # 1 % of what autograd saved (a few kB per layer, independent of L, are not modelled); the
            # unsharded formula is far outside that.
            f = memory.model_activation_bytes(cfg, B, L, 1, 4, T=tp)
            assert abs(saved - f) <= 0.01 * f, (saved, f)
            assert abs(saved - memory.model_activation_bytes(cfg, B, L, 1, 4)) > 0.1 * f


@pytest.mark.slow  # four gloo processes: ~1 min on 2 busy cores
def test_tp_and_cp_together_traffic_formula_equals_measured():
    cfg = bench.load_model_config(TINY)
    B, L = 1, 32
    measured = bench.measure_layouts(TINY, [(2, 2)], B, L, world=4)[0]
    rows, ok = bench.compare_traffic(measured, bench.model_parallel_traffic(cfg, B, L, 2, 2, 4), "TP=2 CP=2")
    assert ok, "\n".join(rows)
    # Activation memory: the formula with channels split by TP, then exchanged by CP, within 1 % (CP's
    # exchanging all H channels - the TP-blind CP formula - is not).
    saved, f = measured[0]["saved"], memory.model_activation_bytes(cfg, B, L, 2, 4, T=2)
    assert abs(saved - f) <= 0.01 * f, (saved, f)
    assert abs(saved - memory.model_activation_bytes(cfg, B, L, 2, 4)) > 0.1 * f
    kinds = {k for m in measured for k, v in m["kinds"].items() if v[0]}
    assert kinds == {("fwd", "all_reduce"), ("bwd", "all_reduce"), ("fwd", "all_to_all"), ("bwd", "all_to_all"),
                     ("fwd", "send_recv"), ("bwd", "send_recv")}
    # Teeth: CP exchanging all H channels (not the TP rank's H/2) is a mismatch.
    wrong = []
    for r in range(2):
        t = bench.Traffic()
        bench._tp_collectives(t, cfg, B * L // 2, L, 2, 4)
        bench._cp_collectives(t, cfg, B, L, 2, cfg.hidden_size, r, 4)
        wrong += [t, t]
    assert not bench.compare_traffic(measured, wrong, "wrong")[1]


@pytest.mark.slow  # one 2-process gloo run: ~30 s
def test_sequence_parallel_traffic_formula_equals_measured():
    cfg = bench.load_model_config(TINY)
    B, L = 1, 32
    measured = bench.measure_layouts(TINY, [(2, 1, True)], B, L)[0]
    rows, ok = bench.compare_traffic(measured, bench.model_parallel_traffic(cfg, B, L, 2, 1, 4, sp=True), "TP=2 SP")
    assert ok, "\n".join(rows)
    # SP activation memory: the TP formula with the stream (norms, regions' inputs) split by position too,
    # within 1 % of what autograd saved (the TP-alone formula is not).
    saved, f = measured[0]["saved"], memory.model_activation_bytes(cfg, B, L, 1, 4, T=2, sp=True)
    assert abs(saved - f) <= 0.01 * f, (saved, f)
    assert abs(saved - memory.model_activation_bytes(cfg, B, L, 1, 4, T=2)) > 0.02 * f
    kinds = {k for m in measured for k, v in m["kinds"].items() if v[0]}
    assert kinds == {(p, k) for p in ("fwd", "bwd") for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                             "all_to_all")}
    # Teeth: a formula without the backward's second gather of each region's input is a mismatch.
    wrong = bench.model_parallel_traffic(cfg, B, L, 2, 1, 4, sp=True)[0]
    regathers = cfg.num_layers * 2 + 1
    calls, payload, wire = wrong.kinds[("bwd", "all_gather")]
    part = B * L * cfg.hidden_size * 4 // 2
    wrong.kinds[("bwd", "all_gather")] = [calls - regathers, payload - regathers * part, wire - regathers * part]
    assert not bench.compare_traffic(measured, [wrong, wrong], "wrong")[1]


def test_formulas_scale_as_designed():
    cfg = bench.load_model_config(str(Path(TINY).parents[0] / "m2_gpt_360m.yaml"))
    # CP: per-rank all-to-all payload halves from CP=2 to CP=4; the halo does not grow with L.
    a2, a4 = (bench.cp_traffic(cfg, 1, 8192, P, 2)[1] for P in (2, 4))
    assert a2.payload("all_to_all") == 2 * a4.payload("all_to_all")
    assert bench.cp_traffic(cfg, 1, 2048, 4, 2)[1].payload("send_recv") == a4.payload("send_recv") > 0
    # ... and as much of it in the backward as in the forward.
    assert a2.payload("all_to_all", "fwd") == a2.payload("all_to_all", "bwd")
    # TP: the payload per rank does not depend on T, the ring wire bytes grow as 2(T-1)/T.
    t2, t8 = (bench.tp_traffic(cfg, 1, 2048, T, 2)[0] for T in (2, 8))
    assert t2.payload() == t8.payload() and t8.wire() == pytest.approx(t2.wire() * (2 * 7 / 8) / (2 * 1 / 2))
    # TP and CP together: CP exchanges a TP rank's H/T channels, TP all-reduces a CP rank's L/P tokens.
    both = bench.model_parallel_traffic(cfg, 1, 8192, 2, 2, 2)
    assert len(both) == 4 and both[0] is both[1] and both[2] is both[3]
    assert both[1].payload("all_to_all") == a2.payload("all_to_all") / 2
    tp_alone = bench.tp_traffic(cfg, 1, 8192, 2, 2)[0]
    filters = cfg.num_layers * 2 * 8192 * cfg.filter_order * 2        # (L, O) features: full L on every rank
    assert both[0].payload("all_reduce") - 8 == (tp_alone.payload("all_reduce") - filters) / 2 + filters
    # SP: the forward moves exactly TP's bytes (a reduce-scatter + an all-gather = an all-reduce), plus the
    # residual conv's all-to-all; the backward adds the gathers again (and the small parameter all-reduces).
    for T in (2, 8):
        tp, sp = bench.tp_traffic(cfg, 1, 2048, T, 2)[0], bench.model_parallel_traffic(cfg, 1, 2048, T, 1, 2, True)[0]
        assert sp.wire(phase="fwd") - sp.wire("all_to_all", "fwd") == pytest.approx(tp.wire(phase="fwd"))
        assert sp.wire(phase="bwd") > tp.wire(phase="bwd")
    # Memory: activations per rank shrink with CP, checkpointing keeps far less than all layers.
    n = bench.count_params(cfg)
    m = [memory.memory_per_rank(replace(cfg, max_seq_len=32768), n, 1, 32768, P, 1, False) for P in (1, 8)]
    assert m[1]["activations"] < m[0]["activations"] / 4
    ck = memory.memory_per_rank(replace(cfg, max_seq_len=32768), n, 1, 32768, 1, 1, True)
    assert ck["activations"] < m[0]["activations"] / 5


def test_chunked_loss_memory_formula_equals_saved_bytes():
    """One process: what model.loss_chunk_tokens saves in autograd-held bytes (the fp32 (B·L, V) log-softmax,
    less its own labels and mask) is what head_bytes says, measured on the whole tiny model."""
    import torch

    from m2train.models import build_model
    from m2train.parallel.activation_checkpointing import saved_activation_bytes

    B, L = 2, 64
    saved, formula = {}, {}
    for chunk in (0, 16):
        cfg = replace(bench.load_model_config(TINY), loss_chunk_tokens=chunk)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        batch = bench._step_batch(cfg, B, L)
        saved[chunk] = saved_activation_bytes(model, lambda: model(**batch).loss)
        formula[chunk] = memory.head_bytes(cfg, B, L, 1, 4)
    assert abs((saved[0] - saved[16]) - (formula[0] - formula[16])) <= 8, (saved, formula)
    assert formula[0] - formula[16] > B * L * cfg.vocab_size * 4 * 0.99


@pytest.mark.slow  # interpreted kernels: a one-layer model here and on 2 gloo ranks, ~1 min on 2 cores
def test_kernel_memory_formula_equals_saved_bytes(monkeypatch):
    """With the fused Triton kernels (model.kernels=triton) the activation formula equals what autograd saves:
    CP=1 with the short conv fused in front, in the one-program layout and (shrunk thresholds) the
    three-level one, which also keeps the gated conv's pre-gate output; CP=2 on 2 gloo ranks. The token ids
    are views of the whole batch under CP (as in the torch-path check); 4 bytes are the loss."""
    from m2train.kernels import fft_monarch, fftconv_long

    B = 2
    (_, m1, f1), (_, m2, f2) = memory.kernel_memory_check(TINY, B, 32)
    assert m1 - f1 == 4, (m1, f1)
    assert 0 <= m2 - f2 <= B * 32 * 8 // 2 + 16, (m2, f2)
    # M2-GPT-360M, 8 x 2048 tokens: the kernels keep about half of what the torch path does (no FFT buffers
    # per sequence, the short conv inside the gated conv, GELU recomputed).
    cfg = replace(bench.load_model_config(TINY), **memory.KERNEL_CHECK_MODEL)
    big = replace(bench.load_model_config(str(Path(TINY).parents[0] / "m2_gpt_360m.yaml")), max_seq_len=32768)
    assert sum(memory.activation_bytes_per_layer(big, 8, 2048, 1, 2, True).values()) < \
        0.55 * sum(memory.activation_bytes_per_layer(big, 8, 2048, 1, 2).values())

    import torch

    from m2train.models import build_model
    from m2train.parallel.activation_checkpointing import saved_activation_bytes

    monkeypatch.setattr(fft_monarch, "ONE_PROGRAM_MAX_FFT", 256)
    monkeypatch.setattr(fft_monarch, "ROW_FFT_SIZE", 256)
    monkeypatch.setattr(fftconv_long, "COLUMN_TILE", 128)
    L = 130                                                # N = 512: three levels, 2 rows of 256
    cfg = replace(cfg, kernels="triton", max_seq_len=256)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = bench._step_batch(cfg, B, L)
    saved = saved_activation_bytes(model, lambda: model(**batch).loss)
    layer = memory.activation_bytes_per_layer(cfg, B, L, 1, 4, True)
    assert saved - (sum(layer.values()) + memory.head_bytes(cfg, B, L, 1, 4)) == 4
    assert layer["long convs"] == 2 * B * L * cfg.hidden_size * 4     # pre-gate output + residual input copy
