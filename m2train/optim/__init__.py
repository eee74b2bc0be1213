"""Optimizers built from a model's parameter groups."""

from __future__ import annotations

import torch

from ..config import OptimConfig
from .decoupled_adamw import DecoupledAdamW


def build_optimizer(model, optim: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `model.param_groups(optim)` (group names kept for logging)."""
    groups = model.param_groups(optim)
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if optim.name == "decoupled_adamw":
        return DecoupledAdamW(groups, **kwargs)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    raise ValueError(f"optim.name: unknown optimizer {optim.name!r}")


__all__ = ["DecoupledAdamW", "build_optimizer"]
