"""`m2train prep`: tokenize a document source into the MDS dataset described in data_prep/FORMAT.md.

How the work is cut (and why the output does not depend on how it is run):
- A *unit* is a fixed run of `docs_per_unit` consecutive documents of one input stream: (stream f,
  chunk k) covers document positions [k*C, (k+1)*C). A stream is one input file, except for text
  sources (one document per file), where it is C consecutive files (data_prep/streams.py). Each unit is packed on its own and written to its own MDS
  folders `train/f{f:06d}-c{k:06d}/` and `val/...`; the dataset index lists units in (f, k) order, so
  the samples are the same for any number of workers, Slurm tasks or restarts.
- The tokens after a unit's last full window (its *tail*) are kept, joined in unit order at the end
  and packed into `train/tail/` (`val/tail/`): nothing but one final partial window per split is lost.
- A *lane* (f, stride s, offset o) reads file f once and processes the chunks k = o (mod s). Slurm
  tasks and worker processes receive lanes; a file is split into strided lanes only when there are
  fewer files than workers (each such lane still decompresses and parses the whole file).
- Restart: a unit is complete once its marker `.prep/units/<unit>.json` exists (written after its
  shards); unit folders without a marker are deleted and redone. `.prep/files/f{f:06d}.json` records
  a file's document count once any lane reached its end. `.prep/args.json` records what determines the
  output; a rerun with different arguments is an error unless --overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .mds import TokenShardWriter, merge_indexes
from .packing import Layout, SplitHasher, cut_windows, doc_samples, stream, token_dtype
from .sources import SKIP_REASONS, DataError, SourceFile, SourceSpec, discover_files
from .streams import Stream, make_streams, read_stream

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE = ".prep"
SPLITS = ("train", "val")
TAIL = "tail"
STATS = "prep_stats.json"
PART_DONE = "part_done.json"
# Test hook: seconds to sleep after each tokenized batch (makes "kill mid-run" tests deterministic).
_DELAY_ENV = "M2TRAIN_PREP_TEST_BATCH_DELAY"


class PrepError(DataError):
    """A prep job that cannot proceed (bad arguments, mismatched rerun, incomplete parts)."""


@dataclass
class PrepConfig:
    source: SourceSpec
    tokenizer: str
    out: str
    layout: str = "gpt_packed"
    seq_len: int = 2048
    val_fraction: float = 0.005
    workers: int | None = None          # default: the CPU cores this process may use
    num_shards: int = 1                 # Slurm array split: this job is part `shard_index` of `num_shards`
    shard_index: int = 0
    docs_per_unit: int = 16384
    batch_docs: int = 256               # documents per tokenizer call
    compression: str = "zstd:1"         # level 1: ~2.5x faster than 3 for ~2% larger token shards
    overwrite: bool = False
    progress: bool = True

    def job_dir(self) -> Path:
        out = Path(self.out)
        return out if self.num_shards == 1 else out / f"part-{self.shard_index:05d}"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))     # respects Slurm/cgroup CPU binding
    except AttributeError:                      # pragma: no cover (non-Linux)
        return os.cpu_count() or 1


def unit_name(f: int, k: int) -> str:
    return f"f{f:06d}-c{k:06d}"


def _write_json(path: Path, obj) -> None:
    """Atomic: a crash leaves either the old file or the new one, never half of one."""
    # A per-process temporary name: lanes sharing a file may write its marker at the same moment.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path):
    return json.loads(path.read_text())


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
    def __init__(self, ctx: "_WorkerContext", f: int, k: int) -> None:
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


class _WorkerContext:
    """Everything a lane needs; built once per process."""

    def __init__(self, cfg: PrepConfig, files: list[Stream], layout: Layout, dtype: np.dtype,
                 report, parent_pid: int | None = None, tokenizer=None) -> None:
        from .tokenizers import load_tokenizer

        self.cfg = cfg
        self.files = files
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
        stream = self.files[lane.file]
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


def _worker_main(cfg, files, layout, dtype, tasks, results, parent_pid) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle
    try:
        ctx = _WorkerContext(cfg, files, layout, dtype, lambda kind, x: results.put((kind, x)), parent_pid)
        while True:
            lane = tasks.get()
            if lane is None:
                break
            ctx.run_lane(lane)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        results.put(("error", (isinstance(e, DataError), f"{type(e).__name__}: {e}",
                               traceback.format_exc())))


# ---------------------------------------------------------------------------------------------------
# Parent side


class _Progress:
    def __init__(self, enabled: bool, n_lanes: int, desc: str) -> None:
        self.t0 = time.perf_counter()
        self.docs = self.tokens = self.units = self.lanes = 0
        self.n_lanes = n_lanes
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit="doc", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, kind: str, payload) -> None:
        if kind == "progress":
            docs, tokens = payload
            self.docs += docs
            self.tokens += tokens
            if self.bar is not None:
                self.bar.update(docs)
                self._postfix()
        elif kind == "unit":
            self.units += 1
        elif kind == "lane":
            self.lanes += 1
            if self.bar is not None:
                self._postfix()

    def _postfix(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / dt / 1e6:.2f}M tok/s, {self.units} units, "
                                 f"lanes {self.lanes}/{self.n_lanes}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_lanes(cfg: PrepConfig, files, layout, dtype, lanes: list[Lane], workers: int) -> _Progress:
    progress = _Progress(cfg.progress, len(lanes), "prep" if cfg.num_shards == 1 else
                         f"prep part {cfg.shard_index}/{cfg.num_shards}")
    try:
        if workers == 1:
            ctx = _WorkerContext(cfg, files, layout, dtype, progress)
            for lane in lanes:
                ctx.run_lane(lane)
            return progress
        import multiprocessing as mp

        # fork: workers start in milliseconds and inherit the imported modules (no torch is imported
        # here, so there is no thread pool to break).
        mpctx = mp.get_context("fork")
        # One process per core already: HF tokenizers must not start a thread pool in each of them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tasks, results = mpctx.Queue(), mpctx.Queue()
        # Largest files first, so the last lanes to finish are short ones.
        for lane in sorted(lanes, key=lambda l: (-files[l.file].bytes / l.stride, l.file, l.offset)):
            tasks.put(lane)
        for _ in range(workers):
            tasks.put(None)
        procs = [mpctx.Process(target=_worker_main, args=(cfg, files, layout, dtype, tasks, results,
                                                          os.getpid()), daemon=True)
                 for _ in range(workers)]
        for p in procs:
            p.start()
        import queue

        try:
            while progress.lanes < len(lanes):
                try:
                    kind, payload = results.get(timeout=0.5)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead or all(p.exitcode == 0 for p in procs) and results.empty():
                        # A worker killed from outside (OOM killer, signal) sends no message.
                        raise PrepError(f"a prep worker exited unexpectedly (exit codes "
                                        f"{[p.exitcode for p in procs]}); rerun to continue")
                    continue
                if kind == "error":
                    is_data, msg, tb = payload
                    if is_data:
                        raise DataError(msg)
                    raise PrepError(f"a prep worker failed: {msg}\n{tb}")
                progress(kind, payload)
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        return progress
    finally:
        progress.close()


def _job_args(cfg: PrepConfig, files: list[SourceFile], tokenizer_sha: str, dtype: np.dtype,
              num_shards: int, shard_index: int) -> dict:
    """Everything the output depends on (and nothing it does not: not the worker count)."""
    src = asdict(cfg.source)
    src.pop("inputs")           # the resolved file list below is what matters
    args = {"format_version": FORMAT_VERSION, "source": src,
            # Absolute: a rerun from another working directory is the same job.
            "files": [{"path": os.path.abspath(f.path), "bytes": f.bytes} for f in files],
            "tokenizer_sha256": tokenizer_sha, "layout": cfg.layout, "seq_len": cfg.seq_len,
            "dtype": dtype.name, "val_fraction": cfg.val_fraction, "docs_per_unit": cfg.docs_per_unit,
            "compression": cfg.compression, "num_shards": num_shards, "shard_index": shard_index}
    return json.loads(json.dumps(args))     # as it reads back from args.json (tuples become lists)


def _owned_entries(job_dir: Path) -> list[Path]:
    names = {STATE, "train", "val", "tokenizer", STATS, PART_DONE}
    return [p for p in job_dir.iterdir() if p.name in names or p.name.startswith("part-")]


def _lock(job_dir: Path, wait_s: float = 30.0):
    """An exclusive lock on the job folder for this process and its workers. The kernel drops it when
    the last of them exits, so a rerun after a crash is never blocked by a stale file."""
    import fcntl

    fd = os.open(job_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    # Workers of a killed job notice within one batch that their parent is gone and exit; give them
    # that long before declaring the folder busy.
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise PrepError(f"another prep job is writing {job_dir} (its lock is held); wait for it "
                                f"or stop it first") from None
            time.sleep(0.1)


def _prepare_job_dir(job_dir: Path, args: dict, overwrite: bool, done_name: str) -> bool:
    """Check a rerun against the recorded arguments. Returns True when the job is already complete."""
    args_path = job_dir / STATE / "args.json"
    if overwrite:
        for p in _owned_entries(job_dir):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif args_path.exists():
        old = _read_json(args_path)
        if old != args:
            diff = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
            raise PrepError(f"{job_dir} holds a prep run with different arguments (differs in: "
                            f"{', '.join(diff)}); rerun with the same arguments to continue it, or pass "
                            f"--overwrite to start over")
        if (job_dir / done_name).exists():
            return True
    else:
        stray = [p.name for p in job_dir.iterdir() if p.name != ".lock"]
        if stray:
            raise PrepError(f"output folder {job_dir} is not empty and holds no prep run "
                            f"({', '.join(sorted(stray)[:5])}...); choose an empty folder or pass --overwrite")
    (job_dir / STATE / "units").mkdir(parents=True, exist_ok=True)
    (job_dir / STATE / "files").mkdir(parents=True, exist_ok=True)
    _write_json(args_path, args)
    return False


def _clean_incomplete_units(job_dir: Path) -> int:
    units = job_dir / STATE / "units"
    n = 0
    for split in SPLITS:
        d = job_dir / split
        if not d.is_dir():
            continue
        for sub in d.iterdir():
            if sub.is_dir() and sub.name != TAIL and not (units / f"{sub.name}.json").exists():
                shutil.rmtree(sub)
                n += 1
        shutil.rmtree(d / TAIL, ignore_errors=True)
        (d / "index.json").unlink(missing_ok=True)
    return n


def _setup(cfg: PrepConfig):
    from .tokenizers import load_tokenizer

    if not 0.0 <= cfg.val_fraction < 1.0:
        raise PrepError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.num_shards < 1 or not 0 <= cfg.shard_index < cfg.num_shards:
        raise PrepError(f"--shard-index {cfg.shard_index} is not in [0, --num-shards {cfg.num_shards})")
    algo, _, level = (cfg.compression or "").partition(":")
    if cfg.compression and (algo != "zstd" or level and not (level.isdigit() and 1 <= int(level) <= 22)):
        raise PrepError(f"--compression must be zstd or zstd:LEVEL (1-22), got {cfg.compression!r}")
    if cfg.docs_per_unit < 1 or cfg.batch_docs < 1:
        raise PrepError("--docs-per-unit and --batch-docs must be positive")
    files = discover_files(cfg.source)
    tok = load_tokenizer(cfg.tokenizer)
    try:
        layout = Layout.build(cfg.layout, cfg.seq_len, tok.special_tokens, str(cfg.tokenizer))
    except ValueError as e:
        raise PrepError(str(e)) from None
    dtype = token_dtype(tok.vocab_size)
    return files, tok, layout, dtype


def run_prep(cfg: PrepConfig) -> dict:
    """Run (or continue) a prep job. Returns prep_stats (a whole dataset) or the part summary (one
    Slurm part of several)."""
    t_start = time.perf_counter()
    files, tok, layout, dtype = _setup(cfg)
    job_dir = cfg.job_dir()
    job_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(job_dir)
    try:
        args = _job_args(cfg, files, tok.sha256(), dtype, cfg.num_shards, cfg.shard_index)
        done_name = STATS if cfg.num_shards == 1 else PART_DONE
        if _prepare_job_dir(job_dir, args, cfg.overwrite, done_name):
            log.info("%s is already complete", job_dir)
            return _read_json(job_dir / done_name)
        if not (job_dir / "tokenizer").is_dir():
            tmp = job_dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_to(tmp)
            os.replace(tmp, job_dir / "tokenizer")
        _clean_incomplete_units(job_dir)
        streams = make_streams(cfg.source.kind, files, cfg.docs_per_unit)
        lanes = part_lanes(len(streams), cfg.num_shards, cfg.shard_index)
        workers = max(1, cfg.workers or default_workers())
        lanes = worker_lanes(lanes, workers)
        workers = min(workers, len(lanes)) or 1
        t0 = time.perf_counter()
        progress = _run_lanes(cfg, streams, layout, dtype, lanes, workers)
        t1 = time.perf_counter()
        if cfg.num_shards > 1:
            summary = _check_units(job_dir, streams, cfg.docs_per_unit,
                                   part_lanes(len(streams), cfg.num_shards, cfg.shard_index))
            summary = {"part": cfg.shard_index, "num_shards": cfg.num_shards, "units": summary,
                       "tokenizer_source": os.path.abspath(tok.path)}
            _write_json(job_dir / PART_DONE, summary)
            return summary
        stats = finalize(job_dir, streams, args, tok, layout, dtype, os.path.abspath(tok.path))
        t2 = time.perf_counter()
        # Read by benchmarks/data_prep.py (steady-state rate = tokens / worker phase).
        log.info("timing: setup %.2f s, workers %.2f s, finalize %.2f s; %d tokens this run, %.2fM tok/s "
                 "in the worker phase (%d workers)", t0 - t_start, t1 - t0, t2 - t1, progress.tokens,
                 progress.tokens / max(t1 - t0, 1e-9) / 1e6, workers)
        return stats
    finally:
        os.close(lock)


# ---------------------------------------------------------------------------------------------------
# Finalize: check completeness, pack tails, index, stats


def _check_units(job_dir: Path, files: list[Stream], C: int, lanes: list[Lane]) -> list[str]:
    """The units `lanes` must have produced, in dataset order; error when any is missing."""
    state = job_dir / STATE
    names = []
    for lane in lanes:
        marker = state / "files" / f"f{lane.file:06d}.json"
        if not marker.exists():
            raise PrepError(f"{job_dir}: input {files[lane.file].path} was not finished; rerun the prep "
                            f"job with the same arguments to complete it")
        n_docs = _read_json(marker)["docs"]
        for k in range(-(-n_docs // C)):
            if lane.owns(k):
                name = unit_name(lane.file, k)
                if not (state / "units" / f"{name}.json").exists():
                    raise PrepError(f"{job_dir}: unit {name} of {files[lane.file].path} is missing; rerun "
                                    f"the prep job with the same arguments to complete it")
                names.append(name)
    return names


def finalize(job_dir: Path, files: list[Stream], args: dict, tok, layout: Layout, dtype: np.dtype,
             tokenizer_source: str) -> dict:
    state = job_dir / STATE
    units = _check_units(job_dir, files, args["docs_per_unit"], [Lane(f) for f in range(len(files))])
    markers = [_read_json(state / "units" / f"{u}.json") for u in units]
    read = sum(m["read"] for m in markers)
    written = sum(m["written"] for m in markers)
    skipped = {r: sum(m["skipped"][r] for m in markers) for r in SKIP_REASONS}
    n_docs = sum(_read_json(state / "files" / f"f{f:06d}.json")["docs"] for f in range(len(files)))
    # The invariant FORMAT.md promises, checked on the totals and against the files' lengths.
    if not (read == written + sum(skipped.values()) == n_docs):
        raise PrepError(f"{job_dir}: document counts do not add up: read {read}, written {written}, "
                        f"skipped {sum(skipped.values())}, documents in files {n_docs}")
    if written == 0:
        paths = [f["path"] for f in args["files"]]
        names = ", ".join(paths[:10]) + (f" ... ({len(paths)} files)" if len(paths) > 10 else "")
        raise DataError(f"no valid document in the source ({read} read, skipped by reason: "
                        f"{ {r: n for r, n in skipped.items() if n} }); files: {names}")
    splits = {}
    for split in SPLITS:
        agg = Counter()
        for m in markers:
            agg.update(m["splits"][split])
        subdirs = [m["unit"] for m in markers if m["splits"][split]["samples"] > 0]
        dropped = 0
        if layout.packed:
            tails = [np.load(state / "units" / f"{u}.tails.npz")[split] for u in units]
            ids = np.concatenate(tails) if tails else np.zeros(0, dtype)
            rows, rest = cut_windows(layout, ids.astype(dtype, copy=False))
            tail_dir = job_dir / split / TAIL
            shutil.rmtree(tail_dir, ignore_errors=True)
            if len(rows):
                w = TokenShardWriter(tail_dir, {"tokens": f"ndarray:{dtype.name}"}, compression=args["compression"])
                w.write_rows("tokens", rows)
                w.finish()
                subdirs.append(TAIL)
                agg["samples"] += len(rows)
                agg["tokens"] += rows.size
            dropped = len(rest)
        (job_dir / split).mkdir(exist_ok=True)
        n = merge_indexes(job_dir / split, subdirs)
        assert n == agg["samples"], (split, n, agg["samples"])
        splits[split] = {"samples": agg["samples"], "tokens": agg["tokens"], "documents": agg["docs"],
                         "document_tokens": agg["doc_tokens"], "truncated_tokens": agg["truncated_tokens"],
                         "dropped_tokens": dropped}
    if splits["val"]["samples"] == 0 and args["val_fraction"] > 0:
        log.warning("the validation split is empty (too little data for val_fraction %s at seq_len %s)",
                    args["val_fraction"], args["seq_len"])
    if any(skipped.values()):
        log.warning("skipped %d of %d documents: %s", sum(skipped.values()), read,
                    ", ".join(f"{r} {n}" for r, n in skipped.items() if n))
    stats = {
        "format_version": FORMAT_VERSION, "layout": layout.name, "seq_len": layout.seq_len,
        "vocab_size": tok.vocab_size, "dtype": dtype.name, "special_tokens": dict(tok.special_tokens),
        # path: the copy inside the dataset (relative, so the folder can move); source: where it came from.
        "tokenizer": {"kind": tok.kind, "path": "tokenizer", "source": tokenizer_source,
                      "sha256": tok.sha256()},
        "splits": splits,
        "documents": {"read": read, "written": written, "skipped": skipped},
        "sources": args["files"],
        "val_fraction": args["val_fraction"], "docs_per_unit": args["docs_per_unit"], "units": len(units),
    }
    _write_json(job_dir / STATS, stats)       # last: its presence means the dataset is complete
    return stats


# ---------------------------------------------------------------------------------------------------
# Merge of Slurm parts


def merge_parts(out: str | Path, progress: bool = True) -> dict:
    """Turn OUT/part-*/ (the tasks of one Slurm array) into one dataset in OUT, equal sample for sample
    to what a single job would have written. Restartable: moves are skipped when already done."""
    from .tokenizers import load_tokenizer

    out = Path(out)
    if (out / STATS).exists() and not list(out.glob("part-*")):
        log.info("%s is already merged", out)
        return _read_json(out / STATS)
    parts = sorted(p for p in out.glob("part-*") if p.is_dir())
    if not parts:
        raise PrepError(f"{out}: no part-NNNNN folders to merge (run `m2train prep --num-shards K "
                        f"--shard-index i` for every i first)")
    all_args = {p: _read_json(p / STATE / "args.json") for p in parts if (p / STATE / "args.json").exists()}
    if len(all_args) != len(parts):
        missing = [p.name for p in parts if p not in all_args]
        raise PrepError(f"{out}: parts without a recorded run: {', '.join(missing)}")
    first = next(iter(all_args.values()))
    K = first["num_shards"]
    expected = [out / f"part-{i:05d}" for i in range(K)]
    missing = [p.name for p in expected if p not in all_args]
    if missing:
        raise PrepError(f"{out}: {K} parts expected, missing {', '.join(missing)}")
    for p, a in all_args.items():
        same = {k: v for k, v in a.items() if k != "shard_index"} == \
            {k: v for k, v in first.items() if k != "shard_index"}
        if not same:
            raise PrepError(f"{p}: was prepared with different arguments than {parts[0]}")
        if not (p / PART_DONE).exists():
            raise PrepError(f"{p}: part {a['shard_index']} is not finished (no {PART_DONE}); rerun "
                            f"its prep task")
    args = dict(first, num_shards=1, shard_index=0)
    lock = _lock(out)
    try:
        state = out / STATE
        if (state / "args.json").exists() and _read_json(state / "args.json") != args:
            raise PrepError(f"{out} already holds a different prep run; cannot merge parts into it")
        for d in (state / "units", state / "files", out / "train", out / "val"):
            d.mkdir(parents=True, exist_ok=True)
        _write_json(state / "args.json", args)
        for p in expected:
            for split in SPLITS:
                src = p / split
                if src.is_dir():
                    for sub in src.iterdir():
                        if sub.is_dir():
                            dst = out / split / sub.name
                            shutil.rmtree(dst, ignore_errors=True)   # a half-finished earlier move
                            os.replace(sub, dst)
            for kind in ("units", "files"):
                for f in (p / STATE / kind).iterdir():
                    os.replace(f, state / kind / f.name)
            if not (out / "tokenizer").is_dir() and (p / "tokenizer").is_dir():
                os.replace(p / "tokenizer", out / "tokenizer")
        tok = load_tokenizer(out / "tokenizer")
        if tok.sha256() != args["tokenizer_sha256"]:
            raise PrepError(f"{out}/tokenizer does not match the tokenizer the parts were prepared with")
        files = [SourceFile(f["path"], f["bytes"]) for f in args["files"]]
        streams = make_streams(args["source"]["kind"], files, args["docs_per_unit"])
        layout = Layout.build(args["layout"], args["seq_len"], tok.special_tokens)
        source = _read_json(expected[0] / PART_DONE)["tokenizer_source"]
        stats = finalize(out, streams, args, tok, layout, np.dtype(args["dtype"]), source)
        for p in expected:
            shutil.rmtree(p)
        return stats
    finally:
        os.close(lock)
