"""Applies parallelism to a built model, in one fixed order:
tensor/context parallel -> activation checkpointing -> engine wrap (m2train.train.engine).

Tensor and context parallelism come first because they replace layers, and checkpoint wrappers must wrap
the final layers; the DeepSpeed engine comes last because ZeRO partitions whatever parameters exist then.
Models never import torch.distributed: everything distributed is applied here, from outside.
"""

from __future__ import annotations

import torch

from ..config import Config, ConfigError


def apply_parallelism(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Everything before the engine wrap; returns the model to hand to DeepSpeed."""
    p, t = cfg.parallel, cfg.train
    if p.tensor_parallel != 1 or p.context_parallel != 1:
        raise ConfigError("parallel.tensor_parallel / parallel.context_parallel: only 1 is supported by the "
                          "trainer so far (data parallel + ZeRO)")
    if t.activation_checkpointing != "none":
        from .activation_checkpointing import apply_activation_checkpointing
        model = apply_activation_checkpointing(model, t.activation_checkpointing, t.checkpoint_every_k) or model
    return model


__all__ = ["apply_parallelism"]
