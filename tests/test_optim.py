"""DecoupledAdamW: reference decay semantics p ← p·(1 − wd·lr_t/lr_peak), Adam otherwise."""

import torch

from m2train.config import OptimConfig
from m2train.models import build_model
from m2train.optim import DecoupledAdamW, build_optimizer

from conftest import tiny_model_cfg


def test_decay_is_scaled_by_schedule_not_by_lr():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = DecoupledAdamW([p], lr=8e-4, weight_decay=1e-5)
    p.grad = torch.zeros_like(p)              # no gradient: only the decay acts
    opt.step()
    torch.testing.assert_close(p.data, torch.full((4,), 1 - 1e-5, dtype=torch.float64))
    opt.param_groups[0]["lr"] = 4e-4          # half-way down the schedule: half the decay
    opt.step()
    torch.testing.assert_close(p.data, torch.full((4,), (1 - 1e-5) * (1 - 0.5e-5), dtype=torch.float64))


def test_equals_torch_adamw_without_decay():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    oa = DecoupledAdamW([a], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    ob = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    for _ in range(5):
        g = torch.randn(10, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-12, atol=1e-12)


def test_per_group_peak_lr():
    p1 = torch.nn.Parameter(torch.ones(1))
    p2 = torch.nn.Parameter(torch.ones(1))
    opt = DecoupledAdamW([{"params": [p1], "lr": 1e-3, "weight_decay": 0.1},
                          {"params": [p2], "lr": 1e-5, "weight_decay": 0.1}], lr=1e-4)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, 1e-5]
    p1.grad = torch.zeros(1)
    p2.grad = torch.zeros(1)
    opt.step()                                  # at peak both decay by wd, whatever their lr
    torch.testing.assert_close(p1.data, torch.tensor([0.9]))
    torch.testing.assert_close(p2.data, torch.tensor([0.9]))


def test_build_optimizer_uses_model_groups():
    model = build_model(tiny_model_cfg("m2_bert"))
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, DecoupledAdamW)
    assert {g["name"] for g in opt.param_groups} == {"default", "no_decay", "filter", "pos_emb"}
    torch_opt = build_optimizer(model, OptimConfig(name="adamw"))
    assert isinstance(torch_opt, torch.optim.AdamW)
    ids = torch.randint(1, 100, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    before = model.bert.layers[0].mixer.in_linear.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.bert.layers[0].mixer.in_linear.weight)
