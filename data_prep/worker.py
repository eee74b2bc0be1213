"""Worker side of `m2train prep`: lanes (what a process reads) and units (what it writes).

A *lane* (stream f, stride s, offset o) reads stream f once and processes the chunks k = o (mod s);
a *unit* (f, k) is packed on its own into `train/<unit>/` and `val/<unit>/` and completed by its
marker `.prep/units/<unit>.json` (see prep.py for the whole picture)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .jobdir import STATE, SPLITS, read_json as _read_json, unit_name, write_json as _write_json
from .mds import TokenShardWriter
from .packing import Layout, SplitHasher, cut_windows, doc_samples, stream
from .sources import SKIP_REASONS, DataError
from .streams import Stream, read_stream

if TYPE_CHECKING:
    from .prep import PrepConfig

log = logging.getLogger(__name__)

# Test hook: seconds to sleep after each tokenized batch (makes "kill mid-run" tests deterministic).
_DELAY_ENV = "M2TRAIN_PREP_TEST_BATCH_DELAY"


# ---------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Lane:
    file: int
    stride: int = 1
    offset: int = 0

    def owns(self, chunk: int) -> bool:
        return chunk % self.stride == self.offset


def part_lanes(n_files: int, num_shards: int, shard_index: int) -> list[Lane]:
    """The lanes of one Slurm part: whole files round-robin when there are enough files, otherwise
    every file split by chunk stride across the parts."""
    if n_files >= num_shards:
        return [Lane(f) for f in range(shard_index, n_files, num_shards)]
    return [Lane(f, num_shards, shard_index) for f in range(n_files)]


def worker_lanes(lanes: list[Lane], workers: int) -> list[Lane]:
    """Split every lane `workers` ways by chunk stride when there are fewer than two lanes per worker:
    with 1 file every core gets work, with 3 files on 2 workers neither waits for the other's second
    file. The price is that each file is decompressed and parsed by `workers` lanes (≈5% of the
    tokenizing cost each), so with enough files lanes are whole files."""
    if workers <= 1 or len(lanes) >= 2 * workers:
        return lanes
    return [Lane(l.file, l.stride * workers, l.offset + j * l.stride) for l in lanes for j in range(workers)]


# ---------------------------------------------------------------------------------------------------
# Worker side: one lane -> its units


@dataclass
class _SplitOut:
    """Samples of one split of one unit, written as they are cut."""

    dir: Path
    layout: Layout
    dtype: np.dtype
    compression: str
    writer: TokenShardWriter | None = None
    pending: list = field(default_factory=list)
    pending_n: int = 0
    docs: int = 0
    samples: int = 0
    tokens: int = 0              # ids stored in samples, PAD excluded
    doc_tokens: int = 0          # tokenizer output for the documents (no specials)
    truncated: int = 0           # bert_doc: ids cut off long documents

    def _write(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        if self.writer is None:
            self.writer = TokenShardWriter(self.dir, {"tokens": f"ndarray:{self.dtype.name}"},
                                           compression=self.compression)
        self.writer.write_rows("tokens", rows)
        self.samples += len(rows)

    def add(self, docs: list[list[int]]) -> None:
        if not docs:
            return
        self.docs += len(docs)
        self.doc_tokens += sum(len(d) for d in docs)
        if not self.layout.packed:
            rows, written, truncated = doc_samples(self.layout, docs, self.dtype)
            self._write(rows)
            self.tokens += written
            self.truncated += truncated
            return
        ids = stream(docs, self.layout.separator, self.dtype)
        self.pending.append(ids)
        self.pending_n += len(ids)
        # Cut in ~1M-id batches: few large numpy operations instead of many small ones.
        if self.pending_n >= max(self.layout.body, 1 << 20):
            self._cut()

    def _cut(self) -> None:
        ids = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        rows, tail = cut_windows(self.layout, ids)
        self._write(rows)
        self.tokens += rows.size
        self.pending, self.pending_n = ([tail], len(tail)) if len(tail) else ([], 0)

    def finish(self) -> np.ndarray:
        """Close the shards; returns the tail (stream ids after the last full window)."""
        if self.layout.packed and self.pending:
            self._cut()
        tail = self.pending[0] if self.pending else np.zeros(0, self.dtype)
        if self.writer is not None:
            self.writer.finish()
        return tail

    def stats(self) -> dict:
        return {"docs": self.docs, "samples": self.samples, "tokens": self.tokens,
                "doc_tokens": self.doc_tokens, "truncated_tokens": self.truncated}


class _Unit:
    def __init__(self, ctx: "WorkerContext", f: int, k: int) -> None:
        self.ctx, self.f, self.k = ctx, f, k
        self.name = unit_name(f, k)
        for split in SPLITS:        # leftovers of an interrupted attempt
            shutil.rmtree(ctx.job_dir / split / self.name, ignore_errors=True)
        self.out = {s: _SplitOut(ctx.job_dir / s / self.name, ctx.layout, ctx.dtype, ctx.compression)
                    for s in SPLITS}
        self.read = 0
        self.skipped: Counter = Counter()
        self.texts: list[str] = []
        self.is_val: list[bool] = []
        # FORMAT.md: the validation split gets at least one document - the first valid one of the
        # dataset's first unit, whatever the hash says.
        self.force_val = (f == 0 and k == 0 and ctx.val_fraction > 0)

    def add(self, text: str | None, reason: str | None, val: bool) -> None:
        self.read += 1
        if text is None:
            self.skipped[reason] += 1
            return
        if self.force_val:
            val, self.force_val = True, False
        self.texts.append(text)
        self.is_val.append(val)
        if len(self.texts) >= self.ctx.batch_docs:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        ids = self.ctx.tokenizer.encode_batch(self.texts)
        train = [d for d, v in zip(ids, self.is_val) if not v]
        val = [d for d, v in zip(ids, self.is_val) if v]
        self.out["train"].add(train)
        self.out["val"].add(val)
        self.ctx.report("progress", (len(self.texts), sum(len(d) for d in ids)))
        self.texts, self.is_val = [], []
        if self.ctx.delay:
            time.sleep(self.ctx.delay)
        self.ctx.check_parent()

    def finish(self) -> None:
        self.flush()
        state = self.ctx.job_dir / STATE / "units"
        tails = {s: self.out[s].finish() for s in SPLITS}
        np.savez(state / f"{self.name}.tails.npz", **tails)
        written = sum(o.docs for o in self.out.values())
        skipped = {r: self.skipped.get(r, 0) for r in SKIP_REASONS}
        assert self.read == written + sum(skipped.values()), (self.name, self.read, written, skipped)
        marker = {"unit": self.name, "file": self.f, "chunk": self.k, "read": self.read,
                  "written": written, "skipped": skipped,
                  "splits": {s: self.out[s].stats() for s in SPLITS},
                  "tail_tokens": {s: int(len(tails[s])) for s in SPLITS}}
        _write_json(state / f"{self.name}.json", marker)      # last: the unit is now complete
        self.ctx.report("unit", self.name)


class WorkerContext:
    """Everything a lane needs; built once per process."""

    def __init__(self, cfg: "PrepConfig", streams: list[Stream], layout: Layout, dtype: np.dtype,
                 report, parent_pid: int | None = None, tokenizer=None) -> None:
        from .tokenizers import load_tokenizer

        self.cfg = cfg
        self.streams = streams
        self.job_dir = cfg.job_dir()
        self.layout, self.dtype = layout, dtype
        self.compression = cfg.compression
        self.val_fraction = cfg.val_fraction
        self.batch_docs = cfg.batch_docs
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, num_threads=1)
        self.report = report
        self.parent_pid = parent_pid
        self.delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        # Units finished by earlier attempts, {file: {chunk}}: scanned once per process, not per lane
        # (no lane ever touches another lane's chunks, so it cannot go stale during the run).
        self.done = _done_units(self.job_dir)

    def check_parent(self) -> None:
        # A worker whose parent was killed must not keep writing next to a restarted job.
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            os._exit(1)

    def run_lane(self, lane: Lane) -> None:
        C = self.cfg.docs_per_unit
        state = self.job_dir / STATE
        stream = self.streams[lane.file]
        done = self.done.get(lane.file, set())
        file_marker = state / "files" / f"f{lane.file:06d}.json"
        if file_marker.exists():
            n_docs = _read_json(file_marker)["docs"]
            mine = [k for k in range(-(-n_docs // C)) if lane.owns(k)]
            if all(k in done for k in mine):
                self.report("lane", lane)
                return
        # Start at the first chunk of ours still to do; from one of our finished chunks before it
        # when there is one, so that the read always reaches a document and learns the file's length.
        first = lane.offset
        while first in done:
            first += lane.stride
        start_chunk = first - lane.stride if first >= lane.stride else first
        hashers: dict[str, SplitHasher] = {}
        unit: _Unit | None = None
        last = start_chunk * C - 1
        start = start_chunk * C
        for pos, name, idx, text, reason in read_stream(self.cfg.source, stream, start=start):
            last = pos
            k = pos // C
            if unit is not None and k != unit.k:
                unit.finish()
                unit = None
            if not lane.owns(k) or k in done:
                continue
            if unit is None:
                unit = _Unit(self, lane.file, k)
            val = False
            if text is not None:
                if name not in hashers:
                    hashers.clear()         # grouped text streams: one file after the other
                    hashers[name] = SplitHasher(name, self.val_fraction)
                val = hashers[name].is_val(idx)
            unit.add(text, reason, val)
        if unit is not None:
            unit.finish()
        if last < start and start > 0:
            # Nothing at or after `start`: the file is shorter than our first chunk. Count it (it is
            # at most `start` documents long).
            last = -1
            for last, *_ in read_stream(self.cfg.source, stream):
                pass
        _write_json(file_marker, {"stream": lane.file, "path": stream.path, "docs": last + 1})
        self.report("lane", lane)


def _done_units(job_dir: Path) -> dict[int, set[int]]:
    done: dict[int, set[int]] = {}
    for p in (job_dir / STATE / "units").glob("f*-c*.json"):
        f, k = p.stem[1:].split("-c")
        done.setdefault(int(f), set()).add(int(k))
    return done


def worker_main(cfg, streams, layout, dtype, tasks, results, parent_pid) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle
    try:
        ctx = WorkerContext(cfg, streams, layout, dtype, lambda kind, x: results.put((kind, x)), parent_pid)
        while True:
            lane = tasks.get()
            if lane is None:
                break
            ctx.run_lane(lane)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        results.put(("error", (isinstance(e, DataError), f"{type(e).__name__}: {e}",
                               traceback.format_exc())))
