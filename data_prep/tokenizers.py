"""Load a tokenizer from a local path behind one small interface that prep and the loaders use.

Supported (nothing is downloaded):
  - a sentencepiece `.model` file, or a directory holding `tokenizer.model`
    (ids as data_prep/sentencepiece_tokenizer.py trains them: pad 0, unk 1, bos/cls 2, eos/sep 3, mask 4);
  - a Hugging Face tokenizer directory with `tokenizer.json` (a `tokenizers` fast tokenizer);
  - a directory with `vocab.txt` (BERT WordPiece, e.g. bert-base-uncased);
  - a directory with `vocab.json` + `merges.txt` (GPT-2 byte-level BPE).

`encode_batch` never adds special tokens: layouts place BOS/EOS/CLS/SEP themselves.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

from .sources import DataError

ROLES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")

# Names a role's token goes by in common vocabularies, tried in order when no tokenizer_config.json /
# special_tokens_map.json names it.
_CANDIDATES = {
    "pad": ("[PAD]", "<pad>", "<|padding|>"),
    "unk": ("[UNK]", "<unk>"),
    "bos": ("<s>", "<|startoftext|>", "<|begin_of_text|>", "[BOS]"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "[EOS]"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
# Files that define an HF tokenizer beyond its vocabulary (lower-casing, special-token names).
_HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(DataError):
    """No loadable tokenizer at a path; the message names it."""


@runtime_checkable
class Tokenizer(Protocol):
    kind: str                               # "sentencepiece" | "hf"
    path: Path                              # the .model file or the HF tokenizer directory
    vocab_size: int
    special_tokens: dict[str, int | None]   # keys ROLES; None when the tokenizer has no such token

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: list[int]) -> str: ...
    def sha256(self) -> str: ...
    def save_to(self, out_dir: Path) -> None: ...


def _hash_files(files: dict[str, Path]) -> str:
    """sha256 over (name, content) of each file in name order: names the exact tokenizer, and stays
    the same for a copy made with save_to."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(files[name].read_bytes()).digest())
    return h.hexdigest()


class SentencePieceTok:
    kind = "sentencepiece"

    def __init__(self, path: Path, num_threads: int = 1):
        import sentencepiece as spm

        self.path = Path(path)
        # One thread by default: prep runs one process per core, so threads would only contend.
        self.num_threads = num_threads
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a loadable sentencepiece model ({e})") from e
        self.vocab_size = self.sp.get_piece_size()
        ids = {"pad": self.sp.pad_id(), "unk": self.sp.unk_id(), "bos": self.sp.bos_id(),
               "eos": self.sp.eos_id()}
        st = {k: (v if v >= 0 else None) for k, v in ids.items()}
        # BERT layouts use BOS as [CLS] and EOS as [SEP] (the ids our trainer reserves for both).
        st["cls"], st["sep"] = st["bos"], st["eos"]
        st["mask"] = self._piece_id("[MASK]", "<mask>")
        self.special_tokens = {r: st[r] for r in ROLES}

    def _piece_id(self, *pieces: str) -> int | None:
        for p in pieces:
            i = self.sp.piece_to_id(p)
            if self.sp.id_to_piece(i) == p:     # piece_to_id answers unk for unknown pieces
                return i
        return None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=self.num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(map(int, ids)))

    def sha256(self) -> str:
        return _hash_files({"tokenizer.model": self.path})

    def save_to(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, out_dir / "tokenizer.model")

    def __repr__(self) -> str:
        return f"SentencePieceTok({str(self.path)!r}, vocab_size={self.vocab_size})"


class HFTok:
    """A `tokenizers` tokenizer built from a directory's files."""

    kind = "hf"

    def __init__(self, path: Path, tok, files: dict[str, Path]):
        self.path = Path(path)
        self.tok = tok
        self.files = files          # the name each file has in a tokenizer directory -> its source
        # A tokenizer.json may carry padding/truncation settings for model inputs; prep packs whole
        # documents itself, so either would silently change them.
        tok.no_padding()
        tok.no_truncation()
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = _find_special_tokens(self.path, tok)
        # Register the special tokens that exist so text like "[MASK]" or "<|endoftext|>" is one id.
        from tokenizers import AddedToken

        names = sorted({tok.id_to_token(i) for i in self.special_tokens.values() if i is not None})
        if names:
            tok.add_special_tokens([AddedToken(n, special=True) for n in names])
        fast = getattr(tok, "encode_batch_fast", None)      # no offsets: faster (tokenizers >= 0.21)
        self._encode = fast if fast is not None else tok.encode_batch

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def sha256(self) -> str:
        return _hash_files(self.files)

    def save_to(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, src in self.files.items():
            shutil.copyfile(src, out_dir / name)

    def __repr__(self) -> str:
        return f"HFTok({str(self.path)!r}, vocab_size={self.vocab_size})"


def _config_token_names(d: Path) -> dict[str, str]:
    """Role -> token string from tokenizer_config.json / special_tokens_map.json when present."""
    names: dict[str, str] = {}
    for fname in _HF_CONFIG_FILES:          # special_tokens_map.json, read second, wins
        f = d / fname
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{f}: not valid JSON ({e})") from e
        for role in ROLES:
            v = cfg.get(f"{role}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                names[role] = v
    return names


def _find_special_tokens(d: Path, tok) -> dict[str, int | None]:
    named = _config_token_names(d)
    out: dict[str, int | None] = {}
    for role in ROLES:
        cands = ((named[role],) if role in named else ()) + _CANDIDATES[role]
        out[role] = next((i for c in cands if (i := tok.token_to_id(c)) is not None), None)
    return out


def _wordpiece(d: Path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    lowercase = True                        # bert-base-uncased; tokenizer_config.json may say otherwise
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        lowercase = bool(json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case", True))
    vocab = d / "vocab.txt"
    unk = "[UNK]"
    tok = HFTokenizer(models.WordPiece.from_file(str(vocab), unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _byte_level_bpe(d: Path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _is_hf_tokenizer_json(f: Path) -> bool:
    """tokenizer.json of the `tokenizers` library (not some other metadata under that name)."""
    try:
        return "model" in json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_tokenizer(path: str | Path, num_threads: int = 1) -> Tokenizer:
    """Load the tokenizer at `path` (see the module docstring for what is recognised).

    `num_threads` only applies to sentencepiece encoding. Raises TokenizerError naming the path when
    nothing loadable is there."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".json" and _is_hf_tokenizer_json(p):
            return _load_hf_json(p.parent, p)
        return SentencePieceTok(p, num_threads)
    if not p.is_dir():
        raise TokenizerError(f"tokenizer path {p} does not exist")
    # tokenizer.model first: a sentencepiece model is the source of truth when both it and a
    # converted tokenizer.json are present.
    if (p / "tokenizer.model").is_file():
        return SentencePieceTok(p / "tokenizer.model", num_threads)
    if (p / "tokenizer.json").is_file() and _is_hf_tokenizer_json(p / "tokenizer.json"):
        return _load_hf_json(p, p / "tokenizer.json")
    configs = {f: p / f for f in _HF_CONFIG_FILES if (p / f).is_file()}
    try:
        if (p / "vocab.txt").is_file():
            return HFTok(p, _wordpiece(p), {"vocab.txt": p / "vocab.txt", **configs})
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return HFTok(p, _byte_level_bpe(p), {"vocab.json": p / "vocab.json",
                                                 "merges.txt": p / "merges.txt", **configs})
    except Exception as e:  # the tokenizers library raises plain Exception on bad files
        raise TokenizerError(f"{p}: tokenizer files present but not loadable ({e})") from e
    raise TokenizerError(
        f"no tokenizer found at {p}: expected a sentencepiece .model file, or a directory with "
        f"tokenizer.model, tokenizer.json, vocab.txt (WordPiece) or vocab.json + merges.txt (GPT-2 BPE)")


def _load_hf_json(d: Path, f: Path) -> HFTok:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(f))
    except Exception as e:
        raise TokenizerError(f"{f}: not a loadable tokenizers JSON file ({e})") from e
    configs = {c: d / c for c in _HF_CONFIG_FILES if (d / c).is_file()}
    return HFTok(d, tok, {"tokenizer.json": f, **configs})
