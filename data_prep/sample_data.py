"""`m2train sample-data`: the embedded sample dataset (BBC News) from raw files to MDS shards.

OUT/raw/        C4-format json.gz and PILE-format jsonl.zst (data_prep/sample_corpus.py)
OUT/tokenizer/  a sentencepiece BPE trained on the C4 files (tokenizer.model)
OUT/gpt/        `m2train prep --layout gpt_packed` of the C4 files (OUT/bert_doc, OUT/bert_packed on request)

Idempotent: every step is skipped when its output is already there with the same arguments, so tests
and the README's first command can call it freely."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LAYOUT_DIRS = {"gpt_packed": "gpt", "bert_doc": "bert_doc", "bert_packed": "bert_packed"}


def _raw(out: Path) -> dict:
    from .sample_corpus import write_sample_raw

    done = out / "raw" / "sample_raw.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(out / "raw", ignore_errors=True)
    info = write_sample_raw(out / "raw")
    done.write_text(json.dumps(info, indent=1))     # last: the raw files are complete
    return info


def _tokenizer(out: Path, c4_files: list[str], vocab_size: int) -> Path:
    from .sentencepiece_tokenizer import train_sentencepiece
    from .sources import SourceFile, SourceSpec, read_documents

    tok_dir = out / "tokenizer"
    meta_path = tok_dir / "sample_tokenizer.json"
    meta = {"vocab_size": vocab_size, "model_type": "bpe", "trained_on": [Path(f).name for f in c4_files]}
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return tok_dir / "tokenizer.model"
    spec = SourceSpec(kind="c4", inputs=tuple(c4_files))
    texts = (t for f in c4_files for _, t, _ in read_documents(spec, SourceFile(f, os.path.getsize(f)))
             if t is not None)
    shutil.rmtree(tok_dir, ignore_errors=True)
    train_sentencepiece(texts, tok_dir / "tokenizer.model", vocab_size)
    meta_path.write_text(json.dumps(meta, indent=1))
    return tok_dir / "tokenizer.model"


def make_sample_data(out: str | Path, layouts: tuple[str, ...] = ("gpt_packed",), seq_len: int = 256,
                     vocab_size: int = 2048, workers: int | None = None, progress: bool = True,
                     val_fraction: float = 0.005) -> dict:
    """Build (or reuse) the sample dataset; returns {"raw": ..., "tokenizer": path, layout: dataset dir}."""
    from .prep import PrepConfig, run_prep
    from .sources import SourceSpec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = _raw(out)
    model = _tokenizer(out, raw["c4"], vocab_size)
    result = {"raw": str(out / "raw"), "tokenizer": str(model)}
    for layout in layouts:
        ds = out / LAYOUT_DIRS[layout]
        cfg = PrepConfig(source=SourceSpec(kind="c4", inputs=tuple(raw["c4"])), tokenizer=str(model),
                         out=str(ds), layout=layout, seq_len=seq_len, val_fraction=val_fraction,
                         workers=workers, progress=progress)
        # A dataset from other arguments (another seq_len, a retrained tokenizer) is rebuilt, not an error.
        args_file = ds / ".prep" / "args.json"
        try:
            stats = run_prep(cfg)
        except Exception as e:
            from .prep import PrepError
            if not (isinstance(e, PrepError) and args_file.exists()):
                raise
            cfg.overwrite = True
            stats = run_prep(cfg)
        result[layout] = {"path": str(ds), "train_samples": stats["splits"]["train"]["samples"],
                          "val_samples": stats["splits"]["val"]["samples"]}
    return result
