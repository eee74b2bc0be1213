"""Import of reference M2-BERT checkpoints (m2train.convert.m2_bert).

Round trips: a random model is written in the reference layout (Composer .pt, HF folder with
pytorch_model.bin or safetensors), imported, and must give identical logits. Parity: an independent,
plain-torch re-implementation of the reference forward (DESIGN.md §4.2), operating directly on the
reference-layout state dict, must agree with the imported model in fp64."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import yaml
import torch
import torch.nn.functional as F

from m2train.config import ModelConfig
from m2train.convert.m2_bert import (ConversionError, from_reference_state_dict, import_m2_bert, infer_config,
                                     load_m2_bert, to_reference_state_dict, write_reference_checkpoint)
from m2train.models import build_model
from m2train.models.pretrained import from_pretrained

VOCAB, L = 100, 32


def tiny_cfg(**overrides) -> ModelConfig:
    # Values that shapes cannot tell (eps, dropout, pad id) stay at the reference defaults, so that
    # shape inference must reproduce this config exactly.
    base = dict(arch="m2_bert", head="mlm", vocab_size=VOCAB, hidden_size=64, num_layers=2,
                intermediate_size=256, max_seq_len=L, filter_order=16)
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def random_model(cfg: ModelConfig) -> torch.nn.Module:
    """A model whose every tensor is random (so a wrongly mapped key cannot go unnoticed), with the
    decoder tied and each filter's freq shared, as in the reference."""
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("filter.t") or name.endswith("filter.z"):
                continue  # keep the real positional features (they matter for the parity test)
            t.copy_(torch.randn(t.shape, generator=g) * (0.5 if t.dim() > 1 else 0.2)
                    + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def ids(batch: int = 2, length: int = L) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---------------------------------------------------------------------------------------------------
# Round trips through every checkpoint flavour
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["standard", "legacy"])
@pytest.mark.parametrize("flavour", ["composer", "hf", "hf-safetensors"])
def test_round_trip(tmp_path, flavour, legacy):
    cfg = tiny_cfg(mixer_input_norm=legacy)
    model = random_model(cfg)
    ref = tmp_path / ("ref.pt" if flavour == "composer" else "ref")
    write_reference_checkpoint(model, ref, flavour)
    if flavour == "composer":
        ckpt = torch.load(ref, weights_only=True)
        assert all(k.startswith("model.") for k in ckpt["state"]["model"])
    out = tmp_path / "out"
    imported, info = import_m2_bert(ref, out)
    assert info["kind"] == flavour
    assert imported.config == cfg
    x = ids()
    assert torch.equal(logits(model, x), logits(imported, x))
    reloaded = from_pretrained(out)
    assert torch.equal(logits(model, x), logits(reloaded, x))
    # and back: the inverse mapping reproduces the reference state dict exactly
    back = to_reference_state_dict(reloaded)
    orig = to_reference_state_dict(model)
    assert back.keys() == orig.keys()
    assert all(torch.equal(back[k], orig[k]) for k in orig)


def test_round_trip_classification_and_variants(tmp_path):
    for cfg in (tiny_cfg(head="classification", num_labels=3),
                tiny_cfg(bidirectional=False, residual_long_conv=False),
                tiny_cfg(mlp_type="dense")):
        model = random_model(cfg)
        ref = tmp_path / f"ref_{cfg.head}_{cfg.bidirectional}_{cfg.mlp_type}"
        write_reference_checkpoint(model, ref, "hf")
        imported, info = load_m2_bert(ref)
        assert imported.config == cfg
        x = ids()
        assert torch.equal(logits(model, x), logits(imported, x))
        # without config.json the shapes give the same config as well
        (ref / "config.json").unlink()
        imported, info = load_m2_bert(ref)
        assert info["config_source"] == "inferred from tensor shapes"
        assert imported.config == cfg


@pytest.mark.parametrize("legacy", [False, True])
def test_shape_inference_without_config_json(tmp_path, legacy):
    cfg = tiny_cfg(mixer_input_norm=legacy)
    model = random_model(cfg)
    sd = to_reference_state_dict(model, "composer")
    # Composer files also pickle run state (here an argparse.Namespace), which the safe loader refuses:
    # the importer falls back to weights_only=False with a warning.
    torch.save({"state": {"model": sd, "run": argparse.Namespace(seed=1)}}, tmp_path / "c.pt")
    assert infer_config(to_reference_state_dict(model)) == cfg
    imported, info = load_m2_bert(tmp_path / "c.pt")
    assert info["config_source"] == "inferred from tensor shapes"
    assert imported.config == cfg
    assert torch.equal(logits(model, ids()), logits(imported, ids()))


def test_hf_config_fields_are_used(tmp_path):
    cfg = tiny_cfg(layer_norm_eps=1e-6, hidden_dropout=0.05, pad_token_id=3)
    model = random_model(cfg)
    ref = write_reference_checkpoint(model, tmp_path / "ref", "hf-safetensors")
    hf = json.loads((ref / "config.json").read_text())
    assert hf["layer_norm_eps"] == 1e-6 and hf["hyena_filter_order"] == 16
    imported, info = load_m2_bert(ref)
    assert info["config_source"] == "config.json"
    assert imported.config == cfg


def test_explicit_config_and_ignored_buffers(tmp_path):
    cfg = tiny_cfg()
    model = random_model(cfg)
    sd = to_reference_state_dict(model)
    sd["bert.embeddings.position_ids"] = torch.arange(L)[None]   # HF buffer: ignored
    torch.save(sd, tmp_path / "weights.bin")                      # a bare file, no config.json
    given = dataclasses.replace(cfg, hidden_dropout=0.0)
    imported, info = load_m2_bert(tmp_path / "weights.bin", config=given)
    assert info["config_source"] == "given config" and imported.config == given
    assert info["ignored"] == ["bert.embeddings.position_ids"]
    assert torch.equal(logits(model, ids()), logits(imported, ids()))


def test_longer_filter_tables_are_truncated(tmp_path):
    """A checkpoint whose filter positional table is longer than max_position_embeddings still imports
    exactly (only the first max_seq_len rows are ever used)."""
    long_model = random_model(tiny_cfg(max_seq_len=48))
    sd = to_reference_state_dict(long_model)
    short = tiny_cfg()
    sd["bert.embeddings.position_embeddings.weight"] = sd["bert.embeddings.position_embeddings.weight"][:L].clone()
    cfg = infer_config(sd)
    assert cfg.max_seq_len == L
    model = build_model(cfg).eval()
    ours, notes = from_reference_state_dict(sd, model)
    model.load_state_dict(ours)
    assert notes and "48->32" in notes[0]
    assert cfg == short
    assert torch.equal(logits(long_model, ids()), logits(model, ids()))


# ---------------------------------------------------------------------------------------------------
# Errors name the offending keys
# ---------------------------------------------------------------------------------------------------

def _write(tmp_path, sd, name="ref"):
    folder = tmp_path / name
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


def test_unknown_key_is_an_error(tmp_path):
    sd = to_reference_state_dict(random_model(tiny_cfg()))
    sd["bert.encoder.layer.0.attention.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"bert\.encoder\.layer\.0\.attention\.mystery\.weight"):
        load_m2_bert(_write(tmp_path, sd))


def test_missing_key_is_an_error(tmp_path):
    sd = to_reference_state_dict(random_model(tiny_cfg()))
    del sd["bert.encoder.layer.1.mlp.wo.bias"]
    with pytest.raises(ConversionError, match=r"missing.*bert\.encoder\.layer\.1\.mlp\.wo\.bias"):
        load_m2_bert(_write(tmp_path, sd))


def test_extra_layer_against_config_is_an_error(tmp_path):
    model = random_model(tiny_cfg())
    ref = write_reference_checkpoint(model, tmp_path / "ref", "hf")
    hf = json.loads((ref / "config.json").read_text())
    hf["num_hidden_layers"] = 1
    (ref / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConversionError, match=r"unknown reference keys.*bert\.encoder\.layer\.1\."):
        load_m2_bert(ref)


def test_mismatched_shared_freq_is_an_error(tmp_path):
    sd = to_reference_state_dict(random_model(tiny_cfg()))
    key = "bert.encoder.layer.0.attention.filter_fn.implicit_filter_rev.3.freq"
    sd[key] = sd[key] + 1.0
    with pytest.raises(ConversionError, match=r"implicit_filter_rev\.3\.freq differs"):
        load_m2_bert(_write(tmp_path, sd))


def test_untied_decoder_is_an_error(tmp_path):
    sd = to_reference_state_dict(random_model(tiny_cfg()))
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] * 2
    with pytest.raises(ConversionError, match=r"cls\.predictions\.decoder\.weight is not equal"):
        load_m2_bert(_write(tmp_path, sd))


def test_shape_mismatch_is_an_error(tmp_path):
    model = random_model(tiny_cfg())
    sd = to_reference_state_dict(model)
    sd["bert.encoder.layer.0.attention.filter_fn.modulation.deltas"] = torch.zeros(64)
    with pytest.raises(ConversionError, match=r"filter_fn\.modulation\.deltas has \(64,\).*\(1, 1, 64\)"):
        load_m2_bert(_write(tmp_path, sd), config=tiny_cfg())


def test_tied_decoder_and_shared_freq_copies_may_be_absent(tmp_path):
    """Exporters that store shared tensors once (e.g. HF safetensors) drop the duplicates."""
    model = random_model(tiny_cfg())
    sd = to_reference_state_dict(model)
    del sd["cls.predictions.decoder.weight"]
    for k in [k for k in sd if re_freq_copy(k)]:
        del sd[k]
    imported, _ = load_m2_bert(_write(tmp_path, sd))
    assert torch.equal(logits(model, ids()), logits(imported, ids()))


def re_freq_copy(key: str) -> bool:
    return key.endswith(".freq") and not key.endswith("implicit_filter.1.freq")


def test_composer_prefix_is_required(tmp_path):
    sd = to_reference_state_dict(random_model(tiny_cfg()))        # no "model." prefix
    torch.save({"state": {"model": sd}}, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"start with 'model\.'"):
        load_m2_bert(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def test_cli_import(tmp_path, capsys):
    from m2train.cli import main

    model = random_model(tiny_cfg())
    ref = write_reference_checkpoint(model, tmp_path / "ckpt.pt", "composer")
    assert main(["import-m2-bert", str(ref), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and str(tmp_path / "out") in printed
    assert torch.equal(logits(model, ids()), logits(from_pretrained(tmp_path / "out"), ids()))
    # an explicit m2train config (YAML) is accepted too; a wrong one fails with a message, not a traceback
    yaml_cfg = tmp_path / "cfg.yaml"
    yaml_cfg.write_text(yaml.safe_dump({"model": dataclasses.asdict(tiny_cfg())}))
    assert main(["import-m2-bert", str(ref), str(tmp_path / "out2"), "--config", str(yaml_cfg)]) == 0
    yaml_cfg.write_text(yaml_cfg.read_text().replace("num_layers: 2", "num_layers: 3"))
    assert main(["import-m2-bert", str(ref), str(tmp_path / "out3"), "--config", str(yaml_cfg)]) == 1
    assert "bert.encoder.layer.2" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    import subprocess
    import sys

    ref = write_reference_checkpoint(random_model(tiny_cfg()), tmp_path / "ref", "hf-safetensors")
    proc = subprocess.run([sys.executable, "-m", "m2train", "import-m2-bert", str(ref), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------
# Parity with an independent re-implementation of the reference forward (DESIGN.md §4.2)
# ---------------------------------------------------------------------------------------------------

def _ref_blockdiag(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference BlockdiagLinear without bias: chunk k of the input times block k (w: (nb, out_b, in_b))."""
    nb, out_b, in_b = w.shape
    xs = x.reshape(*x.shape[:-1], nb, in_b)
    return torch.einsum("...ki,koi->...ko", xs, w).reshape(*x.shape[:-1], nb * out_b)


def _ref_implicit_filter(sd: dict, prefix: str, seq_len: int, bidirectional: bool):
    """k (H, L) [and k_rev] from the Hyena-style filter stored under `prefix` (…filter_fn.)."""
    z = sd[prefix + "pos_emb.z"][0, :seq_len]                # (L, E)
    t = sd[prefix + "pos_emb.t"][0, :seq_len]                # (L, 1)
    deltas = sd[prefix + "modulation.deltas"][0, 0]          # (H,)
    decay = torch.exp(-t * deltas.abs())                     # (L, H)

    def mlp(name):
        h = z
        for lin, act in ((0, 1), (2, 3), (4, 5)):
            h = h @ sd[f"{prefix}{name}.{lin}.weight"].T + sd[f"{prefix}{name}.{lin}.bias"]
            h = torch.sin(sd[f"{prefix}{name}.{act}.freq"] * h)
        return (h @ sd[f"{prefix}{name}.6.weight"].T) * decay   # (L, H)

    k = mlp("implicit_filter").T
    k_rev = mlp("implicit_filter_rev").T if bidirectional else None
    return k, k_rev


def _ref_fftconv(u: torch.Tensor, k: torch.Tensor, k_rev, D: torch.Tensor) -> torch.Tensor:
    """u (B, H, L). The reference builds a 2L kernel [k, 0] + [0, flip(k_rev)] and uses FFTs of size 2L."""
    seq_len = u.shape[-1]
    if k_rev is not None:
        k = F.pad(k, (0, seq_len)) + F.pad(k_rev.flip(-1), (seq_len, 0))
    n = 2 * seq_len
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seq_len]
    return y + u * D[:, None]


def reference_mlm_logits(sd: dict, cfg: ModelConfig, input_ids: torch.Tensor) -> torch.Tensor:
    H, I, eps = cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps
    B, seq_len = input_ids.shape
    e = "bert.embeddings."
    h = (sd[e + "word_embeddings.weight"][input_ids] + sd[e + "token_type_embeddings.weight"][0]
         + sd[e + "position_embeddings.weight"][:seq_len])
    h = F.layer_norm(h, (H,), sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], eps)
    for i in range(cfg.num_layers):
        a = f"bert.encoder.layer.{i}.attention."
        u = h
        if cfg.mixer_input_norm:  # legacy "hyena_training_additions": torch's default eps
            u = F.layer_norm(u, (H,), sd[a + "layernorm.weight"], sd[a + "layernorm.bias"], 1e-5)
        z = (u @ sd[a + "in_linear.weight"].T + sd[a + "in_linear.bias"]).transpose(1, 2)   # (B, 3H, L)
        z = F.conv1d(z, sd[a + "short_filter.weight"], sd[a + "short_filter.bias"], padding=2,
                     groups=3 * H)[..., :seq_len]
        x1, x2, v = z[:, :H], z[:, H:2 * H], z[:, 2 * H:]
        v = v * x1
        k, k_rev = _ref_implicit_filter(sd, a + "filter_fn.", seq_len, cfg.bidirectional)
        y = _ref_fftconv(v, k, k_rev, sd[a + "filter_fn.bias"]) * x2
        if cfg.residual_long_conv:
            k2, k2_rev = _ref_implicit_filter(sd, a + "filter_fn2.", seq_len, cfg.bidirectional)
            y = y + _ref_fftconv(u.transpose(1, 2), k2, k2_rev, sd[a + "filter_fn2.bias"])
        y = y.transpose(1, 2) @ sd[a + "out_linear.weight"].T + sd[a + "out_linear.bias"]
        m = f"bert.encoder.layer.{i}.mlp."
        g = _ref_blockdiag(y, sd[m + "gated_layers.weight"])
        glu = F.gelu(g[..., :I]) * g[..., I:]
        out = _ref_blockdiag(glu, sd[m + "wo.weight"]) + sd[m + "wo.bias"]
        h = F.layer_norm(y + out, (H,), sd[m + "layernorm.weight"], sd[m + "layernorm.bias"], eps)
    c = "cls.predictions."
    t = F.gelu(h @ sd[c + "transform.dense.weight"].T + sd[c + "transform.dense.bias"])
    t = F.layer_norm(t, (H,), sd[c + "transform.LayerNorm.weight"], sd[c + "transform.LayerNorm.bias"], 1e-12)
    return t @ sd[c + "decoder.weight"].T + sd[c + "decoder.bias"]


@pytest.mark.parametrize("legacy", [False, True], ids=["standard", "legacy"])
@pytest.mark.parametrize("seq_len", [L, 19])
def test_parity_with_reference_forward(tmp_path, legacy, seq_len):
    cfg = tiny_cfg(mixer_input_norm=legacy)
    source = random_model(cfg)
    ref = write_reference_checkpoint(source, tmp_path / "ref.pt", "composer")
    # The reference-layout tensors as stored in the checkpoint, in fp64.
    sd = {k[len("model."):]: v.double() for k, v in torch.load(ref, weights_only=True)["state"]["model"].items()}
    model, _ = load_m2_bert(ref)
    model = model.double().eval()
    x = ids(3, seq_len)
    expected = reference_mlm_logits(sd, cfg, x)
    got = logits(model, x)
    assert got.dtype == torch.float64
    scale = expected.abs().max().item()
    assert math.isfinite(scale) and scale > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * max(1.0, scale))
