"""Train and load sentencepiece tokenizers with the special tokens GPT and BERT need.

Ids: 0 <pad>, 1 <unk>, 2 <s> (BOS / [CLS]), 3 </s> (EOS / [SEP]), 4 [MASK]. Byte fallback keeps every
input encodable (no <unk> for unseen characters).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_TOKEN = "[MASK]"


NORMALIZATIONS = ("nmt_nfkc", "nfkc", "identity")


def train_sentencepiece(texts: Iterable[str], model_path: str | Path, vocab_size: int,
                        model_type: str = "bpe", max_sentence_length: int = 1 << 20,
                        normalization: str = "nmt_nfkc", num_threads: int = 2) -> Path:
    """Train on an iterable of documents; writes MODEL_PATH (.model) and returns its path.

    `max_sentence_length` is raised far above sentencepiece's default (4192 bytes) because each
    "sentence" here is a whole document: with the default, long documents are silently dropped.

    `normalization`: "nmt_nfkc" (sentencepiece's default) folds newlines and runs of spaces into one
    space; "identity" keeps the text exactly (decode(encode(t)) == t, newlines included, which an LM
    that should learn paragraph structure needs); "nfkc" applies Unicode NFKC but keeps whitespace."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    keep_whitespace = normalization != "nmt_nfkc"
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    n_docs = 0

    def docs():
        nonlocal n_docs
        for t in texts:
            t = t if keep_whitespace else t.strip()
            if t and not t.isspace():
                n_docs += 1
                yield t

    spm.SentencePieceTrainer.train(
        sentence_iterator=docs(), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=[MASK_TOKEN], max_sentence_length=max_sentence_length,
        character_coverage=0.9995, num_threads=num_threads, minloglevel=2, hard_vocab_limit=False,
        normalization_rule_name=normalization, remove_extra_whitespaces=not keep_whitespace,
        # Whitespace-preserving models need pieces such as "\n\n" or runs of spaces to stay compact.
        allow_whitespace_only_pieces=keep_whitespace,
    )
    if n_docs == 0:
        raise ValueError("no non-empty document to train the tokenizer on")
    model_path.write_bytes(buf.getvalue())
    return model_path


@dataclass
class SentencePieceTokenizer:
    path: Path

    def __post_init__(self) -> None:
        import sentencepiece as spm

        self.path = Path(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def identity(self) -> str:
        """sha256 of the model file: names the exact tokenizer in stats and checkpoints."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()
