"""Turn tokenized documents into fixed-length samples for each layout of data_prep/FORMAT.md.

Packed layouts (gpt_packed, bert_packed) form one token stream per (unit, split) and cut it into
windows; the tokens after the last full window are returned as a *tail*. Tails of all units are
joined in unit order at finalize time and cut again (`pack_tails`), so packing within units loses
at most one partial window per split for the whole dataset, whatever the unit size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

LAYOUTS = ("gpt_packed", "bert_doc", "bert_packed")
# Special tokens each layout needs from the tokenizer.
# ([MASK] is not written by prep, but masked-LM training needs it, so fail here rather than later.)
REQUIRED_SPECIALS = {"gpt_packed": ("eos",), "bert_doc": ("cls", "sep", "pad", "mask"),
                     "bert_packed": ("cls", "sep", "mask")}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of the vocabulary."""
    # uint16 is the floor even for tiny vocabularies: FORMAT.md promises uint16 or uint32.
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


@dataclass(frozen=True)
class Layout:
    """Sample geometry of one layout: `window` ids per sample, made of an optional fixed `prefix`
    ([CLS] for bert_packed) plus `window - len(prefix)` ids of the document stream."""

    name: str
    seq_len: int
    separator: int | None      # appended after every document in packed layouts (EOS / [SEP])
    cls: int | None
    sep: int | None
    pad: int | None

    @staticmethod
    def build(name: str, seq_len: int, specials: dict[str, int | None], tokenizer_desc: str = "") -> "Layout":
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
        missing = [k for k in REQUIRED_SPECIALS[name] if specials.get(k) is None]
        if missing:
            raise ValueError(f"layout {name} needs the special token(s) {', '.join(missing)}, which the "
                             f"tokenizer {tokenizer_desc} does not define")
        if seq_len < (2 if name == "gpt_packed" else 3):
            raise ValueError(f"--seq-len {seq_len} is too short for layout {name}")
        sep = specials.get("eos") if name == "gpt_packed" else specials.get("sep")
        return Layout(name, seq_len, sep, specials.get("cls"), specials.get("sep"), specials.get("pad"))

    @property
    def packed(self) -> bool:
        return self.name != "bert_doc"

    @property
    def window(self) -> int:
        """Ids stored per sample: seq_len + 1 for GPT (inputs and shifted labels), seq_len for BERT."""
        return self.seq_len + 1 if self.name == "gpt_packed" else self.seq_len

    @property
    def body(self) -> int:
        """Stream ids per packed sample (the window minus the [CLS] prefix of bert_packed)."""
        return self.window - (1 if self.name == "bert_packed" else 0)


def stream(docs: list[list[int]], separator: int, dtype: np.dtype) -> np.ndarray:
    """Documents joined into one array, each followed by `separator`."""
    n = sum(len(d) for d in docs) + len(docs)
    out = np.empty(n, dtype=dtype)
    pos = 0
    for d in docs:
        k = len(d)
        out[pos:pos + k] = d
        out[pos + k] = separator
        pos += k + 1
    return out


def cut_windows(layout: Layout, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut a stream into (samples [n, window], tail): consecutive non-overlapping windows; for
    bert_packed each sample is [CLS] + `body` stream ids."""
    body = layout.body
    n = len(ids) // body
    rows = ids[:n * body].reshape(n, body)
    if layout.name == "bert_packed":
        rows = np.concatenate([np.full((n, 1), layout.cls, dtype=ids.dtype), rows], axis=1)
    return rows, ids[n * body:]


def doc_samples(layout: Layout, docs: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    """bert_doc: one sample per document, [CLS] doc [SEP] truncated to seq_len (keeping the [SEP]),
    right-padded with PAD. Returns (samples, real ids written, ids cut by truncation)."""
    L = layout.seq_len
    rows = np.full((len(docs), L), layout.pad, dtype=dtype)
    written = truncated = 0
    for i, d in enumerate(docs):
        keep = min(len(d), L - 2)
        rows[i, 0] = layout.cls
        rows[i, 1:1 + keep] = d[:keep]
        rows[i, 1 + keep] = layout.sep
        written += keep + 2
        truncated += len(d) - keep
    return rows, written, truncated


class SplitHasher:
    """Assigns documents to the validation split by a stable hash of (file name, index in file).

    Independent of worker count, Slurm shard and restarts: it only looks at where a document is."""

    def __init__(self, file_name: str, val_fraction: float) -> None:
        self.threshold = int(val_fraction * (1 << 64))
        self._base = hashlib.blake2b(file_name.encode("utf-8") + b"\0", digest_size=8)

    def is_val(self, index: int) -> bool:
        if self.threshold <= 0:
            return False
        h = self._base.copy()
        h.update(index.to_bytes(8, "little"))
        return int.from_bytes(h.digest(), "little") < self.threshold
