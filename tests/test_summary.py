"""Parameter counts of the released configs, the model-summary breakdown, and the analytic FLOP counts
cross-checked against torch.utils.flop_counter.FlopCounterMode (which counts matmuls and SDPA, not FFTs)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model_cfg
from m2train.config import CONFIG_DIR, load_config
from m2train.models import build_model
from m2train.models.flops import (flop_items, flops_by_kind, forward_flops_per_token, real_fft_flops,
                                  training_flops_per_token)
from m2train.models.longconv import fft_size
from m2train.models.summary import build_meta_model, parameter_breakdown, summarize

ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _model_cfg(name: str):
    return load_config(CONFIG_DIR / f"{name}.yaml").model


# --------------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("m2_bert_80m", 80.3e6), ("m2_bert_110m", 115.6e6),
                                           ("m2_bert_260m", 259.1e6), ("m2_bert_341m", 341.0e6)])
def test_m2_bert_parameter_counts_match_reference(name, expected):
    n = build_meta_model(_model_cfg(name)).num_parameters()
    assert abs(n - expected) <= 0.05e6, f"{name}: {n / 1e6:.3f}M, reference ≈{expected / 1e6:.1f}M"


@pytest.mark.parametrize("name,nominal", [("m2_gpt_145m", 145e6), ("m2_gpt_360m", 360e6)])
def test_m2_gpt_parameter_counts_near_name(name, nominal):
    n = build_meta_model(_model_cfg(name)).num_parameters()
    assert abs(n - nominal) <= 0.03 * nominal, f"{name}: {n / 1e6:.2f}M"


def test_meta_build_matches_cpu_build():
    cfg = _model_cfg("m2_bert_tiny")
    meta = build_meta_model(cfg)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta.num_parameters() == build_model(cfg).num_parameters()


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_breakdown_sums_to_parameter_count(name):
    model = build_meta_model(_model_cfg(name))
    parts = parameter_breakdown(model)
    assert "other" not in parts, f"unclassified parameters in {name}: the classifier needs updating"
    assert parts["total"] == model.num_parameters()
    assert sum(v for k, v in parts.items() if k != "total") == model.num_parameters()


def test_tied_decoder_counted_once():
    cfg = _model_cfg("m2_bert_80m")
    parts = parameter_breakdown(build_meta_model(cfg))
    assert parts["embeddings: word (tied decoder)"] == cfg.vocab_size * cfg.hidden_size
    assert "head: LM head (untied)" not in parts


@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt", "bert", "gpt"])
def test_breakdown_other_heads_and_mlp_types(arch):
    heads = ["classification", "mlm"] if arch in ("m2_bert", "bert") else ["causal_lm"]
    for head in heads:
        for mlp_type in ("blockdiag", "monarch", "dense"):
            extra = {} if arch in ("m2_bert", "bert") else {"tie_word_embeddings": False}
            cfg = tiny_model_cfg(arch, head=head, mlp_type=mlp_type, mixer_input_norm=True, **extra)
            model = build_meta_model(cfg)
            parts = parameter_breakdown(model)
            assert "other" not in parts
            assert parts["total"] == model.num_parameters()


# --------------------------------------------------------------------------------------------------
# FLOPs: internal consistency
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["m2_bert_80m", "m2_gpt_360m", "gpt_125m", "bert_base"])
def test_flop_dicts_are_consistent(name):
    cfg = _model_cfg(name)
    fwd = forward_flops_per_token(cfg)
    trn = training_flops_per_token(cfg)
    assert fwd.keys() == trn.keys()
    assert math.isclose(fwd["total"], sum(v for k, v in fwd.items() if k != "total"))
    assert math.isclose(trn["total"], sum(v for k, v in trn.items() if k != "total"))
    assert 2 * fwd["total"] < trn["total"] <= 3 * fwd["total"] + 1e-6
    kinds = flops_by_kind(cfg)
    assert math.isclose(kinds["total"], fwd["total"])


def test_fft_conventions():
    assert fft_size(128) == 256 and fft_size(100) == 256 and fft_size(2048) == 4096
    assert real_fft_flops(256) == 2.5 * 256 * 8
    cfg = tiny_model_cfg("m2_gpt", residual_long_conv=False)
    L, H = 40, cfg.hidden_size
    n = fft_size(L)
    fft = [it for it in flop_items(cfg, L) if it.kind == "fft"]
    expected = cfg.num_layers * H * (2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / L
    assert math.isclose(sum(it.flops for it in fft), expected)


def test_filters_amortised_over_batch_and_causal_attention_half():
    cfg = _model_cfg("m2_gpt_145m")
    f1 = forward_flops_per_token(cfg, 2048, batch_size=1)["mixer.filters"]
    f8 = forward_flops_per_token(cfg, 2048, batch_size=8)["mixer.filters"]
    assert math.isclose(f1, 8 * f8)
    g = _model_cfg("gpt_125m")
    needed = forward_flops_per_token(g, 2048)["attn.scores"]
    full = forward_flops_per_token(g, 2048, causal_attention="full")["attn.scores"]
    assert math.isclose(full, 4 * 2048 * g.hidden_size * g.num_layers)
    assert math.isclose(needed, full * (2049 / 2) / 2048)


def test_mlm_head_fraction():
    cfg = _model_cfg("m2_bert_80m")
    full = forward_flops_per_token(cfg)
    part = forward_flops_per_token(cfg, head_fraction=0.3)
    assert math.isclose(part["head.decoder"], 0.3 * full["head.decoder"])
    assert math.isclose(full["head.decoder"], 2 * cfg.hidden_size * cfg.vocab_size + cfg.vocab_size)


# --------------------------------------------------------------------------------------------------
# FLOPs: cross-check of the matmul parts against FlopCounterMode
# --------------------------------------------------------------------------------------------------

def _measure(model, ids, backward=False):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=None) as fc:
        out = model(ids)
        if backward:
            out.logits.float().pow(2).mean().backward()
    return fc


def _module_flops(fc, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(sum(ops.values()) for name, ops in fc.get_flop_counts().items() if rx.search(name))


def _matmul_component(cfg, L, B, component, **kw) -> float:
    return sum(it.flops for it in flop_items(cfg, L, batch_size=B, causal_attention="full", **kw)
               if it.component == component and it.kind == "matmul") * B * L


@pytest.mark.parametrize("mlp_type", ["blockdiag", "monarch", "dense"])
@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt", "bert", "gpt"])
def test_matmul_flops_match_flop_counter(arch, mlp_type):
    cfg = tiny_model_cfg(arch, mlp_type=mlp_type)
    model = build_model(cfg).eval()
    B, L = 3, 37                    # L not a power of two: FFT size 128
    ids = torch.randint(1, cfg.vocab_size, (B, L))
    fc = _measure(model, ids)
    analytic = flops_by_kind(cfg, L, batch_size=B, causal_attention="full")["matmul"] * B * L
    assert fc.get_total_flops() == pytest.approx(analytic, rel=1e-9)

    layer = r"\.(layers|blocks)\.\d+"
    if arch.startswith("m2"):
        checks = {"mixer.in_proj": layer + r"\.mixer\.in_linear$",
                  "mixer.out_proj": layer + r"\.mixer\.out_linear$",
                  "mixer.filters": layer + r"\.mixer\.(long_conv|residual_conv)\.filter$",
                  "glu.in": layer + r"\.mlp\.gated_layers$",
                  "glu.out": layer + r"\.mlp\.wo$"}
    else:
        checks = {"attn.qkv": layer + r"\.attn\.qkv$",
                  "attn.out_proj": layer + r"\.attn\.out$",
                  "mlp.fc1": layer + r"\.mlp\.fc1$",
                  "mlp.fc2": layer + r"\.mlp\.fc2$"}
    for component, pattern in checks.items():
        measured = _module_flops(fc, pattern)
        assert measured > 0, f"no module matched {pattern}"
        assert measured == pytest.approx(_matmul_component(cfg, L, B, component), rel=1e-9), component
    if not arch.startswith("m2"):
        attn = _module_flops(fc, layer + r"\.attn$")
        expected = sum(_matmul_component(cfg, L, B, c) for c in ("attn.qkv", "attn.scores", "attn.out_proj"))
        assert attn == pytest.approx(expected, rel=1e-9)
    if arch in ("m2_bert", "bert"):
        assert _module_flops(fc, r"\.mlm$") == pytest.approx(
            _matmul_component(cfg, L, B, "head.transform") + _matmul_component(cfg, L, B, "head.decoder"))


@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt", "bert", "gpt"])
def test_training_matmul_flops_are_three_times_forward(arch):
    cfg = tiny_model_cfg(arch)
    model = build_model(cfg).train()
    B, L = 2, 24
    ids = torch.randint(1, cfg.vocab_size, (B, L))
    fc = _measure(model, ids, backward=True)
    analytic = flops_by_kind(cfg, L, training=True, batch_size=B, causal_attention="full")["matmul"] * B * L
    assert fc.get_total_flops() == pytest.approx(analytic, rel=1e-9)


def test_classification_head_flops():
    cfg = tiny_model_cfg("m2_bert", head="classification", num_labels=3)
    model = build_model(cfg).eval()
    B, L = 2, 16
    fc = _measure(model, torch.randint(1, cfg.vocab_size, (B, L)))
    analytic = flops_by_kind(cfg, L, batch_size=B)["matmul"] * B * L
    assert fc.get_total_flops() == pytest.approx(analytic, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# summary text and CLI
# --------------------------------------------------------------------------------------------------

def test_summarize_text():
    cfg = load_config(CONFIG_DIR / "m2_gpt_360m.yaml")
    text = summarize(cfg, 2048)
    assert "6N rule would say" in text and "GFLOPs per token" in text
    assert "seq mixer: FFT long convs" in text and "L=2048" in text
    assert f"{build_meta_model(cfg.model).num_parameters():,}" in text


def test_cli_model_summary(capsys):
    from m2train.cli import main
    assert main(["model-summary", str(CONFIG_DIR / "m2_bert_80m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "80,285,760" in out
    assert "6N rule would say" in out
    # overrides before --seq-len: argparse does not intermix a trailing nargs="*" positional
    assert main(["model-summary", "m2_gpt_tiny", "model.num_layers=2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "layers=2" in out and "L=64" in out
    assert main(["model-summary", "m2_gpt_tiny", "--seq-len", "100000"]) == 2


def test_monarch_causal_mixer_is_classified_and_counted():
    from m2train.config import load_config
    cfg = load_config("m2_gpt_tiny", ["model.sequence_mixer=monarch_causal"]).model
    model = build_meta_model(cfg)
    parts = parameter_breakdown(model)
    assert "other" not in parts, parts
    assert sum(v for k, v in parts.items() if k != "total") == model.num_parameters()
    flops = forward_flops_per_token(cfg, 256)
    assert flops["mixer.long_conv_monarch"] > 0 and "mixer.long_conv_fft" not in flops
