"""Tensor and context parallelism together (TP = 2 x CP = 2) on 4 real gloo processes, fp32: the model with
TP applied, then CP (m2train.parallel's order), equals the single-process one - loss, logits gathered over
the vocabulary shards and the sequence chunks, and every parameter's gradient (summed over CP ranks, then
the TP shards merged; relative error < 1e-5, one loss on every rank) - for M2-GPT and M2-BERT, on the torch
path (also under activation checkpointing) and with the fused kernels; with dropout on, TP peers keep their
replicated tensors identical."""

from __future__ import annotations

import copy

import pytest
import torch

from kernel_helpers import ran_kernel, recording_fused_convs
from test_checkpoint_helpers import run_distributed
# The CP tests' batch (labels and padding inside both CP chunks), error and equivalence checks.
from test_context_parallel import _assert_equivalent, rel_err
from test_context_parallel import _batch as _cp_batch

TP, CP = 2, 2


def _batch(cfg, B: int, L: int, arch: str) -> dict:
    return _cp_batch(cfg, B, L, torch.Generator().manual_seed(1), arch)


def _equivalence(arch: str, overrides: dict, L: int = 24, checkpointing: str = "none") -> dict:
    """Reference (whole model, whole sequence, this process) vs TP x CP over the 4 ranks; checkpointing:
    activation checkpointing applied last (m2train.parallel's order), its recompute repeating the
    exchanges and TP collectives in backward."""
    import torch.distributed as dist

    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.context_parallel import apply_context_parallel, gather_sequence, shard_batch
    from m2train.parallel.tensor_parallel import apply_tensor_parallel, gather_logits, gather_tensors, shard_rules

    torch.manual_seed(0)                                   # same full weights and batch on every rank
    cfg = tiny_model_cfg(arch, vocab_size=128, max_seq_len=L, **overrides)
    ref = build_model(cfg).train()
    batch = _batch(cfg, 2, L, arch)
    ref_out = ref(**batch)
    ref_out.loss.backward()

    model = apply_tensor_parallel(copy.deepcopy(ref), groups.tp_group())
    model = apply_context_parallel(model, groups.cp_group(), grad_reduction="sum")
    if checkpointing != "none":
        from m2train.parallel.activation_checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(model, checkpointing)
    model.zero_grad(set_to_none=True)
    with recording_fused_convs() as convs:
        out = model(**shard_batch(batch, groups.cp_group()))
    glu_ops = [name for name in ("GLUMLPFunction", "GLUBlockdiagFunction") if ran_kernel(out.loss, name)]
    out.loss.backward()
    errs = {"loss": rel_err(out.loss.detach(), ref_out.loss)}
    if not overrides.get("loss_chunk_tokens"):
        logits = gather_sequence(gather_logits(out.logits.detach(), groups.tp_group()), groups.cp_group())
        errs["logits"] = rel_err(logits, ref_out.logits.detach())
    # Parameters are replicated over CP ranks, each holding its positions' (or channels') share of the
    # gradient: sum over CP, then merge the TP shards.
    local = {}
    for name, p in model.named_parameters():
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
        dist.all_reduce(g, group=groups.cp_group())
        local[name] = g
    full = gather_tensors(local, shard_rules(model, TP), groups.tp_group())
    ref_params = dict(ref.named_parameters())
    losses = [torch.zeros(()) for _ in range(TP * CP)]
    dist.all_gather(losses, out.loss.detach().float())
    return {"errs": errs, "grads": {n: rel_err(g, ref_params[n].grad) for n, g in full.items()},
            "n_params": len(ref_params), "convs": convs, "glu_ops": glu_ops,
            "same_loss": len({x.item() for x in losses}) == 1,
            "zero_grads": [n for n, p in ref.named_parameters() if p.grad is None or not p.grad.any()]}


def _torch_path_cases(rank, world):
    from m2train.parallel import groups

    groups.init_model_parallel(tp=TP, cp=CP)
    assert (groups.tp_rank(), groups.cp_rank()) == (rank % TP, rank // TP)
    results = {
        "m2_gpt": _equivalence("m2_gpt", {}),
        "m2_gpt_chunked_loss": _equivalence("m2_gpt", {"loss_chunk_tokens": 7}),
        "m2_bert": _equivalence("m2_bert", {}),
        "m2_bert_no_residual_conv": _equivalence("m2_bert", {"residual_long_conv": False}),
        "m2_gpt_every_block_checkpointed": _equivalence("m2_gpt", {}, checkpointing="every_block"),
    }
    dropout = _dropout_replicas(rank)
    dropout["error"] = _channel_error()
    dropout["order_error"] = _order_error()
    groups.destroy_model_parallel()
    return results, dropout


def _channel_error() -> str:
    """The error for a width whose TP shard does not split over the CP ranks (34 / 2 = 17 channels)."""
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.context_parallel import apply_context_parallel
    from m2train.parallel.tensor_parallel import apply_tensor_parallel

    cfg = tiny_model_cfg("m2_gpt", vocab_size=128, hidden_size=34, intermediate_size=68, mlp_type="dense")
    model = apply_tensor_parallel(build_model(cfg), groups.tp_group())
    try:
        apply_context_parallel(model, groups.cp_group())
    except ValueError as e:
        return str(e)
    return "no error"


def _order_error() -> str:
    """The error for TP applied after CP (it would replace the mixers and drop the CP classes)."""
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.context_parallel import apply_context_parallel
    from m2train.parallel.tensor_parallel import apply_tensor_parallel

    model = apply_context_parallel(build_model(tiny_model_cfg("m2_gpt", vocab_size=128)), groups.cp_group())
    try:
        apply_tensor_parallel(model, groups.tp_group())
    except ValueError as e:
        return str(e)
    return "no error"


def _dropout_replicas(rank: int) -> dict:
    """With dropout on and the trainer's seeding (m2train.train.trainer.replica_seed: one stream per CP rank,
    shared by its TP peers), the loss and the replicated parameters' gradients of TP peers are identical."""
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.context_parallel import apply_context_parallel, shard_batch
    from m2train.parallel.tensor_parallel import apply_tensor_parallel, shard_rules
    from m2train.train.trainer import replica_seed

    torch.manual_seed(0)
    cfg = tiny_model_cfg("m2_bert", vocab_size=128, max_seq_len=24, hidden_dropout=0.1, mixer_dropout=0.1)
    model = apply_tensor_parallel(build_model(cfg).train(), groups.tp_group())
    model = apply_context_parallel(model, groups.cp_group())
    torch.manual_seed(replica_seed(0, 0, CP, groups.cp_rank()))
    out = model(**shard_batch(_batch(cfg, 2, 24, "m2_bert"), groups.cp_group()))
    out.loss.backward()
    rules = shard_rules(model, TP)
    return {"loss": out.loss.item(),
            "replicated_grads": {n: p.grad.clone() for n, p in model.named_parameters() if n not in rules}}


def _assert_all_equivalent(results: list) -> None:
    for r in results:
        for case, figures in r.items():
            try:
                _assert_equivalent([figures])
            except AssertionError as e:
                raise AssertionError(f"{case}: {e}") from None


@pytest.mark.slow  # four spawned processes importing megatron-core + DeepSpeed on 2 cores: ~1 min
def test_tp2_cp2_forward_backward_equal_single_process():
    results, dropout = zip(*run_distributed(_torch_path_cases, TP * CP))
    _assert_all_equivalent(results)
    assert all(not figures["convs"] and not figures["glu_ops"] for r in results for figures in r.values())
    # Dropout: one loss everywhere (the global mean); TP peers (ranks 2c, 2c + 1) keep replicated tensors equal.
    assert len({d["loss"] for d in dropout}) == 1
    assert all(d["error"] == "context parallelism: model.hidden_size / parallel.tensor_parallel=2 = 17 channels "
               "per TP rank is not a multiple of parallel.context_parallel=2 (the long convs are split by channel)"
               for d in dropout), dropout[0]["error"]
    assert all(d["order_error"] == "apply_tensor_parallel: apply tensor parallelism before context parallelism"
               for d in dropout), dropout[0]["order_error"]
    for c in range(CP):
        a, b = dropout[c * TP]["replicated_grads"], dropout[c * TP + 1]["replicated_grads"]
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]


def _kernel_cases(rank, world):
    from m2train.parallel import groups

    groups.init_model_parallel(tp=TP, cp=CP)
    # Half the usual width: the interpreter runs one program per (sequence, channel).
    small = {"kernels": "triton", "hidden_size": 16, "intermediate_size": 32}
    results = {"m2_gpt": _equivalence("m2_gpt", small),
               "m2_bert": _equivalence("m2_bert", {**small, "pad_masking": True})}
    groups.destroy_model_parallel()
    return results


@pytest.mark.slow  # four spawned processes, the FFT-conv and GLU kernels interpreted: ~1-2 min on 2 cores
def test_tp2_cp2_with_fused_kernels_equal_single_process():
    results = run_distributed(_kernel_cases, TP * CP)
    _assert_all_equivalent(results)
    # Each layer's two long convs ran the fused kernel on whole sequences (L = 24) of this rank's
    # H / (TP x CP) = 4 channels between the CP exchanges: the gated one, then the residual one adding it.
    per_layer = [((2, 4, 24), "gate_out"), ((2, 4, 24), "addend")]
    for r in results:
        for case, figures in r.items():
            assert figures["convs"] == per_layer * 2, (case, figures["convs"])
            assert figures["glu_ops"] == ["GLUMLPFunction"], (case, figures["glu_ops"])   # TP's GLU slices
