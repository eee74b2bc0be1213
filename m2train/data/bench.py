"""Loader throughput: how many samples/s `build_dataloader` delivers from a prepared dataset.

    python -m m2train.data.bench PATH [--split train] [--micro-batch-size 8] [--workers 0 2] [--batches 200]

Start-up (dataset construction, first batch: index download, shard decompression, worker start) and the
one-off `import streaming` are reported separately from the steady rate, which is what a training loop
sees after its first step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Optional


def measure_loader_throughput(path: str, split: str = "train", micro_batch_size: int = 8, num_workers: int = 0,
                              batches: int = 200, cache_dir: Optional[str] = None, seed: int = 0,
                              progress: bool = False) -> dict:
    """Time `batches` batches (crossing epochs if needed) from a fresh loader; returns a dict of figures."""
    from tqdm import tqdm

    from ..config import DataConfig
    from .loader import build_dataloader

    cfg = DataConfig(path=str(path), num_workers=num_workers)
    t_import = time.perf_counter()
    import streaming  # noqa: F401  (its import alone takes seconds: reported apart from loader start-up)
    import_s = time.perf_counter() - t_import
    with tempfile.TemporaryDirectory(prefix="m2train-bench-") as tmp:
        t0 = time.perf_counter()
        loader = build_dataloader(cfg, split=split, micro_batch_size=micro_batch_size, seed=seed,
                                  cache_dir=cache_dir or tmp)
        it = iter(loader)
        first = next(it)
        t_first = time.perf_counter()
        tokens_per_batch = int(first["input_ids"].numel())
        n = 0
        samples = 0
        bar = tqdm(total=batches, desc=f"loader w={num_workers}", unit="batch", disable=not progress)
        t1 = time.perf_counter()
        while n < batches:
            try:
                b = next(it)
            except StopIteration:  # val: one pass; start another
                it = iter(loader)
                continue
            samples += int(b["input_ids"].shape[0])
            n += 1
            bar.update(1)
        elapsed = time.perf_counter() - t1
        bar.close()
        loader.close()
    return {
        "path": str(path), "split": split, "layout": loader.info.layout, "seq_len": loader.info.seq_len,
        "micro_batch_size": micro_batch_size, "num_workers": num_workers, "batches": n, "samples": samples,
        "import_s": round(import_s, 3), "startup_s": round(t_first - t0, 3), "steady_s": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 1) if elapsed > 0 else float("inf"),
        "tokens_per_s": round(samples * tokens_per_batch / micro_batch_size / elapsed, 1) if elapsed > 0 else float("inf"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2train.data.bench",
                                description="Measure m2train.data loader throughput on a prepared dataset.")
    p.add_argument("path", help="a dataset folder written by `m2train prep` (holds prep_stats.json, train/, val/)")
    p.add_argument("--split", choices=("train", "val"), default="train", help="which split to read (default train)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="loader worker counts to measure, one run each (default: 0 2)")
    p.add_argument("--batches", type=int, default=200, help="batches timed per run after the first (default 200)")
    p.add_argument("--cache-dir", default=None, help="where decompressed shards go (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")
    args = p.parse_args(argv)
    if not Path(args.path).exists() and "://" not in args.path:
        p.error(f"{args.path} does not exist")
    for w in args.workers:
        r = measure_loader_throughput(args.path, args.split, args.micro_batch_size, w, args.batches,
                                      args.cache_dir, progress=not args.json)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"workers={w}: {r['samples_per_s']:.0f} samples/s, {r['tokens_per_s']:.0f} tokens/s "
                  f"({r['layout']}, seq_len {r['seq_len']}, batch {r['micro_batch_size']}; start-up {r['startup_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
