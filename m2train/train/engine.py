"""The DeepSpeed engine every run goes through (ZeRO 0/1/2/3, optional CPU offload), and its config.

Precision: the engine is always fp32 (fp32 parameters = master weights, fp32 gradients, fp32 optimizer
state). `train.precision=bf16` runs forward and backward under torch.autocast(bfloat16) instead of
DeepSpeed's bf16 mode: that keeps fp32 master weights on every ZeRO stage alike (DeepSpeed's bf16 mode
stores bf16 parameters and keeps the fp32 copy only inside its optimizer wrappers, and stage 0 has none),
autocast leaves the FFT convolutions in fp32 (torch.fft has no bf16 kernels; the models upcast around
them), and grads are reduced in fp32. The cost is fp32 communication volume.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..config import Config


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_parallel * cfg.parallel.context_parallel)


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    """The DeepSpeed JSON config for a validated run config (train.grad_accum_steps already resolved)."""
    t, p = cfg.train, cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_size,
        # ZeRO stages clip inside their optimizer wrapper (they own the partitioned grads). Stage 0 leaves
        # the grads in param.grad: the trainer measures and clips them itself (it needs the norm first
        # to decide whether the step is finite), so DeepSpeed must not clip a second time.
        "gradient_clipping": (t.grad_clip or 0.0) if p.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # Our optimizers (DecoupledAdamW, torch AdamW) are client optimizers; with offload DeepSpeed would
        # otherwise insist on its own compiled CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


class SkippableStep:
    """Wraps the client optimizer's step() so the trainer can veto one update.

    DeepSpeed calls the client optimizer's step exactly once per accumulation boundary on every ZeRO
    stage (on flattened fp32 partitions for stages 1-3). Vetoing it there skips the update the same way
    on every stage: parameters and Adam moments/step counts stay untouched, DeepSpeed still zeroes the
    gradients, and no lr-scheduler state exists to advance (the schedule is a function of the step)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.skip_next = False
        self.applied = False
        self._step = optimizer.step
        optimizer.step = self  # instance attribute shadows the bound method DeepSpeed looks up

    def __call__(self, *args, **kwargs):
        if self.skip_next:
            self.applied = False
            return None
        self.applied = True
        return self._step(*args, **kwargs)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, dp_size: int):
    """deepspeed.initialize around an already-initialised process group (launch.init_distributed).

    With tensor / context parallelism the m2train mpu tells DeepSpeed to shard and average over dp x cp
    only (and to count TP shards once in the gradient norm); DeepSpeed's batch bookkeeping then counts
    dp x cp ranks, so its train_batch_size is given for that many."""
    import deepspeed

    from ..parallel.mpu import build_mpu

    mpu = build_mpu()
    ds_ranks = dp_size * cfg.parallel.context_parallel if mpu is not None else dp_size
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, ds_ranks), dist_init_required=False,
        mpu=mpu)
    if cfg.parallel.zero_stage == 3:
        from ..parallel.zero3 import enable_chunked_loss

        enable_chunked_loss(engine.module)
    return engine, ds_optimizer


def autocast_context(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def global_grad_norm_stage0(model: torch.nn.Module) -> float:
    """L2 norm of the (already data-parallel-averaged) gradients; inf/nan when any grad is non-finite.
    Under tensor parallelism the squares of sharded gradients (megatron's `tensor_model_parallel` tag) are
    summed over the TP group and replicated ones counted once, so the norm is the single-process one."""
    from ..parallel import groups

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if groups.tp_size() == 1:
        return float(torch.nn.utils.get_total_norm(grads, 2.0)) if grads else 0.0
    import torch.distributed as dist

    # On the gradients' device: NCCL reduces only GPU tensors.
    sq = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or groups.tp_rank() == 0):
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=groups.tp_group())
    return float(sq.sqrt())


def clip_stage0(model: torch.nn.Module, max_norm: float, total_norm: float) -> None:
    if math.isfinite(total_norm) and total_norm > max_norm:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, torch.tensor(total_norm))
