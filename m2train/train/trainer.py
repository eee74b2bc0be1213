"""The training loop behind `m2train train`: one DeepSpeed engine path for a laptop process, torchrun, the
deepspeed launcher and srun alike.

Read top to bottom, `train(cfg)`:
  validate (config, dataset, batch layout) -> process group -> model, optimizer, engine -> data loaders
  -> resume from the newest complete checkpoint -> loop:
       micro-batches (forward under autocast, backward) -> one all-reduce of [loss, non-finite,
       stop-signal, time-budget] -> skip or apply the update -> log / eval / save -> stop?
Exact resume on CPU is a design goal, so every piece of state that changes the numbers is either a pure
function of the step (the lr) or saved per rank in the checkpoint (engine/optimizer, data-loader position,
python/numpy/torch RNG, the causal-Monarch root-finder warm start).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, to_plain
from ..parallel.context_parallel import shard_batch
from . import signals
from .engine import (SkippableStep, autocast_context, build_engine, clip_stage0, global_grad_norm_stage0)
from .metrics import MetricsLogger, format_progress, peak_flops_per_device
from .schedule import apply_lr, remember_peak_lrs
from .validate import check_data_compat, check_intervals, resolve_batch

INJECT_NAN_ENV = "M2TRAIN_INJECT_NAN_STEPS"
MAX_ROLLBACKS = 3


class NonFiniteStop(RuntimeError):
    """Too many consecutive non-finite steps (exit code signals.EXIT_NONFINITE)."""


def injected_nan_steps() -> set[int]:
    """Testing aid: M2TRAIN_INJECT_NAN_STEPS=5,6 makes rank 0's loss NaN at steps 5 and 6 (1-based, once
    per process, so a rollback that replays step 5 trains it normally)."""
    raw = os.environ.get(INJECT_NAN_ENV, "").strip()
    if not raw:
        return set()
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError:
        raise ConfigError(f"{INJECT_NAN_ENV}={raw!r}: expected comma-separated step numbers, e.g. 5,6") from None


@dataclass
class Progress:
    """Counters that are saved with every checkpoint."""
    step: int = 0                 # global batches consumed (optimizer steps attempted)
    tokens_seen: int = 0
    skipped_steps: int = 0        # non-finite steps whose update was skipped
    consecutive_nonfinite: int = 0

    @property
    def updates(self) -> int:
        """Updates actually applied: the lr schedule's position (a skipped step does not advance it)."""
        return self.step - self.skipped_steps


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

def replica_seed(seed: int, dp_rank: int, cp_size: int = 1, cp_rank: int = 0) -> int:
    """The training RNG seed of a rank: one stream per (data-parallel replica, CP rank). CP ranks hold other
    positions of the same sequences, so their dropout masks must differ; TP ranks of one (dp, cp) position
    share the stream, so the activations they replicate see the same masks."""
    return seed + 1 + dp_rank * cp_size + cp_rank


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def monarch_warm_starts(model: torch.nn.Module) -> dict:
    """The causal-Monarch root finder's warm-start points (plain attributes, not buffers). They change the
    roots at round-off level, so exact resume needs them saved and restored."""
    return {name: (m._points.clone() if m._points is not None else None)
            for name, m in model.named_modules() if hasattr(m, "_points")}


def restore_monarch_warm_starts(model: torch.nn.Module, saved: dict | None) -> None:
    modules = dict(model.named_modules())
    for name, points in (saved or {}).items():
        if name in modules:
            modules[name]._points = points


def full_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model: a tensor-parallel rank holds 1/T of each sharded tensor (tagged
    `tensor_model_parallel`, split evenly) and all of each replicated one."""
    tp = getattr(model, "tp_size", 1)
    return sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters())


def model_config_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{prefix}.{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]


def _evaluate(model, loader, max_batches: int, precision: str) -> dict:
    """Validation metrics, all-reduced over ranks, prefixed `val_` (val_loss, val_perplexity, ...)."""
    from .evaluate import evaluate
    results = evaluate(model, loader, max_batches,
                       autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    return {k if k.startswith("val_") else f"val_{k}": v for k, v in results.items()}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def prepare(cfg: Config):
    """Everything that can fail cheaply, before the process group or the model exist."""
    from ..data import read_prep_stats

    check_intervals(cfg)
    try:
        info = read_prep_stats(cfg.data.path)
    except (FileNotFoundError, ValueError) as e:    # missing or malformed prep_stats.json (named in e)
        raise ConfigError(f"data.path={cfg.data.path}: {e}") from None
    check_data_compat(cfg, info)
    return info


def train(cfg: Config) -> int:
    """Run (or resume) the configured training; returns the process exit code (see signals)."""
    from ..launch import detect_env, exit_worker, init_distributed, shutdown_distributed

    info = prepare(cfg)
    dp = resolve_batch(cfg, detect_env().world_size)   # reads the launcher's env only: still cheap
    env = init_distributed(cfg.parallel.backend)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model_parallel = cfg.parallel.tensor_parallel * cfg.parallel.context_parallel > 1
    if model_parallel:
        from ..parallel import groups
        groups.init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel)
    trainer = Trainer(cfg, env, dp, info)
    code = trainer.run()
    for loader in (getattr(trainer, "train_loader", None), getattr(trainer, "val_loader", None)):
        if loader is not None:
            loader.close()                      # releases streaming's shared memory now, not at exit
    dist.barrier()
    signals.exit_with_code_on_sigterm(code)   # every rank is done: a launcher's teardown SIGTERM is not a failure
    if model_parallel:
        groups.destroy_model_parallel()
    shutdown_distributed()
    exit_worker(code, env.rank, env.world_size)    # a non-zero code of a multi-process run ends here
    return code


class Trainer:
    def __init__(self, cfg: Config, env, dp: int, info) -> None:
        self.cfg, self.env, self.dp, self.info = cfg, env, dp, info
        self.rank = env.rank
        self.is_main = env.rank == 0
        from ..parallel import groups
        # Data-parallel position (what the loader shards by) and the model-parallel peers of this replica:
        # TP and CP ranks of one replica read the same samples.
        self.dp_rank = groups.dp_rank() if groups.is_initialized() else env.rank
        self.model_parallel = cfg.parallel.tensor_parallel * cfg.parallel.context_parallel
        # Context parallelism: each rank of a CP group runs one sequence chunk of every micro-batch.
        self.cp_group = groups.cp_group() if cfg.parallel.context_parallel > 1 else None
        self.device = torch.device(env.device)
        t = cfg.train
        self.run_dir = Path(t.run_dir or f"runs/{cfg.name}")
        self.ckpt_dir = Path(t.checkpoint_dir) if t.checkpoint_dir else self.run_dir / "checkpoints"
        self.progress = Progress()
        self.stop = signals.StopRequest()
        self.budget = signals.TimeBudget(t.time_budget_s, start=signals.process_start_time())
        self.inject = injected_nan_steps()
        self.rollbacks = 0
        self.last_saved_step = -1
        self.resume_note = ""

    # ---------------------------------------------------------------------------------------------
    def build(self) -> None:
        from ..checkpoint import CheckpointManager
        from ..data import build_dataloader
        from ..models import build_model
        from ..optim import build_optimizer
        from ..parallel import apply_parallelism, groups

        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import yaml
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
        # The same seed on every rank: every rank must build identical initial weights (ZeRO-3 partitions
        # each rank's own copy; stages 0-2 broadcast rank 0's anyway).
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model)
        model = apply_parallelism(model, cfg)
        optimizer = build_optimizer(model, cfg.optim)
        remember_peak_lrs(optimizer.param_groups)
        self.guard = SkippableStep(optimizer)
        self.engine, _ = build_engine(model, optimizer, cfg, self.dp)
        self.model = self.engine.module
        # Dropout / masking randomness from here on (restored exactly on resume): see replica_seed.
        seed_everything(replica_seed(cfg.train.seed, self.dp_rank, groups.cp_size(), groups.cp_rank()))

        cache = cfg.data.local_cache or str(self.run_dir / "data_cache")
        loader_kw = dict(micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                         dp_rank=self.dp_rank, dp_world=self.dp, cache_dir=cache)
        # The train loader is one endless stream across epochs (reshuffled per epoch), so max_steps may
        # exceed an epoch; its state_dict is the exact resume point.
        self.train_loader = build_dataloader(
            cfg.data, split="train", mlm_probability=None if cfg.model.is_causal else cfg.data.mlm_probability,
            info=self.info, **loader_kw)
        self.val_loader = None
        if cfg.train.eval_every:
            self.val_loader = build_dataloader(
                cfg.data, split="val",
                mlm_probability=None if cfg.model.is_causal else cfg.data.eval_mlm_probability,
                info=self.info, **loader_kw)
        self.ckpt = CheckpointManager(self.ckpt_dir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)

    def _layout_note(self) -> str:
        p = self.cfg.parallel
        return ((f", tensor parallel {p.tensor_parallel}" if p.tensor_parallel > 1 else "")
                + (" + sequence parallel" if p.sequence_parallel else "")
                + (f", context parallel {p.context_parallel}" if p.context_parallel > 1 else ""))

    # ---------------------------------------------------------------------------------------------
    def resume(self, *, data: bool = True) -> str | None:
        """Load the newest complete checkpoint, if any; returns its path."""
        from ..checkpoint import read_manifest

        path = self.ckpt.find_latest()
        if path is None:
            return None
        saved_model = (read_manifest(path).get("config") or {}).get("model")
        if saved_model is not None:
            diffs = model_config_differences(saved_model, to_plain(self.cfg.model))
            if diffs:
                raise ConfigError(f"cannot resume from {path}: the model config changed ("
                                  + "; ".join(diffs) + "); use a new train.run_dir or restore the config")
        meta, client = self.ckpt.load(self.engine, path)
        if meta.get("world_changed"):
            self.resume_note = (f" (saved with world {meta['saved_world'].get('world')}, data-parallel "
                                f"{meta['saved_world'].get('dp')}: resharded, data stream continued)")
        self.progress = Progress(step=int(meta["step"]), tokens_seen=int(meta["tokens_seen"]),
                                 skipped_steps=int(client.get("skipped_steps", 0)),
                                 consecutive_nonfinite=int(client.get("consecutive_nonfinite", 0)))
        if data:
            self.train_loader.load_state_dict(client["data"])
        # The manager restored this rank's RNG (python/numpy/torch/cuda), or reseeded it when the
        # data-parallel layout changed.
        restore_monarch_warm_starts(self.model, client.get("monarch_points"))
        self.last_saved_step = self.progress.step
        return str(path)

    def save(self) -> None:
        if self.last_saved_step == self.progress.step:
            return
        t0 = time.time()
        p = self.progress
        client = {"data": self.train_loader.state_dict(),
                  "skipped_steps": p.skipped_steps, "consecutive_nonfinite": p.consecutive_nonfinite,
                  "monarch_points": monarch_warm_starts(self.model)}
        meta = {"config": to_plain(self.cfg), "step": p.step, "tokens_seen": p.tokens_seen,
                "world": {"world": self.env.world_size, "dp": self.dp, "tp": self.cfg.parallel.tensor_parallel,
                          "cp": self.cfg.parallel.context_parallel, "zero_stage": self.cfg.parallel.zero_stage}}
        self.ckpt.save(self.engine, p.step, client, meta)
        self.last_saved_step = p.step
        self.budget.record_save(time.time() - t0)

    # ---------------------------------------------------------------------------------------------
    def _next_micro_batch(self) -> tuple[dict, int]:
        """The next training micro-batch on this rank's device (only this rank's sequence chunk under context
        parallelism) and its whole token count."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.train_loader).items()}
        tokens = batch["input_ids"].numel()
        if self.cp_group is not None:
            batch = shard_batch(batch, self.cp_group)
        return batch, tokens

    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns its (all-reduced) statistics."""
        cfg, engine = self.cfg, self.engine
        step_no = self.progress.step + 1
        accum = cfg.train.grad_accum_steps
        # Accumulated on the device: no host sync until the one all-reduce below.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for micro in range(accum):
            batch, micro_tokens = self._next_micro_batch()
            tokens += micro_tokens
            with autocast_context(cfg, self.device):
                loss = engine(**batch).loss
            if step_no in self.inject and self.rank == 0 and micro == 0:
                loss = loss * float("nan")
            loss_value = loss.detach().double()
            nonfinite += (~torch.isfinite(loss_value)).double()
            loss_sum += loss_value
            engine.backward(loss)
            if micro < accum - 1:
                engine.step()     # inside the accumulation window: DeepSpeed only counts the micro-step
        self.inject.discard(step_no)

        # One collective per step carries everything the ranks must agree on.
        host = torch.tensor([float(tokens), float(self.stop.requested), float(self.budget.exhausted())],
                            dtype=torch.float64, device=self.device)
        flags = torch.cat([loss_sum.view(1), nonfinite.view(1), host])
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        loss_total, n_nonfinite, tokens, stop_signal, budget = flags.cpu().tolist()
        # Every TP / CP rank of a replica reports that replica's whole-batch loss and token count.
        loss_mean = loss_total / (accum * self.dp * self.model_parallel)
        tokens = tokens / self.model_parallel
        skip = n_nonfinite > 0 or not math.isfinite(loss_total)

        grad_norm = None
        if cfg.parallel.zero_stage == 0:
            # Stage 0: grads are already averaged in param.grad; measure (and clip) them here.
            grad_norm = global_grad_norm_stage0(self.model)
            skip = skip or not math.isfinite(grad_norm)
            if not skip and cfg.train.grad_clip:
                clip_stage0(self.model, cfg.train.grad_clip, grad_norm)
        lr_mult = apply_lr(engine.optimizer.param_groups, self.progress.updates, cfg.train)
        self.guard.skip_next, self.guard.applied = skip, False
        engine.step()
        if cfg.parallel.zero_stage > 0:
            gn = engine.get_global_grad_norm()
            grad_norm = None if gn is None else float(gn)
            # ZeRO's own overflow check skips non-finite partitioned grads before our guard is reached.
            skip = skip or not self.guard.applied or (grad_norm is not None and not math.isfinite(grad_norm))
        self.guard.skip_next = False
        return {"loss": loss_mean, "grad_norm": grad_norm, "tokens": int(tokens), "skipped": skip,
                "stop_signal": stop_signal > 0, "budget": budget > 0, "lr": cfg.optim.lr * lr_mult}

    # ---------------------------------------------------------------------------------------------
    def handle_nonfinite(self, stats: dict, logger: MetricsLogger) -> None:
        p, t = self.progress, self.cfg.train
        if p.consecutive_nonfinite < t.max_nonfinite_steps:
            return
        first = p.step - p.consecutive_nonfinite + 1
        what = f"loss {stats['loss']}, grad norm {stats['grad_norm']}"
        if t.on_nonfinite == "rollback" and self.rollbacks < MAX_ROLLBACKS:
            path = self.resume(data=False)
            if path is not None:
                self.rollbacks += 1
                logger.rewind(self.progress.step)
                logger.print(f"step {p.step}: {t.max_nonfinite_steps} consecutive non-finite steps "
                             f"({first}..{p.step}; {what}); rolled back to {path} (step {self.progress.step}), "
                             f"continuing with the next unseen batches (rollback {self.rollbacks}/{MAX_ROLLBACKS})")
                self.progress.consecutive_nonfinite = 0
                return
        last = self.ckpt.find_latest()
        raise NonFiniteStop(
            f"step {p.step}: {p.consecutive_nonfinite} consecutive non-finite steps (steps {first}..{p.step}; "
            f"{what}) >= train.max_nonfinite_steps={t.max_nonfinite_steps}; their updates were skipped and "
            f"the run stops without saving. Last checkpoint: {last or 'none'}"
            + ("" if t.on_nonfinite == "stop" else f" (rollbacks used: {self.rollbacks}/{MAX_ROLLBACKS})"))

    # ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        from ..checkpoint import capture_rng_state, restore_rng_state
        from ..models.flops import training_flops_per_token

        cfg, t = self.cfg, self.cfg.train
        t_setup = time.time()
        self.build()
        t_built = time.time()
        resumed = self.resume()
        t_resumed = time.time()
        self.stop.install()
        if self.is_main:    # a marker left by an earlier stop no longer describes this run
            (self.run_dir / signals.STOP_MARKER).unlink(missing_ok=True)
        # Rank 0's side channels (wandb ids, the peak-FLOPs probe) must not shift the RNG streams that an
        # uninterrupted run would have had here.
        rng = capture_rng_state()
        logger = MetricsLogger(self.run_dir, enabled=self.is_main, resume_step=self.progress.step,
                               config_dict=to_plain(cfg), run_name=cfg.name, wandb_mode=t.wandb,
                               wandb_project=t.wandb_project, tensorboard=t.tensorboard)
        seq_len = self.info.seq_len
        flops_per_token = training_flops_per_token(cfg.model, seq_len, batch_size=t.micro_batch_size)["total"]
        peak, peak_src = peak_flops_per_device(self.device, t.precision) if self.is_main else (None, "")
        restore_rng_state(rng)
        if self.is_main:
            logger.print(
                f"m2train train: {cfg.name} ({cfg.model.arch}, {full_parameter_count(self.model) / 1e6:.2f}M params) "
                f"on {self.env.world_size} process(es) [{self.env.backend}, ZeRO-{cfg.parallel.zero_stage}, "
                f"{t.precision}{self._layout_note()}], global batch {t.global_batch_size} = "
                f"{t.micro_batch_size} x {self.dp} x "
                f"{t.grad_accum_steps}, {seq_len} tokens/sample; peak {peak / 1e9:.0f} GFLOP/s/device "
                f"({peak_src}); run dir {self.run_dir}; engine + loaders {t_built - t_setup:.1f} s, "
                f"resume {t_resumed - t_built:.1f} s")
            logger.print(f"resumed from {resumed} at step {self.progress.step}{self.resume_note}" if resumed
                         else "starting from scratch (no checkpoint found)")
        code = signals.EXIT_FINISHED
        interval_tokens, interval_time, step_time_ema = 0, 0.0, None
        try:
            while self.progress.step < t.max_steps:
                t0 = time.time()
                stats = self.train_step()
                dt = time.time() - t0
                p = self.progress
                p.step += 1
                p.tokens_seen += stats["tokens"]
                if stats["skipped"]:
                    p.skipped_steps += 1
                    p.consecutive_nonfinite += 1
                else:
                    p.consecutive_nonfinite = 0
                self.budget.record_step(dt)
                step_time_ema = dt if step_time_ema is None else 0.9 * step_time_ema + 0.1 * dt
                interval_tokens += stats["tokens"]
                interval_time += dt

                record = None
                if p.step % t.log_every == 0 or p.step == t.max_steps or stats["skipped"]:
                    tps = interval_tokens / max(interval_time, 1e-9)
                    mfu = (tps * flops_per_token / self.env.world_size / peak) if peak else None
                    record = {"step": p.step, "loss": stats["loss"], "lr": stats["lr"],
                              "grad_norm": stats["grad_norm"], "tokens_seen": p.tokens_seen,
                              "tokens_per_s": tps, "mfu": mfu, "step_time_s": dt,
                              "skipped_steps": p.skipped_steps}
                    if self.rollbacks:
                        record["rollbacks"] = self.rollbacks
                    logger.print(format_progress(p.step, t.max_steps, stats["loss"], stats["lr"],
                                                 stats["grad_norm"], tps, mfu,
                                                 (t.max_steps - p.step) * step_time_ema, p.skipped_steps))
                    interval_tokens, interval_time = 0, 0.0
                if t.eval_every and (p.step % t.eval_every == 0 or p.step == t.max_steps):
                    self.engine.eval()
                    results = _evaluate(self.model, self.val_loader, t.eval_batches, t.precision)
                    self.engine.train()
                    record = (record or {"step": p.step}) | results
                    logger.print(f"step {p.step} validation: "
                                 + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                             if isinstance(v, float)))
                if record is not None:
                    logger.log(record)

                if stats["skipped"]:
                    self.handle_nonfinite(stats, logger)
                if stats["stop_signal"] or stats["budget"]:
                    why = (f"signal {self.stop.signal_name or 'on another rank'}" if stats["stop_signal"]
                           else f"train.time_budget_s={t.time_budget_s} nearly used")
                    self.save()
                    if self.is_main:
                        signals.write_stop_marker(self.run_dir, self.progress.step,
                                                  "signal" if stats["stop_signal"] else "time_budget", self.ckpt_dir)
                    logger.print(f"stopped at step {self.progress.step} ({why}); checkpoint saved in "
                                 f"{self.ckpt_dir}; rerun the same command to resume")
                    code = signals.EXIT_STOPPED
                    break
                if t.save_every and self.progress.step % t.save_every == 0:
                    self.save()
            else:
                self.save()
                logger.print(f"finished {t.max_steps} steps in {time.time() - t_resumed:.1f} s "
                             f"(last save {self.budget.save_s or 0:.1f} s); final checkpoint in {self.ckpt_dir}")
        except NonFiniteStop as e:
            logger.print(f"m2train train: {e}")
            code = signals.EXIT_NONFINITE
        finally:
            self.stop.uninstall()
            logger.close()
        return code
