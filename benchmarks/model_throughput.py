"""Encoder forward throughput on CPU: M2-BERT-80M vs our BERT-base (SDPA) vs, when installed, Hugging Face
`transformers.BertModel` (attn_implementation="sdpa").

What is timed: the encoder only (embeddings through the last layer, no MLM head), `model.bert(input_ids)`,
fp32, eval mode, under torch.inference_mode, with a fixed number of tokens per batch (batch = tokens / L).
Models are timed interleaved (one forward of each per round) so that load from other processes on the
machine hits all of them alike; the figure is the median over rounds, after warm-up forwards.

Two M2 rows: "M2-BERT-80M" is the model as it runs by default (kernel spectra computed on the first
forward and reused while the filter parameters are unchanged, which is what repeated inference does);
"M2 (filters recomputed)" disables that reuse, i.e. the filter MLP and kernel FFT run in every forward, as in
training.

Also reported: forward FLOPs per token (m2train.models.flops, encoder components only; attention counted
as QKᵀ and AV matmuls), achieved GFLOP/s, its fraction of the fp32 matmul rate measured in the same run
(2048×2048 @ 2048×2048 torch.mm, median of several, measured before every L), and the growth of M2 time per
token from L=1024 to the largest L.

    .venv/bin/python benchmarks/model_throughput.py                      # full table, ~20-30 min
    .venv/bin/python benchmarks/model_throughput.py --lengths 128 1024 --repeats 2 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2train.config import load_config  # noqa: E402
from m2train.models import build_model  # noqa: E402

HEADING = "## model_throughput (CPU)"


# ---------------------------------------------------------------- FLOPs ------------------------------

def encoder_flops_per_token(model_cfg, L: int, batch: int) -> tuple[float, float]:
    """(total, matmul-only) forward FLOPs per token of the encoder (no MLM head)."""
    try:
        from m2train.models.flops import flop_items
    except ImportError:                                    # helper not available: own analytic count
        return _fallback_flops(model_cfg, L)
    items = [it for it in flop_items(model_cfg, L, batch_size=batch) if not it.component.startswith("head.")]
    return sum(it.flops for it in items), sum(it.flops for it in items if it.kind == "matmul")


def _fallback_flops(cfg, L: int) -> tuple[float, float]:
    """GEMMs (+ attention scores or FFT convolutions) only: 2 FLOPs per multiply-add."""
    H, I, N = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    if cfg.arch == "bert":
        mm = 2 * (4 * H * H + 2 * H * I) + 4 * L * H
        return N * mm, N * mm
    n = 1 << (2 * L - 1).bit_length()
    fft = 2 * H * (2 * 2.5 * n * torch.log2(torch.tensor(float(n))).item() + 6 * (n // 2 + 1)) / L
    mm = 2 * (4 * H * H) + 2 * 3 * H * I / cfg.mlp_nblocks
    return N * (mm + fft), N * mm


# ---------------------------------------------------------------- models -----------------------------

def ours(config: str, L: int):
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [f"model.max_seq_len={L}"]).model
    model = build_model(cfg).eval()
    return model.bert, cfg


def m2_recomputing_filters(L: int):
    from m2train.models.mixer import LongConv
    encoder, cfg = ours("m2_bert_80m", L)
    for m in encoder.modules():
        if isinstance(m, LongConv):
            m.cache_spectrum = False
    return encoder, cfg


def hf_bert(L: int):
    """transformers.BertModel with BERT-base shapes, random init (nothing downloaded), SDPA attention."""
    from transformers import BertConfig, BertModel
    hf_cfg = BertConfig(vocab_size=30528, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=L, attn_implementation="sdpa")
    model = BertModel(hf_cfg, add_pooling_layer=False).eval()
    return model, None


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- timing -----------------------------

def matmul_gflops(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / statistics.median(times) / 1e9


def time_interleaved(fns: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of every fn, calling them round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(args) -> list[dict]:
    rows = []
    with_hf = not args.no_hf and hf_available()
    if not args.no_hf and not with_hf:
        print("transformers not importable: skipping the Hugging Face BertModel rows", flush=True)
    for L in args.lengths:
        B = max(1, args.tokens // L)
        tokens = B * L
        builders = {"M2-BERT-80M": lambda: ours("m2_bert_80m", L)}
        if not args.no_recompute:
            builders["M2 (filters recomputed)"] = lambda: m2_recomputing_filters(L)
        builders["BERT-base (ours, SDPA)"] = lambda: ours("bert_base", L)
        if with_hf:
            builders["HF BertModel (SDPA)"] = lambda: hf_bert(L)
        models = {name: build() for name, build in builders.items()}
        ids = torch.randint(1, 30522, (B, L), generator=torch.Generator().manual_seed(0))
        gflops_mm = matmul_gflops()
        with torch.inference_mode():
            fns = {name: (lambda m=m: m(ids)) for name, (m, _) in models.items()}
            secs = time_interleaved(fns, args.warmup, args.repeats)
        gflops_mm = statistics.median([gflops_mm, matmul_gflops()])       # before and after this L
        bert_cfg = models["BERT-base (ours, SDPA)"][1]
        for name, (_, cfg) in models.items():
            total, mm = encoder_flops_per_token(cfg if cfg is not None else bert_cfg, L, B)
            tok_s = tokens / secs[name]
            rows.append(dict(model=name, L=L, batch=B, tok_s=tok_s, ms_per_ktok=1e6 / tok_s,
                             mflop_tok=total / 1e6, mm_mflop_tok=mm / 1e6, gflops=total * tok_s / 1e9,
                             mm_rate=gflops_mm))
            print(f"L={L:5d} B={B:3d} {name:26s} {tok_s:9.0f} tok/s  {total * tok_s / 1e9:6.1f} GFLOP/s "
                  f"(matmul rate {gflops_mm:.0f})", flush=True)
        del models
    return rows


# ---------------------------------------------------------------- report -----------------------------

def report(rows: list[dict], args, elapsed: float) -> str:
    lines = ["| L | batch | model | tokens/s | speedup vs BERT-base | FLOP/token (M) | of which matmul (M) "
             "| GFLOP/s | % of matmul rate |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["L"], r["model"]): r for r in rows}
    for r in rows:
        base = by[(r["L"], "BERT-base (ours, SDPA)")]
        lines.append(f"| {r['L']} | {r['batch']} | {r['model']} | {r['tok_s']:.0f} | "
                     f"{r['tok_s'] / base['tok_s']:.2f}x | {r['mflop_tok']:.0f} | {r['mm_mflop_tok']:.0f} | "
                     f"{r['gflops']:.0f} | {100 * r['gflops'] / r['mm_rate']:.0f}% |")
    rates = [r["mm_rate"] for r in rows if r["model"] == "M2-BERT-80M"]
    lines += ["", f"fp32 matmul rate (2048³ torch.mm, median of 5, before and after each L): "
                  f"{min(rates):.0f}–{max(rates):.0f} GFLOP/s (median {statistics.median(rates):.0f})."]
    lines += ["", *targets(by, args.lengths)]
    lines += ["", f"Total benchmark time {elapsed / 60:.1f} min."]
    return "\n".join(lines)


def targets(by: dict, lengths: list[int]) -> list[str]:
    out = ["Targets (M2-BERT-80M, default = spectra reused across forwards; recomputed in brackets):"]

    def speedup(L, name="M2-BERT-80M"):
        return by[(L, name)]["tok_s"] / by[(L, "BERT-base (ours, SDPA)")]["tok_s"]

    def alt(fn, L):
        key = (L, "M2 (filters recomputed)")
        return f" [{fn(L, 'M2 (filters recomputed)'):.2f}x]" if key in by else ""

    for L, goal in ((4096, 2.5), (8192, 3.5)):
        if L in lengths:
            s = speedup(L)
            out.append(f"- L={L}: {s:.2f}x BERT-base{alt(speedup, L)} (target ≥ {goal}x): "
                       f"{'met' if s >= goal else 'NOT met'}")
    big = max(lengths)
    if 1024 in lengths and big > 1024:
        def growth(L, name="M2-BERT-80M"):
            return by[(1024, name)]["tok_s"] / by[(L, name)]["tok_s"]
        g = growth(big)
        grow_alt = ""
        if (big, "M2 (filters recomputed)") in by:
            grow_alt = f" [{growth(big, 'M2 (filters recomputed)'):.2f}x]"
        out.append(f"- M2 time per token L=1024 → {big}: ×{g:.2f}{grow_alt} (target ≤ 1.6): "
                   f"{'met' if g <= 1.6 else 'NOT met'}")
    fracs = {L: by[(L, "M2-BERT-80M")]["gflops"] / by[(L, "M2-BERT-80M")]["mm_rate"] for L in lengths}
    worst = min(fracs, key=fracs.get)
    out.append(f"- M2 achieved / matmul rate (total counted FLOPs): {', '.join(f'L={L} {100 * f:.0f}%' for L, f in fracs.items())} "
               f"(target ≥ 60%): {'met' if fracs[worst] >= 0.6 else f'NOT met at L={worst}'}")
    return out


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except Exception:
        name = platform.processor() or "unknown"
    return f"{os.cpu_count()}-core CPU, lscpu model name: {name}"


def write_results(text: str, path: Path, heading: str = HEADING) -> None:
    """Move a benchmark's section of RESULTS.md (`heading` to the next '## ', default `## model_throughput
    (CPU)`) to the end with `text` as its new content, or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(heading)
    if start >= 0:
        end = old.find("\n## ", start + len(heading))
        old = old[:start].rstrip() + ("\n\n" + old[end + 1:] if end >= 0 else "")
    path.write_text(old.rstrip() + "\n\n" + text.rstrip() + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (batch = tokens // L)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-hf", action="store_true", help="skip transformers.BertModel even if installed")
    p.add_argument("--no-recompute", action="store_true", help="skip the filters-recomputed M2 row")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    rows = run(args)
    elapsed = time.perf_counter() - t0
    table = report(rows, args, elapsed)
    load_after = os.getloadavg()
    command = "cd /work/main && .venv/bin/python benchmarks/model_throughput.py " + " ".join(sys.argv[1:])
    header = "\n".join([
        HEADING, "",
        f"- Command: `{command.strip()}`",
        f"- Machine: {machine()}; torch {torch.__version__}, {args.threads} threads, fp32, "
        f"{args.tokens} tokens per batch, median of {args.repeats} interleaved rounds after {args.warmup} warm-up.",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; 1-min load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after (other processes share these 2 cores).",
        "- Encoder only (`model.bert(input_ids)`, no MLM head), eval, torch.inference_mode.", ""])
    print("\n" + header + "\n" + table)
    if not args.no_write:
        write_results(header + "\n" + table, args.results)
        print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
