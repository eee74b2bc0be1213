"""Shared helpers for the checkpoint / eval / export tests (no tests here): real gloo process groups in
spawned processes and real DeepSpeed engines on tiny models."""

from __future__ import annotations

import io
import os
import socket
import sys
import traceback

import torch
import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, queue):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        sys.path.insert(0, TESTS_DIR)
        torch.set_num_threads(1)  # two ranks on a 2-core machine
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        result = fn(rank, world, *args)
        torch.distributed.barrier()
        # As bytes: tensors sent through a multiprocessing queue travel as shared-memory handles that
        # die with this process.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 300.0) -> list:
    """Run fn(rank, world, *args) in `world` fresh processes joined by a gloo group; returns each rank's
    return value (rank order), raising with the worker's traceback if any rank failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def tiny_gpt_cfg(**overrides):
    from conftest import tiny_model_cfg
    return tiny_model_cfg("m2_gpt", **overrides)


def make_engine(model_cfg, zero_stage: int, world: int, micro_batch: int = 2, seed: int = 0,
                lr: float = 3e-3, optimizer: str = "decoupled_adamw", bf16: bool = False):
    """A real DeepSpeed engine around build_model(model_cfg): the reference optimizer over the model's
    parameter groups, a warmup LambdaLR, clipping. `seed` sets the initial weights."""
    import deepspeed

    from m2train.config import OptimConfig
    from m2train.models import build_model
    from m2train.optim import build_optimizer

    torch.manual_seed(seed)
    model = build_model(model_cfg)
    opt = build_optimizer(model, OptimConfig(name=optimizer, lr=lr, weight_decay=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": micro_batch * world, "zero_optimization": {"stage": zero_stage},
              "gradient_clipping": 1.0, "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9,
              "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def gpt_batch(step: int, micro_batch: int = 2, seq: int = 16, vocab: int = 101, rank: int | None = None):
    """A deterministic GPT batch for `step` (and `rank`, if given): inputs and next-token labels."""
    g = torch.Generator().manual_seed(10_000 * step + (0 if rank is None else 1 + rank))
    x = torch.randint(0, vocab, (micro_batch, seq + 1), generator=g)
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def train_steps(engine, start: int, n: int, rank: int | None = None) -> list[float]:
    losses = []
    for step in range(start, start + n):
        batch = gpt_batch(step, engine.train_micro_batch_size_per_gpu(), rank=rank)
        out = engine(batch["input_ids"], labels=batch["labels"])
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return losses


def module_state(engine) -> dict:
    """Full (gathered, under ZeRO-3) fp32 copies of the engine's model weights."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                           enabled=engine.zero_optimization_stage() == 3):
        state = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
    assert all(v.numel() > 0 for v in state.values())
    return state
