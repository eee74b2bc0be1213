"""Megatron-style tensor parallelism (TP) for built M2-GPT / M2-BERT models.

`apply_tensor_parallel(model, tp_group)` shards a model built as usual (models never see torch.distributed)
in place: each TP rank keeps 1/T of the channels of every sequence mixer, 1/T of every GLU's intermediate
units and 1/T of the vocabulary; everything else (LayerNorms, biases after a reduction, position / token-type
embeddings, the filters' shared MLP, z and freq) stays replicated. Communication follows megatron's two
mappings (copy to the TP region = identity forward / all-reduce backward, reduce from it = all-reduce
forward / identity backward; own autograd functions, m2train.parallel.tp_regions) and uses megatron-core's
`vocab_parallel_cross_entropy` for the loss.

Per layer and micro-batch of N = B·L tokens (fp32 words; H hidden, O filter order, V vocab):

  sequence mixer   in_linear column-parallel: rank r keeps rows r of each of x1 / x2 / v, so the short conv,
                   the gating and both long convs are local. The mixer input u is copied to the TP region once
                   (its backward all-reduce covers both consumers: in_linear and the residual long conv, which
                   reads channels r of u). out_linear row-parallel: forward all-reduce of (N, H).
                   -> 1 all-reduce (N, H) forward + 1 all-reduce (N, H) backward.
  implicit filters each filter's last Linear (O -> H) keeps output rows r; the shared MLP features (L, O) are
                   copied to the TP region (backward all-reduce of (L, O) per filter MLP: 2 per mixer causal,
                   4 bidirectional) so the replicated MLP weights, z and freq get full gradients.
  GLU (blockdiag)  rank r keeps row slice r of every [A; B] block (gate and value slices stay paired) and
                   the matching column slices of Wo's blocks; the partial (N, H) output is all-reduced.
                   -> 1 all-reduce (N, H) forward + 1 all-reduce (N, H) backward (input copy). Dense GLUs
                   shard the same way (megatron's column -> row MLP).
  embedding        vocab-parallel: forward all-reduce (N, H); no backward communication.
  LM / MLM head    tied decoder vocab-parallel: backward all-reduce of (N', H) for the copied input; the
                   cross-entropy all-reduces 3 scalars per token (max, target logit, sum of exp).

So a layer costs 2 forward + 2 backward all-reduces of an (N, H) activation, as a Transformer layer under
megatron TP; activations stay replicated between layers unless m2train.parallel.sequence_parallel splits them
by position (it overrides the region edges, `_RegionEdges`, and the layers that read a region's input).

Dropout: TP peers share one RNG stream (the trainer seeds them alike), so replicated activations get the
same masks on every rank; dropout on sharded activations (`sharded_dropout`) draws the unsharded mask and
keeps this rank's slice, so channels on different ranks are not dropped in lockstep. The fused Triton
mixer's in-kernel dropout likewise draws the seeds of all H channels and keeps this rank's H/T: a rank's
channels get exactly the masks they would get unsharded.

Fused kernels (model.kernels, m2train.kernels): the sharded mixer runs M2SequenceMixer's own
`_forward_reference` on its H/T channels, so whatever that path fuses (the short conv and the dropout inside
the gated FFT-conv kernel, the residual conv adding the main branch as it stores) is fused under TP too; only
the steps that touch other ranks (`_drop_channels`, `_dropout_seeds`, `_own_channels`, `_project_out`) are
its own. A block-diagonal GLU's slices run the GLU kernels as one (the training MLP op of kernels/glu.py,
or with dropout between the layers the up-projection kernel and the block-diagonal kernel for Wo's kept
columns); the partial output is scattered into its blocks and all-reduced as on the torch path.

State dicts (m2train.parallel.tp_plan): `shard_rules(model, T)` describes how every sharded tensor of the
full model is split; `shard_state_dict` / `merge_state_dicts` / `gather_state_dict` convert exactly between
the full (single-process) state dict and the per-rank shards, so checkpoints, export and evaluation all use
the normal single-process layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import ops
from ..models.base import kernel_mode
from ..models.blockdiag import blockdiag_matmul
from ..models.glu import MonarchGLU
from ..models.heads import mlm_forward
from ..models.mixer import M2SequenceMixer, linear_to_channels_first
from ..models.outputs import ModelOutput, upcast
# The collectives at the TP regions' edges (megatron's mappings) live in tp_regions.
from .tp_regions import copy_to_tp as _copy_to_tp
from .tp_regions import reduce_from_tp as _reduce_from_tp
# The plan and the state-dict conversions live in tp_plan; re-exported here, where callers look for them.
from .tp_plan import (GLUOutShard, Shard, check_tensor_parallel, gather_state_dict,  # noqa: F401
                      gather_tensors, merge_state_dicts, shard_rules, shard_state_dict)


def sharded_dropout(x: torch.Tensor, dropout: nn.Dropout, dim: int, rank: int, size: int,
                    groups: int = 1) -> torch.Tensor:
    """Dropout of a tensor sharded along `dim` over TP ranks that share one RNG stream (the trainer seeds
    TP peers alike so replicated activations get equal masks). Plain dropout would give every rank the SAME
    mask on its different channels; instead each rank draws the mask of the whole unsharded tensor (the
    RNG advances alike everywhere) and keeps its own channels' part, so masks are independent across
    channels and each channel gets exactly its unsharded mask. `groups`: the unsharded `dim` is that many
    equal chunks, each split over the ranks (a block-diagonal GLU's gate blocks); 1 = one contiguous slice
    per rank."""
    p = dropout.p
    if not dropout.training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    shape = list(x.shape)
    width = shape[dim]
    shape[dim] = width * size
    # Scaled before the product, as torch's CPU dropout does: for TP = 1 this is bit for bit F.dropout.
    keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p).div_(1.0 - p)
    # The kept slice is copied out: the product saves the mask it used, and a view would keep the whole
    # unsharded mask alive until backward.
    if groups == 1:
        return x * keep.narrow(dim, rank * width, width).contiguous()
    dim = dim % x.dim()
    mine = keep.unflatten(dim, (groups, size, width // groups)).select(dim + 1, rank).flatten(dim, dim + 1)
    return x * mine.contiguous()


def _mark_parallel(p: torch.Tensor, dim: int) -> None:
    """Tag a sharded parameter the way megatron does: DeepSpeed's gradient-norm code counts tensors with
    `tensor_model_parallel` on every TP rank and replicated ones on TP rank 0 only."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    set_tensor_model_parallel_attributes(p, True, dim, 1)


# --------------------------------------------------------------------------------------------------
# Sharded layers (same parameter names as the layers they replace, so state-dict keys never change)
# --------------------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """y_r = copy_to_tp(x) @ W_r^T (+ b_r): output features sharded. Pass copy_input=False when the caller
    already copied x into the TP region (one backward all-reduce for several consumers). Like the mixer's
    ChannelsFirstLinear it can give its output channels-first (out_channels_first, add_bias)."""

    channels_first_output = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, copy_input: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.copy_input = group, copy_input
        _mark_parallel(self.weight, 0)
        if self.bias is not None:
            _mark_parallel(self.bias, 0)

    def forward(self, x: torch.Tensor, out_channels_first: bool = False, add_bias: bool = True) -> torch.Tensor:
        if self.copy_input:
            x = _copy_to_tp(x, self.group)
        bias = self.bias if add_bias else None
        return linear_to_channels_first(x, self.weight, bias) if out_channels_first else F.linear(x, self.weight, bias)

    def forward_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """forward(x)[..., rows], computing only those output rows (context parallelism evaluates a filter's
        output layer for the channels its rank convolves)."""
        if self.copy_input:
            x = _copy_to_tp(x, self.group)
        return F.linear(x, self.weight[rows], self.bias[rows] if self.bias is not None else None)


class _RegionEdges:
    """How a TP layer's input enters the TP region and its partial output leaves it, and how replicated
    parameters applied after the exit are used. These are megatron's copy / reduce mappings;
    m2train.parallel.sequence_parallel overrides the three for activations split along the sequence."""

    def _region_input(self, x: torch.Tensor) -> torch.Tensor:
        return _copy_to_tp(x, self.group)

    def _region_output(self, x: torch.Tensor) -> torch.Tensor:
        return _reduce_from_tp(x, self.group)

    def _replicated(self, p: torch.Tensor) -> torch.Tensor:
        return p


class VocabParallelEmbedding(_RegionEdges, nn.Module):
    """Rows [start, start + V/T) of the embedding; other ids give zeros here and the sum over TP ranks is the
    full lookup. Keeps nn.Embedding's padding_idx (no gradient for the pad row), unlike megatron's layer."""

    def __init__(self, weight: torch.Tensor, start: int, padding_idx: int | None, group):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.end = start, start + weight.shape[0]
        self.padding_idx = (padding_idx - start if padding_idx is not None
                            and self.start <= padding_idx < self.end else None)
        self.group = group
        _mark_parallel(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, padding_idx=self.padding_idx)
        return self._region_output(out.masked_fill(outside[..., None], 0.0))


class TensorParallelMixer(_RegionEdges, M2SequenceMixer):
    """The M2 sequence mixer on H/T channels: M2SequenceMixer's `_forward_reference` (with its fused Triton
    paths when the kernels are on) plus the TP communication and channel-sharded dropout. Holds the original
    mixer's submodules under the same names; still an M2SequenceMixer, so activation checkpointing's "mixer"
    mode finds it."""

    def __init__(self, mixer: M2SequenceMixer, lo: int, hi: int, group):
        nn.Module.__init__(self)                 # adopt the built submodules instead of building new ones
        for name, child in mixer.named_children():
            setattr(self, name, child)
        self.input_norm = mixer.input_norm               # optional ones may be None (not children then)
        self.residual_conv = mixer.residual_conv
        self.pad_masking, self.bidirectional = mixer.pad_masking, mixer.bidirectional
        self.kernels = mixer.kernels
        self.hidden_size = hi - lo
        self.lo, self.hi, self.group = lo, hi, group
        self.tp_rank, self.tp_size = dist.get_rank(group), dist.get_world_size(group)

    def forward(self, u: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Never the CPU no-grad fast path (M2SequenceMixer._forward_fused): it reads the weights as H x H.
        if self.input_norm is not None:
            u = self.input_norm(u)
        u = self._region_input(u)                # one backward all-reduce for in_linear + residual conv
        keep = pad_mask.to(u.dtype)[:, None, :] if self.pad_masking and pad_mask is not None else None
        return self._forward_reference(u, keep)

    def _drop_channels(self, x: torch.Tensor) -> torch.Tensor:
        return sharded_dropout(x, self.dropout, 1, self.tp_rank, self.tp_size)

    def _dropout_seeds(self, device) -> torch.Tensor:
        from ..kernels.fftconv_front import draw_seeds    # imports Triton: only once the fused path runs

        return draw_seeds(self.hidden_size * self.tp_size, device)[self.lo:self.hi]

    def _own_channels(self, u_t: torch.Tensor) -> torch.Tensor:
        return u_t[:, self.lo:self.hi]

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        """Row-parallel out_linear: this rank's partial product, all-reduced, then the (replicated) bias."""
        out = self._region_output(F.linear(y.transpose(1, 2), self.out_linear.weight))
        return out + self._replicated(self.out_linear.bias) if self.out_linear.bias is not None else out


class TensorParallelGLU(_RegionEdges, MonarchGLU):
    """MonarchGLU with I/T intermediate units per rank (block-diagonal or dense layers)."""

    def __init__(self, glu: MonarchGLU, out_blocks: list[int] | None, group):
        nn.Module.__init__(self)
        self.intermediate_size = glu.intermediate_size // dist.get_world_size(group)
        self.gated_layers, self.wo, self.dropout = glu.gated_layers, glu.wo, glu.dropout
        self.kernels = glu.kernels
        self.out_blocks = out_blocks             # blockdiag: the Wo blocks (output chunks) this rank feeds
        self.group = group
        self.tp_rank, self.tp_size = dist.get_rank(group), dist.get_world_size(group)

    def _dropout(self, act: torch.Tensor) -> torch.Tensor:
        # Block-diagonal: this rank's units are its slice of each of the nb/2 gate blocks; dense: one slice.
        groups = 1 if self.out_blocks is None else len(self.out_blocks)
        return sharded_dropout(act, self.dropout, act.dim() - 1, self.tp_rank, self.tp_size, groups)

    def forward(self, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """GLU(y) [+ residual], as MonarchGLU (the residual is added after the all-reduce)."""
        out = self._tp_glu(self._region_input(y))
        return out + residual if residual is not None else out

    def _tp_glu(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_blocks is None:              # dense
            gate, value = self._first_linear(y, self.gated_layers.weight).chunk(2, dim=-1)
            partial = F.linear(self._dropout(F.gelu(gate) * value), self.wo.weight)
        else:
            wg, wo = self.gated_layers.weight, self.wo.weight
            nb, out_chunk = 2 * wo.shape[0], wo.shape[1]
            mode = kernel_mode(self)
            if ops.kernels_enabled(y, mode) and self._kernels_take(y, wg):
                # The GLU kernels on this rank's slices: they are themselves an aligned block-diagonal GLU of
                # I/T units (gate block k still pairs with value block k + nb/2), and Wo's kept columns a
                # block-diagonal layer of nb/2 blocks. Without dropout between them, the MLP op that
                # recomputes the activation in its backward; with it, the two steps.
                part = None
                if not (self.training and self.dropout.p > 0):
                    part = ops.glu_mlp(y, wg, wo, None, self.intermediate_size, mode, apply=self._kernel_apply(y))
                if part is None:
                    act = self._dropout(ops.glu_blockdiag(y, wg, self.intermediate_size, mode,
                                                          apply=self._kernel_apply(y)))
                    part = ops.blockdiag_linear(act, wo, None, self.intermediate_size, nb // 2 * out_chunk, mode)
            else:
                gate, value = self._first_blockdiag(y, wg).chunk(2, dim=-1)
                act = self._dropout(F.gelu(gate) * value)
                part = blockdiag_matmul(act, wo)
            part = part.unflatten(-1, (nb // 2, out_chunk))
            partial = part.new_zeros(*part.shape[:-2], nb, out_chunk)
            partial[..., self.out_blocks, :] = part
            partial = partial.flatten(-2)
        out = self._region_output(partial)
        return out + self._replicated(self.wo.bias).to(out.dtype) if self.wo.bias is not None else out

    # The layers that read the region's input (m2train.parallel.sequence_parallel gathers it inside them).
    def _first_linear(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(y, w)

    def _first_blockdiag(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return blockdiag_matmul(y, w)

    def _kernels_take(self, y: torch.Tensor, w: torch.Tensor) -> bool:
        return True               # the kernel ops fall back to their reference path themselves

    def _kernel_apply(self, y: torch.Tensor):
        return None               # the kernel ops apply their autograd Functions to y as usual


# --------------------------------------------------------------------------------------------------
# Loss over a vocab-sharded head
# --------------------------------------------------------------------------------------------------
def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over positions whose label != ignore_index, from vocab-sharded logits (n, V/T): their
    mean (= the single-process F.cross_entropy(..., ignore_index)) or sum. Megatron's vocab-parallel CE
    overwrites its input in place: it gets a copy, so returned logits stay intact."""
    total = _vocab_parallel_ce_sum(upcast(logits).clone(), labels, ignore_index)
    return total / (labels != ignore_index).sum() if reduction == "mean" else total


def _vocab_parallel_ce_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed megatron-core vocab-parallel cross-entropy of (n, V/T) logits over labels != ignore_index;
    overwrites `logits`."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    valid = labels != ignore_index
    return (vocab_parallel_cross_entropy(logits, labels.masked_fill(~valid, 0)) * valid).sum()


def _vocab_parallel_loss_sum(hidden, weight, labels, group, ignore_index: int = -100) -> torch.Tensor:
    """Summed vocab-parallel cross-entropy of one token chunk, the head included (hidden (n, H) -> logits
    shard (n, V/T) -> loss); the logits are a temporary here, so megatron may overwrite them in place."""
    return _vocab_parallel_ce_sum(upcast(F.linear(_copy_to_tp(hidden, group), weight)), labels, ignore_index)


def chunked_vocab_parallel_loss(hidden, weight, labels, chunk_tokens: int, group,
                                reduction: str = "mean") -> torch.Tensor:
    """model.loss_chunk_tokens under TP: the vocab-parallel cross-entropy over labelled tokens (their mean,
    or sum), `chunk_tokens` at a time, each chunk's head + loss recomputed in backward (activation
    checkpointing, collectives included), so no (tokens x V/T) logits shard is kept. hidden (N, H),
    labels (N,)."""
    from torch.utils.checkpoint import checkpoint

    total = None
    for s in range(0, hidden.shape[0], chunk_tokens):
        part = checkpoint(_vocab_parallel_loss_sum, hidden[s:s + chunk_tokens], weight,
                          labels[s:s + chunk_tokens], group, use_reentrant=False)
        total = part if total is None else total + part
    return total / (labels != -100).sum() if reduction == "mean" else total


class _TensorParallelCausalLMHead:
    """CausalLM's head steps with the vocab-sharded tied (or untied) head: logits are this rank's vocab shard
    (`gather_logits` for the full ones), losses come from megatron's vocab-parallel cross-entropy (with
    model.loss_chunk_tokens in training: chunked_vocab_parallel_loss, no logits kept). CausalLM.forward
    itself is unchanged, and so is context parallelism's on top of it."""

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_copy_to_tp(hidden, self._tp_group), self.lm_head_weight)

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        return vocab_parallel_loss(logits.flatten(0, 1), labels.flatten(), reduction=reduction)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        return chunked_vocab_parallel_loss(hidden.flatten(0, 1), self.lm_head_weight, labels.flatten(),
                                           self.config.loss_chunk_tokens, self._tp_group, reduction)


class _TensorParallelMaskedLM:
    """EncoderForMaskedLM.forward with the vocab-sharded tied decoder (reference label semantics: labels > 0
    are scored; with mlm_logits_at_masked_only the head runs only there, logits zero elsewhere)."""

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> ModelOutput:
        hidden = self.bert(input_ids, token_type_ids, attention_mask)
        head = self.mlm

        def decode(h):
            h = head.norm(F.gelu(head.dense(h)))
            return F.linear(_copy_to_tp(h, self._tp_group), self.bert.embeddings.word_embeddings.weight,
                            head.decoder_bias)

        logits, loss = mlm_forward(decode, hidden, labels, self.config.mlm_logits_at_masked_only,
                                   loss_fn=vocab_parallel_loss)
        return ModelOutput(logits=logits, loss=loss)


# --------------------------------------------------------------------------------------------------
# Applying TP to a built model
# --------------------------------------------------------------------------------------------------
def apply_tensor_parallel(model: nn.Module, tp_group) -> nn.Module:
    """Shard a built (full, single-process-initialised) M2 model over `tp_group` in place and return it.

    Every rank must hold the same full weights beforehand (same seed, or the same loaded state dict):
    each keeps its slices. The model's forward then returns this rank's vocab shard of the logits
    (`gather_logits` for the full ones) and the full loss."""
    from megatron.core import parallel_state as ps

    size, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if size > 1 and tp_group is not ps.get_tensor_model_parallel_group():
        # megatron's vocab-parallel cross-entropy always reduces over parallel_state's TP group.
        raise ValueError("apply_tensor_parallel: tp_group must be megatron parallel_state's TP group "
                         "(m2train.parallel.groups.tp_group())")
    if getattr(model, "_tp_rules", None) is not None:
        raise ValueError("apply_tensor_parallel: this model is already tensor-parallel")
    from .context_parallel import is_context_parallel
    if is_context_parallel(model):
        # TP replaces the mixers and would drop the CP classes: m2train.parallel applies TP first.
        raise ValueError("apply_tensor_parallel: apply tensor parallelism before context parallelism")
    rules = shard_rules(model, size)
    if size == 1:
        return model
    local = shard_state_dict(model.state_dict(), rules, rank, size)

    def piece(key: str) -> torch.Tensor:
        return local[key]

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, M2SequenceMixer):
                setattr(module, child_name, _shard_mixer(child, path, piece, rank, size, tp_group))
            elif isinstance(child, MonarchGLU):
                setattr(module, child_name, _shard_glu(child, path, piece, rules, rank, size, tp_group))
    _shard_vocab(model, piece, rank, size, tp_group)
    model._tp_rules = rules
    model._tp_group = tp_group
    model.tp_size, model.tp_rank = size, rank
    return model


def _shard_mixer(mixer: M2SequenceMixer, path: str, piece, rank: int, size: int, group) -> nn.Module:
    H = mixer.hidden_size
    Hl = H // size
    mixer.in_linear = ColumnParallelLinear(piece(f"{path}.in_linear.weight"), piece(f"{path}.in_linear.bias"),
                                           group, copy_input=False)
    sc = mixer.short_conv
    sc.weight = nn.Parameter(piece(f"{path}.short_conv.weight"))
    sc.bias = nn.Parameter(piece(f"{path}.short_conv.bias"))
    sc.channels = 3 * Hl
    _mark_parallel(sc.weight, 0)
    _mark_parallel(sc.bias, 0)
    for conv_name in ("long_conv", "residual_conv"):
        conv = getattr(mixer, conv_name)
        if conv is None:
            continue
        p = f"{path}.{conv_name}"
        conv.skip = nn.Parameter(piece(f"{p}.skip"))
        _mark_parallel(conv.skip, 0)
        flt = conv.filter
        flt.deltas = piece(f"{p}.filter.deltas")
        flt.channels = Hl
        for mlp_name in ("mlp", "mlp_rev"):
            mlp = getattr(flt, mlp_name)
            if mlp is not None:
                mlp.out = ColumnParallelLinear(piece(f"{p}.filter.{mlp_name}.out.weight"), None, group)
        if hasattr(conv, "_spectrum_cache"):
            conv._spectrum_cache = None
    mixer.out_linear.weight = nn.Parameter(piece(f"{path}.out_linear.weight"))
    _mark_parallel(mixer.out_linear.weight, 1)
    return TensorParallelMixer(mixer, rank * Hl, (rank + 1) * Hl, group)


def _shard_glu(glu: MonarchGLU, path: str, piece, rules, rank: int, size: int, group) -> nn.Module:
    g, o = glu.gated_layers, glu.wo
    g.weight = nn.Parameter(piece(f"{path}.gated_layers.weight"))
    o.weight = nn.Parameter(piece(f"{path}.wo.weight"))
    wo_rule = rules[f"{path}.wo.weight"]
    out_blocks = None
    if isinstance(wo_rule, GLUOutShard):
        out_blocks = wo_rule.output_blocks(rank, size, g.nblocks)
        _mark_parallel(g.weight, 1)
        _mark_parallel(o.weight, 2)
    else:
        _mark_parallel(g.weight, 0)
        _mark_parallel(o.weight, 1)
    return TensorParallelGLU(glu, out_blocks, group)


def _shard_vocab(model: nn.Module, piece, rank: int, size: int, group) -> None:
    from ..models.bert import EncoderForMaskedLM
    from ..models.gpt import CausalLM

    V = model.config.vocab_size
    start = rank * (V // size)
    if isinstance(model, CausalLM):
        model.embed = VocabParallelEmbedding(piece("embed.weight"), start, model.embed.padding_idx, group)
        if model.lm_head is not None:
            model.lm_head.weight = nn.Parameter(piece("lm_head.weight"))
            _mark_parallel(model.lm_head.weight, 0)
        _swap_class(model, _TensorParallelCausalLMHead)
        return
    emb = model.bert.embeddings
    emb.word_embeddings = VocabParallelEmbedding(piece("bert.embeddings.word_embeddings.weight"), start,
                                                 emb.word_embeddings.padding_idx, group)
    if isinstance(model, EncoderForMaskedLM):
        model.mlm.decoder_bias = nn.Parameter(piece("mlm.decoder_bias"))
        _mark_parallel(model.mlm.decoder_bias, 0)
        model.mlm._embeddings[0] = emb.word_embeddings        # keep the decoder tied to the new shard
        _swap_class(model, _TensorParallelMaskedLM)


def _swap_class(module: nn.Module, mixin: type, prefix: str = "TensorParallel", **attrs) -> None:
    """Give this instance a subclass with `mixin` in front (the way torch's fully_shard swaps classes), named
    `prefix` + the class name, and set `attrs` on it: the class still is-a the original class and keeps
    every other method. m2train.parallel.sequence_parallel swaps its mixins in the same way."""
    cls = type(module)
    module.__class__ = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    for k, v in attrs.items():
        setattr(module, k, v)


def gather_logits(logits: torch.Tensor, group) -> torch.Tensor:
    """Full-vocabulary logits from each rank's vocab shard (no autograd: for evaluation and tests)."""
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


__all__ = ["apply_tensor_parallel", "check_tensor_parallel", "shard_rules", "shard_state_dict",
           "merge_state_dicts", "gather_state_dict", "gather_tensors", "sharded_dropout", "gather_logits",
           "vocab_parallel_loss", "chunked_vocab_parallel_loss", "ColumnParallelLinear", "VocabParallelEmbedding",
           "TensorParallelMixer", "TensorParallelGLU", "Shard", "GLUOutShard"]
