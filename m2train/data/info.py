"""What a prepared dataset is: `prep_stats.json` (data_prep/FORMAT.md) read into a typed `DatasetInfo`.

The trainer checks model/data compatibility (seq_len, vocab) from this object before any heavy work, and
the loaders take layout, special-token ids and dtype from it; a malformed file fails here, naming the file
and the key, rather than deep inside a worker process.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

LAYOUTS = ("gpt_packed", "bert_doc", "bert_packed")
STATS_FILE = "prep_stats.json"
# data_prep/FORMAT.md: the special tokens each layout is built from.
REQUIRED_SPECIALS = {"gpt_packed": ("eos",), "bert_doc": ("cls", "sep", "pad", "mask"),
                     "bert_packed": ("cls", "sep", "mask")}
# Tokens that carry structure rather than text: MLM never masks them, and random replacements never
# produce them.
STRUCTURAL_TOKENS = ("cls", "sep", "pad", "bos", "eos")


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URLs (s3://, gs://, ...); plain paths (local or network-mounted) are local."""
    return "://" in str(path)


def join_path(base: str | os.PathLike, *parts: str) -> str:
    """Join a local path or a URL with '/' (os.path.join would mangle nothing here, but URLs are not paths)."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


@dataclass(frozen=True)
class DatasetInfo:
    """The facts about a prepared dataset that training needs (from OUT/prep_stats.json)."""

    path: str                               # the dataset root (local folder or URL)
    layout: str                             # gpt_packed | bert_doc | bert_packed
    seq_len: int                            # model input length (GPT windows hold seq_len + 1 tokens)
    vocab_size: int                         # tokenizer vocabulary size; every token id is < vocab_size
    dtype: str                              # uint16 | uint32 (the MDS ndarray column type)
    special_tokens: dict                    # name -> id or None (pad, unk, bos, eos, cls, sep, mask)
    tokenizer: dict = field(default_factory=dict)   # kind, path, sha256
    splits: dict = field(default_factory=dict)      # split name -> {"samples": N, "tokens": T}
    format_version: int = 1
    stats: dict = field(default_factory=dict, repr=False)  # the whole file, for logging

    @property
    def is_causal(self) -> bool:
        """GPT-style next-token data (gpt_packed) rather than masked-LM data."""
        return self.layout == "gpt_packed"

    @property
    def sample_len(self) -> int:
        """Tokens stored per sample: seq_len + 1 for GPT (inputs and shifted labels), seq_len for BERT."""
        return self.seq_len + 1 if self.is_causal else self.seq_len

    @property
    def pad_id(self) -> Optional[int]:
        return self.special_tokens.get("pad")

    @property
    def mask_id(self) -> Optional[int]:
        return self.special_tokens.get("mask")

    @property
    def structural_ids(self) -> tuple:
        """Ids of cls/sep/pad/bos/eos that the tokenizer has (never masked, never a random replacement)."""
        ids = {self.special_tokens.get(name) for name in STRUCTURAL_TOKENS}
        return tuple(sorted(i for i in ids if i is not None))

    @property
    def tokenizer_dir(self) -> Optional[str]:
        """The copy of the tokenizer inside the dataset (tokenizer.path relative to OUT, default "tokenizer")."""
        rel = self.tokenizer.get("path") or "tokenizer"
        if is_remote(self.path):
            return join_path(self.path, rel)
        d = Path(self.path, rel)  # an absolute tokenizer.path stays absolute
        return str(d) if d.exists() else None

    def split_samples(self, split: str) -> Optional[int]:
        entry = self.splits.get(split)
        return None if entry is None else entry.get("samples")


def _fetch_remote_stats(url: str, cache_dir: Optional[str | os.PathLike]) -> Path:
    from streaming.base.storage import download_file  # streaming is heavy to import; only when needed

    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="m2train-stats-"))
    root.mkdir(parents=True, exist_ok=True)
    local = root / STATS_FILE
    try:
        download_file(url, str(local), 60)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url} not found: not a prepared dataset (or preparation has not finished; "
                                f"{STATS_FILE} is written last). Run `m2train prep ...` first.") from e
    return local


def read_prep_stats(path: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> DatasetInfo:
    """Read and validate PATH/prep_stats.json (PATH: a prepared dataset folder, or a URL to one).

    Errors name the file and the key. For a remote dataset the file is downloaded into `cache_dir`.
    """
    if path is None:
        raise ValueError("data.path is not set: point it at a dataset prepared with `m2train prep`")
    stats_url = join_path(path, STATS_FILE)
    if is_remote(path):
        stats_file = _fetch_remote_stats(stats_url, cache_dir)
    else:
        stats_file = Path(stats_url)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"dataset folder {path} does not exist (data.path); prepare one with "
                                    f"`m2train prep ...`")
        if not stats_file.is_file():
            raise FileNotFoundError(f"{stats_file} not found: {path} is not a prepared dataset (or its "
                                    f"preparation has not finished; {STATS_FILE} is written last). "
                                    f"Run `m2train prep ...` first.")
    try:
        stats = json.loads(Path(stats_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{stats_url}: not valid JSON ({e})") from e
    if not isinstance(stats, dict):
        raise ValueError(f"{stats_url}: expected a JSON object, got {type(stats).__name__}")

    def get(key: str, types: tuple, default: Any = KeyError) -> Any:
        if key not in stats:
            if default is KeyError:
                raise ValueError(f"{stats_url}: missing key {key!r} (see data_prep/FORMAT.md)")
            return default
        value = stats[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise ValueError(f"{stats_url}: key {key!r} has {value!r}; expected "
                             f"{' or '.join(t.__name__ for t in types)}")
        return value

    version = get("format_version", (int,), 1)
    if version != 1:
        raise ValueError(f"{stats_url}: format_version {version} is not supported by this m2train "
                         f"(it reads version 1); re-run `m2train prep` or upgrade m2train")
    layout = get("layout", (str,))
    if layout not in LAYOUTS:
        raise ValueError(f"{stats_url}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    seq_len = get("seq_len", (int,))
    vocab_size = get("vocab_size", (int,))
    for key, v in (("seq_len", seq_len), ("vocab_size", vocab_size)):
        if v < 1:
            raise ValueError(f"{stats_url}: {key} must be >= 1, got {v}")
    dtype = get("dtype", (str,))
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"{stats_url}: dtype {dtype!r} must be 'uint16' or 'uint32'")
    if dtype == "uint16" and vocab_size > 65536:
        raise ValueError(f"{stats_url}: dtype uint16 cannot hold vocab_size {vocab_size}")
    specials = get("special_tokens", (dict,))
    for name, tid in specials.items():
        if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < vocab_size):
            raise ValueError(f"{stats_url}: special_tokens.{name} = {tid!r} is not an id in [0, {vocab_size}) "
                             f"or null")
    for name in REQUIRED_SPECIALS[layout]:
        if specials.get(name) is None:
            raise ValueError(f"{stats_url}: layout {layout} needs special_tokens.{name}, which is missing or "
                             f"null; prepare the data with a tokenizer that has it (data_prep/FORMAT.md)")
    return DatasetInfo(
        path=str(path), layout=layout, seq_len=seq_len, vocab_size=vocab_size, dtype=dtype,
        special_tokens=dict(specials), tokenizer=dict(get("tokenizer", (dict,), {})),
        splits=dict(get("splits", (dict,), {})), format_version=version, stats=stats,
    )
