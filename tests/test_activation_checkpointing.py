"""Activation checkpointing: every mode gives the same outputs and gradients (fp64), keeps state_dict keys,
really drops the activations held for backward, and trains identically under DeepSpeed ZeRO-2/3 with two
gloo ranks."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_model_cfg
from m2train.launch import free_port
from m2train.models import build_model
from m2train.parallel.activation_checkpointing import (MODES, apply_activation_checkpointing,
                                                       checkpointed_module_names, is_checkpointed, model_blocks,
                                                       remove_activation_checkpointing, saved_activation_bytes)


def _apply(model, mode, every_k=2) -> list[str]:
    assert apply_activation_checkpointing(model, mode, every_k) is model      # in place, same object
    return checkpointed_module_names(model)

# (arch, head): M2-GPT, M2-BERT (MLM and classification) and both Transformer baselines.
MODELS = [("m2_gpt", "causal_lm"), ("m2_bert", "mlm"), ("m2_bert", "classification"), ("gpt", "causal_lm"),
          ("bert", "mlm")]


def _model(arch: str, head: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    # Dropout on: the recompute must replay the same dropout masks (checkpoint restores the RNG state).
    cfg = tiny_model_cfg(arch, **{"head": head, "num_layers": 4, "hidden_dropout": 0.1, **overrides})
    return build_model(cfg).double()


def _batch(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (2, 24), generator=g)
    if model.config.head == "classification":
        return dict(input_ids=ids, labels=torch.tensor([0, 1]))
    return dict(input_ids=ids, labels=ids)


def _forward_backward(model, batch):
    torch.manual_seed(123)                       # same dropout stream for every variant
    out = model(**batch)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=1e-12), \
        f"{what}: max diff {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("arch, head", MODELS)
def test_every_mode_gives_identical_outputs_and_gradients(arch, head):
    model = _model(arch, head)
    model.train()
    batch = _batch(model)
    ref_logits, ref_loss, ref_grads = _forward_backward(model, batch)
    assert len(ref_grads) == sum(1 for p in model.parameters() if p.requires_grad)   # every weight trained
    for mode in MODES:
        names = _apply(model, mode, every_k=2)
        logits, loss, grads = _forward_backward(model, batch)
        _assert_same(logits, ref_logits, f"{arch}/{head} {mode} logits")
        _assert_same(loss, ref_loss, f"{arch}/{head} {mode} loss")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            _assert_same(grads[name], ref_grads[name], f"{arch}/{head} {mode} grad of {name}")
        if mode != "none":
            assert names, mode
    remove_activation_checkpointing(model)
    assert not any(is_checkpointed(m) for m in model.modules())


@pytest.mark.slow      # the fused kernels interpreted: ~1 min per model on 2 cores
@pytest.mark.parametrize("arch, head", [("m2_gpt", "causal_lm"), ("m2_bert", "mlm")])
def test_checkpointing_replays_the_fused_kernels_and_their_dropout(arch, head, monkeypatch):
    """With the fused Triton kernels forced (the GPU default; interpreted here, fp32) and the mixer's dropout
    on, a recompute must draw the same in-kernel dropout seeds (checkpoint replays the RNG) and rebuild what
    the kernel ops keep (the gated conv's inputs and taps, the GLU MLP's pre-activation): every mode gives
    the same logits, loss and gradients as no checkpointing."""
    from m2train.kernels.dispatch import ENV_VAR

    from kernel_helpers import ran_kernel

    monkeypatch.setenv(ENV_VAR, "triton")
    torch.manual_seed(0)
    cfg = tiny_model_cfg(arch, head=head, hidden_size=16, intermediate_size=32, max_seq_len=16, mixer_dropout=0.1)
    model = build_model(cfg).train()
    batch = _batch(model)
    batch = {k: v[:1, :16] for k, v in batch.items()}
    torch.manual_seed(123)
    out = model(**batch)
    assert ran_kernel(out.loss, "_FrontGatedFFTConv") and ran_kernel(out.loss, "GLUMLPFunction")
    ref_logits, ref_loss, ref_grads = _forward_backward(model, batch)
    model.eval()
    assert not torch.equal(model(**batch).loss.detach(), ref_loss)          # the dropout really dropped
    model.train()
    for mode in ("every_block", "mixer"):
        _apply(model, mode)
        logits, loss, grads = _forward_backward(model, batch)
        _assert_same(logits, ref_logits, f"{arch} {mode} logits")
        _assert_same(loss, ref_loss, f"{arch} {mode} loss")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7), f"{arch} {mode} {name}"


@pytest.mark.parametrize("arch, head", [("m2_gpt", "causal_lm"), ("m2_bert", "mlm"), ("gpt", "causal_lm")])
def test_modes_select_the_documented_modules(arch, head):
    model = _model(arch, head)
    prefix = "blocks" if arch in ("m2_gpt", "gpt") else "bert.layers"
    mixer = "attn" if arch == "gpt" else "mixer"
    assert _apply(model, "none") == []
    assert _apply(model, "every_block") == [f"{prefix}.{i}" for i in range(4)]
    assert _apply(model, "every_k", every_k=2) == [f"{prefix}.1", f"{prefix}.3"]
    assert _apply(model, "every_k", every_k=3) == [f"{prefix}.2"]
    assert _apply(model, "every_k", every_k=1) == [f"{prefix}.{i}" for i in range(4)]
    # a new call replaces the old choice instead of stacking on it
    assert _apply(model, "mixer") == [f"{prefix}.{i}.{mixer}" for i in range(4)]
    assert not any(is_checkpointed(b) for b in model_blocks(model))
    assert sum(is_checkpointed(m) for m in model.modules()) == 4


def test_bad_arguments_are_named():
    model = _model("m2_gpt", "causal_lm")
    with pytest.raises(ValueError, match="train.activation_checkpointing: unknown mode 'sometimes'"):
        apply_activation_checkpointing(model, "sometimes")
    with pytest.raises(ValueError, match="train.checkpoint_every_k"):
        apply_activation_checkpointing(model, "every_k", every_k=0)
    with pytest.raises(ValueError, match="neither .blocks nor .bert.layers"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "every_block")


@pytest.mark.parametrize("arch, head", [("m2_gpt", "causal_lm"), ("m2_bert", "mlm")])
def test_state_dict_keys_unchanged_and_checkpoints_load_either_way(arch, head):
    plain = _model(arch, head).eval()
    keys = list(plain.state_dict().keys())
    for mode in MODES[1:]:
        ckpt = _model(arch, head).eval()
        apply_activation_checkpointing(ckpt, mode)
        assert list(ckpt.state_dict().keys()) == keys
        assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    # weights saved from a checkpointed model load into a plain one and vice versa (strict)
    src = _model(arch, head)
    apply_activation_checkpointing(src, "every_block")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dst = _model(arch, head)
    dst.load_state_dict(src.state_dict(), strict=True)
    back = _model(arch, head)
    apply_activation_checkpointing(back, "mixer")
    back.load_state_dict(dst.state_dict(), strict=True)
    batch = _batch(src)
    src.eval(), dst.eval(), back.eval()
    with torch.no_grad():
        ref = src(**batch).logits
        _assert_same(dst(**batch).logits, ref, "plain model loaded from a checkpointed one")
        _assert_same(back(**batch).logits, ref, "checkpointed model loaded from a plain one")


def test_deepcopy_keeps_checkpointing_and_its_own_weights():
    model = _model("m2_gpt", "causal_lm")
    apply_activation_checkpointing(model, "every_block")
    clone = copy.deepcopy(model)
    assert all(is_checkpointed(b) for b in clone.blocks)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    batch = _batch(model)
    model.eval(), clone.eval()
    assert not torch.equal(model(**batch).logits, clone(**batch).logits)


@pytest.mark.parametrize("arch, head", [("m2_gpt", "causal_lm"), ("m2_bert", "mlm"), ("gpt", "causal_lm")])
def test_activation_memory_really_drops(arch, head):
    model = _model(arch, head, num_layers=6)
    model.train()
    batch = _batch(model)

    def step():
        return model(**batch).loss

    saved = {}
    for mode in MODES:
        apply_activation_checkpointing(model, mode, every_k=2)
        saved[mode] = saved_activation_bytes(model, step)
    # every block: only each block's input (B·L·H) plus the embedding/head activations survive
    assert saved["every_block"] < 0.35 * saved["none"], saved
    # every second block: roughly half the blocks' activations
    assert saved["every_block"] < saved["every_k"] < 0.7 * saved["none"], saved
    assert saved["mixer"] < 0.85 * saved["none"], saved
    # the input of each checkpointed block is counted (non-reentrant checkpoint keeps it itself)
    B, L, H = batch["input_ids"].shape + (model.config.hidden_size,)
    assert saved["every_block"] >= 6 * B * L * H * 8


def test_no_grad_forward_skips_checkpointing():
    model = _model("m2_gpt", "causal_lm").eval()
    batch = _batch(model)
    with torch.no_grad():
        ref = model(**batch).logits
    apply_activation_checkpointing(model, "every_block")
    calls = []
    h = model.blocks[0].norm1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(**batch).logits
    assert torch.equal(out, ref) and len(calls) == 1
    out = model(**batch).loss
    out.backward()
    assert len(calls) == 3                      # with grad: forward + recompute in backward
    h.remove()


# --------------------------------------------------------------------------------------------------
# under DeepSpeed ZeRO-2 / ZeRO-3, 2 gloo ranks
# --------------------------------------------------------------------------------------------------

ZERO_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import deepspeed
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from conftest import tiny_model_cfg
    from m2train.launch import init_distributed
    from m2train.models import build_model
    from m2train.parallel.activation_checkpointing import (apply_activation_checkpointing,
                                                           checkpointed_module_names)

    env = init_distributed()
    torch.set_num_threads(1)
    results = {}
    for stage in (2, 3):
        for mode in ("none", "every_block", "mixer"):
            torch.manual_seed(0)
            model = build_model(tiny_model_cfg("m2_gpt", num_layers=3, hidden_dropout=0.1))
            apply_activation_checkpointing(model, mode)
            names = checkpointed_module_names(model)
            calls = []
            model.blocks[1].norm1.register_forward_hook(lambda *a: calls.append(1))
            ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                         "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
                         "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
                         "steps_per_print": 10**9, "wall_clock_breakdown": False}
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config)
            losses = []
            for step in range(4):
                g = torch.Generator().manual_seed(1000 * step + env.rank)
                ids = torch.randint(0, 101, (2, 24), generator=g)
                torch.manual_seed(step)
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            results[f"zero{stage}/{mode}"] = dict(losses=losses, calls=len(calls), names=names)
            del engine, model
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{env.rank}.json"), "w") as f:
        json.dump(results, f)
""")


@pytest.mark.slow
def test_zero2_and_zero3_losses_match_without_checkpointing(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(ZERO_WORKER)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", RESULT_DIR=str(tmp_path),
               TESTS_DIR=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stage in (2, 3):
            ref = res[f"zero{stage}/none"]
            assert ref["calls"] == 4                       # no recompute without checkpointing
            assert ref["losses"][-1] < ref["losses"][0]    # it trains
            for mode in ("every_block", "mixer"):
                r = res[f"zero{stage}/{mode}"]
                assert r["names"], mode
                # bit-identical losses: the recompute replays the same math and dropout masks
                assert r["losses"] == ref["losses"], (stage, mode, r["losses"], ref["losses"])
            # block 1's norm1 recomputed in backward only when the whole block is checkpointed
            assert res[f"zero{stage}/every_block"]["calls"] == 8
            assert res[f"zero{stage}/mixer"]["calls"] == 4


def test_trainer_entry_point_applies_the_configured_mode():
    """m2train.parallel.apply_parallelism (what `m2train train` calls) honours train.activation_checkpointing."""
    from m2train.config import load_config
    from m2train.parallel import apply_parallelism

    cfg = load_config("m2_gpt_tiny", ["train.activation_checkpointing=every_k", "train.checkpoint_every_k=2"])
    model = build_model(cfg.model)
    assert apply_parallelism(model, cfg) is model
    assert checkpointed_module_names(model) == ["blocks.1", "blocks.3"]
