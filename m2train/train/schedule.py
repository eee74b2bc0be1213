"""Learning-rate schedules: linear warmup, then cosine (GPT recipe) or linear (M2-BERT recipe) decay to
`min_lr_ratio` of the peak, or constant.

The schedule is a pure function of the number of applied updates, and each parameter group is scaled
relative to its OWN peak lr (`initial_lr`: the filter and positional-feature groups have their own lrs).
Nothing is stored, so resuming at step N gives exactly the lr an uninterrupted run had at step N.
"""

from __future__ import annotations

import math


def lr_multiplier(update: int, *, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Fraction of the peak lr for the `update`-th optimizer update (0-based).

    Warmup ramps linearly from 1/warmup to 1 over the first `warmup_steps` updates (never 0: an update with
    lr 0 would waste a batch). After warmup, `cosine` follows half a cosine from 1 down to min_lr_ratio at
    `max_steps`, `linear` a straight line to min_lr_ratio at `max_steps`, `constant` stays at 1; past
    `max_steps` (a run extended by an override) the floor is kept."""
    if update < warmup_steps:
        return (update + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (update - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"train.lr_schedule: unknown schedule {schedule!r}")


def remember_peak_lrs(param_groups: list[dict]) -> None:
    """Record each group's configured lr as its peak (`initial_lr`, the key DecoupledAdamW already uses
    for its decay ratio, and torch's schedulers use too). It travels in the optimizer's state_dict."""
    for group in param_groups:
        group.setdefault("initial_lr", group["lr"])


def apply_lr(param_groups: list[dict], update: int, train_cfg) -> float:
    """Set every group's lr for the given update; returns the multiplier."""
    mult = lr_multiplier(update, max_steps=train_cfg.max_steps, warmup_steps=train_cfg.warmup_steps,
                         schedule=train_cfg.lr_schedule, min_lr_ratio=train_cfg.min_lr_ratio)
    for group in param_groups:
        group["lr"] = group["initial_lr"] * mult
    return mult
