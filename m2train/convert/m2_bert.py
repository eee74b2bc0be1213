"""Import official M2-BERT checkpoints (HazyResearch/m2) into m2train, and write ours in their layout.

Inputs (DESIGN.md §4.2, "Reference checkpoint layout"):
  - a Composer `.pt`: weights at ckpt['state']['model'], every key prefixed `model.`;
  - a Hugging Face folder or file: `pytorch_model.bin` or `*.safetensors` (keys without the prefix), with
    the reference `config.json` next to it when there is one.

The model config comes, in this order of preference, from an m2train config the user passes, from the
reference config.json, or from the tensor shapes (see `infer_config`). Keys are mapped through KEY_TABLE,
an explicit table used in both directions (`from_reference_state_dict`, `to_reference_state_dict`). A
reference key the table does not know, or a key the model needs that the checkpoint lacks, is an error that
names the key; nothing is silently dropped except the known non-weight buffers in IGNORED_REFERENCE_KEYS.

    m2train import-m2-bert REF OUT [--config CFG]      (CLI: `main`)
    import_m2_bert(REF, OUT, config=None)              (Python)
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, load_config, model_config_from_dict, to_plain


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the offending keys or fields."""


# ----------------------------------------------------------------------------------------------------
# The key table
# ----------------------------------------------------------------------------------------------------

# Reference keys that carry no learned state and are skipped when present: index buffers that Hugging
# Face-style BertEmbeddings register (`position_ids` = arange(max_len), `token_type_ids` = zeros).
IGNORED_REFERENCE_KEYS = frozenset({
    "bert.embeddings.position_ids",
    "bert.embeddings.token_type_ids",
})

COMPOSER_PREFIX = "model."

# Placeholders (expanded for a given config by `reference_key_map`):
#   {i}       layer index
#   {p}       weight | bias
#   {f}->{F}  reference filter module -> ours:  filter_fn -> long_conv,  filter_fn2 -> residual_conv
#   {m}->{M}  filter MLP:                       implicit_filter -> mlp,  implicit_filter_rev -> mlp_rev
#   {j}->{J}  a Linear inside the reference nn.Sequential (0, 2, 4) -> our mlp.linears (0, 1, 2)
#   {s}       a Sin inside that Sequential (1, 3, 5); all of them hold the filter's ONE shared freq
# Reshape (reference shape in terms of ours):
#   None      same shape
#   "lead1"   (1, *ours)      pos_emb.z (1, L, E) and pos_emb.t (1, L, 1)
#   "lead2"   (1, 1, *ours)   modulation.deltas (1, 1, H)
#   "shared"  same shape; several reference keys hold one tensor of ours: all present copies must be equal
#   "tied"    same shape; a copy of another of our tensors (must be equal), not stored by us
# Only-when: a condition on the config under which the row exists (None: always).
_RL = "bert.encoder.layer.{i}."          # reference layer prefix
_OL = "bert.layers.{i}."                 # our layer prefix
KEY_TABLE: tuple[tuple[str, str, str | None, str | None], ...] = (
    # reference key                                   our key                                        reshape   only when
    ("bert.embeddings.word_embeddings.weight",         "bert.embeddings.word_embeddings.weight",      None,     None),
    ("bert.embeddings.position_embeddings.weight",     "bert.embeddings.position_embeddings.weight",  None,     "positions"),
    ("bert.embeddings.token_type_embeddings.weight",   "bert.embeddings.token_type_embeddings.weight", None,    None),
    ("bert.embeddings.LayerNorm.{p}",                  "bert.embeddings.norm.{p}",                    None,     None),
    # --- sequence mixer ("attention" in the reference) ------------------------------------------------
    (_RL + "attention.layernorm.{p}",                  _OL + "mixer.input_norm.{p}",                  None,     "legacy"),
    (_RL + "attention.in_linear.{p}",                  _OL + "mixer.in_linear.{p}",                   None,     None),
    (_RL + "attention.short_filter.{p}",               _OL + "mixer.short_conv.{p}",                  None,     None),
    (_RL + "attention.out_linear.{p}",                 _OL + "mixer.out_linear.{p}",                  None,     None),
    (_RL + "attention.{f}.bias",                       _OL + "mixer.{F}.skip",                        None,     None),
    (_RL + "attention.{f}.pos_emb.z",                  _OL + "mixer.{F}.filter.z",                    "lead1",  None),
    (_RL + "attention.{f}.pos_emb.t",                  _OL + "mixer.{F}.filter.t",                    "lead1",  None),
    (_RL + "attention.{f}.modulation.deltas",          _OL + "mixer.{F}.filter.deltas",               "lead2",  None),
    (_RL + "attention.{f}.{m}.{j}.{p}",                _OL + "mixer.{F}.filter.{M}.linears.{J}.{p}",  None,     None),
    (_RL + "attention.{f}.{m}.{s}.freq",               _OL + "mixer.{F}.filter.sin.freq",             "shared", None),
    (_RL + "attention.{f}.{m}.6.weight",               _OL + "mixer.{F}.filter.{M}.out.weight",       None,     None),
    # --- GLU dimension mixer and the layer's post-norm ---------------------------------------------------
    (_RL + "mlp.gated_layers.weight",                  _OL + "mlp.gated_layers.weight",               None,     None),
    (_RL + "mlp.wo.{p}",                               _OL + "mlp.wo.{p}",                            None,     None),
    (_RL + "mlp.layernorm.{p}",                        _OL + "norm.{p}",                              None,     None),
    # --- MLM head ---------------------------------------------------------------------------------------
    ("cls.predictions.transform.dense.{p}",            "mlm.dense.{p}",                               None,     "mlm"),
    ("cls.predictions.transform.LayerNorm.{p}",        "mlm.norm.{p}",                                None,     "mlm"),
    ("cls.predictions.decoder.bias",                   "mlm.decoder_bias",                            None,     "mlm"),
    ("cls.predictions.decoder.weight",                 "bert.embeddings.word_embeddings.weight",      "tied",   "mlm"),
    # --- classification head ----------------------------------------------------------------------------
    ("bert.pooler.dense.{p}",                          "classifier.pooler.{p}",                       None,     "classification"),
    ("classifier.{p}",                                 "classifier.classifier.{p}",                   None,     "classification"),
)

# Our tensors whose first dimension is a length: a reference checkpoint may hold more rows than the
# model's max_seq_len (e.g. long_conv_l_max > max_position_embeddings); only the first max_seq_len rows
# are ever used, so the extra rows are dropped (exact for every input length the model accepts).
_LENGTH_KEYS = re.compile(r"(filter\.z|filter\.t|position_embeddings\.weight)$")


def _conditions(cfg: ModelConfig) -> dict[str | None, bool]:
    return {None: True, "positions": cfg.position_embeddings, "legacy": cfg.mixer_input_norm,
            "mlm": cfg.head == "mlm", "classification": cfg.head == "classification"}


def _domains(cfg: ModelConfig) -> dict[str, list[dict[str, str]]]:
    filters = [("filter_fn", "long_conv")] + ([("filter_fn2", "residual_conv")] if cfg.residual_long_conv else [])
    mlps = [("implicit_filter", "mlp")] + ([("implicit_filter_rev", "mlp_rev")] if cfg.bidirectional else [])
    return {
        "i": [{"i": str(i)} for i in range(cfg.num_layers)],
        "p": [{"p": "weight"}, {"p": "bias"}],
        "f": [{"f": r, "F": o} for r, o in filters],
        "m": [{"m": r, "M": o} for r, o in mlps],
        "j": [{"j": r, "J": o} for r, o in (("0", "0"), ("2", "1"), ("4", "2"))],
        "s": [{"s": s} for s in ("1", "3", "5")],
    }


def reference_key_map(cfg: ModelConfig) -> dict[str, tuple[str, str | None]]:
    """KEY_TABLE expanded for one config: {reference key: (our key, reshape)} (no Composer prefix)."""
    _check_representable(cfg)
    conditions, domains = _conditions(cfg), _domains(cfg)
    out: dict[str, tuple[str, str | None]] = {}
    for ref_t, our_t, reshape, when in KEY_TABLE:
        if not conditions[when]:
            continue
        letters = [c for c in dict.fromkeys(re.findall(r"\{(\w)\}", ref_t))]
        for combo in itertools.product(*(domains[c] for c in letters)):
            values: dict[str, str] = {}
            for part in combo:
                values.update(part)
            out[ref_t.format(**values)] = (our_t.format(**values), reshape)
    return out


def _check_representable(cfg: ModelConfig) -> None:
    problems = []
    if cfg.arch != "m2_bert":
        problems.append(f"model.arch={cfg.arch!r} (only 'm2_bert' has a reference layout)")
    if cfg.head not in ("mlm", "classification"):
        problems.append(f"model.head={cfg.head!r}")
    if cfg.mlp_type not in ("blockdiag", "dense"):
        problems.append(f"model.mlp_type={cfg.mlp_type!r} (the reference GLU is block-diagonal or dense)")
    if problems:
        raise ConversionError("no reference M2-BERT layout for " + ", ".join(problems))


def _ref_shape(our_shape: tuple, reshape: str | None) -> tuple:
    if reshape == "lead1":
        return (1, *our_shape)
    if reshape == "lead2":
        return (1, 1, *our_shape)
    return tuple(our_shape)


# ----------------------------------------------------------------------------------------------------
# reference -> ours
# ----------------------------------------------------------------------------------------------------

def _strip_composer_prefix(state: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k in state if not k.startswith(COMPOSER_PREFIX)]
    if bad:
        raise ConversionError(f"Composer checkpoint: expected every key of ['state']['model'] to start with "
                              f"{COMPOSER_PREFIX!r}; these do not: {', '.join(sorted(bad)[:20])}")
    return {k[len(COMPOSER_PREFIX):]: v for k, v in state.items()}


def from_reference_state_dict(ref_sd: dict[str, torch.Tensor], model: torch.nn.Module
                              ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a reference state dict (keys without the Composer prefix) onto `model`'s state_dict keys.

    Returns (our state dict, notes). Raises ConversionError naming every unknown reference key, every
    missing one, every shape mismatch, a shared `freq` whose copies differ and a decoder weight that is
    not the word embedding. `cls.predictions.decoder.weight` may be absent (tied), and of the copies of a
    filter's shared freq at least one must be present (exporters may store shared tensors once)."""
    cfg: ModelConfig = model.config
    key_map = reference_key_map(cfg)
    expected = model.state_dict()
    notes: list[str] = []

    sd = {k: v for k, v in ref_sd.items() if k not in IGNORED_REFERENCE_KEYS}
    not_tensors = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    unknown = sorted(k for k in sd if k not in key_map)
    optional = {k for k, (_, r) in key_map.items() if r in ("tied", "shared")}
    missing = sorted(k for k in key_map if k not in sd and k not in optional)
    # A shared tensor needs at least one of its copies.
    shared_targets: dict[str, list[str]] = {}
    for k, (ours, r) in key_map.items():
        if r == "shared":
            shared_targets.setdefault(ours, []).append(k)
    for ours, refs in shared_targets.items():
        if not any(r in sd for r in refs):
            missing.append(refs[0])
    problems = []
    if not_tensors:
        problems.append(f"entries that are not tensors: {', '.join(not_tensors)}")
    if unknown:
        problems.append(f"unknown reference keys (not in the M2-BERT layout for this config): {', '.join(unknown)}")
    if missing:
        problems.append(f"missing reference keys: {', '.join(sorted(missing))}")
    if problems:
        raise ConversionError("; ".join(problems))

    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    tied: list[tuple[str, str]] = []
    truncated: set[str] = set()
    for ref_key, (our_key, reshape) in key_map.items():
        if ref_key not in sd:
            continue
        if reshape == "tied":
            tied.append((ref_key, our_key))
            continue
        if our_key not in expected:
            raise ConversionError(f"internal: {ref_key} maps to {our_key}, which the model does not have")
        tensor = sd[ref_key]
        our_shape = tuple(expected[our_key].shape)
        want = _ref_shape(our_shape, reshape)
        lead = len(want) - len(our_shape)
        if tuple(tensor.shape) != want:
            # Longer length dimension than the model's max_seq_len: keep the first rows.
            shape = tuple(tensor.shape)
            if (_LENGTH_KEYS.search(our_key) and len(shape) == len(want) and shape[:lead] == want[:lead]
                    and shape[lead + 1:] == want[lead + 1:] and shape[lead] > want[lead]):
                tensor = tensor.narrow(lead, 0, want[lead])
                truncated.add(f"{shape[lead]}->{want[lead]}")
            else:
                raise ConversionError(f"shape mismatch: {ref_key} has {shape}, the model's {our_key} "
                                      f"needs {want} in the reference layout")
        value = tensor.reshape(our_shape) if lead else tensor
        if reshape == "shared" and our_key in out:
            if not torch.equal(out[our_key], value):
                raise ConversionError(f"{ref_key} differs from {source[our_key]}: the reference shares ONE "
                                      f"Sin frequency per filter, so all its copies must be equal")
            continue
        out[our_key] = value.clone()
        source[our_key] = ref_key
    for ref_key, our_key in tied:
        if tuple(sd[ref_key].shape) != tuple(out[our_key].shape) or not torch.equal(sd[ref_key], out[our_key]):
            raise ConversionError(f"{ref_key} is not equal to {source[our_key]}: the decoder must be tied to "
                                  "the word embeddings (untied decoders are not supported)")
    if truncated:
        notes.append(f"dropped unused rows of length-indexed tensors ({', '.join(sorted(truncated))}) to "
                     f"match max_seq_len={cfg.max_seq_len}")
    no_source = sorted(set(expected) - set(out))
    if no_source:
        raise ConversionError(f"internal: no reference key fills {', '.join(no_source)} (KEY_TABLE out of date?)")
    return out, notes


# ----------------------------------------------------------------------------------------------------
# ours -> reference
# ----------------------------------------------------------------------------------------------------

def to_reference_state_dict(model: torch.nn.Module, flavour: str = "hf") -> dict[str, torch.Tensor]:
    """Our weights in the reference layout: flavour "hf" (plain keys, as in pytorch_model.bin) or
    "composer" (keys prefixed `model.`, to be stored at ckpt['state']['model']). Every value is its own
    CPU copy (shared freq and tied decoder included), so the dict can go to torch.save or safetensors."""
    if flavour not in ("hf", "composer"):
        raise ValueError(f"flavour must be 'hf' or 'composer', got {flavour!r}")
    cfg: ModelConfig = model.config
    key_map = reference_key_map(cfg)
    ours = model.state_dict()
    unmapped = sorted(set(ours) - {o for o, _ in key_map.values()})
    if unmapped:
        raise ConversionError(f"no reference name for: {', '.join(unmapped)} (KEY_TABLE out of date?)")
    prefix = COMPOSER_PREFIX if flavour == "composer" else ""
    out = {}
    for ref_key, (our_key, reshape) in key_map.items():
        t = ours[our_key].detach().to("cpu")
        out[prefix + ref_key] = t.reshape(_ref_shape(tuple(t.shape), reshape)).clone()
    return out


def reference_config_dict(cfg: ModelConfig) -> dict:
    """A reference-style (Hugging Face BertConfig) config.json for an M2-BERT ModelConfig."""
    _check_representable(cfg)
    return {
        "architectures": ["BertForMaskedLM" if cfg.head == "mlm" else "BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_seq_len,
        "long_conv_l_max": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "pad_token_id": cfg.pad_token_id,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.hidden_dropout,
        "initializer_range": cfg.initializer_range,
        "monarch_mixer_sequence_mixing": True,
        "use_positional_encodings": cfg.position_embeddings,
        "bidirectional": cfg.bidirectional,
        "residual_long_conv": cfg.residual_long_conv,
        "hyena_training_additions": cfg.mixer_input_norm,
        "hyena_filter_order": cfg.filter_order,
        "hyena_emb_dim": cfg.filter_emb_dim,
        "hyena_w": cfg.filter_sin_freq,
        "use_glu_mlp": True,
        "use_monarch_mlp": cfg.mlp_type == "blockdiag",
        "monarch_mlp_nblocks": cfg.mlp_nblocks,
        "num_labels": cfg.num_labels,
        "pool_all": cfg.pooling == "mean",
        "classifier_dropout": cfg.classifier_dropout,
    }


def write_reference_checkpoint(model: torch.nn.Module, path: str | os.PathLike, flavour: str) -> Path:
    """Write `model` as a reference checkpoint: flavour "composer" (a .pt file), "hf" (a folder with
    pytorch_model.bin + config.json) or "hf-safetensors" (a folder with model.safetensors + config.json)."""
    path = Path(path)
    if flavour == "composer":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": {"model": to_reference_state_dict(model, "composer")}}, path)
        return path
    if flavour not in ("hf", "hf-safetensors"):
        raise ValueError(f"flavour must be 'composer', 'hf' or 'hf-safetensors', got {flavour!r}")
    path.mkdir(parents=True, exist_ok=True)
    sd = to_reference_state_dict(model, "hf")
    if flavour == "hf":
        torch.save(sd, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(reference_config_dict(model.config), indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Reading checkpoints and configs
# ----------------------------------------------------------------------------------------------------

def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Composer checkpoints also pickle optimizer/scheduler/RNG/run state, which the safe loader
        # refuses. Loading them unpickles arbitrary objects: only do this for files you trust.
        print(f"m2train: {path} holds more than tensors ({str(e).splitlines()[0][:120]}); retrying with "
              "torch.load(weights_only=False) - this executes pickled code, so only use trusted checkpoints",
              file=sys.stderr)
        return torch.load(path, map_location="cpu", weights_only=False)


def _load_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out: dict[str, torch.Tensor] = {}
    for p in paths:
        part = load_file(str(p), device="cpu")
        dup = sorted(set(part) & set(out))
        if dup:
            raise ConversionError(f"{p}: keys also present in another shard: {', '.join(dup[:10])}")
        out.update(part)
    return out


def _from_torch_object(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(obj, dict) and "state" in obj:
        state = obj["state"]
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise ConversionError(f"{path}: a Composer checkpoint must hold the weights at ['state']['model']")
        return _strip_composer_prefix(state["model"]), "composer"
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        return dict(obj), "hf"
    raise ConversionError(f"{path}: neither a Composer checkpoint (dict with 'state') nor a state dict "
                          f"(got {type(obj).__name__})")


def load_reference_checkpoint(ref: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """Read a reference checkpoint: (state dict without the Composer prefix, reference config.json or
    None, kind) where kind is "composer", "hf" (torch pickle) or "hf-safetensors"."""
    ref = Path(ref)
    if not ref.exists():
        raise ConversionError(f"{ref}: no such file or folder")
    hf_config = None
    if ref.is_dir():
        folder = ref
        shards = sorted(ref.glob("*.safetensors"))
        bins = sorted(ref.glob("pytorch_model*.bin"))
        pts = sorted(ref.glob("*.pt"))
        if shards:
            sd, kind = _load_safetensors(shards), "hf-safetensors"
        elif bins:
            sd, kind = {}, "hf"
            for b in bins:
                part, kind = _from_torch_object(_torch_load(b), b)
                sd.update(part)
        elif len(pts) == 1:
            sd, kind = _from_torch_object(_torch_load(pts[0]), pts[0])
        else:
            raise ConversionError(f"{ref}: no weights found (expected *.safetensors, pytorch_model*.bin or one .pt)")
    else:
        folder = ref.parent
        if ref.suffix == ".safetensors":
            sd, kind = _load_safetensors([ref]), "hf-safetensors"
        else:
            sd, kind = _from_torch_object(_torch_load(ref), ref)
    # A config.json next to Hugging Face-style weights describes them; a Composer .pt carries no
    # HF config and a neighbouring config.json may belong to something else, so it is not used.
    cfg_path = folder / "config.json"
    if kind != "composer" and cfg_path.is_file():
        try:
            hf_config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: not valid JSON: {e}") from None
        if isinstance(hf_config, dict) and hf_config.get("format") == "m2train":
            raise ConversionError(f"{ref}: this is already an m2train folder; load it with from_pretrained")
    return sd, hf_config, kind


def _need(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"cannot infer the config: missing reference key {key} "
                              "(is this an M2-BERT checkpoint? pass --config to set the config explicitly)")
    return sd[key]


def infer_config(ref_sd: dict[str, torch.Tensor]) -> ModelConfig:
    """The M2-BERT config that the tensor shapes describe. Values that shapes cannot tell (layer_norm_eps,
    dropout, pad id, pooling, ...) keep the reference defaults."""
    word = _need(ref_sd, "bert.embeddings.word_embeddings.weight")
    vocab, hidden = word.shape
    layers = {int(m.group(1)) for k in ref_sd for m in [re.match(r"bert\.encoder\.layer\.(\d+)\.", k)] if m}
    if not layers:
        raise ConversionError("cannot infer the config: no bert.encoder.layer.{i}.* keys")
    a = "bert.encoder.layer.0.attention."
    z = _need(ref_sd, a + "filter_fn.pos_emb.z")                  # (1, L_max, emb_dim)
    l_max, emb_dim = z.shape[1], z.shape[2]
    pos = ref_sd.get("bert.embeddings.position_embeddings.weight")
    order = _need(ref_sd, a + "filter_fn.implicit_filter.0.weight").shape[0]
    gated = _need(ref_sd, "bert.encoder.layer.0.mlp.gated_layers.weight")
    if gated.dim() == 3:                                           # block-diagonal (nblocks, 2I/nb, H/nb)
        mlp_type, nblocks, inter = "blockdiag", gated.shape[0], gated.shape[0] * gated.shape[1] // 2
    else:                                                          # dense nn.Linear (2I, H)
        mlp_type, nblocks, inter = "dense", 4, gated.shape[0] // 2
    cls_keys = any(k.startswith("cls.") for k in ref_sd)
    clf = ref_sd.get("classifier.weight")
    if cls_keys and clf is not None:
        raise ConversionError("checkpoint has both an MLM head (cls.*) and a classifier (classifier.*)")
    if not cls_keys and clf is None:
        raise ConversionError("cannot infer the head: neither cls.predictions.* (MLM) nor classifier.* keys")
    d = dict(
        arch="m2_bert", head="mlm" if cls_keys else "classification",
        vocab_size=int(vocab), hidden_size=int(hidden), num_layers=max(layers) + 1,
        intermediate_size=int(inter),
        max_seq_len=int(min(l_max, pos.shape[0]) if pos is not None else l_max),
        type_vocab_size=int(_need(ref_sd, "bert.embeddings.token_type_embeddings.weight").shape[0]),
        position_embeddings=pos is not None,
        bidirectional=(a + "filter_fn.implicit_filter_rev.0.weight") in ref_sd,
        residual_long_conv=(a + "filter_fn2.pos_emb.z") in ref_sd,
        mixer_input_norm=(a + "layernorm.weight") in ref_sd,
        short_conv_kernel=int(_need(ref_sd, a + "short_filter.weight").shape[-1]),
        filter_order=int(order), filter_emb_dim=int(emb_dim),
        mlp_type=mlp_type, mlp_nblocks=int(nblocks),
    )
    if clf is not None:
        d["num_labels"] = int(clf.shape[0])
    return model_config_from_dict(d)


# Reference config.json field -> ModelConfig field, for the fields that map one to one.
HF_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "intermediate_size": "intermediate_size",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_token_id",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_dropout_prob": "hidden_dropout",
    "initializer_range": "initializer_range",
    "bidirectional": "bidirectional",
    "residual_long_conv": "residual_long_conv",
    "hyena_training_additions": "mixer_input_norm",
    "hyena_filter_order": "filter_order",
    "hyena_emb_dim": "filter_emb_dim",
    "hyena_w": "filter_sin_freq",
    "monarch_mlp_nblocks": "mlp_nblocks",
    "classifier_dropout": "classifier_dropout",
}


def config_from_reference(hf: dict, ref_sd: dict[str, torch.Tensor]) -> ModelConfig:
    """ModelConfig from a reference config.json; the head, num_labels and whether there are learned
    positions come from the weights, which are authoritative for them."""
    if hf.get("monarch_mixer_sequence_mixing") is False:
        raise ConversionError("config.json: monarch_mixer_sequence_mixing=false is an attention BERT, not M2-BERT")
    if hf.get("use_glu_mlp") is False:
        raise ConversionError("config.json: use_glu_mlp=false (a non-gated MLP) is not supported; M2-BERT uses the GLU")
    inferred = to_plain(infer_config(ref_sd))
    d = dict(inferred)
    for ref_name, ours in HF_CONFIG_FIELDS.items():
        if hf.get(ref_name) is not None or (ours == "classifier_dropout" and ref_name in hf):
            d[ours] = hf[ref_name]
    if "use_monarch_mlp" in hf:
        d["mlp_type"] = "blockdiag" if hf["use_monarch_mlp"] else "dense"
    if "pool_all" in hf:
        d["pooling"] = "mean" if hf["pool_all"] else "cls"
    lengths = [hf[k] for k in ("max_position_embeddings", "long_conv_l_max") if isinstance(hf.get(k), int)]
    if not inferred["position_embeddings"] and isinstance(hf.get("long_conv_l_max"), int):
        lengths = [hf["long_conv_l_max"]]
    if lengths:
        d["max_seq_len"] = min(lengths)
    try:
        return model_config_from_dict(d)
    except ValueError as e:
        raise ConversionError(f"config.json gives an invalid config: {e}") from None


def _user_config(config: Any) -> ModelConfig:
    """An explicit config: a ModelConfig, a dict (model fields, or a run config / m2train config.json with a
    'model' mapping), or a path to a YAML run config (or a name under configs/) or a JSON file."""
    if isinstance(config, ModelConfig):
        config.validate()
        return config
    if isinstance(config, (str, os.PathLike)) and str(config).endswith(".json"):
        config = json.loads(Path(config).read_text())
    if isinstance(config, dict):
        data = config["model"] if isinstance(config.get("model"), dict) else config
        return model_config_from_dict(data)
    return load_config(config).model


def resolve_config(ref_sd: dict[str, torch.Tensor], hf_config: dict | None, config: Any = None
                   ) -> tuple[ModelConfig, str]:
    """(config, where it came from): explicit > reference config.json > tensor shapes."""
    if config is not None:
        return _user_config(config), "given config"
    if hf_config is not None:
        return config_from_reference(hf_config, ref_sd), "config.json"
    return infer_config(ref_sd), "inferred from tensor shapes"


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------

def load_m2_bert(ref: str | os.PathLike, config: Any = None) -> tuple[torch.nn.Module, dict]:
    """Build our model from a reference checkpoint; returns (model in eval mode, info)."""
    from ..models import build_model

    ref_sd, hf_config, kind = load_reference_checkpoint(ref)
    cfg, cfg_source = resolve_config(ref_sd, hf_config, config)
    if cfg.arch != "m2_bert":
        raise ConversionError(f"the config describes arch {cfg.arch!r}; a reference M2-BERT needs 'm2_bert'")
    model = build_model(cfg)
    our_sd, notes = from_reference_state_dict(ref_sd, model)
    model.load_state_dict(our_sd, strict=True)
    model.eval()
    info = {"kind": kind, "config_source": cfg_source, "notes": notes,
            "ignored": sorted(k for k in ref_sd if k in IGNORED_REFERENCE_KEYS)}
    return model, info


def import_m2_bert(ref: str | os.PathLike, out_dir: str | os.PathLike, config: Any = None
                   ) -> tuple[torch.nn.Module, dict]:
    """Convert a reference M2-BERT checkpoint into an m2train folder (save_pretrained)."""
    from ..models.pretrained import save_pretrained

    model, info = load_m2_bert(ref, config)
    info["out_dir"] = str(save_pretrained(model, out_dir))
    return model, info


def main(args) -> int:
    """`m2train import-m2-bert REF OUT [--config CFG]`."""
    try:
        model, info = import_m2_bert(args.ref, args.out, getattr(args, "config", None))
    except (ConversionError, OSError, json.JSONDecodeError) as e:
        print(f"m2train import-m2-bert: error: {e}", file=sys.stderr)
        return 1
    cfg = model.config
    print(f"read {args.ref} ({info['kind']}); config {info['config_source']}:")
    print(f"  head={cfg.head} hidden={cfg.hidden_size} layers={cfg.num_layers} intermediate="
          f"{cfg.intermediate_size} vocab={cfg.vocab_size} max_seq_len={cfg.max_seq_len} "
          f"filter_order={cfg.filter_order} bidirectional={cfg.bidirectional} "
          f"residual_long_conv={cfg.residual_long_conv} legacy_input_norm={cfg.mixer_input_norm} "
          f"mlp={cfg.mlp_type}/{cfg.mlp_nblocks}" + (f" num_labels={cfg.num_labels}" if cfg.head == "classification" else ""))
    for note in info["notes"]:
        print(f"  note: {note}")
    if info["ignored"]:
        print(f"  skipped non-weight buffers: {', '.join(info['ignored'])}")
    print(f"parameters: {model.num_parameters():,} (tied decoder counted once)")
    print(f"wrote {info['out_dir']} (model.safetensors + config.json; load with "
          "m2train.models.pretrained.from_pretrained)")
    return 0


__all__ = ["ConversionError", "KEY_TABLE", "IGNORED_REFERENCE_KEYS", "reference_key_map",
           "from_reference_state_dict", "to_reference_state_dict", "reference_config_dict",
           "write_reference_checkpoint", "load_reference_checkpoint", "infer_config", "config_from_reference",
           "resolve_config", "load_m2_bert", "import_m2_bert", "main"]
