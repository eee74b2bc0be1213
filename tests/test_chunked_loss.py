"""model.loss_chunk_tokens: the LM head + cross-entropy in token chunks with the logits recomputed in backward
(m2train.models.chunked_loss) equals the plain path, and keeps no (tokens x vocab) tensor for backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_cfg

from m2train.config import ConfigError
from m2train.models import build_model
from m2train.models.chunked_loss import linear_cross_entropy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


LABELS = torch.tensor([1, -100, 3, 10, 0, -100, 4])


def test_gather_weight_wraps_every_use_of_the_weight():
    """The ZeRO-3 hook (m2train.parallel.zero3 sets the model's head_weight_gather): the weight is made whole
    around the forward's products and again around the backward's recompute, and is whole nowhere else
    here - simulated by a weight whose values exist only inside the context."""
    import contextlib

    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    full = torch.randn(11, 5, dtype=torch.float64)
    w = torch.nn.Parameter(torch.full_like(full, float("nan")))       # "partitioned": unusable outside
    entered = []

    @contextlib.contextmanager
    def gather(weight):
        assert weight is w
        entered.append(torch.is_grad_enabled())
        with torch.no_grad():
            weight.copy_(full)
        try:
            yield
        finally:
            with torch.no_grad():
                weight.fill_(float("nan"))

    loss = linear_cross_entropy(h, w, LABELS, 3, "mean", gather)
    loss.backward()
    assert entered == [False, False]          # once in forward, once in backward (autograd.Function bodies)
    ref_w = full.clone().requires_grad_()
    ref_h = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.T, LABELS, ignore_index=-100)
    ref.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-12
    assert rel(h.grad, ref_h.grad) < 1e-12 and rel(w.grad, ref_w.grad) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_fp64(reduction):
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, LABELS, 3, reduction), (h, w))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_equals_linear_then_cross_entropy(reduction, chunk):
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    got = linear_cross_entropy(h, w, LABELS, chunk, reduction)
    want = F.cross_entropy(F.linear(h, w), LABELS, ignore_index=-100, reduction=reduction)
    assert abs(got.item() - want.item()) < 1e-12 * abs(want.item())
    for g, e in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        assert rel(g, e) < 1e-12


def test_no_labelled_position_gives_nan_like_cross_entropy():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.full((3,), -100)
    assert linear_cross_entropy(h, w, labels, 2).isnan() and F.cross_entropy(h @ w.T, labels).isnan()
    assert linear_cross_entropy(h, w, labels, 2, "sum").item() == 0.0


def test_bad_arguments_are_refused():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long), 2, "none")
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), 2)


def _gpt_pair(**kw):
    torch.manual_seed(0)
    ref = build_model(tiny_model_cfg("m2_gpt", **kw)).train()
    chunked = copy.deepcopy(ref)
    chunked.config.loss_chunk_tokens = 13          # does not divide B·L = 80
    return ref, chunked


def _batch(L=40, V=101):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, L), generator=g)
    labels = torch.randint(0, V, (2, L), generator=g)
    labels[0, :5] = -100
    return ids, labels


@pytest.mark.parametrize("tied", [True, False])
def test_m2_gpt_training_loss_and_grads_equal_the_plain_path(tied):
    ref, chunked = _gpt_pair(tie_word_embeddings=tied)
    ids, labels = _batch()
    out_ref = ref(ids, labels=labels)
    out = chunked(ids, labels=labels)
    assert out.logits is None and out_ref.logits is not None
    assert rel(out.loss, out_ref.loss) < 1e-6
    out_ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), chunked.parameters()):
        assert rel(q.grad, p.grad) < 1e-5, name
    chunked.eval()                                  # evaluation keeps the logits (perplexity, export)
    assert chunked(ids, labels=labels).logits.shape == (2, 40, 101)


def test_bf16_autocast_agrees():
    ref, chunked = _gpt_pair()
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = ref(ids, labels=labels).loss
        loss = chunked(ids, labels=labels).loss
    assert loss.dtype == torch.float32 and rel(loss, loss_ref) < 1e-3
    loss_ref.backward()
    loss.backward()
    for (name, p), q in zip(ref.named_parameters(), chunked.parameters()):
        assert q.grad.dtype == p.grad.dtype and rel(q.grad, p.grad) < 3e-2, name


def _saved_bytes(model, ids, labels) -> int:
    """Bytes of every tensor autograd saves for backward during one forward (views counted in full)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=labels).loss
    return total


def test_no_tokens_x_vocab_tensor_is_kept_for_backward():
    V, L = 4096, 64
    ref, chunked = _gpt_pair(vocab_size=V, max_seq_len=L)
    ids, labels = _batch(L, V)
    logits_bytes = 2 * L * V * 4                     # one fp32 (B·L, V) tensor
    plain, small = _saved_bytes(ref, ids, labels), _saved_bytes(chunked, ids, labels)
    # the plain path saves two (B·L, V) fp32 tensors (log-softmax's output, for itself and for the NLL);
    # the chunked one none, only the labels and their mask (a few hundred bytes)
    assert plain - small > 1.99 * logits_bytes, (plain, small)
    assert small < plain / 2, (plain, small)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens.*causal"):
        tiny_model_cfg("m2_bert", loss_chunk_tokens=64).validate()
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens.*>= 0"):
        tiny_model_cfg("m2_gpt", loss_chunk_tokens=-1).validate()
