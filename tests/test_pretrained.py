"""save_pretrained / from_pretrained: model.safetensors + config.json round trips for every model family."""

from __future__ import annotations

import json

import pytest
import torch

from m2train.config import load_config
from m2train.models import build_model
from m2train.models.pretrained import PretrainedFormatError, from_pretrained, save_pretrained


def _small(name: str, **overrides):
    cfg = load_config(name).model
    for k, v in dict(vocab_size=300, max_seq_len=32, **overrides).items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


CASES = {
    "m2_bert_mlm": lambda: _small("m2_bert_tiny"),
    "m2_bert_classification": lambda: _small("m2_bert_tiny", head="classification", num_labels=3),
    "m2_bert_legacy": lambda: _small("m2_bert_tiny", mixer_input_norm=True),
    "m2_gpt": lambda: _small("m2_gpt_tiny", num_layers=2),
    "gpt": lambda: _small("gpt_tiny", num_layers=2),
    "bert_mlm": lambda: _small("m2_bert_tiny", arch="bert", num_heads=4),
    "bert_classification": lambda: _small("m2_bert_tiny", arch="bert", num_heads=4, head="classification"),
}


def _perturb(model):
    """Random values everywhere (incl. buffers), so a tensor that is not saved/loaded shows up."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    cfg = CASES[case]()
    model = _perturb(build_model(cfg))
    out = save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "m2train" and meta["format_version"] == 1 and meta["model"]["arch"] == cfg.arch

    loaded = from_pretrained(out)
    assert not loaded.training
    assert type(loaded) is type(model) and loaded.config == cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randint(1, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_tied_weights_stored_once_and_buffers_included(tmp_path):
    from safetensors import safe_open

    model = build_model(CASES["m2_bert_mlm"]())
    save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert not any("decoder.weight" in k for k in keys)               # the MLM decoder is the embedding
    assert any(k.endswith("filter.t") for k in keys) and any(k.endswith("filter.deltas") for k in keys)
    loaded = from_pretrained(tmp_path)
    assert loaded.mlm.decoder_weight is loaded.bert.embeddings.word_embeddings.weight   # still tied

    gpt = build_model(CASES["m2_gpt"]())
    save_pretrained(gpt, tmp_path / "gpt")
    loaded = from_pretrained(tmp_path / "gpt")
    assert loaded.lm_head is None                                      # tied head: nothing extra stored


def test_dtype_is_preserved(tmp_path):
    model = build_model(CASES["m2_gpt"]()).to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert from_pretrained(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(CASES["m2_bert_mlm"]())
    save_pretrained(model, tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    tensors.pop("bert.layers.1.mlp.wo.bias")
    tensors["bert.layers.1.extra"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(PretrainedFormatError) as e:
        from_pretrained(tmp_path)
    assert "missing keys: bert.layers.1.mlp.wo.bias" in str(e.value)
    assert "unexpected keys: bert.layers.1.extra" in str(e.value)


def test_config_mismatch_and_bad_folders(tmp_path):
    model = build_model(CASES["m2_bert_mlm"]())
    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PretrainedFormatError, match="shape mismatch for bert.embeddings.word_embeddings.weight"):
        from_pretrained(tmp_path)
    meta["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PretrainedFormatError, match="format_version"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(PretrainedFormatError, match="not an m2train config"):
        from_pretrained(tmp_path)
    with pytest.raises(PretrainedFormatError, match="not found"):
        from_pretrained(tmp_path / "nowhere")
