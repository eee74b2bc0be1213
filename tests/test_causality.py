"""Causality of M2-GPT and each of its components, in fp64.

Perturbing inputs after position t must leave every output at positions ≤ t unchanged. Components
without an FFT are checked bit-exactly; FFT-based ones to fp64 round-off (1e-12 relative): an FFT mixes all
positions' rounding errors, so bit-equality is impossible there, while a real leak — one tap of a filter on
a future input — shows up at ~1e-1 (the non-causal control below proves the check would see it)."""

import pytest
import torch

from m2train.models import build_model
from m2train.models.glu import MonarchGLU
from m2train.models.longconv import long_conv
from m2train.models.m2_gpt import M2GPTBlock
from m2train.models.mixer import M2SequenceMixer
from m2train.models.short_conv import CausalShortConv

from conftest import tiny_model_cfg

L = 24
POSITIONS = [0, 1, 5, 12, L - 2, L - 1]


def max_leak(fn, x, t, seq_dim):
    """Largest change of outputs at positions ≤ t when inputs after t are replaced by noise."""
    x2 = x.clone()
    idx = [slice(None)] * x.dim()
    idx[seq_dim] = slice(t + 1, None)
    x2[tuple(idx)] = torch.randn_like(x2[tuple(idx)]) * 3 if x.is_floating_point() else \
        torch.randint_like(x2[tuple(idx)], 1, 100)
    y1, y2 = fn(x), fn(x2)
    keep = [slice(None)] * y1.dim()
    keep[seq_dim] = slice(0, t + 1)
    diff = (y1[tuple(keep)] - y2[tuple(keep)]).abs().max().item()
    return diff / max(y1.abs().max().item(), 1e-30)


def assert_causal(fn, x, seq_dim, exact):
    for t in POSITIONS:
        leak = max_leak(fn, x, t, seq_dim)
        if exact:
            assert leak == 0.0, f"output at <= {t} changed by {leak}"
        else:
            assert leak < 1e-12, f"output at <= {t} changed by {leak}"
    # and the last position is trivially causal: nothing after it
    assert torch.equal(fn(x), fn(x.clone()))


def test_short_conv_is_causal():
    conv = CausalShortConv(5).double()
    assert_causal(conv, torch.randn(2, 5, L, dtype=torch.float64), seq_dim=2, exact=True)


def test_causal_long_conv_is_causal():
    k = torch.randn(4, L, dtype=torch.float64)
    assert_causal(lambda v: long_conv(v, k), torch.randn(2, 4, L, dtype=torch.float64), 2, exact=False)


def test_bidirectional_long_conv_is_detected_as_non_causal():
    k = torch.randn(4, L, dtype=torch.float64)
    v = torch.randn(2, 4, L, dtype=torch.float64)
    assert max_leak(lambda x: long_conv(x, k, k), v, 5, 2) > 1e-3


def test_glu_is_per_position():
    for kind in ("blockdiag", "monarch", "dense"):
        glu = MonarchGLU(16, 32, kind=kind, nblocks=4).double()
        assert_causal(glu, torch.randn(2, L, 16, dtype=torch.float64), seq_dim=1, exact=True)


@pytest.mark.parametrize("residual", [True, False])
def test_causal_mixer_is_causal(residual):
    mixer = M2SequenceMixer(8, L, bidirectional=False, residual_long_conv=residual, filter_order=8).double()
    assert_causal(mixer, torch.randn(2, L, 8, dtype=torch.float64), seq_dim=1, exact=False)


@pytest.mark.parametrize("mlp_type", ["blockdiag", "monarch"])
def test_m2_gpt_block_and_model_are_causal(mlp_type):
    cfg = tiny_model_cfg("m2_gpt", max_seq_len=L, mlp_type=mlp_type)
    block = M2GPTBlock(cfg).double()
    assert_causal(block, torch.randn(2, L, cfg.hidden_size, dtype=torch.float64), seq_dim=1, exact=False)
    model = build_model(cfg).double().eval()
    ids = torch.randint(1, cfg.vocab_size, (2, L))
    assert_causal(lambda x: model(x).logits, ids, seq_dim=1, exact=False)


def test_m2_gpt_mixer_variant_with_input_norm_is_causal():
    cfg = tiny_model_cfg("m2_gpt", max_seq_len=L, mixer_input_norm=True, residual_long_conv=False)
    model = build_model(cfg).double().eval()
    assert_causal(lambda x: model(x).logits, torch.randint(1, cfg.vocab_size, (1, L)), seq_dim=1, exact=False)


def test_gpt_baseline_is_causal():
    model = build_model(tiny_model_cfg("gpt", max_seq_len=L)).double().eval()
    assert_causal(lambda x: model(x).logits, torch.randint(1, 100, (2, L)), seq_dim=1, exact=False)
