"""LR schedules: warmup + cosine / linear decay to min_lr_ratio, applied relative to each group's own lr."""

import math

import pytest
import torch

from m2train.config import TrainConfig
from m2train.optim import DecoupledAdamW
from m2train.train.schedule import apply_lr, lr_multiplier, remember_peak_lrs


def mult(update, schedule="cosine", max_steps=110, warmup=10, ratio=0.1):
    return lr_multiplier(update, max_steps=max_steps, warmup_steps=warmup, schedule=schedule, min_lr_ratio=ratio)


def test_warmup_is_linear_and_never_zero():
    assert mult(0) == pytest.approx(0.1)
    assert mult(4) == pytest.approx(0.5)
    assert mult(9) == pytest.approx(1.0)
    assert all(mult(u) > 0 for u in range(10))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_reaches_min_ratio_at_max_steps_and_stays(schedule):
    assert mult(10, schedule) == pytest.approx(1.0)
    assert mult(110, schedule) == pytest.approx(0.1)
    assert mult(500, schedule) == pytest.approx(0.1)      # run extended past max_steps keeps the floor
    values = [mult(u, schedule) for u in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_and_linear_shapes_at_midpoint():
    # Halfway through the decay: cosine is at the mean of 1 and the floor, as is linear; a quarter in they differ.
    assert mult(60, "cosine") == pytest.approx(0.55)
    assert mult(60, "linear") == pytest.approx(0.55)
    assert mult(35, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert mult(35, "linear") == pytest.approx(1 - 0.9 * 0.25)


def test_constant_and_no_warmup():
    assert mult(0, "constant", warmup=0) == 1.0
    assert mult(1000, "constant") == 1.0
    assert mult(0, "linear", warmup=0) == pytest.approx(1.0)


def test_groups_scale_relative_to_their_own_peak():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = DecoupledAdamW([{"params": [p1], "lr": 8e-4}, {"params": [p2], "lr": 1e-5}], lr=8e-4)
    remember_peak_lrs(opt.param_groups)
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr_schedule="linear", min_lr_ratio=0.02)
    apply_lr(opt.param_groups, 55, cfg)
    m = 1 - 0.98 * 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(8e-4 * m)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-5 * m)
    # The peak (DecoupledAdamW's decay reference) is never overwritten, so decay follows lr_t / lr_peak.
    assert [g["initial_lr"] for g in opt.param_groups] == [8e-4, 1e-5]
    apply_lr(opt.param_groups, 100, cfg)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-5 * 0.02)


def test_torch_adamw_groups_get_a_peak():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 3e-3}])
    remember_peak_lrs(opt.param_groups)
    apply_lr(opt.param_groups, 0, TrainConfig(max_steps=10, warmup_steps=2))
    assert opt.param_groups[0]["lr"] == pytest.approx(1.5e-3)
    assert opt.param_groups[0]["initial_lr"] == 3e-3
