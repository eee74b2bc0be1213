"""data_prep.sample_corpus: the BBC News articles written as C4 json.gz and PILE jsonl.zst files."""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import pytest

from m2train.data_prep.sample_corpus import load_articles, write_sample_raw
from m2train.data_prep.sources import SourceSpec, discover_files, read_documents


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(open(p, "rb").read())
    return h.hexdigest()


def _read(spec):
    docs, reasons = [], Counter()
    for f in discover_files(spec):
        for _, text, reason in read_documents(spec, f):
            if text is not None:
                docs.append(text)
            else:
                reasons[reason] += 1
    return docs, reasons


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, write_sample_raw(out)


def test_layout_and_counts(sample):
    out, info = sample
    assert [os.path.relpath(p, out) for p in info["c4"]] == [
        f"c4/c4-train.{k:05d}-of-00004.json.gz" for k in range(4)]
    assert [os.path.relpath(p, out) for p in info["pile"]] == ["pile/00.jsonl.zst", "pile/01.jsonl.zst"]
    assert info["articles"] == info["documents"] == 2225 and info["copies"] == 1
    assert info["categories"] == {"business": 510, "entertainment": 386, "politics": 417,
                                  "sports": 511, "tech": 401}
    articles = sorted(text for _, _, text in load_articles())
    assert info["text_bytes"] == sum(len(t.encode()) for t in articles)
    # The £ of the Latin-1 files survives as text (no replacement characters).
    assert any("\u00a3" in t for t in articles) and not any("\ufffd" in t for t in articles)


def test_c4_files_read_back_as_the_articles(sample):
    out, info = sample
    docs, reasons = _read(SourceSpec("c4", (str(out / "c4" / "c4-train.*.json.gz"),)))
    assert not reasons
    assert sorted(docs) == sorted(text for _, _, text in load_articles())
    import gzip
    import json

    first = json.loads(gzip.open(info["c4"][0]).readline())
    assert set(first) == {"text", "timestamp", "url"}
    assert first["url"].startswith("https://bbc-news.example/") and first["timestamp"].startswith("2019-")


def test_pile_files_carry_the_category_as_subset(sample):
    out, _ = sample
    docs, reasons = _read(SourceSpec("pile", (str(out / "pile"),)))
    assert len(docs) == 2225 and not reasons
    tech, reasons = _read(SourceSpec("pile", (str(out / "pile"),), pile_include=("bbc_tech",)))
    assert len(tech) == 401 and reasons == {"excluded_subset": 2225 - 401}


def test_deterministic_bytes(sample, tmp_path):
    out, info = sample
    again = write_sample_raw(tmp_path)
    assert _digest(again["c4"] + again["pile"]) == _digest(info["c4"] + info["pile"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_copies_are_unique(tmp_path):
    info = write_sample_raw(tmp_path, copies=2)
    assert info["documents"] == 2 * 2225
    docs, reasons = _read(SourceSpec("c4", (str(tmp_path / "c4"),)))
    assert len(docs) == 2 * 2225 and not reasons
    originals = Counter(text for _, _, text in load_articles())
    # Every copy differs from its original (the corpus itself repeats a few articles; copies add none).
    assert Counter(docs) == originals + Counter(
        f"{t}\n\nThis is copy {c} of the article." for t in originals.elements() for c in (1,))
    assert len(set(docs)) == 2 * len(originals)
    with pytest.raises(ValueError, match="copies"):
        write_sample_raw(tmp_path, copies=0)
