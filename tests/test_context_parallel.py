"""Context parallelism (m2train.parallel.context_parallel) on 2 real gloo processes, fp32: the CP=2 model
equals the unsharded one (logits gathered over the sequence, loss, and parameter gradients reduced over the
CP ranks), causality holds across the chunk boundary, and a CP=2 M2-GPT runs forward and backward at
L = 32,768."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from kernel_helpers import recording_fused_convs
from test_checkpoint_helpers import run_distributed

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _batch(cfg, B: int, L: int, gen: torch.Generator, arch: str) -> dict:
    ids = torch.randint(1, cfg.vocab_size, (B, L), generator=gen)
    if arch == "m2_gpt":
        labels = torch.randint(0, cfg.vocab_size, (B, L), generator=gen)
        labels[:, :3] = -100                               # unlabelled positions, only on rank 0's chunk
        return {"input_ids": ids, "labels": labels}
    labels = torch.where(torch.rand(B, L, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 5:] = 0                                    # padding at the end of sample 1 (rank 1's chunk)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "token_type_ids": (torch.arange(L) >= L // 2).long().expand(B, L).contiguous()}


def _equivalence(rank, world, arch, overrides, grad_reduction, L, checkpointing="none"):
    """Reference (whole sequence, this process) vs CP over both ranks; returns the figures to assert.
    checkpointing: activation checkpointing applied after CP (the trainer's order), whose recompute
    repeats the exchanges during backward."""
    import torch.distributed as dist
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel.context_parallel import apply_context_parallel, gather_sequence, shard_batch

    kernels = overrides.get("kernels") == "triton"
    recording = contextlib.ExitStack()                     # closed before returning
    kernel_calls = recording.enter_context(recording_fused_convs()) if kernels else None
    exchanges = _count_all_to_alls() if kernels else None
    torch.manual_seed(0)                                   # same weights and batch on both ranks
    cfg = tiny_model_cfg(arch, max_seq_len=L, **overrides)
    ref = build_model(cfg).train()
    batch = _batch(cfg, 2, L, torch.Generator().manual_seed(1), arch)
    ref_out = ref(**batch)
    ref_out.loss.backward()

    group = dist.new_group(list(range(world)))
    cp = apply_context_parallel(copy.deepcopy(ref), group, grad_reduction=grad_reduction)
    if checkpointing != "none":
        from m2train.parallel.activation_checkpointing import apply_activation_checkpointing
        cp = apply_activation_checkpointing(cp, checkpointing)
    cp.zero_grad(set_to_none=True)
    if kernels:
        kernel_calls.clear()
        exchanges.clear()
    out = cp(**shard_batch(batch, group))
    if kernels:
        # The CP long convs ran the fused kernel on whole sequences of H/P channels. With a residual conv
        # both convs share one all-to-all there and one back: the first gates its output with x2, the
        # second adds the first's; without one, x2 stays local (an ungated conv between two exchanges).
        H = cfg.hidden_size
        if cfg.residual_long_conv:
            per_layer = [((2, H // world, L), "gate_out"), ((2, H // world, L), "addend")]
            shapes = [(3, 2, H, L // world), (2, H // world, L)]
        else:
            per_layer = [((2, H // world, L), "")]
            shapes = [(2, H, L // world), (2, H // world, L)]
        assert kernel_calls == per_layer * cfg.num_layers, kernel_calls
        assert exchanges == shapes * cfg.num_layers, exchanges
    out.loss.backward()
    errs = {"loss": rel_err(out.loss.detach(), ref_out.loss)}
    if overrides.get("loss_chunk_tokens"):               # training forwards without logits, on both sides
        assert out.logits is None and ref_out.logits is None
    else:
        errs["logits"] = rel_err(gather_sequence(out.logits.detach(), group), ref_out.logits.detach())
    grads = {}
    ref_params = dict(ref.named_parameters())
    for name, p in cp.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.clone()
        dist.all_reduce(g, group=group)
        if grad_reduction == "mean":
            g /= world
        grads[name] = rel_err(g, ref_params[name].grad)
    # The local chunks' own losses differ from rank to rank; the reported loss must not.
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, out.loss.detach().float())
    recording.close()
    return {"errs": errs, "grads": grads, "same_loss": len({x.item() for x in losses}) == 1,
            "n_params": sum(1 for _ in cp.parameters()),
            "zero_grads": [n for n, p in ref.named_parameters() if p.grad is None or not p.grad.any()]}


def _count_all_to_alls() -> list:
    """Record the input shape of every all-to-all of m2train.parallel.context_parallel from now on."""
    from m2train.parallel import context_parallel

    calls, original = [], context_parallel._all_to_all

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)
    context_parallel._all_to_all = counted
    return calls


def _assert_equivalent(results):
    for r in results:
        assert all(e < REL_TOL for e in r["errs"].values()), r["errs"]
        assert r["same_loss"]
        bad = {n: e for n, e in r["grads"].items() if not e < REL_TOL}
        assert not bad, f"gradients off (relative error): {bad}"
        assert len(r["grads"]) == r["n_params"]
        # The comparison means something only if the gradients are not trivially zero.
        assert len(r["zero_grads"]) < r["n_params"] // 4, r["zero_grads"]


@pytest.fixture(scope="module")
def small_runs():
    """Every small-sequence case in ONE pair of processes (each spawn pays interpreter, torch and
    DeepSpeed start-up): {name: [rank 0 result, rank 1 result]}."""
    results = run_distributed(_small_cases, 2)
    return {k: [r[k] for r in results] for k in results[0]}


def _small_cases(rank, world):
    return {"equivalence": _equivalence_cases(rank, world), "bf16": _bf16(rank, world),
            "causality": _causality(rank, world), "errors": _errors(rank, world),
            "no_labels": _no_labels(rank, world)}


def _no_labels(rank, world):
    """An MLM batch in which only rank 1's chunk has labels, and one with none at all."""
    import torch.distributed as dist
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel.context_parallel import apply_context_parallel, shard_batch

    torch.manual_seed(0)
    ref = build_model(tiny_model_cfg("m2_bert", max_seq_len=32))
    cp = apply_context_parallel(copy.deepcopy(ref), dist.new_group(list(range(world))), grad_reduction="sum")
    ids = torch.randint(1, 101, (2, 32), generator=torch.Generator().manual_seed(4))
    out = {}
    for name, labels in (("half", torch.where(torch.arange(32) >= 20, ids, -100)),
                         ("none", torch.full_like(ids, -100))):
        batch = {"input_ids": ids, "labels": labels}
        loss = cp(**shard_batch(batch, cp._cp_group)).loss
        loss.backward()
        out[name] = (loss.item(), ref(**batch).loss.item())
    return out


def _errors(rank, world):
    """The message of each unsupported input (None if it did not raise)."""
    import torch.distributed as dist
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel.context_parallel import apply_context_parallel, shard_sequence

    group = dist.new_group(list(range(world)))

    def message(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    def apply(arch, **kw):
        return lambda: apply_context_parallel(build_model(tiny_model_cfg(arch, **kw)), group)

    cp = apply_context_parallel(build_model(tiny_model_cfg("m2_gpt", max_seq_len=64)), group)
    return {
        "odd_length": message(lambda: shard_sequence(torch.zeros(1, 33), group)),
        "attention": message(apply("gpt")),
        "classification": message(apply("m2_bert", head="classification")),
        "hidden": message(apply("m2_gpt", hidden_size=33, intermediate_size=66, mlp_type="dense")),
        "monarch": message(apply("m2_gpt", sequence_mixer="monarch_causal")),
        "twice": message(lambda: apply_context_parallel(cp, group)),
        "too_long": message(lambda: cp(torch.zeros(1, 40, dtype=torch.long))),     # 2 x 40 > 64
        "short_chunk": message(lambda: cp(torch.zeros(1, 1, dtype=torch.long))),   # chunk < halo of 2
    }


@pytest.mark.slow  # the shared 2-process run
def test_cp_loss_when_a_chunk_or_the_batch_has_no_labels(small_runs):
    for r in small_runs["no_labels"]:
        cp, ref = r["half"]
        assert abs(cp - ref) <= REL_TOL * abs(ref)      # rank 0's chunk has no label: still the global mean
        assert r["none"] == (0.0, 0.0)


@pytest.mark.slow  # the shared 2-process run
def test_cp_errors_name_the_config_key(small_runs):
    e = small_runs["errors"][0]
    assert "parallel.context_parallel=2" in e["odd_length"]
    assert "model.arch" in e["attention"]
    assert "classification" in e["classification"]
    assert "model.hidden_size=33" in e["hidden"]
    assert "model.sequence_mixer" in e["monarch"]
    assert "already applied" in e["twice"]
    assert "max_seq_len" in e["too_long"]
    assert "model.short_conv_kernel" in e["short_chunk"]


@pytest.mark.slow  # the shared 2-process run: ~30-60 s on 2 busy cores
def test_cp2_m2_gpt_and_bert_equal_single_process(small_runs):
    for case in zip(*small_runs["equivalence"]):
        _assert_equivalent(case)


def _equivalence_cases(rank, world):
    return [
        _equivalence(rank, world, "m2_gpt", {}, "sum", 32),
        # ZeRO over dp x cp averages gradients: grads averaged over CP ranks must equal the reference.
        _equivalence(rank, world, "m2_gpt", {"short_conv_kernel": 4}, "mean", 32),
        _equivalence(rank, world, "m2_bert", {"pad_masking": True}, "sum", 32),
        _equivalence(rank, world, "m2_bert", {"residual_long_conv": False, "mixer_input_norm": True}, "mean", 24),
        _equivalence(rank, world, "m2_gpt", {}, "sum", 32, checkpointing="every_block"),
        _equivalence(rank, world, "m2_bert", {}, "sum", 32, checkpointing="mixer"),
        # model.loss_chunk_tokens: each rank's chunk loss summed chunk by chunk, logits never kept.
        _equivalence(rank, world, "m2_gpt", {"loss_chunk_tokens": 5}, "sum", 32),
        # Kernels forced (interpreted here): the CP long convs run kernels.fftconv on whole sequences.
        _equivalence(rank, world, "m2_gpt", {"kernels": "triton"}, "sum", 32),
        _equivalence(rank, world, "m2_bert", {"kernels": "triton", "pad_masking": True}, "mean", 32),
        _equivalence(rank, world, "m2_bert", {"kernels": "triton", "residual_long_conv": False}, "sum", 24),
    ]


def _bf16(rank, world):
    """What DeepSpeed's bf16 engine runs: bf16 weights and activations (FFTs upcast to fp32 inside)."""
    import torch.distributed as dist
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel.context_parallel import apply_context_parallel, shard_batch

    torch.manual_seed(0)
    cfg = tiny_model_cfg("m2_gpt", max_seq_len=32)
    ref = build_model(cfg).to(torch.bfloat16)
    batch = _batch(cfg, 2, 32, torch.Generator().manual_seed(1), "m2_gpt")
    ref_loss = ref(**batch).loss
    group = dist.new_group(list(range(world)))
    cp = apply_context_parallel(copy.deepcopy(ref), group, grad_reduction="sum")
    loss = cp(**shard_batch(batch, group)).loss
    loss.backward()
    return {"loss": rel_err(loss.detach().float(), ref_loss.detach().float()),
            "grads_bf16_finite": all(p.grad.dtype == torch.bfloat16 and p.grad.isfinite().all()
                                     for p in cp.parameters() if p.grad is not None)}


@pytest.mark.slow  # the shared 2-process run
def test_cp2_bf16_runs_and_agrees(small_runs):
    for r in small_runs["bf16"]:
        assert r["loss"] < 1e-2, r          # bf16 round-off, not an fp32 comparison
        assert r["grads_bf16_finite"]


def _causality(rank, world):
    """CP=2 logits after changing one token: what may and may not change, across the chunk boundary.
    fp64, so that round-off (~1e-15) is far below the smallest real influence of a distant token."""
    import torch.distributed as dist
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel.context_parallel import apply_context_parallel, gather_sequence, shard_sequence

    L = 32
    group = dist.new_group(list(range(world)))
    out = {}
    for arch in ("m2_gpt", "m2_bert"):
        torch.manual_seed(0)
        model = apply_context_parallel(build_model(tiny_model_cfg(arch, max_seq_len=L)).double().eval(), group)
        ids = torch.randint(1, 101, (1, L), generator=torch.Generator().manual_seed(2))

        def logits(ids):
            with torch.no_grad():
                return gather_sequence(model(shard_sequence(ids, group)).logits, group)[0]

        base = logits(ids)
        for p in (5, L // 2 + 2):                      # a position in rank 0's chunk, one in rank 1's
            changed = ids.clone()
            changed[0, p] = ids[0, p] % 100 + 1
            diff = (logits(changed) - base).abs().amax(-1)     # (L,) largest change per position
            out[(arch, p)] = diff
    return out


@pytest.mark.slow  # the shared 2-process run
def test_cp2_causal_and_bidirectional_across_chunks(small_runs):
    diffs = small_runs["causality"][0]
    L = 32
    for p in (5, L // 2 + 2):
        gpt = diffs[("m2_gpt", p)]
        assert gpt[:p].max() < 1e-12, f"M2-GPT under CP: a change at {p} reached earlier positions {gpt[:p]}"
        assert (gpt[p:] > 1e-9).all(), f"M2-GPT under CP: a change at {p} did not reach every later position"
        bert = diffs[("m2_bert", p)]
        assert (bert > 1e-9).all(), f"M2-BERT under CP: a change at {p} did not reach every position {bert}"


def _long_sequence(rank, world, L):
    """CP=2 M2-GPT at length L: forward + backward, compared with the unsharded model, with the largest
    tensor autograd saves recorded (an O(L²) intermediate would show up there)."""
    import torch.distributed as dist
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel.context_parallel import apply_context_parallel, gather_sequence, shard_batch

    torch.manual_seed(0)
    cfg = tiny_model_cfg("m2_gpt", max_seq_len=L, hidden_size=16, intermediate_size=32, num_layers=1,
                         filter_order=8, vocab_size=64)
    ref = build_model(cfg)
    ids = torch.randint(0, 64, (1, L), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}
    ref_out = ref(**batch)
    ref_out.loss.backward()

    group = dist.new_group(list(range(world)))
    cp = apply_context_parallel(copy.deepcopy(ref), group, grad_reduction="sum")
    cp.zero_grad(set_to_none=True)
    largest = [0]

    def pack(t):
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = cp(**shard_batch(batch, group))
    out.loss.backward()
    grad_errs = []
    for (name, p), q in zip(cp.named_parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        grad_errs.append((rel_err(g, q.grad), name))
    logits = gather_sequence(out.logits.detach(), group)
    return {"logits": rel_err(logits, ref_out.logits.detach()), "loss": rel_err(out.loss.detach(), ref_out.loss),
            "grad": max(grad_errs), "largest_saved": largest[0], "local_len": out.logits.shape[1]}


@pytest.mark.slow  # L = 32,768 on two processes: ~15-30 s
def test_cp2_m2_gpt_at_32k_forward_backward():
    L = 32768
    for r in run_distributed(_long_sequence, 2, L):
        assert r["local_len"] == L // 2
        assert r["logits"] < REL_TOL and r["loss"] < REL_TOL, r
        # fp32 gradients of weights that sum over all 32,768 positions (one GEMM in the reference, two halves
        # plus an all-reduce under CP) differ by round-off of order sqrt(L)·eps ≈ 1e-5.
        assert r["grad"][0] < 1e-4, r
        # Largest saved activation: a (1, H/2, 2L)-ish complex FFT buffer or the (1, L/2, vocab) logits,
        # never anything with L² elements (1.07e9 here).
        assert r["largest_saved"] < 64 * L, r
