"""Applies parallelism to a built model, in one fixed order:
tensor parallel (-> sequence parallel) -> context parallel -> activation checkpointing -> engine wrap
(m2train.train.engine).

Tensor and context parallelism come first because they replace layers (and TP slices the weights every rank
built identically from the same seed), and checkpoint wrappers must wrap the final layers; the DeepSpeed
engine comes last because ZeRO partitions whatever parameters exist then, over the dp x cp group that
`mpu.build_mpu()` describes. Models never import torch.distributed: everything distributed is applied
here, from outside.

    groups.init_model_parallel(tp, cp)      # after m2train.launch.init_distributed
    model = apply_parallelism(build_model(cfg.model), cfg)
    engine = deepspeed.initialize(model=model, mpu=mpu.build_mpu(), ...)
"""

from __future__ import annotations

import torch

from ..config import Config, ConfigError


def check_parallel_config(cfg: Config, world_size: int) -> int:
    """Layout checks that need only the config and the world size; returns the data-parallel size."""
    from .groups import check_layout

    p = cfg.parallel
    dp = check_layout(world_size, p.tensor_parallel, p.context_parallel)
    if p.sequence_parallel:
        if p.tensor_parallel < 2:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1 (it splits the "
                              "activations TP would replicate)")
        if p.context_parallel > 1:
            raise ConfigError("parallel.sequence_parallel=true with parallel.context_parallel > 1 is not "
                              "supported")
        if cfg.model.arch != "m2_gpt":
            raise ConfigError(f"parallel.sequence_parallel=true supports model.arch m2_gpt for now, not "
                              f"{cfg.model.arch!r}")
        if cfg.model.position_embeddings:
            raise ConfigError("parallel.sequence_parallel=true does not support model.position_embeddings=true")
    if p.tensor_parallel > 1 and p.zero_stage == 3:
        raise ConfigError("parallel.zero_stage=3 with parallel.tensor_parallel>1 is not supported (ZeRO-3 "
                          "would partition the TP shards again); use zero_stage 0, 1 or 2")
    return dp


def apply_parallelism(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Everything before the engine wrap; returns the model to hand to DeepSpeed. With tp or cp > 1 the
    groups must exist (groups.init_model_parallel)."""
    from . import groups

    p, t = cfg.parallel, cfg.train
    if p.tensor_parallel > 1 or p.context_parallel > 1:
        if (groups.tp_size(), groups.cp_size()) != (p.tensor_parallel, p.context_parallel):
            raise RuntimeError(f"apply_parallelism: parallel.tensor_parallel={p.tensor_parallel}, "
                               f"context_parallel={p.context_parallel} but the process groups have tp="
                               f"{groups.tp_size()}, cp={groups.cp_size()}: call groups.init_model_parallel first")
    if p.tensor_parallel > 1:
        from .tensor_parallel import apply_tensor_parallel
        model = apply_tensor_parallel(model, groups.tp_group())
        if p.sequence_parallel:
            from .sequence_parallel import apply_sequence_parallel
            model = apply_sequence_parallel(model, groups.tp_group())
    if p.context_parallel > 1:
        from .context_parallel import apply_context_parallel
        # ZeRO averages gradients over dp x cp: CP scales its loss gradient to match.
        model = apply_context_parallel(model, groups.cp_group(), grad_reduction="mean")
    if t.activation_checkpointing != "none":
        from .activation_checkpointing import apply_activation_checkpointing
        model = apply_activation_checkpointing(model, t.activation_checkpointing, t.checkpoint_every_k) or model
    return model


__all__ = ["apply_parallelism", "check_parallel_config"]
