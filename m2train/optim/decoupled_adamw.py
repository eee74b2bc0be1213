"""AdamW with the reference M2-BERT ("Composer DecoupledAdamW") weight-decay semantics.

torch.optim.AdamW decays p ← p·(1 − lr_t·wd). The reference instead decays p ← p·(1 − wd·lr_t/lr_peak):
the decay follows the *schedule* but is not multiplied by the learning rate itself, so wd=1e-5 with
lr=8e-4 decays ~1250× more per step than torch's AdamW would. lr_peak is each group's `initial_lr`
(set when the optimizer is built, so per-group learning rates keep their own ratio).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class DecoupledAdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-5):
        if lr <= 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid DecoupledAdamW settings lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            peak = group["initial_lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("DecoupledAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                if wd != 0 and peak > 0:
                    p.mul_(1 - wd * lr / peak)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1 = 1 - beta1 ** step
                bias2 = 1 - beta2 ** step
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / bias1)
        return loss
