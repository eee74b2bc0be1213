"""Document sources for data prep: find the input files of a source and stream their documents.

Kinds (`SourceSpec.kind`):
  c4     JSON lines (.json / .jsonl, optionally .gz or .zst): {"text", "timestamp", "url"} per line.
  pile   JSON lines (.jsonl / .json, optionally .zst or .gz): {"text", "meta": {"pile_set_name"}};
         `pile_include` / `pile_exclude` filter on meta.pile_set_name.
  jsonl  generic JSON lines; the document is the string field `text_field`.
  text   plain .txt files, one document per file, UTF-8.
  hf     a local Hugging Face dataset: a `save_to_disk` folder (.arrow files; a DatasetDict folder
         contributes every split, so name one split's folder to use only that one), a folder of
         parquet or json/jsonl data files, or one such file; the document is column/field `text_field`.

Every document read is reported once, in file order, as (index_in_file, text, None) or
(index_in_file, None, reason) with reason one of SKIP_REASONS, so a caller can keep
`read == written + skipped` without guessing. For JSON lines the index is the line number (0-based).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

KINDS = ("c4", "pile", "jsonl", "text", "hf")
SKIP_REASONS = ("malformed_json", "invalid_utf8", "missing_text", "empty", "oversized",
                "truncated_file", "excluded_subset")

_JSON_EXTS = (".json", ".jsonl")
_COMPRESSED_EXTS = ("", ".gz", ".zst")
# Which files a directory input contributes, per kind (globs and explicit files are taken as given).
_DIR_EXTS = {
    "c4": tuple(e + c for e in _JSON_EXTS for c in _COMPRESSED_EXTS),
    "pile": tuple(e + c for e in _JSON_EXTS for c in _COMPRESSED_EXTS),
    "jsonl": tuple(e + c for e in _JSON_EXTS for c in _COMPRESSED_EXTS),
    "text": (".txt",),
    "hf": (".arrow", ".parquet") + tuple(e + c for e in _JSON_EXTS for c in _COMPRESSED_EXTS),
}
# Metadata that `datasets.save_to_disk` writes next to the data files: never documents.
_HF_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}

_READ_SIZE = 1 << 20          # compressed bytes per read: large reads keep per-call overhead negligible
_FEED_SIZE = 1 << 16          # compressed bytes per decoder call
_ARROW_BATCH = 8192           # rows per parquet batch
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class DataError(Exception):
    """Bad input that prep cannot work around; the message names the file, glob or key."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str                             # "c4" | "pile" | "jsonl" | "text" | "hf"
    inputs: tuple[str, ...]               # files, directories or globs
    text_field: str = "text"              # jsonl / hf
    pile_include: tuple[str, ...] = ()    # meta.pile_set_name values to keep (empty: all)
    pile_exclude: tuple[str, ...] = ()
    max_doc_bytes: int = 10_000_000       # larger documents (UTF-8 bytes) are skipped as "oversized"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown source kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if isinstance(self.inputs, str):   # a bare string would be iterated character by character
            object.__setattr__(self, "inputs", (self.inputs,))
        if not self.inputs:
            raise DataError(f"source {self.kind!r} has no inputs")
        if self.max_doc_bytes <= 0:
            raise DataError(f"max_doc_bytes must be positive, got {self.max_doc_bytes}")
        if (self.pile_include or self.pile_exclude) and self.kind != "pile":
            raise DataError("pile_include / pile_exclude only apply to kind 'pile'")
        both = set(self.pile_include) & set(self.pile_exclude)
        if both:
            raise DataError(f"subsets both included and excluded: {sorted(both)}")


@dataclass(frozen=True)
class SourceFile:
    path: str
    bytes: int


# ---------------------------------------------------------------------------------------------------
# Discovery


def discover_files(spec: SourceSpec) -> list[SourceFile]:
    """All input files of `spec`, sorted by path, each once.

    An input is a file (taken as is), a directory (searched recursively for the kind's file types) or
    a glob (`**` allowed). Raises DataError naming the input when it matches nothing, and naming the
    file when one cannot be opened."""
    paths: set[str] = set()
    for inp in spec.inputs:
        found = _expand_input(spec.kind, inp)
        if not found:
            if glob.has_magic(inp):
                raise DataError(f"{spec.kind} input glob {inp!r} matches no file")
            raise DataError(f"{spec.kind} input directory {inp!r} holds no "
                            f"{_describe_exts(spec.kind)} file")
        paths.update(found)
    files = []
    for p in sorted(paths):
        try:
            size = os.stat(p).st_size
            with open(p, "rb"):
                pass
        except OSError as e:
            raise DataError(f"cannot read input file {p}: {e.strerror or e}") from e
        files.append(SourceFile(p, size))
    return files


def _describe_exts(kind: str) -> str:
    return "/".join(_DIR_EXTS[kind])


def _expand_input(kind: str, inp: str) -> list[str]:
    if glob.has_magic(inp):
        out = []
        for m in glob.glob(inp, recursive=True):
            out.extend(_scan_dir(kind, m) if os.path.isdir(m) else [os.path.abspath(m)])
        return out
    if os.path.isdir(inp):
        return _scan_dir(kind, inp)
    if os.path.lexists(inp):          # a dangling link is reported as unreadable, not as missing
        return [os.path.abspath(inp)]
    raise DataError(f"{kind} input {inp!r} does not exist")


def _scan_dir(kind: str, root: str) -> list[str]:
    if kind == "hf":
        listed = _hf_state_files(root)
        if listed is not None:
            return listed
    exts = _DIR_EXTS[kind]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.endswith(exts):
                continue
            if kind == "hf" and name in _HF_METADATA:
                continue
            found.append(os.path.abspath(os.path.join(dirpath, name)))
    if kind == "hf" and any(f.endswith((".arrow", ".parquet")) for f in found):
        # A folder of columnar data files: json files beside them are metadata, not more documents.
        found = [f for f in found if f.endswith((".arrow", ".parquet"))]
    return found


def _hf_state_files(root: str) -> list[str] | None:
    """The data files a `save_to_disk` folder lists in its state.json (None when it is not one)."""
    state = os.path.join(root, "state.json")
    if not os.path.isfile(state):
        return None
    try:
        with open(state, "rb") as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a readable datasets state.json ({e})") from e
    return [os.path.abspath(os.path.join(root, name)) for name in files]


# ---------------------------------------------------------------------------------------------------
# Reading


def read_documents(spec: SourceSpec, file: SourceFile,
                   start: int = 0) -> Iterator[tuple[int, str | None, str | None]]:
    """Stream the documents of one file: (index, text, None) or (index, None, skip_reason).

    Indices run 0, 1, 2, ... in file order; with `start` the first `start` documents are passed
    over without being parsed (restart). A compressed file that ends early yields one
    (index, None, "truncated_file") and stops. An unreadable file raises DataError naming it.
    One warning per file summarises what was skipped."""
    path = file.path
    counts: Counter[str] = Counter()
    if spec.kind == "text":
        it = _text_documents(spec, path, start)
    elif path.endswith(".arrow"):
        it = _arrow_documents(spec, path, start)
    elif path.endswith(".parquet"):
        it = _parquet_documents(spec, path, start)
    else:
        it = _json_documents(spec, path, start)
    n = 0
    for item in it:
        n += 1
        if item[2] is not None:
            counts[item[2]] += 1
        yield item
    if counts:
        log.warning("%s: skipped %d of %d documents read (%s)", path, sum(counts.values()), n,
                    ", ".join(f"{r}={c}" for r, c in sorted(counts.items())))


def _text_documents(spec: SourceSpec, path: str, start: int):
    if start > 0:
        return
    try:
        size = os.stat(path).st_size
        if size > spec.max_doc_bytes:
            yield 0, None, "oversized"
            return
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield 0, None, "invalid_utf8"
        return
    yield 0, *_check_text(text, spec.max_doc_bytes)


def _check_text(text, max_doc_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a decoded document value."""
    if type(text) is not str:
        return None, "missing_text"
    if not text or text.isspace():
        return None, "empty"
    # A character takes at most 4 UTF-8 bytes, so only long strings need the exact byte count.
    if len(text) * 4 > max_doc_bytes and len(text.encode("utf-8", "surrogatepass")) > max_doc_bytes:
        return None, "oversized"
    return text, None


# --- JSON lines ------------------------------------------------------------------------------------

class _Truncated(Exception):
    """The compressed stream ended (or broke) before its end marker."""


_OVERSIZED = object()   # stands in for a line too long to hold in memory


def _codec(path: str) -> str | None:
    """'gz', 'zst' or None: by extension, else by magic bytes (C4 files are sometimes renamed)."""
    if path.endswith(".gz"):
        return "gz"
    if path.endswith(".zst"):
        return "zst"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if head.startswith(_GZIP_MAGIC):
        return "gz"
    if head.startswith(_ZSTD_MAGIC):
        return "zst"
    return None


def _new_decoder(codec: str):
    if codec == "gz":
        return zlib.decompressobj(wbits=31)    # 31: gzip header and trailer
    import zstandard
    return zstandard.ZstdDecompressor().decompressobj()


def _decompressed_chunks(path: str, codec: str | None) -> Iterator[bytes]:
    """The file's bytes, decompressed, in large chunks. Handles multi-member gzip and multi-frame
    zstd. Raises _Truncated when the last member/frame is incomplete or the data is corrupt (a
    corrupt spot that still inflates is only caught by the CRC at the member's end, so lines decoded
    from it come out first and are mostly counted as malformed_json), and DataError when the file
    cannot be opened or does not start with its codec's header."""
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        if codec is None:
            while True:
                try:
                    chunk = f.read(_READ_SIZE)
                except OSError as e:
                    raise DataError(f"cannot read {path}: {e.strerror or e}") from e
                if not chunk:
                    return
                yield chunk
        import zstandard
        errors = (zlib.error, zstandard.ZstdError)
        magic = _GZIP_MAGIC if codec == "gz" else _ZSTD_MAGIC
        dec = _new_decoder(codec)
        mid_stream = False    # inside a member/frame that has not ended
        offset = 0
        while True:
            try:
                comp = f.read(_READ_SIZE)
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror or e}") from e
            if not comp:
                break
            if offset == 0 and not comp.startswith(magic):
                raise DataError(f"{path}: not a valid {codec} file (no {codec} header)")
            # Feed the decoder in slices so that output before a corrupt spot still comes out.
            for lo in range(0, len(comp), _FEED_SIZE):
                piece = comp[lo: lo + _FEED_SIZE]
                while piece:
                    if not mid_stream:
                        piece = piece.lstrip(b"\0")   # gzip writers may pad between/after members
                        if not piece:
                            break
                    mid_stream = True
                    try:
                        out = dec.decompress(piece)
                    except errors as e:
                        raise _Truncated(f"corrupt {codec} data before compressed byte "
                                         f"{offset + lo + len(piece)} ({e})") from None
                    if out:
                        yield out
                    if dec.eof:
                        piece = dec.unused_data
                        dec = _new_decoder(codec)
                        mid_stream = False
                    else:
                        piece = b""
            offset += len(comp)
        if mid_stream:
            raise _Truncated(f"the {codec} stream ends before its end marker")


def _line_blocks(chunks: Iterator[bytes], max_line: int) -> Iterator[list]:
    """Split a chunk stream into lists of complete lines (bytes, no newline). A line longer than
    `max_line` is never held in memory: it is dropped as it streams by and reported as _OVERSIZED.
    A final line without a newline counts; a partial line lost to truncation does not."""
    pending = b""
    skipping = False
    for chunk in chunks:
        lead = None
        if skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                continue
            chunk, skipping, lead = chunk[nl + 1:], False, _OVERSIZED
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        if lead is not None:
            lines.insert(0, lead)
        if len(pending) > max_line:
            pending, skipping = b"", True
        if lines:
            yield lines
    if skipping:
        yield [_OVERSIZED]
    elif pending:
        yield [pending]


def _json_documents(spec: SourceSpec, path: str, start: int):
    field = spec.text_field
    max_bytes = spec.max_doc_bytes
    pile = spec.kind == "pile"
    include = frozenset(spec.pile_include)
    exclude = frozenset(spec.pile_exclude)
    # A JSON line spends at most 6 bytes on each byte of its text (\u00XX escapes) plus the other
    # fields, so longer lines are oversized without parsing them.
    max_line = 6 * max_bytes + (1 << 20)
    loads = json.loads
    idx = 0
    codec = _codec(path)
    try:
        for lines in _line_blocks(_decompressed_chunks(path, codec), max_line):
            if idx < start:
                if idx + len(lines) <= start:
                    idx += len(lines)
                    continue
                lines = lines[start - idx:]
                idx = start
            for line in lines:
                i = idx
                idx += 1
                if line is _OVERSIZED:
                    yield i, None, "oversized"
                    continue
                try:
                    obj = loads(line)
                except UnicodeDecodeError:
                    yield i, None, "invalid_utf8"
                    continue
                except (ValueError, RecursionError):
                    yield i, None, ("empty" if not line.strip() else "malformed_json")
                    continue
                if type(obj) is not dict:
                    yield i, None, "missing_text"
                    continue
                if pile:
                    meta = obj.get("meta")
                    name = meta.get("pile_set_name") if type(meta) is dict else None
                    if (include and name not in include) or (exclude and name in exclude):
                        yield i, None, "excluded_subset"
                        continue
                text = obj.get(field)
                if type(text) is not str:
                    yield i, None, "missing_text"
                    continue
                if not text or text.isspace():
                    yield i, None, "empty"
                    continue
                # JSON can spell lone surrogates (\ud800) that are not encodable text; only lines
                # with a \uD escape can hold one, so the check costs a byte search otherwise.
                if b"\\ud" in line or b"\\uD" in line:
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        yield i, None, "invalid_utf8"
                        continue
                # The line's length bounds the text's UTF-8 size, so most documents skip the count.
                if len(line) > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
                    yield i, None, "oversized"
                    continue
                yield i, text, None
    except _Truncated as e:
        # A restart past the marker (start > idx) has already counted it.
        if idx >= start:
            log.warning("%s: %s; documents from line %d on are lost (counted once as "
                        "truncated_file)", path, e, idx)
            yield idx, None, "truncated_file"


# --- Arrow / parquet (Hugging Face datasets) -------------------------------------------------------

def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise DataError("reading .arrow / .parquet files needs pyarrow (pip install pyarrow)") from e
    return pyarrow


def _column_index(schema, field: str, path: str) -> int:
    i = schema.get_field_index(field)
    if i < 0:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); "
                        f"set the text field to the column that holds the documents")
    return i


def _arrow_batches(path: str):
    """Record batches of an .arrow file: the IPC stream format `save_to_disk` writes, or the IPC
    file format."""
    pa = _import_pyarrow()
    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        pass
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    try:
        reader = pa.ipc.open_file(pa.memory_map(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not an Arrow IPC stream or file ({e})") from e
    return reader.schema, (reader.get_batch(k) for k in range(reader.num_record_batches))


def _arrow_documents(spec: SourceSpec, path: str, start: int):
    pa = _import_pyarrow()
    schema, batches = _arrow_batches(path)
    col = _column_index(schema, spec.text_field, path)
    yield from _column_documents(spec, path, start, ((b.num_rows, b.column(col)) for b in batches),
                                 pa.ArrowInvalid)


def _parquet_documents(spec: SourceSpec, path: str, start: int):
    pa = _import_pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    _column_index(pf.schema_arrow, spec.text_field, path)
    # Skip whole row groups before `start` without decoding them.
    first, skipped = 0, 0
    meta = pf.metadata
    while first < meta.num_row_groups and skipped + meta.row_group(first).num_rows <= start:
        skipped += meta.row_group(first).num_rows
        first += 1
    groups = list(range(first, meta.num_row_groups))
    batches = pf.iter_batches(batch_size=_ARROW_BATCH, row_groups=groups,
                              columns=[spec.text_field]) if groups else iter(())
    yield from _column_documents(spec, path, start - skipped,
                                 ((b.num_rows, b.column(0)) for b in batches), pa.ArrowInvalid,
                                 base=skipped)


def _column_documents(spec, path, start, batches, errors, base: int = 0):
    idx = base
    start += base
    max_bytes = spec.max_doc_bytes
    try:
        for n, column in batches:
            if idx + n <= start:
                idx += n
                continue
            values = column.to_pylist()
            if idx < start:
                values = values[start - idx:]
                idx = start
            for text in values:
                yield (idx, *_check_text(text, max_bytes))
                idx += 1
    except (errors, OSError) as e:
        if idx >= start:
            log.warning("%s: %s; rows from %d on are lost (counted once as truncated_file)",
                        path, e, idx)
            yield idx, None, "truncated_file"
