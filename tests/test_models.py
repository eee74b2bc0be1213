"""Whole models: interfaces, lengths, bf16 autocast, heads, init and parameter counts."""

import glob

import pytest
import torch

from m2train.config import load_config
from m2train.models import build_model
from m2train.models.outputs import ModelOutput

from conftest import tiny_model_cfg

ARCHS = ["m2_bert", "m2_gpt", "bert", "gpt"]


def inputs_for(cfg, B=2, L=None):
    L = L or cfg.max_seq_len
    ids = torch.randint(1, cfg.vocab_size, (B, L))
    return ids


@pytest.mark.parametrize("arch", ARCHS)
def test_interface_logits_everywhere_and_loss_with_labels(arch):
    cfg = tiny_model_cfg(arch)
    model = build_model(cfg)
    ids = inputs_for(cfg)
    out = model(ids)
    assert isinstance(out, ModelOutput) and out.loss is None
    assert out.logits.shape == (2, cfg.max_seq_len, cfg.vocab_size)
    labels = ids.clone()
    labels[:, ::3] = -100
    out = model(ids, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mlp_rev" not in n
               and "token_type" not in n and "pos_embed" not in n and "position" not in n)


@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt"])
@pytest.mark.parametrize("L", [1, 7, 23, 40])
def test_odd_non_power_of_two_and_short_lengths(arch, L):
    cfg = tiny_model_cfg(arch)          # max_seq_len 40
    model = build_model(cfg).double().eval()
    ids = inputs_for(cfg, L=L)
    y = model(ids).logits
    assert y.shape == (2, L, cfg.vocab_size) and torch.isfinite(y).all()
    if arch == "m2_gpt":
        # a causal model's outputs on a prefix equal its outputs on the full sequence
        full = model(torch.cat([ids, inputs_for(cfg, L=40 - L)], 1) if L < 40 else ids).logits
        torch.testing.assert_close(full[:, :L], y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["m2_bert", "m2_gpt"])
def test_bf16_autocast_close_to_fp32(arch):
    cfg = tiny_model_cfg(arch, hidden_size=64, intermediate_size=128)
    model = build_model(cfg).eval()
    ids = inputs_for(cfg)
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).logits
    assert torch.isfinite(low).all()
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def test_bf16_autocast_backward_is_finite():
    cfg = tiny_model_cfg("m2_gpt")
    model = build_model(cfg)
    ids = inputs_for(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mlm_logits_only_at_masked_positions_match_full_head():
    cfg = tiny_model_cfg("m2_bert")
    model = build_model(cfg).double().eval()
    ids = inputs_for(cfg)
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5, 11]] = ids[:, [2, 5, 11]]
    fast = model(ids, labels=labels)
    model.config.mlm_logits_at_masked_only = False
    full = model(ids, labels=labels)
    sel = labels > 0
    torch.testing.assert_close(fast.logits[sel], full.logits[sel])
    torch.testing.assert_close(fast.loss, full.loss)
    assert (fast.logits[~sel] == 0).all()                    # reference: zeros elsewhere
    expected = torch.nn.functional.cross_entropy(full.logits[sel], labels[sel])
    torch.testing.assert_close(full.loss, expected)


def test_mlm_decoder_is_tied_to_word_embeddings():
    model = build_model(tiny_model_cfg("m2_bert"))
    assert model.mlm.decoder_weight is model.bert.embeddings.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder.weight" in n for n in names)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classification_head(pooling):
    cfg = tiny_model_cfg("m2_bert", head="classification", num_labels=3, pooling=pooling)
    model = build_model(cfg).double().eval()
    ids = inputs_for(cfg)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    hidden = model.bert(ids, None, mask)
    head = model.classifier
    if pooling == "mean":
        pooled = torch.stack([hidden[0].mean(0), hidden[1, :30].mean(0)])
    else:
        pooled = hidden[:, 0]
    expected = head.classifier(torch.tanh(head.pooler(pooled)))
    torch.testing.assert_close(out.logits, expected)


def test_bert_baseline_attention_mask_hides_padding():
    cfg = tiny_model_cfg("bert")
    model = build_model(cfg).double().eval()
    ids = inputs_for(cfg, B=1, L=20)
    mask = torch.ones_like(ids)
    mask[:, 15:] = 0
    a = model.bert(ids, None, mask)[:, :15]
    ids2 = ids.clone()
    ids2[:, 15:] = 7
    b = model.bert(ids2, None, mask)[:, :15]
    torch.testing.assert_close(a, b)


def test_init_weights_is_complete_and_reproducible():
    cfg = tiny_model_cfg("m2_bert")
    torch.manual_seed(1)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    # re-running init_weights with the same seed reproduces the same weights (every tensor is reset)
    torch.manual_seed(2)
    a.init_weights()
    torch.manual_seed(2)
    b.init_weights()
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    emb = a.bert.embeddings.word_embeddings.weight
    assert 0.015 < emb.std().item() < 0.025 and emb[cfg.pad_token_id].abs().sum() == 0
    assert torch.all(a.bert.layers[0].mixer.long_conv.filter.sin.freq == 10.0)


def test_every_config_builds_or_validates():
    for path in sorted(glob.glob("configs/*.yaml")):
        cfg = load_config(path)
        assert cfg.model.arch in ARCHS, path


def test_param_groups_follow_the_reference_recipe():
    from m2train.config import OptimConfig
    model = build_model(tiny_model_cfg("m2_bert"))
    groups = {g["name"]: g for g in model.param_groups(OptimConfig())}
    assert set(groups) == {"default", "no_decay", "filter", "pos_emb"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    filt = model.bert.layers[0].mixer.long_conv.filter
    assert id(filt.z) in ids["pos_emb"] and groups["pos_emb"]["lr"] == 1e-5
    assert groups["pos_emb"]["weight_decay"] == 0.0
    assert id(filt.sin.freq) in ids["filter"] and id(filt.mlp.out.weight) in ids["filter"]
    assert all(id(p) in ids["filter"] for p in filt.mlp.parameters())
    assert not any(id(p) in ids["filter"] for p in filt.mlp_rev.parameters())
    assert groups["filter"]["lr"] == 1e-3 and groups["filter"]["weight_decay"] == 0.1
    layer = model.bert.layers[0]
    for p in (layer.norm.weight, layer.mixer.in_linear.bias, layer.mixer.long_conv.skip):
        assert id(p) in ids["no_decay"]
    assert id(layer.mixer.in_linear.weight) in ids["default"]
    # every parameter in exactly one group
    all_ids = [i for s in ids.values() for i in s]
    assert len(all_ids) == len(set(all_ids)) == len({id(p) for p in model.parameters()})
