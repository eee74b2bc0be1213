"""Sequence parallelism (m2train.parallel.sequence_parallel) on top of TP=2, 2 real gloo processes, fp32:

- the SP model equals the single-process M2-GPT (loss, logits gathered over the vocab shards, every gradient
  after merging the TP shards, relative error < 1e-5) on the torch path (block-diagonal and dense GLU), with
  the chunked loss, under activation checkpointing, with the fused Triton kernels (interpreted; with and
  without dropout, so both GLU kernel ops run their Functions on the gathered input), and with dropout on
  (SP draws each position's unsharded mask); under bf16 autocast it matches TP alone;
- no activation of the whole sequence's width is kept outside the TP regions: every (B, L, H) tensor TP
  keeps for backward (norm inputs and outputs, the regions' first layers' inputs, the head's input) is kept
  as this rank's (B, L/T, H) instead;
- the unsupported layouts are clear errors, from apply_sequence_parallel and from the config check, and so is a
  sequence length that does not split over the TP ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_checkpoint_helpers import run_distributed
# The CP tests' batch (the first 3 positions unlabelled), relative error and equivalence checks (rel < 1e-5).
from test_context_parallel import _assert_equivalent, rel_err
from test_context_parallel import _batch as _cp_batch

L = 24


def _batch(cfg) -> dict:
    return _cp_batch(cfg, 2, L, torch.Generator().manual_seed(1), "m2_gpt")


def _sp_model(ref):
    from m2train.parallel import groups
    from m2train.parallel.sequence_parallel import apply_sequence_parallel
    from m2train.parallel.tensor_parallel import apply_tensor_parallel

    model = apply_tensor_parallel(copy.deepcopy(ref), groups.tp_group())
    return apply_sequence_parallel(model, groups.tp_group())


def _run(model, batch, autocast: bool):
    torch.manual_seed(5)                       # the same dropout draws in every model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    return out


def _equivalence(overrides: dict, against_tp: bool = False, autocast: bool = False,
                 checkpointing: str = "none") -> dict:
    """Single process (or TP alone) vs TP=2 + SP, every forward from the same RNG state; checkpointing:
    activation checkpointing applied to the SP model last (m2train.parallel's order), so its recompute
    repeats the gathers and the dropout draws."""
    import torch.distributed as dist
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.tensor_parallel import apply_tensor_parallel, gather_logits, gather_tensors, shard_rules

    torch.manual_seed(0)
    cfg = tiny_model_cfg("m2_gpt", vocab_size=128, max_seq_len=L, **overrides)
    ref = build_model(cfg).train()
    sp = _sp_model(ref)
    if checkpointing != "none":
        from m2train.parallel.activation_checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(sp, checkpointing)
    if against_tp:
        ref = apply_tensor_parallel(copy.deepcopy(ref), groups.tp_group())
    batch = _batch(cfg)
    ref_out, out = _run(ref, batch, autocast), _run(sp, batch, autocast)
    errs = {"loss": rel_err(out.loss.detach(), ref_out.loss.detach())}
    if out.logits is not None:
        logits = out.logits.detach().float()                  # bf16 under autocast
        errs["logits"] = rel_err(logits if against_tp else gather_logits(logits, groups.tp_group()),
                                 ref_out.logits.detach().float())

    def grads(model):
        return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}

    got = grads(sp) if against_tp else gather_tensors(grads(sp), shard_rules(sp, 2), groups.tp_group())
    want = grads(ref)
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, out.loss.detach().float(), group=groups.tp_group())
    with torch.no_grad():
        undropped = ref.eval()(**batch).loss.item()
    return {"errs": errs, "grads": {n: rel_err(g, want[n]) for n, g in got.items()}, "n_params": len(want),
            "zero_grads": [n for n, g in want.items() if not g.any()], "same_loss": len({x.item() for x in losses}) == 1,
            "dropped": abs(undropped - ref_out.loss.item())}


def _kept_activations() -> dict:
    """Shapes and bytes of the tensors autograd keeps in one training forward, TP alone vs TP + SP."""
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(0)
    # intermediate_size 128: no tensor inside the GLU region (I/T = 64 units) has the hidden width 32.
    cfg = tiny_model_cfg("m2_gpt", vocab_size=128, max_seq_len=L, intermediate_size=128, hidden_dropout=0.1)
    ref = build_model(cfg).train()
    batch = _batch(cfg)
    result = {}
    for name, model in (("tp", apply_tensor_parallel(copy.deepcopy(ref), groups.tp_group())), ("sp", _sp_model(ref))):
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        kept: dict[int, tuple] = {}

        def pack(t):
            s = t.untyped_storage()
            # Floating-point activations: the embedding's (B, L, 1) out-of-shard mask is an input's property.
            if s.data_ptr() not in weights and t.is_floating_point():
                kept.setdefault(s.data_ptr(), (tuple(t.shape), s.nbytes()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch).loss.backward()
        result[name] = list(kept.values())
    return result


def _errors() -> list[str]:
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.context_parallel import apply_context_parallel
    from m2train.parallel.sequence_parallel import apply_sequence_parallel
    from m2train.parallel.tensor_parallel import apply_tensor_parallel

    def attempt(fn) -> str:
        try:
            fn()
            return "no error"
        except ValueError as e:
            return str(e)

    tp = groups.tp_group()
    gpt = lambda **kw: build_model(tiny_model_cfg("m2_gpt", vocab_size=128, **kw))  # noqa: E731
    bert = apply_tensor_parallel(build_model(tiny_model_cfg("m2_bert", vocab_size=128)), tp)
    twice = apply_sequence_parallel(apply_tensor_parallel(gpt(), tp), tp)
    return [attempt(lambda: apply_sequence_parallel(gpt(), tp)),
            attempt(lambda: apply_sequence_parallel(bert, tp)),
            attempt(lambda: apply_sequence_parallel(apply_tensor_parallel(gpt(position_embeddings=True), tp), tp)),
            attempt(lambda: apply_sequence_parallel(twice, tp)),
            attempt(lambda: apply_context_parallel(twice, tp)),
            # A sequence length that does not split over the TP ranks: refused before any collective.
            attempt(lambda: twice(input_ids=torch.ones(1, 25, dtype=torch.long)))]


def _cases(rank, world):
    from m2train.parallel import groups

    groups.init_model_parallel(tp=world)
    kernels = {"kernels": "triton", "hidden_size": 16, "intermediate_size": 32}
    results = {
        "torch": _equivalence({}),
        "dense_glu": _equivalence({"mlp_type": "dense"}),
        # hidden_dropout: the embedding's, the blocks', the mixer's and the GLU's dropouts
        "dropout": _equivalence({"hidden_dropout": 0.1}),
        "chunked_loss": _equivalence({"loss_chunk_tokens": 7}),
        "dropout_every_block_checkpointed": _equivalence({"hidden_dropout": 0.1}, checkpointing="every_block"),
        "kernels": _equivalence(kernels),                                  # the GLU MLP kernel op
        "kernels_dropout": _equivalence({**kernels, "hidden_dropout": 0.1}),  # the GLU up-projection kernel
    }
    # bf16 autocast: the gathered layers cast this rank's part before gathering; compared with TP alone.
    autocast = _equivalence({"loss_chunk_tokens": 7}, against_tp=True, autocast=True)
    kept, errors = _kept_activations(), _errors()
    groups.destroy_model_parallel()
    return results, autocast, kept, errors


@pytest.mark.slow  # two spawned processes (megatron-core, DeepSpeed imports; the kernel cases interpreted): ~1.5 min
def test_tp2_sequence_parallel_equals_single_process_and_keeps_only_local_positions():
    B, H = 2, 32
    runs = run_distributed(_cases, 2)
    for results, autocast, kept, errors in runs:
        for case, r in results.items():
            try:
                _assert_equivalent([r])
            except AssertionError as e:
                raise AssertionError(f"{case}: {e}") from e
            if "dropout" in case:
                assert r["dropped"] > 1e-4, case           # the masks really dropped something
        assert all(e < 2e-2 for e in autocast["errs"].values()), autocast["errs"]
        bad = {n: e for n, e in autocast["grads"].items() if not e < 5e-2}
        assert not bad, f"autocast: gradients off (relative error): {bad}"

        # Outside the regions TP keeps whole-sequence (B, L, H) activations (also as the flattened (B·L, H)
        # and the block-diagonal layer's (nblocks, B·L, H/nblocks) views) and (B, L, 1) norm statistics;
        # SP keeps none of them, but exactly half their bytes as this rank's (B, L/2, .) positions.
        whole = {(B, L, H), (B, L, 1), (B * L, H), (4, B * L, H // 4)}
        local = {(B, L // 2, H), (B, L // 2, 1)}

        def kept_bytes(rows, shapes):
            return sum(n for shape, n in rows if shape in shapes)

        assert kept_bytes(kept["tp"], whole) > 0 and kept_bytes(kept["tp"], local) == 0, kept["tp"]
        assert kept_bytes(kept["sp"], whole) == 0, kept["sp"]
        assert kept_bytes(kept["sp"], local) == kept_bytes(kept["tp"], whole) // 2, kept
        assert sum(n for _, n in kept["sp"]) < sum(n for _, n in kept["tp"])

        assert errors[0].startswith("sequence parallelism needs tensor parallelism"), errors[0]
        assert errors[1].startswith("sequence parallelism supports M2-GPT"), errors[1]
        assert "position_embeddings" in errors[2], errors[2]
        assert "already sequence-parallel" in errors[3], errors[3]
        assert errors[4].startswith("context parallelism on a sequence-parallel model"), errors[4]
        assert errors[5] == ("sequence parallelism: sequence length 25 is not a multiple of "
                             "parallel.tensor_parallel=2"), errors[5]


@pytest.mark.parametrize("config, overrides, message", [
    ("m2_gpt_tiny", ["parallel.tensor_parallel=1"], "needs parallel.tensor_parallel > 1"),
    ("m2_gpt_tiny", ["parallel.context_parallel=2"], "parallel.context_parallel > 1 is not supported"),
    ("m2_bert_tiny", [], "supports model.arch m2_gpt"),
    ("m2_gpt_tiny", ["model.position_embeddings=true"], "does not support model.position_embeddings"),
])
def test_sequence_parallel_config_errors(config, overrides, message):
    from m2train.config import ConfigError, load_config
    from m2train.parallel import check_parallel_config

    cfg = load_config(config, ["parallel.sequence_parallel=true", "parallel.tensor_parallel=2", *overrides])
    world = cfg.parallel.tensor_parallel * cfg.parallel.context_parallel
    with pytest.raises(ConfigError, match=message):
        check_parallel_config(cfg, world)
