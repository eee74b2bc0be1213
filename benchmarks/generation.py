"""Generation speed: incremental decoding (m2train.models.decoding) vs recomputing the whole prefix for every
token, for M2-GPT and, as a reference, the GPT baseline with its KV cache.

For each model and context length P: a random prompt of P tokens is decoded in one call ("prefill"), then
`--tokens` single-token steps follow ("step", the median per token). "Recompute" is what generation costs
without a cache: one full forward over P tokens per new token (the median of max(1, `--tokens` // 2) forwards
at length P: each costs as much as the whole prefill).
Eval mode, torch.inference_mode, batch 1, random weights (speed does not depend on them). Models are timed one
after another; the speedup is recompute / step within the same model and length.

    .venv/bin/python benchmarks/generation.py                                   # the RESULTS table
    .venv/bin/python benchmarks/generation.py --configs m2_gpt_tiny --contexts 64 128 --tokens 4 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2train.config import load_config  # noqa: E402
from m2train.models import build_model  # noqa: E402
from model_throughput import write_results  # noqa: E402

HEADING = "## generation (CPU)"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model, P: int, tokens: int) -> dict:
    """Seconds: prefill of P tokens, median cached step after it, median full forward at length P."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, P))
    with torch.inference_mode():
        model(prompt[:, :8])                                                   # warm-up
        state = model.new_decode_state(1, P + tokens)
        prefill = _timed(lambda: model.decode(prompt, state))
        nxt = torch.randint(0, vocab, (1, 1))
        steps = [_timed(lambda: model.decode(nxt, state)) for _ in range(tokens)]
        recompute = [_timed(lambda: model(prompt)) for _ in range(max(1, tokens // 2))]
    return {"prefill": prefill, "step": statistics.median(steps), "recompute": statistics.median(recompute)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["m2_gpt_145m", "gpt_125m"],
                    help="configs to time (default: M2-GPT-145M and the GPT-125M baseline)")
    ap.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 2048], help="prompt lengths")
    ap.add_argument("--tokens", type=int, default=8, help="decoding steps timed per length (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for name in args.configs:
        contexts = sorted(args.contexts)
        cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"),
                          [f"model.max_seq_len={max(contexts) + args.tokens}", "model.hidden_dropout=0.0"])
        model = build_model(cfg.model).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for P in contexts:
            r = measure(model, P, args.tokens)
            row = (name, f"{params:.0f}M", P, r["prefill"] * 1e3, r["step"] * 1e3, r["recompute"] * 1e3,
                   r["recompute"] / r["step"])
            rows.append(row)
            print("{} ({}) P={}: prefill {:.0f} ms, step {:.1f} ms/token, recompute {:.0f} ms/token, "
                  "{:.1f}x".format(*row), flush=True)

    load = os.getloadavg()[0]
    table = [HEADING, "",
             "- Command: `" + " ".join([".venv/bin/python benchmarks/generation.py", *sys.argv[1:]]) + "`",
             f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, eval, inference_mode.",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; 1-min load average "
             f"{load:.1f} after the run.",
             f"- step: median of {args.tokens} single-token incremental decoding steps after the prompt; recompute: "
             "median full forward over the prompt (what each token costs without a cache).", "",
             "| config | params | context P | prefill (ms) | step (ms/token) | recompute (ms/token) | speedup |",
             "|---|---|---|---|---|---|---|"]
    table += ["| {} | {} | {} | {:.0f} | {:.1f} | {:.0f} | {:.1f}x |".format(*r) for r in rows]
    text = "\n".join(table) + "\n"
    print("\n" + text)
    if not args.no_write:
        write_results(text, ROOT / "benchmarks" / "RESULTS.md", HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
