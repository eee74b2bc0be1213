"""A sharded checkpoint -> a self-contained model folder (m2train export).

    OUT/model.safetensors, OUT/config.json    consolidated weights + ModelConfig (models.pretrained format;
                                              load with m2train.models.from_pretrained(OUT))
    OUT/tokenizer/                            the tokenizer the run's data was prepared with
    OUT/export.json, OUT/README.md            step, tokens seen, source checkpoint, where the tokenizer came from

The tokenizer is looked for in this order: the --tokenizer given, DATA/tokenizer/ of the checkpoint's
data.path, RUN_DIR/tokenizer/ (a copy a run keeps beside its checkpoints), the path prep_stats.json
recorded. Its origin is written into export.json.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_META = "export.json"


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message says what to change."""


def _tokenizer_candidates(manifest: dict, ckpt_dir: Path) -> list[tuple[Path, str]]:
    config = manifest.get("config") or {}
    out: list[tuple[Path, str]] = []
    data_path = (config.get("data") or {}).get("path")
    if data_path and "://" not in str(data_path):
        out.append((Path(data_path) / "tokenizer", "data.path/tokenizer"))
    run_dir = (config.get("train") or {}).get("run_dir")
    if run_dir:
        out.append((Path(run_dir) / "tokenizer", "train.run_dir/tokenizer"))
    # The default layout keeps checkpoints in RUN_DIR/checkpoints/step_*.
    out.append((ckpt_dir.parent.parent / "tokenizer", "run directory (beside checkpoints/)"))
    if data_path and "://" not in str(data_path):
        stats = Path(data_path) / "prep_stats.json"
        if stats.is_file():
            try:
                recorded = (json.loads(stats.read_text()).get("tokenizer") or {}).get("path")
            except json.JSONDecodeError:
                recorded = None
            if recorded:
                out.append((Path(recorded), "prep_stats.json tokenizer.path"))
    return out


def find_tokenizer(manifest: dict, ckpt_dir: Path, given: Optional[str] = None) -> tuple[Path, str]:
    """(tokenizer folder or file, how it was found); raises ExportError listing where it looked."""
    if given is not None:
        p = Path(given)
        if not p.exists():
            raise ExportError(f"--tokenizer {given}: does not exist")
        return p, "--tokenizer"
    tried = []
    for cand, how in _tokenizer_candidates(manifest, ckpt_dir):
        if cand.exists() and (cand.is_file() or any(cand.iterdir())):
            return cand, how
        tried.append(f"{cand} ({how})")
    raise ExportError("no tokenizer found for this checkpoint; looked in: " + "; ".join(tried)
                      + ". Pass --tokenizer DIR, or --no-tokenizer to export the weights alone")


def export_checkpoint(ckpt, out, tokenizer: Optional[str] = None, include_tokenizer: bool = True,
                      dtype: str = "fp32", overwrite: bool = False, verify: str = "sha256") -> Path:
    """Write the export folder for `ckpt` (a step_* folder, checkpoint root or run directory) into `out`;
    returns `out`. Refuses a non-empty `out` unless overwrite=True."""
    from ..checkpoint.consolidate import load_model_from_checkpoint, resolve_checkpoint
    from ..models.pretrained import save_pretrained

    if dtype not in DTYPES:
        raise ExportError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
    path = resolve_checkpoint(ckpt, verify)
    model, manifest = load_model_from_checkpoint(path, dtype=DTYPES[dtype])

    tok_src, tok_how = (None, None)
    if include_tokenizer:
        tok_src, tok_how = find_tokenizer(manifest, path, tokenizer)

    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out)
    tok_dst = out / "tokenizer"
    if tok_src is not None:
        if tok_dst.exists():
            shutil.rmtree(tok_dst)
        if tok_src.is_dir():
            shutil.copytree(tok_src, tok_dst)
        else:
            tok_dst.mkdir()
            shutil.copy2(tok_src, tok_dst / tok_src.name)
    meta = {
        "format": "m2train-export",
        "format_version": 1,
        "step": manifest.get("step"),
        "tokens_seen": manifest.get("tokens_seen"),
        "source_checkpoint": str(path.resolve()),
        "source_world": manifest.get("world"),
        "dtype": dtype,
        "tokenizer": None if tok_src is None else {"source": str(tok_src.resolve()), "found_via": tok_how,
                                                   "files": sorted(p.relative_to(tok_dst).as_posix()
                                                                   for p in tok_dst.rglob("*") if p.is_file())},
        "exported_unix": time.time(),
        "config": manifest.get("config"),
    }
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    cfg = model.config
    (out / "README.md").write_text(
        f"# {((manifest.get('config') or {}).get('name')) or cfg.arch} (m2train export)\n\n"
        f"- model: {cfg.arch}, head {cfg.head}, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"vocab {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}\n"
        f"- trained for {manifest.get('step')} steps, {manifest.get('tokens_seen')} tokens\n"
        f"- exported from {path.resolve()} ({dtype})\n"
        f"- tokenizer: {'tokenizer/ (from ' + tok_how + ')' if tok_src is not None else 'not included'}\n\n"
        "```python\nfrom m2train.models import from_pretrained\n"
        f"model = from_pretrained(\"{out.name}\")\n```\n")
    return out


__all__ = ["export_checkpoint", "find_tokenizer", "ExportError"]
