"""The LM head and its cross-entropy in token chunks, without keeping the (N, V) logits for backward.

F.cross_entropy(F.linear(h, W)) keeps the logits (N x V, bf16 under autocast) and their fp32 upcast for
backward: at L = 131,072 and V = 50,304 that is 13 + 26 GB per sequence, more than the whole M2 trunk with
activation checkpointing. `linear_cross_entropy` computes the same loss chunk by chunk (logits of at most
`chunk_tokens` rows exist at a time) and saves only h, W and the labels; backward recomputes each chunk's
logits and forms softmax - onehot directly, so the extra memory is one (chunk, V) fp32 block in either
pass, at the price of one more (N, H) x (H, V) product.

Numerics follow the reference path: the logits are computed in the autocast dtype (recorded in forward and
restored for the recompute), the log-softmax and the gradient of the logits in fp32 (fp64 for fp64 models),
and positions labelled -100 contribute nothing. With reduction "mean" the sum is divided by the number of
labelled positions (NaN when there are none, as F.cross_entropy gives).

Under ZeRO-3 the weight (the LM head, tied to the token embedding) is partitioned between uses, and the
backward's recompute runs outside any module whose hooks would gather it; `gather_weight`, set from
m2train.parallel (models never import torch.distributed), gathers it around the products.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from .outputs import upcast

IGNORE_INDEX = -100


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, mean: bool, gather_weight):
        device_type = hidden.device.type
        ctx.autocast = _autocast_state(device_type)
        ctx.gather_weight = gather_weight
        valid = labels != IGNORE_INDEX
        safe = labels.masked_fill(~valid, 0)
        total = None
        with gather_weight(weight):
            for s in range(0, hidden.shape[0], chunk):
                logits = upcast(F.linear(hidden[s:s + chunk], weight))
                part = (torch.logsumexp(logits, -1) - logits.gather(1, safe[s:s + chunk, None])[:, 0])
                part = part.masked_fill(~valid[s:s + chunk], 0).sum()
                total = part if total is None else total + part
        # divisor: the number of labelled positions for "mean" (an integer tensor: exact in any dtype)
        divisor = valid.sum() if mean else torch.ones((), dtype=torch.int64, device=hidden.device)
        ctx.save_for_backward(hidden, weight, safe, valid, divisor)
        ctx.chunk = chunk
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe, valid, divisor = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        autocast = torch.autocast(device_type=hidden.device.type, dtype=dtype, enabled=enabled)
        with ctx.gather_weight(weight), autocast:
            if ctx.needs_input_grad[1]:
                grad_weight = torch.zeros_like(weight, dtype=upcast(weight).dtype)
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s:s + ctx.chunk]
                raw = F.linear(h, weight)
                # d loss / d logits = (softmax - onehot) * grad * scale on labelled rows, 0 elsewhere
                g = torch.softmax(upcast(raw), -1)
                g.scatter_add_(1, safe[s:s + ctx.chunk, None], g.new_full((g.shape[0], 1), -1.0))
                g.mul_(valid[s:s + ctx.chunk, None] * (grad_out / divisor).to(g.dtype))
                # In the logits' dtype; under autocast the products cast weight (cached) and h themselves.
                g = g.to(raw.dtype)
                if grad_hidden is not None:
                    grad_hidden[s:s + ctx.chunk] = (g @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g.transpose(0, 1) @ h).to(grad_weight.dtype)
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _whole(weight: torch.Tensor) -> ContextManager:
    return contextlib.nullcontext()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                         reduction: str = "mean",
                         gather_weight: Callable[[torch.Tensor], ContextManager] | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction) for hidden (N, H), weight (V, H),
    labels (N,), computed `chunk_tokens` rows at a time with the logits recomputed in backward.
    `gather_weight(weight)`, when given, is a context manager inside which `weight` holds its full value
    (ZeRO-3: see the module docstring); it is entered in forward and again in backward."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H) and labels (N,), got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, reduction == "mean",
                                     gather_weight or _whole)


__all__ = ["linear_cross_entropy"]
