"""Benchmark of the learned causal Monarch convolution (issue 8) against the FFT long convolution.

Part 1 (`ops`): time of forward and forward+backward, and peak memory, at N = 1K..16K on the CPU, for
    - fft:     m2train.models.longconv.long_conv(x, k)        (zero-padded rFFT of size 2^⌈log2 2N⌉)
    - monarch: CausalMonarchConv(H, N)(x, k), nodes/levels at a non-DFT value, root finder warm-started
               from the previous call's points (as in training); "factors" = the shared per-forward part
               (points, blocks, inverses), timed alone.
    Memory = peak RSS during one forward+backward minus RSS just before it, measured in a fresh
    subprocess per (op, N) (getrusage ru_maxrss; tracemalloc does not see torch's allocations).
Part 2 (`train`): tiny M2-GPT (configs/m2_gpt_tiny.yaml) trained on the BBC News corpus with the FFT mixer
    and with the learned causal Monarch mixer: same seed, same batches, same steps, same initial weights
    (the Monarch convs start at the DFT setting with the FFT model's filters copied, so both models are
    the same function at step 0). The Monarch model is the same config with
    `model.sequence_mixer=monarch_causal`; its node/level parameters are the optimizer group
    "monarch_basis" (lr = base lr × --basis-lr-mult, no weight decay).

    .venv/bin/python benchmarks/causal_monarch.py ops   [--sizes 1024 2048 4096 8192 16384]
    .venv/bin/python benchmarks/causal_monarch.py train [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from m2train.models.causal_monarch import CausalMonarchConv, monarch_factors
from m2train.models.longconv import long_conv


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_op(kind: str, H: int, N: int):
    torch.manual_seed(0)
    k = (torch.randn(H, N) * torch.exp(-torch.arange(N) / (N / 8))).requires_grad_()
    if kind == "fft":
        return (lambda x: long_conv(x, k)), None, k
    conv = CausalMonarchConv(H, N)
    with torch.no_grad():
        conv.node_offsets.normal_(0, 0.02)
        conv.level_log_offsets.normal_(0, 0.01)
    conv.factors()                      # cold start once; later calls warm-start like training steps
    return (lambda x: conv(x, k)), conv, k


def measure_one(kind: str, H: int, N: int, B: int, repeats: int) -> dict:
    """Run in a subprocess: one (op, N) point."""
    op, conv, k = make_op(kind, H, N)
    x = torch.randn(B, H, N, requires_grad=True)
    base = rss_bytes()
    y = op(x)                           # first forward+backward: the memory measurement
    y.square().sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del y
    res = {"kind": kind, "N": N, "H": H, "B": B, "peak_rss_delta_mb": (peak - base) / 2**20}

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        res["fwd_nograd_s"] = best(lambda: op(x))
    res["fwd_s"] = best(lambda: op(x))
    res["fwd_bwd_s"] = best(lambda: op(x).square().sum().backward())
    if conv is not None:
        with torch.no_grad():
            res["factors_s"] = best(conv.factors)
        res["n"] = conv.n
    return res


def run_ops(args) -> list[dict]:
    rows = []
    for N in args.sizes:
        for kind in ("fft", "monarch"):
            cmd = [sys.executable, __file__, "_one", kind, str(N), "--H", str(args.H), "--B", str(args.B),
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| N | n (N'=n²) | FFT fwd ms | FFT fwd+bwd ms | FFT peak MB | Monarch fwd ms | Monarch fwd+bwd ms "
          "| of which factors ms | Monarch peak MB | Monarch fwd+bwd ×/doubling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    prev = None
    for N in sorted({r["N"] for r in rows}):
        f = next(r for r in rows if r["N"] == N and r["kind"] == "fft")
        m = next(r for r in rows if r["N"] == N and r["kind"] == "monarch")
        ratio = f"{m['fwd_bwd_s'] / prev:.2f}" if prev else "–"
        prev = m["fwd_bwd_s"]
        print(f"| {N} | {m['n']} ({m['n'] ** 2}) | {f['fwd_s'] * 1e3:.1f} | {f['fwd_bwd_s'] * 1e3:.1f} | "
              f"{f['peak_rss_delta_mb']:.0f} | {m['fwd_s'] * 1e3:.1f} | {m['fwd_bwd_s'] * 1e3:.1f} | "
              f"{m['factors_s'] * 1e3:.1f} | {m['peak_rss_delta_mb']:.0f} | {ratio} |")


# ------------------------------------------------------------------------------------------------
# training comparison
# ------------------------------------------------------------------------------------------------

def pack(token_lists: list[list[int]], eos_id: int, window: int) -> torch.Tensor:
    """Documents joined with EOS, cut into non-overlapping windows (the partial tail is dropped)."""
    flat = [t for ids in token_lists for t in (*ids, eos_id)]
    n = len(flat) // window
    return torch.tensor(flat[: n * window], dtype=torch.long).view(n, window)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over the windows (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        b = windows[i:i + batch_size]
        total += model(b[:, :-1], labels=b[:, 1:]).loss.item() * b[:, 1:].numel()
        count += b[:, 1:].numel()
    model.train()
    return total / count


def run_train(args) -> dict:
    from m2train.config import load_config
    from m2train.data_prep.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece
    from m2train.models import build_model
    from m2train.optim import build_optimizer
    from m2train.data_prep.sample_corpus import load_articles

    cfg = load_config("m2_gpt_tiny", [f"model.max_seq_len={args.seq_len}"])
    docs = [text for _, _, text in load_articles()]
    source = f"BBC News ({len(docs)} articles)"
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 7]
    val_docs = [d for i, d in enumerate(docs) if i % 20 == 7]
    out = os.path.join(args.out, "tokenizer.model")
    sp = train_sentencepiece(train_docs, out, vocab_size=cfg.model.vocab_size)
    tok = SentencePieceTokenizer(sp)
    train = pack(tok.encode(train_docs), tok.eos_id, args.seq_len + 1)
    val = pack(tok.encode(val_docs), tok.eos_id, args.seq_len + 1)[: args.val_windows]
    print(f"corpus: {source}; {len(train)} train windows, {len(val)} validation windows of {args.seq_len + 1}")

    results = {}
    torch.manual_seed(args.seed)
    fft_init = build_model(cfg.model).state_dict()
    for variant in ("fft", "monarch_causal"):
        vcfg = load_config("m2_gpt_tiny", [f"model.max_seq_len={args.seq_len}",
                                           f"model.sequence_mixer={variant}",
                                           f"optim.monarch_basis_lr={cfg.optim.lr * args.basis_lr_mult}"])
        model = build_model(vcfg.model)
        # identical weights at step 0: the Monarch basis starts at the DFT setting, where it is the FFT conv
        missing, unexpected = model.load_state_dict(fft_init, strict=False)
        assert not unexpected and all(".monarch." in k for k in missing)
        basis = [p for n, p in model.named_parameters() if ".monarch." in n]
        opt = build_optimizer(model, vcfg.optim)
        peaks = [g["lr"] for g in opt.param_groups]
        gen = torch.Generator().manual_seed(args.seed)
        initial = evaluate(model, val, args.batch_size)
        t0 = time.time()
        warmup = max(1, args.steps // 20)
        for step in range(args.steps):
            scale = lr_at(step, args.steps, 1.0, warmup)
            for g, peak in zip(opt.param_groups, peaks):
                g["lr"] = peak * scale
            batch = train[torch.randint(len(train), (args.batch_size,), generator=gen)]
            loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        train_s = time.time() - t0
        val_loss = evaluate(model, val, args.batch_size)
        res = {"initial_val_loss": initial, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
               "last_train_loss": loss.item(), "train_s": train_s, "params": model.num_parameters()}
        if basis:
            convs = [m for m in model.modules() if isinstance(m, CausalMonarchConv)]
            conds, drift = [], []
            for c in convs:
                F = monarch_factors(c.node_offsets, c.level_log_offsets)
                conds.append(max(torch.linalg.cond(F.V).item(), torch.linalg.cond(F.B).max().item()))
                drift.append(max(c.node_offsets.abs().max().item(), c.level_log_offsets.abs().max().item()))
            res.update(max_factor_cond=max(conds), max_basis_offset=max(drift), n=convs[0].n)
        results[variant] = res
        print(variant, json.dumps(res), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("ops")
    o.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    o.add_argument("--H", type=int, default=64)
    o.add_argument("--B", type=int, default=2)
    o.add_argument("--repeats", type=int, default=3)
    one = sub.add_parser("_one")
    one.add_argument("kind")
    one.add_argument("N", type=int)
    one.add_argument("--H", type=int, default=64)
    one.add_argument("--B", type=int, default=2)
    one.add_argument("--repeats", type=int, default=3)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--val-windows", type=int, default=128)
    t.add_argument("--basis-lr-mult", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/bench_causal_monarch")
    args = p.parse_args()
    if args.cmd == "_one":
        print(json.dumps(measure_one(args.kind, args.H, args.N, args.B, args.repeats)))
    elif args.cmd == "ops":
        run_ops(args)
    else:
        run_train(args)


if __name__ == "__main__":
    main()
