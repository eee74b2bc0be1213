"""End of a prep job: check that every unit is there, pack the carried-over tails, write the merged
MDS indexes and prep_stats.json; and the merge of the parts of a Slurm array."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from .jobdir import (PART_DONE, SPLITS, STATE, STATS, TAIL, FORMAT_VERSION, PrepError, lock,
                     read_json as _read_json, unit_name, write_json as _write_json)
from .mds import TokenShardWriter, merge_indexes
from .packing import Layout, cut_windows
from .sources import SKIP_REASONS, DataError, SourceFile
from .streams import Stream, make_streams
from .worker import Lane

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Finalize: check completeness, pack tails, index, stats


def check_units(job_dir: Path, streams: list[Stream], C: int, lanes: list[Lane]) -> list[str]:
    """The units `lanes` must have produced, in dataset order; error when any is missing."""
    state = job_dir / STATE
    names = []
    for lane in lanes:
        marker = state / "files" / f"f{lane.file:06d}.json"
        if not marker.exists():
            raise PrepError(f"{job_dir}: input {streams[lane.file].path} was not finished; rerun the prep "
                            f"job with the same arguments to complete it")
        n_docs = _read_json(marker)["docs"]
        for k in range(-(-n_docs // C)):
            if lane.owns(k):
                name = unit_name(lane.file, k)
                if not (state / "units" / f"{name}.json").exists():
                    raise PrepError(f"{job_dir}: unit {name} of {streams[lane.file].path} is missing; rerun "
                                    f"the prep job with the same arguments to complete it")
                names.append(name)
    return names


def finalize(job_dir: Path, streams: list[Stream], args: dict, tok, layout: Layout, dtype: np.dtype,
             tokenizer_source: str) -> dict:
    state = job_dir / STATE
    units = check_units(job_dir, streams, args["docs_per_unit"], [Lane(f) for f in range(len(streams))])
    markers = [_read_json(state / "units" / f"{u}.json") for u in units]
    read = sum(m["read"] for m in markers)
    written = sum(m["written"] for m in markers)
    skipped = {r: sum(m["skipped"][r] for m in markers) for r in SKIP_REASONS}
    n_docs = sum(_read_json(state / "files" / f"f{f:06d}.json")["docs"] for f in range(len(streams)))
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
    lock_fd = lock(out)
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
        os.close(lock_fd)
