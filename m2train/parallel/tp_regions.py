"""How activations enter and leave a tensor-parallel region: megatron's mappings over the TP group, each an
autograd.Function whose backward is the matching collective.

Without sequence parallelism activations between TP regions are replicated on every TP rank:
    copy_to_tp        identity forward, all-reduce of the gradient backward (the region's input)
    reduce_from_tp    all-reduce forward, identity backward (the region's partial output)
With sequence parallelism (m2train.parallel.sequence_parallel) they are split along the sequence (dim 1 of a
(B, L, H) activation, rank r holding positions [r·L/T, (r+1)·L/T)):
    gathered_apply    a region's first layer on the whole sequences, all-gathered inside its autograd
                      Function, keeping only this rank's part (gathered again in backward, whose input
                      gradient is reduce-scattered)
    scatter_to_sp     reduce-scatter forward, all-gather backward (the region's partial output)
    gather_from_sp    all-gather forward, reduce-scatter backward (a plain gather whose result autograd may
                      keep: the chunked loss uses it inside its checkpoint)
The forward's all-gather and reduce-scatter move what TP's all-reduce moves; the backward's second gather of
each region's input is SP's extra traffic (benchmarks/parallel.py `_sp_collectives`), the price of not
keeping the replicated activations (norms, dropout, residuals, the regions' inputs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # A fresh contiguous tensor: megatron's own mapping helpers all-reduce `x.contiguous()` and return x,
    # which silently skips the reduction when x is a non-contiguous view (as the mixer's transposed
    # gradients are).
    out = x.contiguous(memory_format=torch.contiguous_format).clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Each rank's x joined along `dim` in rank order ((B, L/T, ...) -> (B, L, ...) for dim 1), as a fresh
    contiguous tensor: `gathered_apply` then flattens it to rows without a copy, for the kernels' Functions
    that take contiguous 2-D inputs."""
    size = dist.get_world_size(group)
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))          # the collective joins along dim 0
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out.unflatten(0, (size, x.shape[0])).movedim(0, dim).flatten(dim, dim + 1)


def _reduce_scatter(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """(B, L, ...) partial sums on each rank -> this rank's part of their sum along `dim` ((B, L/T, ...))."""
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[dim]} is not a multiple of "
                         f"parallel.tensor_parallel={size}")
    parts = x.unflatten(dim, (size, x.shape[dim] // size)).movedim(dim, 0).contiguous()
    out = parts.new_empty(parts.shape[1:])
    # The collective splits its input along dim 0 into one block per rank.
    dist.reduce_scatter_single(out, parts.flatten(0, 1), group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient over TP backward (megatron's "copy to TP region")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (megatron's "reduce from TP region")."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, ctx.dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, ctx.dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


# --------------------------------------------------------------------------------------------------
# A region's first layer under sequence parallelism: gathered input in forward, only the local part kept
# --------------------------------------------------------------------------------------------------
class _InnerContext:
    """Stands in for the autograd ctx of a Function run inside `gathered_apply`: it records what the
    Function saves (so the gathered input among it can be swapped for the local part) and carries the
    attributes the Function sets for its backward."""

    def __init__(self, needs_input_grad: tuple):
        self.needs_input_grad = needs_input_grad
        self.to_save: tuple = ()

    def save_for_backward(self, *tensors) -> None:
        self.to_save = tensors


class _GatheredInput(torch.autograd.Function):
    """`fn` (an autograd.Function) applied to the whole sequences gathered from x_local; of what `fn` saves,
    the gathered input (and any view of it) is replaced by x_local and gathered again in backward. The
    backward reduce-scatters fn's input gradient back to this rank's positions."""

    @staticmethod
    def forward(ctx, x_local, group, fn, flatten, *args):
        full = _all_gather(x_local, group, 1)
        inner = _InnerContext((ctx.needs_input_grad[0], *ctx.needs_input_grad[4:]))
        out = fn.forward(inner, full.flatten(0, -2) if flatten else full, *args)
        saved, inner.to_save = list(inner.to_save), ()            # the ctx must not keep `full` alive
        storage = full.untyped_storage().data_ptr()
        ctx.views = []
        for i, t in enumerate(saved):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage:
                ctx.views.append((i, t.size(), t.stride(), t.storage_offset()))
                saved[i] = None
        ctx.save_for_backward(x_local, *saved)
        ctx.inner, ctx.fn, ctx.group, ctx.full_shape = inner, fn, group, full.shape
        return out

    @staticmethod
    def backward(ctx, *grads):
        x_local, *saved = ctx.saved_tensors
        if ctx.views:
            full = _all_gather(x_local, ctx.group, 1)
            for i, size, stride, offset in ctx.views:
                saved[i] = full.as_strided(size, stride, offset)
        ctx.inner.saved_tensors = tuple(saved)
        grads_in = ctx.fn.backward(ctx.inner, *grads)
        ctx.inner.saved_tensors = ()
        dx = grads_in[0]
        if dx is not None:
            dx = _reduce_scatter(dx.reshape(ctx.full_shape), ctx.group, 1)
        return (dx, None, None, None, *grads_in[1:])


def gathered_apply(fn: type[torch.autograd.Function], x_local: torch.Tensor, group, *args,
                   flatten: bool = False) -> torch.Tensor:
    """fn.apply(x, *args) for x = the whole sequences of x_local (B, L/T, ...) gathered over the TP group
    (flattened to (B·L, ...) when `flatten`, for Functions that take 2-D inputs), keeping x_local instead
    of x for the backward, which gathers it again (megatron's sequence-parallel linear layers do the same):
    the (B, L, H) input of a region's first layer is then never kept on any rank. `fn` must take its
    input first and save it (or views of it) with ctx.save_for_backward."""
    return _GatheredInput.apply(x_local, group, fn, flatten, *args)


class LinearFunction(torch.autograd.Function):
    """x @ w^T (+ b), channels-last (..., O) or, with `channels_first`, (B, O, L) for x (B, L, I), with an
    explicit backward (so that `gathered_apply` can run it). Computes in x's dtype (the weights are cast to
    it, as autocast would), returns the weight gradients in the weights' dtypes."""

    @staticmethod
    def forward(ctx, x, w, b, channels_first):
        ctx.save_for_backward(x, w)
        ctx.channels_first, ctx.bias_dtype = channels_first, (b.dtype if b is not None else None)
        wc, bc = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
        if channels_first:
            out = torch.bmm(wc.expand(x.shape[0], -1, -1), x.mT)
            return out + bc[:, None] if bc is not None else out
        return F.linear(x, wc, bc)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        if ctx.channels_first:
            grad = grad.mT
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = (grad @ w.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        dw = (g2.t() @ x2.to(g2.dtype)).to(w.dtype) if ctx.needs_input_grad[1] else None
        db = g2.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class BlockdiagFunction(torch.autograd.Function):
    """m2train.models.blockdiag.blockdiag_matmul(x, w) (x (..., nblocks·in_blk), w (nblocks, out_blk,
    in_blk)) with an explicit backward, for `gathered_apply`. Computes in x's dtype."""

    @staticmethod
    def forward(ctx, x, w):
        from ..models.blockdiag import blockdiag_matmul

        ctx.save_for_backward(x, w)
        return blockdiag_matmul(x, w.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        nblocks, out_blk, in_blk = w.shape
        g = grad.reshape(-1, nblocks, out_blk).transpose(0, 1)           # (nblocks, N, out_blk)
        xb = x.reshape(-1, nblocks, in_blk).transpose(0, 1)             # (nblocks, N, in_blk)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.bmm(g, w.to(g.dtype)).transpose(0, 1).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.bmm(g.transpose(1, 2), xb.to(g.dtype)).to(w.dtype)
        return dx, dw


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _GatherFromSP.apply(x, group, dim)


def scatter_to_sp(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _ScatterToSP.apply(x, group, dim)


__all__ = ["copy_to_tp", "reduce_from_tp", "gather_from_sp", "scatter_to_sp", "gathered_apply", "LinearFunction",
           "BlockdiagFunction"]
