"""Tensor parallelism (m2train.parallel.tensor_parallel) on 2 real gloo processes, fp32: the TP=2 model
equals the single-process one (logits gathered over the vocab shards, loss, every parameter's gradient after
merging the shards), replicated tensors stay identical across TP ranks under dropout, state dicts shard and
merge exactly, and DeepSpeed's clipped gradient norm under TP=2
with the m2train mpu (ZeRO-1) equals the single-process norm, as does the clipped update."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kernel_helpers import ran_kernel
from test_checkpoint_helpers import run_distributed

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cfg(arch: str, **overrides):
    from conftest import tiny_model_cfg
    # vocab divisible by 2; H=32, I=64 with 4 blocks: each GLU block splits into two 16-row slices.
    return tiny_model_cfg(arch, **{"vocab_size": 128, **overrides})


def _batch(cfg, B: int, L: int, arch: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=gen)
    if arch == "m2_gpt":
        labels = torch.randint(0, cfg.vocab_size, (B, L), generator=gen)
        labels[:, :3] = -100
        return {"input_ids": ids, "labels": labels}
    ids[:, 0] = 0                                           # pad id 0: its embedding row gets no gradient
    labels = torch.where(torch.rand(B, L, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "labels": labels, "token_type_ids": (torch.arange(L) >= L // 2).long().expand(B, L)}


def _equivalence(rank, world, arch, overrides, L=24):
    import torch.distributed as dist

    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.tensor_parallel import (apply_tensor_parallel, gather_logits, gather_state_dict,
                                                  gather_tensors, shard_rules)

    groups.init_model_parallel(tp=world)
    torch.manual_seed(0)                                    # same full weights on both ranks
    cfg = _cfg(arch, max_seq_len=L, **overrides)
    ref = build_model(cfg).train()
    batch = _batch(cfg, 2, L, arch)
    ref_out = ref(**batch)
    ref_out.loss.backward()

    tp = apply_tensor_parallel(copy.deepcopy(ref), groups.tp_group())
    tp.zero_grad(set_to_none=True)
    out = tp(**batch)
    out.loss.backward()
    errs = {"loss": rel_err(out.loss.detach(), ref_out.loss)}
    if overrides.get("loss_chunk_tokens"):                  # chunked loss: no logits on either side
        assert out.logits is None and ref_out.logits is None
    else:
        errs["logits"] = rel_err(gather_logits(out.logits.detach(), groups.tp_group()), ref_out.logits.detach())
    rules = shard_rules(tp, world)
    local_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in tp.named_parameters()}
    full_grads = gather_tensors(local_grads, rules, groups.tp_group())
    ref_params = dict(ref.named_parameters())
    grads = {n: rel_err(g, ref_params[n].grad) for n, g in full_grads.items()}
    # Gathered weights are the original ones, bit for bit.
    full_sd = gather_state_dict(tp)
    sd_exact = all(torch.equal(v, ref.state_dict()[k]) for k, v in full_sd.items()) and \
        full_sd.keys() == ref.state_dict().keys()
    n_sharded = sum(1 for n in rules if n in dict(tp.named_parameters()))
    decode_refused = None                                   # (BERT: no decoding at all)
    if arch in ("m2_gpt", "gpt"):
        decode_refused = False
        try:
            tp.new_decode_state(1)
        except NotImplementedError as e:
            decode_refused = "not one parallelised by m2train.parallel" in str(e)
    local_numel = sum(p.numel() for p in tp.parameters())
    groups.destroy_model_parallel()
    dist.barrier()
    return {"errs": errs, "grads": grads, "n_params": len(ref_params), "sd_exact": sd_exact,
            "n_sharded": n_sharded, "decode_refused": decode_refused,
            "numel_ratio": local_numel / sum(p.numel() for p in ref.parameters()),
            "zero_grads": [n for n, p in ref.named_parameters() if p.grad is None or not p.grad.any()]}


def _clipped_zero1_step(rank, world):
    """One SGD step with gradient clipping through a real DeepSpeed ZeRO-1 engine given the m2train mpu:
    DeepSpeed's global grad norm and the clipped update equal the single-process ones (SGD: the update is
    proportional to the clip factor, so a wrong norm shows in the weights)."""
    import deepspeed

    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.mpu import build_mpu
    from m2train.parallel.tensor_parallel import apply_tensor_parallel, gather_state_dict

    groups.init_model_parallel(tp=world)
    torch.manual_seed(0)
    cfg = _cfg("m2_gpt", max_seq_len=24)
    ref = build_model(cfg)
    batch = _batch(cfg, 2, 24, "m2_gpt")
    tp = apply_tensor_parallel(copy.deepcopy(ref), groups.tp_group())
    ref(**batch).loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01).item()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "zero_optimization": {"stage": 1}, "gradient_clipping": 0.01, "steps_per_print": 10 ** 9,
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=tp, optimizer=torch.optim.SGD(tp.parameters(), lr=0.5),
                                      config=config, mpu=build_mpu(), dist_init_required=False)
    engine.backward(engine(**batch).loss)
    engine.step()
    norm = float(engine.get_global_grad_norm())
    full = gather_state_dict(engine.module)
    ref_sd = ref.state_dict()
    err = max(rel_err(full[k], ref_sd[k]) for k in ref_sd if ref_sd[k].is_floating_point())
    groups.destroy_model_parallel()
    return {"norm": norm, "ref_norm": ref_norm, "weights_err": err}


def _dropout_replicas(rank, world):
    """With dropout on, TP peers (same RNG stream) must keep replicated tensors identical: the loss and
    every replicated parameter's gradient are the same on both ranks."""
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.tensor_parallel import apply_tensor_parallel, shard_rules

    groups.init_model_parallel(tp=world)
    torch.manual_seed(0)
    cfg = _cfg("m2_bert", max_seq_len=24, hidden_dropout=0.1, mixer_dropout=0.1)
    tp = apply_tensor_parallel(build_model(cfg).train(), groups.tp_group())
    torch.manual_seed(5)
    out = tp(**_batch(cfg, 2, 24, "m2_bert"))
    out.loss.backward()
    rules = shard_rules(tp, world)
    replicated = {n: p.grad.clone() for n, p in tp.named_parameters() if n not in rules}
    groups.destroy_model_parallel()
    return {"loss": out.loss.item(), "grads": replicated}


def _all_cases(rank, world):
    return [_clipped_zero1_step(rank, world), _dropout_replicas(rank, world),
        _equivalence(rank, world, "m2_gpt", {}),
        _equivalence(rank, world, "m2_gpt", {"tie_word_embeddings": False, "mlp_type": "dense"}),
        # model.loss_chunk_tokens: the vocab-parallel head + loss in chunks of 7 tokens, recomputed in backward
        _equivalence(rank, world, "m2_gpt", {"loss_chunk_tokens": 7}),
        _equivalence(rank, world, "m2_bert", {}),
        _equivalence(rank, world, "m2_bert", {"residual_long_conv": False, "mixer_input_norm": True,
                                              "pad_masking": True}),
    ]


@pytest.mark.slow  # two spawned processes importing megatron-core + DeepSpeed: ~30 s on 2 busy cores
def test_tp2_forward_backward_equal_single_process():
    results = run_distributed(_all_cases, 2)
    for r in [res[0] for res in results]:
        assert r["ref_norm"] > 0.1                          # far above the 0.01 clip: clipping is active
        assert math.isclose(r["norm"], r["ref_norm"], rel_tol=1e-5), r
        assert r["weights_err"] < REL_TOL, r
    d0, d1 = results[0][1], results[1][1]
    assert d0["loss"] == d1["loss"] and d0["grads"].keys() == d1["grads"].keys()
    assert all(torch.equal(d0["grads"][n], d1["grads"][n]) for n in d0["grads"])
    for case in zip(*[res[2:] for res in results]):
        for r in case:
            assert all(e < REL_TOL for e in r["errs"].values()), r["errs"]
            bad = {n: e for n, e in r["grads"].items() if not e < REL_TOL}
            assert not bad, f"gradients off (relative error): {bad}"
            assert len(r["grads"]) == r["n_params"]
            assert r["sd_exact"]
            assert r["decode_refused"] is not False         # a TP causal LM refuses incremental decoding
            assert r["n_sharded"] >= 10
            assert r["numel_ratio"] < 0.75                  # the big matrices really are split
            # The comparison means something only if the gradients are not trivially zero.
            assert len(r["zero_grads"]) < r["n_params"] // 4, r["zero_grads"]


def _kernel_equivalence(rank, world, arch, overrides, L=24, pad=False):
    """TP=2 with the fused Triton kernels forced on (interpreted here) against the single-process model with
    the same kernels, in training mode with the mixer's dropout on: the TP mixer takes the same fused paths
    (short conv + dropout inside the gated FFT-conv kernel, residual conv adding the main branch) on its
    channels, and its dropout masks are its channels' slice of the unsharded ones, so losses, logits and
    every gradient agree."""
    from unittest import mock

    import m2train.kernels.fftconv_front as front
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.tensor_parallel import apply_tensor_parallel, gather_logits, gather_tensors, shard_rules

    groups.init_model_parallel(tp=world)
    torch.manual_seed(0)
    # Half the usual width and one sequence: the interpreter runs one program per (sequence, channel).
    cfg = _cfg(arch, max_seq_len=L, kernels="triton", mixer_dropout=0.1, hidden_size=16, intermediate_size=32,
               **overrides)
    ref = build_model(cfg).train()
    batch = _batch(cfg, 1, L, arch)
    if pad:
        batch["attention_mask"] = (torch.arange(L) < L - 5).long()[None]
    tp = apply_tensor_parallel(copy.deepcopy(ref), groups.tp_group())
    calls = []
    real = front.front_gated_fft_conv

    def counted(z, *args, **kwargs):
        calls.append((tuple(z.shape), kwargs.get("dropout_p")))
        return real(z, *args, **kwargs)

    outs, glu_ops = [], []
    with mock.patch.object(front, "front_gated_fft_conv", counted):
        for model in (ref, tp):
            torch.manual_seed(5)                            # the same RNG stream for both forwards
            out = model(**batch)
            glu_ops.append([name for name in ("GLUMLPFunction", "GLUBlockdiagFunction", "BlockdiagFunction")
                            if ran_kernel(out.loss, name)])
            out.loss.backward()
            outs.append(out)
    (ref_out, out) = outs
    errs = {"loss": rel_err(out.loss.detach(), ref_out.loss),
            "logits": rel_err(gather_logits(out.logits.detach(), groups.tp_group()), ref_out.logits.detach())}
    rules = shard_rules(tp, world)
    full_grads = gather_tensors({n: p.grad for n, p in tp.named_parameters()}, rules, groups.tp_group())
    ref_params = dict(ref.named_parameters())
    grads = {n: rel_err(g, ref_params[n].grad) for n, g in full_grads.items()}
    # The same loss without dropout: the masks above really dropped something.
    with torch.no_grad():
        ref.eval()
        undropped = ref(**batch).loss.item()
    groups.destroy_model_parallel()
    return {"errs": errs, "grads": grads, "n_params": len(ref_params), "calls": calls,
            "dropped": abs(undropped - ref_out.loss.item()), "glu_ops": glu_ops}


@pytest.mark.slow  # two spawned processes, every mixer kernel interpreted: ~1 min on 2 cores
def test_tp2_with_fused_kernels_and_dropout_equals_single_process():
    results = run_distributed(_kernel_cases, 2)
    for case in zip(*results):
        for r in case:
            assert all(e < REL_TOL for e in r["errs"].values()), r["errs"]
            bad = {n: e for n, e in r["grads"].items() if not e < REL_TOL}
            assert not bad, f"gradients off (relative error): {bad}"
            assert len(r["grads"]) == r["n_params"]
            assert r["dropped"] > 1e-4                    # dropout was on and changed the loss
    gpt, bert, bert_masked = results[0]
    # The fused front ran in every layer, single-process on 3H = 48 channels, under TP on 3H/2 = 24.
    assert [c[0][1] for c in gpt["calls"]] == [48, 48, 24, 24] and all(c[1] == 0.1 for c in gpt["calls"])
    assert [c[0][1] for c in bert["calls"]] == [48, 48, 24, 24]
    assert bert_masked["calls"] == []                    # a pad mask keeps the short conv outside
    # The GLU kernels ran, single-process and on each TP rank's slices: the training MLP op, or with dropout
    # between the layers (the M2-BERT case, hidden_dropout 0.1) the up-projection and block-diagonal kernels.
    for rank in results:
        gpt, bert, bert_masked = rank
        for r in (gpt, bert_masked):
            assert r["glu_ops"] == [["GLUMLPFunction"]] * 2, r["glu_ops"]
        assert bert["glu_ops"] == [["GLUBlockdiagFunction", "BlockdiagFunction"]] * 2, bert["glu_ops"]


def _kernel_cases(rank, world):
    return [_kernel_equivalence(rank, world, "m2_gpt", {}),
            _kernel_equivalence(rank, world, "m2_bert", {"hidden_dropout": 0.1}),
            _kernel_equivalence(rank, world, "m2_bert", {"pad_masking": True}, pad=True)]


def test_shard_and_merge_state_dict_round_trip_for_tp_1_2_4():
    from m2train.models import build_model
    from m2train.parallel.tensor_parallel import merge_state_dicts, shard_rules, shard_state_dict

    for arch in ("m2_gpt", "m2_bert"):
        model = build_model(_cfg(arch))
        full = model.state_dict()
        for size in (1, 2, 4):
            rules = shard_rules(model, size)
            shards = [shard_state_dict(full, rules, r, size) for r in range(size)]
            merged = merge_state_dicts(shards, rules)
            assert merged.keys() == full.keys()
            assert all(torch.equal(merged[k], full[k]) for k in full)
            if size > 1:
                assert shards[0]["blocks.0.mixer.in_linear.weight" if arch == "m2_gpt" else
                                 "bert.layers.0.mixer.in_linear.weight"].shape[0] == 3 * 32 // size
                # Different ranks hold different pieces.
                k = next(iter(rules))
                assert not torch.equal(shards[0][k], shards[1][k])


def test_unshardable_configs_name_the_key():
    from m2train.config import ConfigError
    from m2train.models import build_model
    from m2train.parallel.tensor_parallel import check_tensor_parallel

    with pytest.raises(ConfigError, match="model.vocab_size=101"):
        check_tensor_parallel(build_model(_cfg("m2_gpt", vocab_size=101)), 2)
    with pytest.raises(ConfigError, match="model.hidden_size=32 .*tensor_parallel=3"):
        check_tensor_parallel(build_model(_cfg("m2_gpt", vocab_size=129)), 3)
    with pytest.raises(ConfigError, match="model.sequence_mixer"):
        check_tensor_parallel(build_model(_cfg("m2_gpt", sequence_mixer="monarch_causal")), 2)
    with pytest.raises(ConfigError, match="model.arch"):
        check_tensor_parallel(build_model(_cfg("gpt")), 2)


def test_sharded_dropout_draws_independent_slices_of_one_mask():
    from m2train.parallel.tensor_parallel import sharded_dropout

    drop = torch.nn.Dropout(0.5).train()
    x = torch.ones(3, 8, 5)
    masks = []
    for rank in range(2):
        torch.manual_seed(7)                                 # TP peers share the RNG stream
        masks.append(sharded_dropout(x, drop, 1, rank, 2))
    torch.manual_seed(7)
    full = torch.empty(3, 16, 5).bernoulli_(0.5) * 2.0
    assert torch.equal(torch.cat(masks, dim=1), full)       # rank r keeps slice r of the unsharded mask
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(sharded_dropout(x, drop.eval(), 1, 0, 2), x)
    # groups=2 (a block-diagonal GLU's gate blocks): rank r keeps slice r of each of the 2 chunks of dim 1.
    grouped = []
    drop.train()
    for rank in range(2):
        torch.manual_seed(7)
        grouped.append(sharded_dropout(x, drop, 1, rank, 2, groups=2))
    chunks = full.view(3, 2, 2, 4, 5)                       # (.., group, rank, 4 channels, ..)
    for rank in range(2):
        assert torch.equal(grouped[rank], chunks[:, :, rank].reshape(3, 8, 5))
