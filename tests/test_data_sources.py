"""data_prep.sources: file discovery and document streaming for C4, PILE, jsonl, text and HF sources,
with every bad-input case skipped and counted by reason."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections import Counter

import pytest
import zstandard

from m2train.data_prep.sources import (
    SKIP_REASONS, DataError, SourceFile, SourceSpec, discover_files, read_documents,
)


def _compress(data: bytes, codec: str) -> bytes:
    if codec == ".gz":
        return gzip.compress(data, mtime=0)
    if codec == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_lines(path, lines: list[bytes], codec: str = "", newline_at_end: bool = True):
    data = b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    path.write_bytes(_compress(data, codec))
    return SourceFile(str(path), path.stat().st_size)


def c4_line(text, i=0) -> bytes:
    return json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                       "url": f"https://example.com/{i}"}).encode()


def read_all(spec, f, start=0):
    return list(read_documents(spec, f, start))


def reasons(items):
    return Counter(r for _, _, r in items if r is not None)


# A line per bad-input case, with the outcome each must get.
BAD_CASES = [
    (c4_line("a good document", 0), None),
    (b'{"text": "unterminated', "malformed_json"),
    (b'{"text": "caf\xe9 latin-1 byte"}', "invalid_utf8"),
    (b'{"url": "https://example.com/no-text"}', "missing_text"),
    (b'{"text": 42}', "missing_text"),
    (b'["text", "a list"]', "missing_text"),
    (c4_line("   \n\t  "), "empty"),
    (c4_line(""), "empty"),
    (b"", "empty"),                                            # a blank line is an empty document
    (c4_line("x" * 500), "oversized"),                         # max_doc_bytes=300 below
    (c4_line("\u00e9" * 200), "oversized"),                    # 200 chars but 400 UTF-8 bytes
    (b'{"text": "lone surrogate \\ud800 here"}', "invalid_utf8"),
    (b'{"text": "a real pair \\ud83d\\ude00 is fine"}', None),
    (c4_line("caf\u00e9 \u00a35 \u6f22\u5b57 last good one", 1), None),
]


@pytest.mark.parametrize("codec", ["", ".gz", ".zst"])
def test_every_bad_line_is_skipped_and_counted_by_reason(tmp_path, caplog, codec):
    f = write_lines(tmp_path / f"mixed.jsonl{codec}", [line for line, _ in BAD_CASES], codec)
    spec = SourceSpec("c4", (f.path,), max_doc_bytes=300)
    with caplog.at_level(logging.WARNING, logger="m2train.data_prep.sources"):
        items = read_all(spec, f)
    assert [i for i, _, _ in items] == list(range(len(BAD_CASES)))
    assert [r for _, _, r in items] == [want for _, want in BAD_CASES]
    good = [t for _, t, _ in items if t is not None]
    assert good == ["a good document", "a real pair \U0001F600 is fine",
                    "caf\u00e9 \u00a35 \u6f22\u5b57 last good one"]
    counts = reasons(items)
    assert len(items) == len(good) + sum(counts.values())           # nothing lost silently
    assert set(counts) <= set(SKIP_REASONS)
    # One warning for the file, naming it and the counts by reason.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f.path in warnings[0] and "skipped 11 of 14" in warnings[0]
    assert "malformed_json=1" in warnings[0] and "oversized=2" in warnings[0]


def test_last_line_without_newline_counts(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [c4_line("one"), c4_line("two")], newline_at_end=False)
    assert [t for _, t, _ in read_all(SourceSpec("jsonl", (f.path,)), f)] == ["one", "two"]


def test_jsonl_text_field(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [b'{"body": "x1"}', b'{"text": "no body"}'])
    items = read_all(SourceSpec("jsonl", (f.path,), text_field="body"), f)
    assert items == [(0, "x1", None), (1, None, "missing_text")]


def test_line_too_long_to_hold_is_skipped_while_streaming(tmp_path):
    # max_doc_bytes=10 -> lines over 6*10 + 1 MiB are dropped as they stream by (never held whole);
    # a 2.5 MB line spans several 1 MiB read chunks.
    huge = c4_line("y" * 2_500_000)
    lines = [c4_line("short"), huge, c4_line("after"), c4_line("z" * 50)]
    for codec in ("", ".gz"):
        f = write_lines(tmp_path / f"long.jsonl{codec}", lines, codec)
        items = read_all(SourceSpec("jsonl", (f.path,), max_doc_bytes=10), f)
        assert items == [(0, "short", None), (1, None, "oversized"), (2, "after", None),
                         (3, None, "oversized")]


def _many_docs(n):
    # Hex digests keep the text incompressible enough that files span many decoder feeds.
    return [c4_line(f"document number {i} " + hashlib.sha256(str(i).encode()).hexdigest() * (i % 5),
                    i) for i in range(n)]


@pytest.mark.parametrize("codec", [".gz", ".zst"])
def test_truncated_compressed_file_yields_one_marker_and_keeps_the_complete_documents(
        tmp_path, caplog, codec):
    lines = _many_docs(4000)
    blob = _compress(b"\n".join(lines) + b"\n", codec)
    path = tmp_path / f"cut.json{codec}"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    f = SourceFile(str(path), path.stat().st_size)
    spec = SourceSpec("c4", (f.path,))
    with caplog.at_level(logging.WARNING, logger="m2train.data_prep.sources"):
        items = read_all(spec, f)
    *docs, last = items
    assert last[1:] == (None, "truncated_file")
    assert all(r is None for _, _, r in docs)                  # every complete line still read
    assert 1000 < len(docs) < 4000
    assert [t for _, t, _ in docs] == [json.loads(x)["text"] for x in lines[: len(docs)]]
    assert last[0] == len(docs)
    assert any("ends before its end marker" in r.getMessage() and f.path in r.getMessage()
               for r in caplog.records)
    # A restart exactly at the marker reports it again (it was never consumed) ...
    assert read_all(spec, f, start=len(docs)) == [last]
    # ... a restart past it does not count the lost tail twice.
    assert read_all(spec, f, start=len(docs) + 1) == []


def test_corrupt_gzip_data_mid_file_is_truncated_file(tmp_path):
    lines = _many_docs(3000)
    blob = bytearray(gzip.compress(b"\n".join(lines) + b"\n"))
    blob[len(blob) // 2: len(blob) // 2 + 64] = b"\xff" * 64     # garbage in the deflate stream
    path = tmp_path / "corrupt.json.gz"
    path.write_bytes(bytes(blob))
    items = read_all(SourceSpec("c4", (str(path),)), SourceFile(str(path), len(blob)))
    assert items[-1][2] == "truncated_file" and reasons(items)["truncated_file"] == 1
    assert [i for i, _, _ in items] == list(range(len(items)))
    # The documents before the damaged spot come out intact.
    intact = [t for _, t, _ in items[:500]]
    assert intact == [json.loads(x)["text"] for x in lines[:500]]


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    a, b = [c4_line("first")], [c4_line("second"), c4_line("third")]
    gz = tmp_path / "multi.json.gz"
    gz.write_bytes(gzip.compress(b"\n".join(a) + b"\n") + gzip.compress(b"\n".join(b) + b"\n"))
    zs = tmp_path / "multi.jsonl.zst"
    c = zstandard.ZstdCompressor()
    zs.write_bytes(c.compress(b"\n".join(a) + b"\n") + c.compress(b"\n".join(b) + b"\n"))
    for p in (gz, zs):
        got = [t for _, t, _ in read_all(SourceSpec("jsonl", (str(p),)), SourceFile(str(p), 0))]
        assert got == ["first", "second", "third"]


def test_compression_detected_by_magic_without_extension(tmp_path):
    p = tmp_path / "c4-train.00000-of-01024"
    p.write_bytes(gzip.compress(c4_line("hidden gzip") + b"\n"))
    assert read_all(SourceSpec("c4", (str(p),)), SourceFile(str(p), 0)) == [(0, "hidden gzip", None)]


def test_not_a_gzip_file_raises_naming_it(tmp_path):
    p = tmp_path / "fake.json.gz"
    p.write_bytes(c4_line("plain text, not gzip") + b"\n")
    with pytest.raises(DataError, match="fake.json.gz.*not a valid gz"):
        read_all(SourceSpec("c4", (str(p),)), SourceFile(str(p), 0))


def test_start_resumes_with_the_same_tail(tmp_path):
    # Bad lines sprinkled in and > 1 MiB of data, so restarts land inside and across read chunks.
    lines = _many_docs(6000)
    for k in range(0, 6000, 37):
        lines[k] = b'{"text": broken'
    for codec in ("", ".gz", ".zst"):
        f = write_lines(tmp_path / f"r.jsonl{codec}", lines, codec)
        spec = SourceSpec("jsonl", (f.path,))
        full = read_all(spec, f)
        assert len(full) == 6000
        for start in (0, 1, 37, 2999, 5999, 6000, 7000):
            assert read_all(spec, f, start=start) == full[start:], (codec, start)


def test_pile_include_and_exclude(tmp_path):
    def rec(text, name):
        meta = {"pile_set_name": name} if name else {}
        return json.dumps({"text": text, "meta": meta}).encode()

    lines = [rec("a", "Pile-CC"), rec("b", "Github"), rec("c", "ArXiv"), rec("d", None),
             b'{"text": "no meta at all"}']
    f = write_lines(tmp_path / "00.jsonl.zst", lines, ".zst")
    inc = read_all(SourceSpec("pile", (f.path,), pile_include=("Pile-CC", "ArXiv")), f)
    assert [(t, r) for _, t, r in inc] == [("a", None), (None, "excluded_subset"), ("c", None),
                                           (None, "excluded_subset"), (None, "excluded_subset")]
    exc = read_all(SourceSpec("pile", (f.path,), pile_exclude=("Github",)), f)
    assert [(t, r) for _, t, r in exc] == [("a", None), (None, "excluded_subset"), ("c", None),
                                           ("d", None), ("no meta at all", None)]
    everything = read_all(SourceSpec("pile", (f.path,)), f)
    assert reasons(everything) == Counter()
    with pytest.raises(DataError, match="both included and excluded"):
        SourceSpec("pile", (f.path,), pile_include=("A",), pile_exclude=("A",))
    with pytest.raises(DataError, match="only apply to kind 'pile'"):
        SourceSpec("c4", (f.path,), pile_include=("A",))


# --- discovery -------------------------------------------------------------------------------------

def test_discover_globs_dirs_and_files_sorted_and_deduplicated(tmp_path):
    d = tmp_path / "c4" / "en"
    d.mkdir(parents=True)
    for k in (2, 0, 1):
        write_lines(d / f"c4-train.{k:05d}-of-00003.json.gz", [c4_line(f"doc {k}")], ".gz")
    (d / "README.md").write_text("not data")
    (d / ".hidden.json").write_text("{}")
    spec = SourceSpec("c4", (str(d / "c4-train.*.json.gz"), str(tmp_path / "c4"),
                             str(d / "c4-train.00001-of-00003.json.gz")))
    files = discover_files(spec)
    assert [os.path.basename(f.path) for f in files] == [
        f"c4-train.{k:05d}-of-00003.json.gz" for k in range(3)]
    assert all(f.bytes == os.path.getsize(f.path) for f in files)
    assert discover_files(spec) == files


def test_glob_matching_nothing_raises_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"c4-train\.\*\.json\.gz.*matches no file"):
        discover_files(SourceSpec("c4", (str(tmp_path / "c4-train.*.json.gz"),)))
    with pytest.raises(DataError, match="does not exist"):
        discover_files(SourceSpec("c4", (str(tmp_path / "missing.json.gz"),)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no"):
        discover_files(SourceSpec("pile", (str(tmp_path / "empty"),)))


def test_unreadable_file_raises_naming_it(tmp_path):
    link = tmp_path / "gone.json.gz"
    link.symlink_to(tmp_path / "deleted-target.json.gz")       # dangling: cannot be opened
    with pytest.raises(DataError, match="gone.json.gz"):
        discover_files(SourceSpec("c4", (str(link),)))
    with pytest.raises(DataError, match="gone.json.gz"):
        read_all(SourceSpec("c4", (str(link),)), SourceFile(str(link), 0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_raises_naming_the_file(tmp_path):
    f = write_lines(tmp_path / "locked.json", [c4_line("x")])
    os.chmod(f.path, 0)
    with pytest.raises(DataError, match="locked.json"):
        discover_files(SourceSpec("c4", (f.path,)))


# --- plain text -----------------------------------------------------------------------------------

def test_text_files_one_document_each(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("First article.\n\nSecond paragraph.\n", encoding="utf-8")
    (d / "b.txt").write_bytes(b"caf\xe9 in latin-1")
    (d / "c.txt").write_text("  \n")
    (d / "d.txt").write_text("z" * 1000)
    (d / "notes.md").write_text("ignored")
    spec = SourceSpec("text", (str(d),), max_doc_bytes=500)
    files = discover_files(spec)
    assert [os.path.basename(f.path) for f in files] == ["a.txt", "b.txt", "c.txt", "d.txt"]
    got = [read_all(spec, f) for f in files]
    assert got == [[(0, "First article.\n\nSecond paragraph.\n", None)], [(0, None, "invalid_utf8")],
                   [(0, None, "empty")], [(0, None, "oversized")]]
    assert read_all(spec, files[0], start=1) == []


# --- Hugging Face datasets on disk -----------------------------------------------------------------

def _hf_rows(n):
    return [f"hf document {i}" if i % 10 else None for i in range(n)]


def _write_save_to_disk_folder(root, texts):
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC *stream* files listed in state.json."""
    import pyarrow as pa

    root.mkdir()
    table = pa.table({"text": pa.array(texts, pa.string()), "id": pa.array(range(len(texts)))})
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    half = len(texts) // 2
    for name, part in zip(names, (table.slice(0, half), table.slice(half))):
        with pa.OSFile(str(root / name), "wb") as sink:
            with pa.ipc.new_stream(sink, part.schema) as w:
                for batch in part.to_batches(max_chunksize=100):
                    w.write_batch(batch)
    (root / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_split": "train"}))
    (root / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))


def test_hf_save_to_disk_folder(tmp_path):
    texts = _hf_rows(1000)
    _write_save_to_disk_folder(tmp_path / "ds", texts)
    spec = SourceSpec("hf", (str(tmp_path / "ds"),))
    files = discover_files(spec)
    assert [os.path.basename(f.path) for f in files] == ["data-00000-of-00002.arrow",
                                                         "data-00001-of-00002.arrow"]
    items = [x for f in files for x in read_all(spec, f)]
    got = [t for _, t, _ in items]
    assert got == texts                                     # None where the value is missing
    assert reasons(items) == Counter({"missing_text": 100})
    for start in (0, 99, 100, 250, 499, 500):
        assert read_all(spec, files[0], start) == read_all(spec, files[0])[start:]
    with pytest.raises(DataError, match="no column 'body'.*columns: text, id"):
        read_all(SourceSpec("hf", (str(tmp_path / "ds"),), text_field="body"), files[0])


HF_FIXTURES = os.path.join(os.path.dirname(__file__), "data", "hf_save_to_disk")


def test_hf_folders_written_by_the_datasets_library():
    texts = _hf_rows(200)
    spec = SourceSpec("hf", (os.path.join(HF_FIXTURES, "dataset"),))
    files = discover_files(spec)
    assert [os.path.basename(f.path) for f in files] == ["data-00000-of-00002.arrow",
                                                         "data-00001-of-00002.arrow"]
    assert [t for f in files for _, t, _ in read_all(spec, f)] == texts
    # A DatasetDict folder contributes every split (sorted by path: test before train).
    spec = SourceSpec("hf", (os.path.join(HF_FIXTURES, "dataset_dict"),))
    files = discover_files(spec)
    assert [os.path.relpath(f.path, HF_FIXTURES) for f in files] == [
        "dataset_dict/test/data-00000-of-00001.arrow", "dataset_dict/train/data-00000-of-00001.arrow"]
    assert [t for f in files for _, t, _ in read_all(spec, f)] == texts[150:] + texts[:150]


def test_hf_parquet_and_json_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _hf_rows(700) + ["", "x" * 2000]
    pdir = tmp_path / "pq" / "data"
    pdir.mkdir(parents=True)
    pq.write_table(pa.table({"content": texts}), str(pdir / "train-00000.parquet"), row_group_size=128)
    (tmp_path / "pq" / "README.json").write_text("{}")     # beside parquet data: not documents
    spec = SourceSpec("hf", (str(tmp_path / "pq"),), text_field="content", max_doc_bytes=1000)
    files = discover_files(spec)
    assert [os.path.basename(f.path) for f in files] == ["train-00000.parquet"]
    items = read_all(spec, files[0])
    assert [i for i, _, _ in items] == list(range(702))
    assert reasons(items) == Counter({"missing_text": 70, "empty": 1, "oversized": 1})
    for start in (1, 127, 128, 300, 701, 702):
        assert read_all(spec, files[0], start) == items[start:]

    jdir = tmp_path / "js"
    jdir.mkdir()
    write_lines(jdir / "train.jsonl.gz", [json.dumps({"content": "from json"}).encode()], ".gz")
    (jdir / "dataset_info.json").write_text("{}")
    spec = SourceSpec("hf", (str(jdir),), text_field="content")
    files = discover_files(spec)
    assert [os.path.basename(f.path) for f in files] == ["train.jsonl.gz"]
    assert read_all(spec, files[0]) == [(0, "from json", None)]


def test_spec_validation():
    with pytest.raises(DataError, match="unknown source kind 'c5'"):
        SourceSpec("c5", ("x",))
    with pytest.raises(DataError, match="no inputs"):
        SourceSpec("c4", ())
    assert SourceSpec("c4", "one/path").inputs == ("one/path",)
