"""`m2train prep`: tokenize a document source into the MDS dataset described in data_prep/FORMAT.md.

How the work is cut (and why the output does not depend on how it is run):
- A *unit* is a fixed run of `docs_per_unit` consecutive documents of one input stream: (stream f,
  chunk k) covers document positions [k*C, (k+1)*C). A stream is one input file, except for text
  sources (one document per file), where it is C consecutive files (data_prep/streams.py). Each unit
  is packed on its own and written to its own MDS folders `train/f{f:06d}-c{k:06d}/` and `val/...`;
  the dataset index lists units in (f, k) order, so the samples are the same for any number of
  workers, Slurm tasks or restarts.
- The tokens after a unit's last full window (its *tail*) are kept, joined in unit order at the end
  and packed into `train/tail/` (`val/tail/`): nothing but one final partial window per split is lost.
- A *lane* (f, stride s, offset o) reads stream f once and processes the chunks k = o (mod s). Slurm
  tasks and worker processes receive lanes; a stream is split into strided lanes only when there are
  fewer than two lanes per worker (each such lane still decompresses and parses the whole file).
- Restart: a unit is complete once its marker `.prep/units/<unit>.json` exists (written after its
  shards); unit folders without a marker are deleted and redone. `.prep/files/f{f:06d}.json` records
  a stream's document count once any lane reached its end. `.prep/args.json` records what determines
  the output; a rerun with different arguments is an error unless --overwrite.

Modules: this file drives a job (arguments, workers, progress); data_prep/worker.py reads lanes and
writes units; data_prep/finalize.py checks completeness, packs tails, writes indexes and stats, and
merges Slurm parts; data_prep/jobdir.py holds the job folder's markers and lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .finalize import check_units, finalize, merge_parts  # noqa: F401 - merge_parts is part of this API
from .jobdir import (FORMAT_VERSION, PART_DONE, STATS, PrepError, clean_incomplete_units, lock,
                     prepare_job_dir, read_json as _read_json, write_json as _write_json)
from .packing import Layout, token_dtype
from .sources import DataError, SourceFile, SourceSpec, discover_files
from .streams import make_streams
from .worker import Lane, WorkerContext, part_lanes, worker_lanes, worker_main

__all__ = ["PrepConfig", "PrepError", "run_prep", "merge_parts", "finalize", "part_lanes", "worker_lanes",
           "default_workers"]

log = logging.getLogger(__name__)


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


def _run_lanes(cfg: PrepConfig, streams, layout, dtype, lanes: list[Lane], workers: int) -> _Progress:
    progress = _Progress(cfg.progress, len(lanes), "prep" if cfg.num_shards == 1 else
                         f"prep part {cfg.shard_index}/{cfg.num_shards}")
    try:
        if workers == 1:
            ctx = WorkerContext(cfg, streams, layout, dtype, progress)
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
        for lane in sorted(lanes, key=lambda l: (-streams[l.file].bytes / l.stride, l.file, l.offset)):
            tasks.put(lane)
        for _ in range(workers):
            tasks.put(None)
        procs = [mpctx.Process(target=worker_main, args=(cfg, streams, layout, dtype, tasks, results,
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
    lock_fd = lock(job_dir)
    try:
        args = _job_args(cfg, files, tok.sha256(), dtype, cfg.num_shards, cfg.shard_index)
        done_name = STATS if cfg.num_shards == 1 else PART_DONE
        if prepare_job_dir(job_dir, args, cfg.overwrite, done_name):
            log.info("%s is already complete", job_dir)
            return _read_json(job_dir / done_name)
        if not (job_dir / "tokenizer").is_dir():
            tmp = job_dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_to(tmp)
            os.replace(tmp, job_dir / "tokenizer")
        clean_incomplete_units(job_dir)
        streams = make_streams(cfg.source.kind, files, cfg.docs_per_unit)
        lanes = part_lanes(len(streams), cfg.num_shards, cfg.shard_index)
        workers = max(1, cfg.workers or default_workers())
        lanes = worker_lanes(lanes, workers)
        workers = min(workers, len(lanes)) or 1
        t0 = time.perf_counter()
        progress = _run_lanes(cfg, streams, layout, dtype, lanes, workers)
        t1 = time.perf_counter()
        if cfg.num_shards > 1:
            summary = check_units(job_dir, streams, cfg.docs_per_unit,
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
        os.close(lock_fd)
