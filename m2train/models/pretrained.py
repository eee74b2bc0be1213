"""Hugging Face-style model folders: `model.safetensors` + `config.json`.

    save_pretrained(model, "out/")          # writes out/model.safetensors and out/config.json
    model = from_pretrained("out/")         # rebuilds with build_model(config) and loads strictly

config.json holds the ModelConfig as a plain dict under "model", next to a format marker and version, so a
folder can be recognised (and refused when it comes from a newer, incompatible m2train). The weights are
`model.state_dict()`: tied weights (the MLM decoder / GPT LM head share the word embedding) are not separate
entries there, so they are stored once; persistent buffers (the filters' `t` and `deltas`) are included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import ModelConfig, model_config_from_dict, to_plain

FORMAT_NAME = "m2train"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class PretrainedFormatError(ValueError):
    """A folder that is not a loadable m2train model (the message says what is wrong)."""


def _unshared_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict on the CPU, contiguous, with no two entries sharing storage (safetensors refuses
    shared storage; an entry that aliases an earlier one, e.g. a view, gets its own copy)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        if t.numel() > 0:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in seen or storage.nbytes() != t.numel() * t.element_size():
                # Shares storage with an earlier entry, or is a slice of a larger storage
                # (safetensors cannot save either without a copy).
                t = t.clone()
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen.add(key)
        out[name] = t
    return out


def config_dict(model_cfg: ModelConfig) -> dict:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": to_plain(model_cfg)}


def save_pretrained(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write `model.safetensors` and `config.json` into out_dir (created if needed); returns out_dir.

    Files are written under temporary names and renamed, so an interrupted save never leaves a
    half-written file under the final name."""
    from safetensors.torch import save_file

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("save_pretrained needs an m2train model (built by build_model) with a ModelConfig "
                        f"in .config; got {type(model).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _unshared_state_dict(model)
    tmp_w = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt", "m2train_format_version": str(FORMAT_VERSION)})
    tmp_c = out / (CONFIG_NAME + ".tmp")
    tmp_c.write_text(json.dumps(config_dict(cfg), indent=2, sort_keys=False) + "\n")
    os.replace(tmp_w, out / WEIGHTS_NAME)
    os.replace(tmp_c, out / CONFIG_NAME)
    return out


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in an m2train folder's config.json."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise PretrainedFormatError(f"{path}: not found (an m2train model folder has {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise PretrainedFormatError(f"{path}: not an m2train config (expected \"format\": \"{FORMAT_NAME}\"); "
                                    "for a reference M2-BERT checkpoint use `m2train import-m2-bert`")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PretrainedFormatError(f"{path}: format_version {version!r} is not supported by this m2train "
                                    f"(reads versions <= {FORMAT_VERSION})")
    if not isinstance(data.get("model"), dict):
        raise PretrainedFormatError(f"{path}: missing the \"model\" mapping")
    return model_config_from_dict(data["model"])


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming every missing / unexpected key and every shape mismatch."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for k in sorted(set(expected) & set(given)):
        if tuple(expected[k].shape) != tuple(given[k].shape):
            problems.append(f"shape mismatch for {k}: file has {tuple(given[k].shape)}, "
                            f"model expects {tuple(expected[k].shape)}")
    if problems:
        raise PretrainedFormatError(f"{source}: weights do not match the config: " + "; ".join(problems))


def from_pretrained(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild the model described by config.json and load model.safetensors strictly.

    The model keeps the dtype the weights were saved in unless `dtype` is given, is moved to
    `map_location`, and is returned in eval mode (like Hugging Face's from_pretrained)."""
    from safetensors.torch import load_file

    from . import build_model

    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise PretrainedFormatError(f"{weights}: not found")
    tensors = load_file(str(weights), device="cpu")
    model = build_model(cfg)
    check_state_dict(model.state_dict(), tensors, str(weights))
    if dtype is None:
        float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(float_dtypes) == 1:
            dtype = float_dtypes.pop()
    if dtype is not None:
        model.to(dtype)
    model.load_state_dict(tensors, strict=True)
    model.to(map_location)
    return model.eval()


__all__ = ["save_pretrained", "from_pretrained", "load_config", "check_state_dict", "PretrainedFormatError",
           "FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME"]
