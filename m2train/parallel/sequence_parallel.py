"""Megatron-style sequence parallelism (SP) on top of tensor parallelism, for M2-GPT.

Under plain TP every TP rank holds the whole (B, L, H) activation outside the TP regions (the sequence
mixer's in_linear ... out_linear, the GLU's up ... down projection): the embedding's output, the block
norms' inputs and outputs, the dropout masks and the residual stream are replicated T times, and so are
the inputs the regions' first layers keep for their weight gradients. `apply_sequence_parallel(model,
tp_group)` (after `apply_tensor_parallel`) makes each TP rank keep only its positions [r·L/T, (r+1)·L/T)
of all of them:

- A region's first layers (in_linear, the GLU's up-projection - torch or fused Triton kernels -, the LM
  head) gather the whole sequences inside their autograd Function and keep only this rank's part for the
  backward, which gathers it again (m2train.parallel.tp_regions.gathered_apply: megatron's SP linears do
  the same). The gradient of the gathered input is reduce-scattered back to this rank's positions.
- A region's exit reduce-scatters the partial sums to this rank's positions instead of all-reducing them.
  The vocab-parallel embedding does the same.
- The residual long conv, which reads the mixer input's own H/T channels over the whole sequence, gets
  them with an all-to-all of this rank's positions (context parallelism's exchange over the TP group).
- Parameters applied to this rank's positions only (the LayerNorms, the biases added after a region's exit)
  enter through copy_to_tp, whose backward sums the TP ranks' gradients: every TP rank holds the full
  gradient of its replicated parameters, as without SP.
- Dropout outside the regions draws the mask of the whole sequence from the RNG stream TP peers share and
  keeps this rank's positions (`sharded_dropout` along the sequence): each position gets its unsharded mask,
  so with the same seed an SP model equals the single-process one, dropout included.
- The chunked loss (model.loss_chunk_tokens) gathers one chunk of every rank's tokens at a time inside the
  chunk's checkpoint, so not even the final norm's output is gathered whole.

Communication per layer (N = B·L tokens, H hidden), vs TP's 2 forward + 2 backward all-reduces of (N, H):
forward 2 all-gathers + 2 reduce-scatters of (N, H) (the same bytes as 2 all-reduces), backward the same
plus the 2 re-gathers (N, H), plus the residual conv's all-to-all of N·H/T forward and backward.

Parameters and state-dict keys do not change, so checkpoints are the TP ones. Not supported (clear errors):
M2-BERT (its embeddings and post-norm blocks), learned position embeddings, context parallelism together
with SP; the sequence length must be a multiple of the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import ops
from ..models.base import kernel_mode
from ..models.gpt import CausalLM
from ..models.m2_gpt import M2GPTBlock
from ..models.outputs import upcast
from .context_parallel import _AllToAll
from .tensor_parallel import (ColumnParallelLinear, TensorParallelGLU, TensorParallelMixer, VocabParallelEmbedding,
                              _swap_class, _vocab_parallel_ce_sum, sharded_dropout)
from .tp_regions import (BlockdiagFunction, LinearFunction, copy_to_tp, gather_from_sp, gathered_apply,
                         scatter_to_sp)


def _matmul_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype a matmul on it runs in (autocast's, inside autocast): the rank's part is cast before it
    is gathered, so the gathered tensor is the very one the layer keeps (and half the bytes move in bf16)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _gathered_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, group,
                     channels_first: bool = False) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return gathered_apply(LinearFunction, _matmul_input(x), group, w, b, channels_first)


class _SequenceParallelEdges:
    """The TP layers' region edges (tensor_parallel._RegionEdges) for activations split along the sequence."""

    def _region_input(self, x: torch.Tensor) -> torch.Tensor:
        return x                                 # the region's first layers gather it (gathered_apply)

    def _region_output(self, x: torch.Tensor) -> torch.Tensor:
        return scatter_to_sp(x, self.group)

    def _replicated(self, p: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(p, self.group)


class _SequenceParallelColumnLinear:
    """The mixer's column-parallel in_linear on this rank's positions: gathers them inside (see module doc)."""

    def forward(self, x: torch.Tensor, out_channels_first: bool = False, add_bias: bool = True) -> torch.Tensor:
        return _gathered_linear(x, self.weight, self.bias if add_bias else None, self.group, out_channels_first)


class _SequenceParallelMixer(_SequenceParallelEdges):
    def _own_channels(self, u_t: torch.Tensor) -> torch.Tensor:
        """This rank's channels of the mixer input over the whole sequence, from (B, H, L/T) positions."""
        return _AllToAll.apply(u_t, self.group, 1, 2)

    def _fused_front(self, u: torch.Tensor) -> bool:
        # The kernels see the whole sequence: ask about its length, not this rank's part of it.
        B, Lr, H = u.shape
        return super()._fused_front(u.new_empty(()).expand(B, Lr * self.tp_size, H))


class _SequenceParallelGLU(_SequenceParallelEdges):
    def _first_linear(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _gathered_linear(y, w, None, self.group)

    def _first_blockdiag(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            return gathered_apply(BlockdiagFunction, _matmul_input(y), self.group, w)

    def _kernels_take(self, y: torch.Tensor, w: torch.Tensor) -> bool:
        # The kernel ops would fall back to their reference path on this rank's part alone: decide here.
        return ops.glu_blockdiag_supported(y, w, self.intermediate_size, kernel_mode(self))

    def _kernel_apply(self, y: torch.Tensor):
        B, Lr, H = y.shape

        def apply(fn, x2, *args):
            return gathered_apply(fn, x2.view(B, Lr, H), self.group, *args, flatten=True)
        return apply


class _SequenceParallelLayerNorm:
    """LayerNorm on this rank's positions: weight and bias enter through copy_to_tp, whose backward sums the
    TP ranks' gradients (each rank saw other positions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tp(self.weight, self.group) if self.weight is not None else None
        b = copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class _SequenceParallelDropout:
    """Dropout of this rank's positions (dim 1) with the whole sequence's mask (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sharded_dropout(x, self, 1, self.tp_rank, self.tp_size)


class _SequenceParallelCausalLMHead:
    """The vocab-parallel head on this rank's positions of the final norm's output."""

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _gathered_linear(hidden, self.lm_head_weight, None, self._tp_group)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        return sequence_parallel_chunked_loss(hidden, self.lm_head_weight, labels, self.config.loss_chunk_tokens,
                                              self._tp_group, reduction)


def _chunk_loss_sum(hidden, weight, labels, group) -> torch.Tensor:
    # Every rank's chunk of tokens, rank-major like `labels`; the gather's backward reduce-scatter sums the
    # vocab shards' gradients of each token.
    full = gather_from_sp(hidden, group, 0)
    return _vocab_parallel_ce_sum(upcast(F.linear(full, weight)), labels, -100)


def sequence_parallel_chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   chunk_tokens: int, group, reduction: str = "mean") -> torch.Tensor:
    """model.loss_chunk_tokens under SP: hidden (B, L/T, H) is this rank's positions, labels (B, L) whole.
    Each step gathers chunk_tokens/T tokens from every rank (so a chunk still has about chunk_tokens tokens)
    inside a checkpoint that recomputes head and loss in backward, gathers included: no rank keeps the
    whole (B, L, H) hidden states nor any logits. The loss is a sum over tokens, so the order they are
    gathered in (rank-major) does not matter, as long as the labels follow it."""
    from torch.utils.checkpoint import checkpoint

    size = dist.get_world_size(group)
    B, Lr, H = hidden.shape
    local = hidden.reshape(B * Lr, H)
    by_rank = labels.unflatten(1, (size, Lr)).transpose(0, 1).reshape(size, B * Lr)
    step = max(1, chunk_tokens // size)
    total = None
    for s in range(0, B * Lr, step):
        part = checkpoint(_chunk_loss_sum, local[s:s + step], weight, by_rank[:, s:s + step].reshape(-1), group,
                          use_reentrant=False)
        total = part if total is None else total + part
    return total / (labels != -100).sum() if reduction == "mean" else total


def _check_supported(model: nn.Module, tp_group) -> None:
    from .context_parallel import is_context_parallel

    if not isinstance(model, CausalLM) or not all(isinstance(b, M2GPTBlock) for b in model.blocks):
        raise ValueError(f"sequence parallelism supports M2-GPT (model.arch m2_gpt) for now, not "
                         f"{type(model).__name__}: set parallel.sequence_parallel=false")
    if getattr(model, "_tp_group", None) is not tp_group or dist.get_world_size(tp_group) < 2:
        raise ValueError("sequence parallelism needs tensor parallelism (parallel.tensor_parallel > 1), applied "
                         "first (m2train.parallel.apply_parallelism's order)")
    if is_context_parallel(model):
        raise ValueError("sequence parallelism together with context parallelism is not supported: set "
                         "parallel.sequence_parallel=false or parallel.context_parallel=1")
    if model.pos_embed is not None:
        raise ValueError("sequence parallelism does not support model.position_embeddings=true (M2-GPT's "
                         "filters carry position; the learned table would need this rank's offset)")
    if is_sequence_parallel(model):
        raise ValueError("apply_sequence_parallel: this model is already sequence-parallel")


def apply_sequence_parallel(model: nn.Module, tp_group) -> nn.Module:
    """Make a tensor-parallel M2-GPT keep only this TP rank's positions outside its TP regions, in place.
    Inputs and labels stay whole on every TP rank; logits are the whole sequence's vocab shard, as under TP."""
    _check_supported(model, tp_group)
    rank, size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    sp = "SequenceParallel"
    for m in list(model.modules()):
        if isinstance(m, TensorParallelMixer):
            _swap_class(m, _SequenceParallelMixer, sp)
            assert isinstance(m.in_linear, ColumnParallelLinear)
            _swap_class(m.in_linear, _SequenceParallelColumnLinear, sp)
        elif isinstance(m, TensorParallelGLU):
            _swap_class(m, _SequenceParallelGLU, sp)
        elif isinstance(m, VocabParallelEmbedding):
            _swap_class(m, _SequenceParallelEdges, sp)
    norms = [model.final_norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
    norms += [b.mixer.input_norm for b in model.blocks if b.mixer.input_norm is not None]
    for norm in norms:
        _swap_class(norm, _SequenceParallelLayerNorm, sp, group=tp_group)
    for drop in [model.dropout] + [b.dropout for b in model.blocks]:
        _swap_class(drop, _SequenceParallelDropout, sp, tp_rank=rank, tp_size=size)
    _swap_class(model, _SequenceParallelCausalLMHead, sp)
    model.sequence_parallel = True
    return model


def is_sequence_parallel(model: nn.Module) -> bool:
    return bool(getattr(model, "sequence_parallel", False))


__all__ = ["apply_sequence_parallel", "is_sequence_parallel", "sequence_parallel_chunked_loss"]
