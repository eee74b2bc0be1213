"""Training-engine benchmarks on the CPU (issue 4):

  memory    (b) one M2-GPT-145M training step (forward + backward) at seq 2048, batch 1, with and without
            activation checkpointing. Each variant runs in a fresh subprocess and reports
              - peak RSS delta: VmHWM during the step minus VmRSS just before it (the peak is reset with
                /proc/self/clear_refs first; gradients are allocated before, as they are the same either
                way), i.e. activations + backward temporaries;
              - saved-activation bytes: what autograd holds for backward when the forward returns
                (m2train.parallel.activation_checkpointing.saved_activation_bytes: saved tensors plus the
                inputs checkpointed blocks keep, once per storage, weights excluded).
            Target: at least 40% less activation memory with checkpointing (every_block).
  zero3     (c) per-rank bytes of parameters + optimizer state under ZeRO-3 at 2 ranks vs 1 rank: real
            DeepSpeed engines built exactly as `m2train train` builds them (m2train.train.engine), one
            optimizer step taken so Adam's moments exist, then every tensor a rank holds for the model is
            counted once per storage: parameter partitions (p.ds_tensor and the flat partition buffers),
            parameters ZeRO-3 keeps whole on every rank (small ones, below the persistence threshold),
            the fp32 master partitions and the optimizer state. Target: 2-rank <= 55% of 1-rank.
  overhead  (a) tokens/s of `m2train train` (subprocess, read from RUN_DIR/metrics.jsonl) vs a bare
            PyTorch loop (same model, optimizer, data loader, clipping; no DeepSpeed), single process,
            alternating runs; the ratio of medians. Then, in one process, Trainer.train_step and a bare
            step alternate every step (load changes hit both alike). Target >= 0.95.

    python benchmarks/training.py memory                 # M2-GPT-145M, L=2048, none vs every_block vs mixer
    python benchmarks/training.py zero3                  # M2-GPT-145M, 1 vs 2 ranks
    python benchmarks/training.py overhead --repeats 3   # tiny M2-GPT on the sample corpus
    python benchmarks/training.py memory --config m2_gpt_tiny --seq-len 256   # a quick smoke run

Results are printed as Markdown; benchmarks/RESULTS.md "## training (CPU)" records them with the command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1 << 20


def _clean_env(**extra) -> dict:
    """Environment for child processes: no launcher variables inherited, CPU DeepSpeed, no hubs."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------------
# (b) activation memory
# ------------------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(args) -> None:
    import torch

    from m2train.config import load_config
    from m2train.models import build_model
    from m2train.parallel.activation_checkpointing import (apply_activation_checkpointing,
                                                           checkpointed_module_names, saved_activation_bytes)

    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model).train()
    apply_activation_checkpointing(model, args.mode, cfg.train.checkpoint_every_k)
    names = checkpointed_module_names(model)
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len))
    # Warm-up on a short sequence, in every variant alike: lazy imports (non-reentrant checkpoint pulls in
    # parts of torch._dynamo, ~150 MB of RSS, on first use), thread pools and allocator arenas must not be
    # counted as the step's activation memory.
    from torch.utils.checkpoint import checkpoint
    x = torch.ones(4, requires_grad=True)
    checkpoint(torch.sin, x, use_reentrant=False).sum().backward()
    warm = ids[:, :min(64, args.seq_len)]
    model(input_ids=warm, labels=warm).loss.backward()
    for p in model.parameters():            # same in both variants: not activation memory
        p.grad = torch.zeros_like(p)
    gc.collect()

    # Peak RSS first, in a process that has not run a step yet (a second step could reuse heap memory the
    # first one left resident and understate its own peak).
    base_kb = _status_kb("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    t_fwd = time.perf_counter() - t0
    loss.backward()
    t_step = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    del loss
    gc.collect()
    saved = saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    print("RESULT " + json.dumps({
        "mode": args.mode, "checkpointed": len(names), "params": model.num_parameters(),
        "peak_delta_mb": (peak_kb - base_kb) / 1024, "exact_peak": exact_peak, "base_rss_mb": base_kb / 1024,
        "saved_mb": saved / MB, "fwd_s": t_fwd, "step_s": t_step}), flush=True)


def run_memory(args) -> None:
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "_memory_worker", "--config", args.config, "--mode", mode,
               "--seq-len", str(args.seq_len), "--batch", str(args.batch), *args.overrides]
        print(f"[memory] {mode}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"memory worker ({mode}) failed:\n{proc.stderr[-4000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT "):]))
    ref = next((r for r in rows if r["mode"] == "none"), rows[0])
    print(f"\n{args.config}, {ref['params'] / 1e6:.1f}M params, batch {args.batch} x seq {args.seq_len}, fp32; "
          f"RSS before the step {ref['base_rss_mb']:.0f} MB (weights + zeroed grads)"
          + ("" if ref["exact_peak"] else "; WARNING: VmHWM could not be reset, peak includes model build"))
    print("\n| mode | checkpointed modules | peak RSS delta MB | vs none | saved-for-backward MB | vs none "
          "| fwd s | fwd+bwd s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['checkpointed']} | {r['peak_delta_mb']:.0f} | "
              f"{r['peak_delta_mb'] / ref['peak_delta_mb']:.2f}x | {r['saved_mb']:.0f} | "
              f"{r['saved_mb'] / ref['saved_mb']:.2f}x | {r['fwd_s']:.1f} | {r['step_s']:.1f} |")


# ------------------------------------------------------------------------------------------------------
# (c) ZeRO-3 per-rank bytes
# ------------------------------------------------------------------------------------------------------

def _storage_key(t) -> tuple[int, int] | None:
    if t is None or t.numel() == 0:
        return None
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def zero3_worker(args) -> None:
    import deepspeed
    import torch

    from m2train.config import load_config
    from m2train.launch import init_distributed
    from m2train.models import build_model
    from m2train.optim import build_optimizer
    from m2train.train.engine import deepspeed_config

    env = init_distributed()
    torch.manual_seed(0)
    cfg = load_config(args.config, [*args.overrides, "parallel.zero_stage=3", "train.micro_batch_size=1",
                                    "train.grad_accum_steps=1"])
    model = build_model(cfg.model)
    n_params = model.num_parameters()
    optimizer = build_optimizer(model, cfg.optim)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                config=deepspeed_config(cfg, env.world_size),
                                                dist_init_required=False)
    ids = torch.randint(0, cfg.model.vocab_size, (1, args.seq_len))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()                        # Adam moments exist only after the first step

    seen: set = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            key = _storage_key(t)
            if key is not None and key[0] not in seen:
                seen.add(key[0])
                total += key[1]
        return total

    params = list(model.parameters())
    partitions = count([p.ds_tensor for p in params]) + count(getattr(ds_opt, "fp16_partitioned_groups_flat", []))
    whole = count([p.data for p in params])          # after step: only persistent (small) params are whole
    master = count(getattr(ds_opt, "fp32_partitioned_groups_flat", []))
    state = count([v for st in ds_opt.optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor)])
    result = {"rank": env.rank, "world": env.world_size, "params": n_params, "partitions": partitions,
              "persistent_whole": whole, "fp32_master": master, "optimizer_state": state,
              "total": partitions + whole + master + state,
              "persistent_count": sum(p.data.numel() > 0 for p in params)}
    with open(os.path.join(os.environ["RESULT_DIR"], f"w{env.world_size}_r{env.rank}.json"), "w") as f:
        json.dump(result, f)


def run_zero3(args) -> None:
    from m2train.launch import free_port

    out = Path(tempfile.mkdtemp(prefix="m2_zero3_"))
    results = {}
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "_zero3_worker",
               "--config", args.config, "--seq-len", str(args.seq_len), *args.overrides]
        print(f"[zero3] {world} rank(s)", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=_clean_env(RESULT_DIR=str(out), OMP_NUM_THREADS=str(max(1, 2 // world))),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"zero3 worker ({world} ranks) failed:\n{proc.stderr[-4000:]}")
        results[world] = [json.loads((out / f"w{world}_r{r}.json").read_text()) for r in range(world)]
    one = results[1][0]
    print(f"\n{args.config}, {one['params'] / 1e6:.1f}M params, fp32 engine (torch AdamW client optimizer), "
          f"ZeRO-3, {one['persistent_count']} small parameters kept whole on every rank")
    print("\n| ranks | rank | param partitions MB | whole (persistent) params MB | fp32 master MB | optimizer "
          "state MB | total MB | vs 1 rank |")
    print("|---|---|---|---|---|---|---|---|")
    for world in (1, 2):
        for r in results[world]:
            print(f"| {world} | {r['rank']} | {r['partitions'] / MB:.1f} | {r['persistent_whole'] / MB:.1f} | "
                  f"{r['fp32_master'] / MB:.1f} | {r['optimizer_state'] / MB:.1f} | {r['total'] / MB:.1f} | "
                  f"{r['total'] / one['total']:.3f} |")


# ------------------------------------------------------------------------------------------------------
# (a) trainer overhead
# ------------------------------------------------------------------------------------------------------

def _prepare_data(args) -> str:
    """A prepared dataset: --data, else the embedded sample corpus (`m2train sample-data`), else a
    random-token fixture dataset (tests/data_fixtures.py) of the model's vocab and --seq-len."""
    if args.data:
        return args.data
    out = Path(tempfile.mkdtemp(prefix="m2_overhead_data_"))
    print("[overhead] preparing the sample corpus (m2train sample-data)", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "m2train", "sample-data", str(out / "sample"), "--seq-len",
                           str(args.seq_len), "--no-progress"], env=_clean_env(), capture_output=True, text=True)
    if proc.returncode == 0 and (out / "sample" / "gpt" / "prep_stats.json").exists():
        return str(out / "sample" / "gpt")
    print("[overhead] `m2train sample-data` failed; using a random-token fixture dataset:\n"
          + proc.stderr[-2000:], file=sys.stderr)
    sys.path.insert(0, str(ROOT / "tests"))
    from data_fixtures import make_id_dataset

    from m2train.config import load_config
    vocab = load_config(args.config, args.overrides).model.vocab_size
    return str(make_id_dataset(out / "fixture", "gpt_packed", n_train=4096, n_val=16,
                               seq_len=args.seq_len, vocab_size=vocab))


class BareLoop:
    """The reference: a plain PyTorch training loop, as short as it can be (model, optimizer and loader
    built as the trainer builds them, then forward, backward, clip, step)."""

    def __init__(self, cfg) -> None:
        import torch

        from m2train.data import build_dataloader
        from m2train.models import build_model
        from m2train.optim import build_optimizer

        self.cfg = cfg
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model).train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.loader = iter(build_dataloader(cfg.data, "train", cfg.train.micro_batch_size, seed=cfg.train.seed,
                                            cache_dir=tempfile.mkdtemp(prefix="m2_bare_cache_")))

    def step(self) -> int:
        """One training step; returns its token count."""
        import torch

        batch = next(self.loader)
        loss = self.model(**batch).loss
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()
        return batch["input_ids"].numel()


def bare_loop_worker(args) -> None:
    """The bare loop alone, step by step timed."""
    from m2train.config import load_config

    bare = BareLoop(load_config(args.config, [*args.overrides, f"data.path={args.data}"]))
    times, tokens = [], []
    for _ in range(args.steps):
        t0 = time.time()
        tokens.append(bare.step())
        times.append(time.time() - t0)
    skip = args.warmup
    print("RESULT " + json.dumps({"tokens_per_s": sum(tokens[skip:]) / sum(times[skip:])}), flush=True)


def interleaved_worker(args) -> None:
    """One process, step by step: the trainer's own train_step (DeepSpeed ZeRO-0 engine, all-reduce of the
    step statistics, grad norm + clipping, LR schedule, its data loader) and a bare step (same model init,
    optimizer, loader) alternate, so a change in background load hits both alike. Complements the
    whole-CLI comparison on a shared machine; excludes only the CLI's logging between steps."""
    from m2train.config import load_config
    from m2train.launch import init_distributed
    from m2train.train.trainer import Trainer, prepare
    from m2train.train.validate import resolve_batch

    run_dir = tempfile.mkdtemp(prefix="m2_overhead_interleaved_")
    cfg = load_config(args.config, [*args.overrides, f"data.path={args.data}", f"train.run_dir={run_dir}",
                                    "train.eval_every=0", "train.save_every=0", "train.wandb=disabled",
                                    "train.tensorboard=false", "parallel.zero_stage=0", "train.warmup_steps=0",
                                    # train_step() is called directly, so nothing logs; 1 is valid at any
                                    # --steps (the default 10 is refused when --steps < 10)
                                    "train.log_every=1", f"train.max_steps={args.steps}"])
    info = prepare(cfg)
    dp = resolve_batch(cfg, 1)
    trainer = Trainer(cfg, init_distributed(cfg.parallel.backend), dp, info)
    trainer.build()
    bare = BareLoop(cfg)
    t_tr, t_bare, tokens = 0.0, 0.0, 0
    for step in range(args.steps):
        t0 = time.time()
        stats = trainer.train_step()
        trainer.progress.step += 1
        t1 = time.time()
        bare.step()
        t2 = time.time()
        if step >= args.warmup:
            t_tr += t1 - t0
            t_bare += t2 - t1
            tokens += stats["tokens"]
    print("RESULT " + json.dumps({"trainer": tokens / t_tr, "bare": tokens / t_bare}), flush=True)


def _trainer_tokens_per_s(args, run_dir: Path) -> float:
    overrides = [*args.overrides, f"data.path={args.data}", f"train.run_dir={run_dir}",
                 f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", "train.eval_every=0",
                 "train.save_every=0", "train.wandb=disabled", "parallel.zero_stage=0",
                 # the LR schedule's shape costs nothing; only its warmup must fit into a short run
                 "train.warmup_steps=0"]
    proc = subprocess.run([sys.executable, "-m", "m2train", "train", args.config, *overrides],
                          env=_clean_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"m2train train failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    records = [r for r in records if "tokens_per_s" in r and r["step"] > args.warmup]
    if not records:
        sys.exit(f"no tokens_per_s records after step {args.warmup} in {run_dir / 'metrics.jsonl'}")
    # tokens_per_s is per logging interval; intervals are equally long, so the mean is the overall rate.
    return statistics.mean(r["tokens_per_s"] for r in records)


def run_overhead(args) -> None:
    if args.warmup % args.log_every:
        sys.exit("--warmup must be a multiple of --log-every (the trainer reports per logging interval)")
    args.data = _prepare_data(args)
    trainer, bare = [], []
    for i in range(args.repeats):          # alternate, so background load hits both alike
        run_dir = Path(tempfile.mkdtemp(prefix="m2_overhead_run_"))
        trainer.append(_trainer_tokens_per_s(args, run_dir))
        cmd = [sys.executable, __file__, "_bare_worker", "--config", args.config, "--data", args.data,
               "--steps", str(args.steps), "--warmup", str(args.warmup), *args.overrides]
        proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bare loop failed:\n{proc.stderr[-4000:]}")
        bare.append(json.loads(next(ln for ln in proc.stdout.splitlines()
                                    if ln.startswith("RESULT "))[len("RESULT "):])["tokens_per_s"])
        print(f"[overhead] round {i + 1}: trainer {trainer[-1]:,.0f} tok/s, bare {bare[-1]:,.0f} tok/s",
              file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "_interleaved_worker", "--config", args.config, "--data", args.data,
           "--steps", str(args.steps), "--warmup", str(args.warmup), *args.overrides]
    print("[overhead] interleaved trainer.train_step / bare step in one process", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True)
    inter = None
    if proc.returncode == 0:
        inter = json.loads(next(ln for ln in proc.stdout.splitlines()
                                if ln.startswith("RESULT "))[len("RESULT "):])
    else:
        print(f"[overhead] interleaved run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    t, b = statistics.median(trainer), statistics.median(bare)
    print(f"\n{args.config}, data {args.data}, {args.steps} steps per run (first {args.warmup} excluded), "
          f"{args.repeats} alternating rounds")
    print("\n| run | tokens/s per round | median |")
    print("|---|---|---|")
    print(f"| m2train train (ZeRO-0 engine) | {', '.join(f'{x:,.0f}' for x in trainer)} | {t:,.0f} |")
    print(f"| bare PyTorch loop | {', '.join(f'{x:,.0f}' for x in bare)} | {b:,.0f} |")
    print(f"\ntrainer / bare = {t / b:.3f}")
    if inter is not None:
        print(f"\nInterleaved in one process (Trainer.train_step vs bare step, alternating every step): "
              f"trainer {inter['trainer']:,.0f} tok/s, bare {inter['bare']:,.0f} tok/s, "
              f"ratio {inter['trainer'] / inter['bare']:.3f}")


# ------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("memory", help="(b) activation memory of one training step, per checkpointing mode")
    p.add_argument("--config", default="m2_gpt_145m", help="model config (default m2_gpt_145m)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--modes", nargs="+", default=["none", "every_block", "mixer"],
                   help="activation checkpointing modes to compare (default: none every_block mixer)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.num_layers=4")

    p = sub.add_parser("_memory_worker", help=argparse.SUPPRESS)
    p.add_argument("--config", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("zero3", help="(c) per-rank parameter + optimizer-state bytes, ZeRO-3, 1 vs 2 ranks")
    p.add_argument("--config", default="m2_gpt_145m", help="model config (default m2_gpt_145m)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="sequence length of the one step taken to create optimizer state (default 128)")
    p.add_argument("overrides", nargs="*", help="config overrides")

    p = sub.add_parser("_zero3_worker", help=argparse.SUPPRESS)
    p.add_argument("--config", required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("overhead", help="(a) tokens/s of `m2train train` vs a bare PyTorch loop")
    p.add_argument("--config", default="m2_gpt_tiny", help="model config (default m2_gpt_tiny)")
    p.add_argument("--data", default=None,
                   help="prepared dataset (default: `m2train sample-data` into a temp dir, else a "
                        "random-token fixture)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="sequence length of the prepared sample corpus (default 256)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    p.add_argument("--warmup", type=int, default=10, help="first steps excluded from the rate (default 10)")
    p.add_argument("--log-every", type=int, default=10, help="trainer logging interval (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="alternating trainer/bare rounds (default 3)")
    p.add_argument("overrides", nargs="*", help="config overrides applied to both, e.g. "
                                                "train.micro_batch_size=16")

    p = sub.add_parser("_bare_worker", help=argparse.SUPPRESS)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("_interleaved_worker", help=argparse.SUPPRESS)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("overrides", nargs="*")

    args = parser.parse_args(argv)
    {"memory": run_memory, "_memory_worker": memory_worker, "zero3": run_zero3, "_zero3_worker": zero3_worker,
     "overhead": run_overhead, "_bare_worker": bare_loop_worker,
     "_interleaved_worker": interleaved_worker}[args.command](args)


if __name__ == "__main__":
    main()
