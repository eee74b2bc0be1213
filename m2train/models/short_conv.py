"""Causal depthwise short convolution (kernel 3 in M2): y[t] = b + Σ_j w[j]·x[t - (K-1) + j].

Same parameters and result as the reference `nn.Conv1d(C, C, K, groups=C, padding=K-1)` truncated to L,
written as K shifted multiply-adds: on CPU this is several times faster than conv1d for depthwise K=3.
With the Triton kernels on (ModelConfig.kernels), the module runs m2train.kernels.shortconv instead: one
pass that reads any layout and writes a contiguous channels-first result.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import kernel_mode


def causal_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, *C, L), weight (*C, K), bias (*C) -> (B, *C, L); *C is the channel shape, e.g. (C,) or (3, C).

    One fused multiply-add per tap (addcmul) written into the output, so the only allocation is the
    output itself: on CPU, fresh large temporaries cost more in page faults than the arithmetic."""
    K, L = weight.shape[-1], x.shape[-1]
    w = weight.to(x.dtype)
    y = torch.addcmul(bias.to(x.dtype)[..., None], x, w[..., K - 1, None])   # tap at lag 0
    for shift in range(1, min(K, L)):                                         # tap at lag `shift`
        y[..., shift:].addcmul_(x[..., :-shift], w[..., K - 1 - shift, None])
    return y


class CausalShortConv(nn.Module):
    # "auto" | "triton" | "torch": ModelConfig.kernels, stored by the model's init_weights (base.kernel_mode).
    kernels: str = "auto"

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        # (C, 1, K): the layout of a depthwise nn.Conv1d, so checkpoints map one to one.
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default init (fan_in = K for a depthwise conv).
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, L) -> (B, C, L)."""
        from ..kernels.dispatch import use_triton

        if use_triton(x, kernel_mode(self)):
            from ..kernels import shortconv

            if shortconv.unsupported_reason(x, self.weight) is None:
                return shortconv.causal_short_conv(x, self.weight, self.bias)
        return causal_short_conv(x, self.weight[:, 0, :], self.bias)
