"""Prepared-dataset fixtures written exactly as data_prep/FORMAT.md says (real MDS shards, zstd), for loader
tests and anyone else who needs a small dataset without running the prep job.

Identity datasets: every sample carries its own id in two ordinary tokens (GPT: tokens[0:2]; BERT: right
after [CLS]), so a test can tell exactly which samples a loader delivered. Text datasets: real sentences
tokenized with a sentencepiece model trained here, so decoded batches can be compared with the text.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np

SPECIALS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 2, "sep": 3, "mask": 4}
ID_BASE = 10  # first ordinary token id used for id digits and random body tokens


def write_split(folder: Path, samples: list, dtype: str, size_limit: int = 1 << 11) -> None:
    """One MDS split: column `tokens` (ndarray:<dtype>), zstd, small shards so there are several."""
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"tokens": f"ndarray:{dtype}"}, compression="zstd",
                   size_limit=size_limit) as writer:
        for s in samples:
            writer.write({"tokens": np.asarray(s, dtype=dtype)})


def write_prepared(out: Path, layout: str, seq_len: int, vocab_size: int, splits: dict,
                   special_tokens: Optional[dict] = None, tokenizer: Optional[dict] = None,
                   size_limit: int = 1 << 11) -> Path:
    """OUT/train, OUT/val (MDS) and OUT/prep_stats.json, written last like the prep job does."""
    out = Path(out)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    for name, samples in splits.items():
        write_split(out / name, samples, dtype, size_limit)
    stats = {
        "format_version": 1, "layout": layout, "seq_len": seq_len, "vocab_size": vocab_size, "dtype": dtype,
        "special_tokens": dict(special_tokens or SPECIALS),
        "tokenizer": tokenizer or {"kind": "none", "path": "", "sha256": ""},
        "splits": {name: {"samples": len(s), "tokens": int(sum(len(x) for x in s))} for name, s in splits.items()},
        "documents": {"read": 0, "written": 0, "skipped": {}},
        "sources": [],
    }
    (out / "prep_stats.json").write_text(json.dumps(stats, indent=2))
    return out


# ------------------------------------------------------------------------------------------- identities
def encode_id(sample_id: int, vocab_size: int) -> list:
    radix = vocab_size - ID_BASE
    assert sample_id < radix * radix
    return [ID_BASE + sample_id % radix, ID_BASE + sample_id // radix]


def decode_id(two_tokens, vocab_size: int) -> int:
    radix = vocab_size - ID_BASE
    return int(two_tokens[0] - ID_BASE) + radix * int(two_tokens[1] - ID_BASE)


def _body(rng: np.random.Generator, n: int, vocab_size: int) -> np.ndarray:
    return rng.integers(ID_BASE, vocab_size, size=n)


def gpt_id_samples(ids, seq_len: int, vocab_size: int) -> list:
    """gpt_packed windows of seq_len + 1 tokens: [id digits] + body; EOS sprinkled like document ends."""
    out = []
    for i in ids:
        rng = np.random.default_rng(i)
        body = _body(rng, seq_len + 1 - 2, vocab_size)
        body[rng.integers(0, body.size)] = SPECIALS["eos"]
        out.append(np.concatenate([encode_id(i, vocab_size), body]))
    return out


def bert_id_samples(ids, seq_len: int, vocab_size: int, layout: str = "bert_doc") -> list:
    """bert_doc: [CLS] id doc [SEP] PAD...; bert_packed: [CLS] id doc [SEP] doc [SEP] ... (no padding)."""
    out = []
    cls, sep, pad = SPECIALS["cls"], SPECIALS["sep"], SPECIALS["pad"]
    for i in ids:
        rng = np.random.default_rng(i)
        if layout == "bert_doc":
            doc_len = int(rng.integers(1, seq_len - 4 + 1))  # 1 .. seq_len-4 body tokens
            row = [cls, *encode_id(i, vocab_size), *_body(rng, doc_len, vocab_size).tolist(), sep]
            row += [pad] * (seq_len - len(row))
        else:
            row = [cls, *encode_id(i, vocab_size)]
            while len(row) < seq_len:
                row += _body(rng, int(rng.integers(2, 8)), vocab_size).tolist() + [sep]
            row = row[:seq_len]
            row[-1] = sep
        out.append(np.asarray(row))
    return out


def make_id_dataset(out: Path, layout: str = "gpt_packed", n_train: int = 96, n_val: int = 12,
                    seq_len: int = 16, vocab_size: int = 512) -> Path:
    """Train ids 0..n_train-1, val ids 10_000.. (disjoint)."""
    make = gpt_id_samples if layout == "gpt_packed" else (
        lambda ids, L, V: bert_id_samples(ids, L, V, layout))
    splits = {"train": make(range(n_train), seq_len, vocab_size),
              "val": make(range(10_000, 10_000 + n_val), seq_len, vocab_size)}
    return write_prepared(out, layout, seq_len, vocab_size, splits)


def sample_ids_of_batch(batch: dict, layout: str, vocab_size: int) -> list:
    """The ids of a batch's samples (undoing MLM corruption through the labels)."""
    import torch

    x = batch["input_ids"]
    if layout != "gpt_packed":
        x = torch.where(batch["labels"] != -100, batch["labels"], x)
        return [decode_id(row[1:3].tolist(), vocab_size) for row in x]
    return [decode_id(row[0:2].tolist(), vocab_size) for row in x]


# ------------------------------------------------------------------------------------------- real text
TEXTS = [
    "The river rose quickly after three days of rain, and the old stone bridge was closed to traffic.",
    "A small bakery on the corner sells bread every morning before the sun comes up over the hills.",
    "Scientists measured the temperature of the lake at twelve different depths during the winter.",
    "The committee voted to repair the library roof and to open the reading room on Sunday afternoons.",
    "Her bicycle had a red frame, a basket made of wicker, and a bell that rang like a tiny church.",
    "Farmers in the valley planted barley this year because the spring was dry and unusually warm.",
    "The museum opened a new exhibition about maps, ships and the sailors who first crossed the ocean.",
    "After the concert the musicians packed their instruments and drove home through the quiet town.",
    "Engineers tested the new engine for six hours and recorded its fuel use at every stage of the run.",
    "The children built a kite from paper and sticks and flew it high above the field near the school.",
    "Heavy snow closed the mountain pass, so the travellers waited two nights at a small wooden inn.",
    "The market was full of apples, pears, cheese and honey, and the smell of fresh coffee filled the air.",
]


def train_sentencepiece(texts, vocab_size: int = 400):
    """A BPE sentencepiece model with ids pad 0, unk 1, bos 2, eos 3, [MASK] 4 (byte fallback)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) * 4), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["[MASK]"], byte_fallback=True,
        character_coverage=1.0, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()), buf.getvalue()


def make_text_dataset(out: Path, layout: str = "gpt_packed", seq_len: int = 24, texts=TEXTS):
    """Pack (gpt_packed) or pad (bert_doc) the sentencepiece ids of `texts`, all in both splits' order:
    train = every text, val = the first two. Returns (path, SentencePieceProcessor)."""
    sp, proto = train_sentencepiece(texts)
    out = Path(out)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer" / "tokenizer.model").write_bytes(proto)

    def build(docs):
        if layout == "gpt_packed":
            stream = [t for d in docs for t in sp.encode(d) + [SPECIALS["eos"]]]
            n = len(stream) // (seq_len + 1)  # the partial last window is dropped, as prep does
            return [np.asarray(stream[k * (seq_len + 1):(k + 1) * (seq_len + 1)]) for k in range(n)]
        rows = []
        for d in docs:
            ids = [SPECIALS["cls"], *sp.encode(d)[: seq_len - 2], SPECIALS["sep"]]
            rows.append(np.asarray(ids + [SPECIALS["pad"]] * (seq_len - len(ids))))
        return rows

    splits = {"train": build(texts), "val": build(texts[:2])}
    tok = {"kind": "sentencepiece", "path": "tokenizer/tokenizer.model", "sha256": ""}
    write_prepared(out, layout, seq_len, sp.get_piece_size(), splits, tokenizer=tok)
    return out, sp
