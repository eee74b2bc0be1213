"""Document streams: what one prep lane reads from start to end.

A stream is one input file, except for `text` sources, whose files hold one document each: there a
stream is `docs_per_unit` consecutive files, so that a folder of many small .txt files becomes a few
units (and shard folders) instead of one per document."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from .sources import DataError, SourceFile, SourceSpec, read_documents


@dataclass(frozen=True)
class Stream:
    files: tuple[SourceFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def path(self) -> str:
        """For messages: the file, or the first and last file of a group."""
        if len(self.files) == 1:
            return self.files[0].path
        return f"{self.files[0].path} ... {self.files[-1].path} ({len(self.files)} files)"


def make_streams(kind: str, files: list[SourceFile], docs_per_unit: int) -> list[Stream]:
    if kind != "text":
        return [Stream((f,)) for f in files]
    return [Stream(tuple(files[i:i + docs_per_unit])) for i in range(0, len(files), docs_per_unit)]


def read_stream(spec: SourceSpec, stream: Stream, start: int = 0
                ) -> Iterator[tuple[int, str, int, str | None, str | None]]:
    """(position in stream, file base name, index in file, text, skip reason) for every document from
    position `start` on. The split hash uses (file base name, index in file)."""
    if len(stream.files) == 1:
        f = stream.files[0]
        name = os.path.basename(f.path)
        for idx, text, reason in read_documents(spec, f, start=start):
            yield idx, name, idx, text, reason
        return
    # Grouped text files: exactly one document each, so position == file offset in the group.
    for pos in range(start, len(stream.files)):
        f = stream.files[pos]
        items = list(read_documents(spec, f))
        if len(items) != 1:
            raise DataError(f"{f.path}: a text source file must yield one document, got {len(items)}")
        idx, text, reason = items[0]
        yield pos, os.path.basename(f.path), idx, text, reason
