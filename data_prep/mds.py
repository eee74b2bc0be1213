"""Write token samples as mosaicml-streaming MDS shards without importing `streaming`.

Why not `streaming.MDSWriter` itself: `import streaming` imports torch, torchvision and transformers
eagerly (5-10 s of CPU per process on a 2-core machine), which is most of the wall-clock budget of a
prep job on a modest corpus, and every worker process would pay it. The MDS format is small and
documented by its reader, so this module writes it directly; tests/test_prep_mds.py checks that the
files are byte-identical to what `streaming.MDSWriter` writes for the same samples and that
`streaming.StreamingDataset` reads them back, so the two cannot drift apart silently.

Only what prep needs is supported: one or more 1-D ndarray columns with a fixed dtype
(encoding `ndarray:<dtype>`, shape stored per sample), joint shards, optional zstd compression.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

INDEX = "index.json"
_SHAPE_DTYPES = ((1 << 8, np.uint8, 0), (1 << 16, np.uint16, 1), (1 << 32, np.uint32, 2))


def _shape_header(length: int) -> bytes:
    """NDArray encoding of a dynamic 1-D shape: one byte (ndim << 2 | shape dtype code) + the shape."""
    if length <= 0:
        raise ValueError("MDS cannot store an empty array")
    for limit, dtype, code in _SHAPE_DTYPES:
        if length < limit:
            return bytes([(1 << 2) | code]) + np.array([length], dtype).tobytes()
    raise ValueError(f"array too long for an MDS sample: {length}")


class TokenShardWriter:
    """Writes samples {column: 1-D ndarray} into `out_dir` as MDS shards plus index.json.

    Byte-compatible with `streaming.MDSWriter(columns={c: 'ndarray:<dtype>'}, compression=...,
    size_limit=...)`: same shard header (sample count, uint32 offsets, JSON config), same per-sample
    layout (uint32 size of each dynamic column, then the NDArray encoding), same names and index."""

    def __init__(self, out_dir: str | Path, columns: dict[str, str], compression: str | None = "zstd:1",
                 size_limit: int = 1 << 26) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.dtypes = []
        for name, enc in zip(self.names, self.encodings):
            kind, _, dtype = enc.partition(":")
            if kind != "ndarray" or not dtype or ":" in dtype:
                raise ValueError(f"column {name!r}: only 'ndarray:<dtype>' is supported, got {enc!r}")
            self.dtypes.append(np.dtype(dtype))
        self.compression = compression
        self.level = None
        if compression:
            algo, _, level = compression.partition(":")
            if algo != "zstd":
                raise ValueError(f"only zstd compression is supported, got {compression!r}")
            self.level = int(level) if level else 3     # streaming's default zstd level
        self.size_limit = size_limit
        config = {"version": 2, "format": "mds", "compression": compression, "hashes": [],
                  "size_limit": size_limit, "column_names": self.names,
                  "column_encodings": self.encodings, "column_sizes": [None] * len(self.names)}
        self._config = config
        self._config_bytes = json.dumps(config, sort_keys=True).encode("utf-8")
        self.shards: list[dict] = []
        self._samples: list[bytes] = []
        self._size = 0
        self._reset()

    def _reset(self) -> None:
        self._samples = []
        self._size = 4 + 4 + len(self._config_bytes)   # count + first offset + config, as MDSWriter counts

    def _encode(self, sample: dict[str, np.ndarray]) -> bytes:
        sizes, parts = [], []
        for name, dtype in zip(self.names, self.dtypes):
            arr = sample[name]
            if arr.dtype != dtype or arr.ndim != 1:
                raise ValueError(f"column {name!r}: expected a 1-D {dtype} array, got {arr.dtype} {arr.shape}")
            datum = _shape_header(arr.shape[0]) + arr.tobytes()
            sizes.append(len(datum))
            parts.append(datum)
        return np.array(sizes, np.uint32).tobytes() + b"".join(parts)

    def write(self, sample: dict[str, np.ndarray]) -> None:
        data = self._encode(sample)
        # The same rule as streaming's writer: flush before a sample that would cross the limit.
        if self.size_limit and self.size_limit < self._size + len(data) + 4:
            self._flush()
        self._samples.append(data)
        self._size += len(data) + 4

    def write_rows(self, column: str, rows: np.ndarray) -> None:
        """Write each row of a 2-D array as one sample of a single-column dataset."""
        if self.names != [column]:
            raise ValueError(f"write_rows needs a single-column writer ({column!r}), have {self.names}")
        for row in rows:
            self.write({column: row})

    def _flush(self) -> None:
        n = len(self._samples)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(s) for s in self._samples], out=offsets[1:])
        offsets += 4 + 4 * (n + 1) + len(self._config_bytes)
        raw = (np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + self._config_bytes
               + b"".join(self._samples))
        raw_name = f"shard.{len(self.shards):05}.mds"
        entry = {"samples": n, "raw_data": {"basename": raw_name, "bytes": len(raw), "hashes": {}},
                 "zip_data": None}
        data, name = raw, raw_name
        if self.level is not None:
            data = _zstd_compress(raw, self.level)
            name = raw_name + ".zstd"
            entry["zip_data"] = {"basename": name, "bytes": len(data), "hashes": {}}
        (self.out_dir / name).write_bytes(data)
        entry.update(self._config)
        self.shards.append(entry)
        self._reset()

    def finish(self) -> int:
        """Flush the last shard and write index.json; returns the number of samples written."""
        if self._samples:
            self._flush()
        write_index(self.out_dir, self.shards)
        return sum(s["samples"] for s in self.shards)


def _zstd_compress(raw: bytes, level: int) -> bytes:
    try:
        import zstd     # what streaming itself compresses and decompresses with (one of its dependencies)
    except ImportError:     # pragma: no cover - a frame from zstandard (content size included) reads the same
        import zstandard

        return zstandard.ZstdCompressor(level=level).compress(raw)
    return zstd.compress(raw, level)


def write_index(out_dir: str | Path, shards: list[dict]) -> None:
    """Write `out_dir/index.json` atomically (tmp + rename): a reader never sees half an index."""
    path = Path(out_dir) / INDEX
    tmp = path.with_name(INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 2, "shards": shards}, f, sort_keys=True)
    os.replace(tmp, path)


def read_index(mds_dir: str | Path) -> list[dict]:
    path = Path(mds_dir) / INDEX
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"MDS index not found: {path}") from None
    if obj.get("version") != 2:
        raise ValueError(f"{path}: unsupported MDS index version {obj.get('version')!r}")
    return obj["shards"]


def merge_indexes(root: str | Path, subdirs: Iterable[str]) -> int:
    """Write root/index.json listing the shards of root/<subdir>/index.json, in the given order.

    Shard basenames become `<subdir>/<basename>`, which is what streaming's own `merge_index` produces
    and what StreamingDataset resolves against a local or remote root. Returns the total sample count."""
    root = Path(root)
    shards = []
    for sub in subdirs:
        for shard in read_index(root / sub):
            shard = dict(shard)
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key] = dict(shard[key], basename=f"{sub}/{shard[key]['basename']}")
            shards.append(shard)
    write_index(root, shards)
    return sum(s["samples"] for s in shards)
