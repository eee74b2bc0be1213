"""Context parallelism (CP): one long sequence sharded over the ranks of a CP group (DESIGN.md §5).

    model = apply_context_parallel(model, cp_group)       # a built M2-GPT or M2-BERT (MLM), in place
    batch = shard_batch(batch, cp_group)                  # every rank: the same batch -> its chunk
    out = model(**batch)                                  # out.logits: this rank's chunk; out.loss: global

Rank r of a CP group of size P holds positions [r·L/P, (r+1)·L/P) of every sequence, (B, L/P, H). Through
an M2 model that costs three kinds of exchange, each a custom autograd.Function whose backward is the
inverse exchange, so a plain loss.backward() is correct:

- Everything per position stays local: embeddings (BERT's absolute positions get the chunk offset),
  in_linear, gates, out_linear, norms, the GLU MLP and the LM/MLM head.
- The causal depthwise short conv (kernel K) needs K-1 positions before the chunk: a halo exchange sends
  each rank's last K-1 positions (of the 3H in_linear channels) to the next rank; rank 0 gets zeros, which
  is the zero padding of the unsharded conv. Backward sends the halo's gradient back.
- Around each long convolution (the gated one and the residual one) an all-to-all swaps sequence sharding
  (B, H, L/P) for channel sharding (B, H/P, L): the convolution is depthwise, so each rank then convolves
  whole sequences, causal or bidirectional, for its H/P channels with those channels' kernel (only those
  channels' rows of the filter's output layer are evaluated), D skip included; a second all-to-all swaps
  back. The implicit filter is evaluated at the GLOBAL length L, so the kernel is the unsharded model's.
  With the fused Triton kernels on (model.kernels) and a residual conv, both convs share the exchanges:
  v ⊙ x1, x2 and u go over in one all-to-all, the gated kernel and the residual kernel (which adds the
  gated result) run channel-sharded, and their sum comes back in one (`context_parallel_gated_convs`).

With tensor parallelism (applied first, m2train.parallel.apply_parallelism) each TP rank's mixer holds H/T
channels; CP runs on top of them through the mixer's own channel hooks, so the exchanges above move H/T
channels within the CP group (rank r of it convolving H/(T·P)), the filters' output rows stay column-parallel
(`_output_rows`), and the loss uses the model's vocab-parallel head steps (`lm_logits`, `token_loss`,
`lm_loss`) summed over the chunk.

Nothing is O(L²) and no rank ever holds a (.., H, L) activation: per rank the long-conv activations are
(B, H/P, L), the same size as the (B, H, L/P) chunk.

Gradients: every rank computes the same loss (the global token mean, `out.loss`) and backpropagates it.
Parameters are replicated over CP ranks and each rank's gradient is the contribution of its positions
(or channels), so the true gradient is the SUM over CP ranks. megatron-style layouts (m2train.parallel.
groups: ZeRO averages over the dp x cp group) AVERAGE instead, so by default (`grad_reduction="mean"`)
the loss's gradient is scaled by P while its value stays the global mean; pass grad_reduction="sum"
when the gradient reduction sums over CP ranks.

For the trainer (m2train/train/trainer.py):
    apply_context_parallel(model, groups.cp_group())   before activation checkpointing / engine wrap
    shard_batch(batch, cp_group)                        each (B, L) tensor of the batch -> (B, L/P)
    shard_sequence(tensor, cp_group, dim=1)             one tensor
    gather_sequence(tensor, cp_group, dim=1)            the inverse (eval / inspection; not for training)
    global_token_mean(local_sum, local_count, cp_group) the loss helper the model's forward uses

Not supported (clear errors): attention baselines (GPT/BERT), the learned causal Monarch long conv
(model.sequence_mixer: monarch_causal), sequence classification (its pooling needs the whole sequence),
learned absolute positions on a causal LM (M2-GPT's filters carry position).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..models.bert import BertEmbeddings, EncoderForMaskedLM
from ..models.gpt import CausalLM
from ..models.longconv import fft_size, kernel_spectrum, fft_conv
from ..models.mixer import LongConv, M2SequenceMixer
from ..models.outputs import ModelOutput, upcast
from ..models.short_conv import causal_short_conv


def _rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


# --- sharding the data -------------------------------------------------------------------------------
def shard_sequence(tensor: torch.Tensor, cp_group, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous chunk of `tensor` along `dim` (the sequence): rank r gets [r·L/P, (r+1)·L/P).
    Every CP rank must pass the same full tensor. L must be a multiple of the CP size."""
    rank, size = _rank_size(cp_group)
    L = tensor.shape[dim]
    if L % size:
        raise ValueError(f"context parallel: sequence length {L} is not a multiple of "
                         f"parallel.context_parallel={size}")
    chunk = L // size
    return tensor.narrow(dim, rank * chunk, chunk)


def shard_batch(batch: dict[str, Any], cp_group, dim: int = 1) -> dict[str, Any]:
    """shard_sequence on every tensor of a batch whose `dim` has the sequence length (that of input_ids);
    other entries (e.g. per-sequence labels) pass through unchanged."""
    L = batch["input_ids"].shape[dim]
    return {k: shard_sequence(v, cp_group, dim) if torch.is_tensor(v) and v.dim() > dim and v.shape[dim] == L
            else v for k, v in batch.items()}


def gather_sequence(tensor: torch.Tensor, cp_group, dim: int = 1) -> torch.Tensor:
    """The inverse of shard_sequence: the chunks of all CP ranks concatenated along `dim`, on every rank.
    Its backward returns this rank's slice of the gradient, which is right only when every rank computes
    the same thing from the gathered tensor: use it for evaluation and inspection, not inside a model."""
    return _GatherSequence.apply(tensor, cp_group, dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return shard_sequence(grad, ctx.group, ctx.dim).contiguous(), None, None


# --- the loss --------------------------------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum). Backward: identity, because every rank backpropagates the same reduced
    value, and each rank's gradient must only carry its own term's contribution."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def global_token_mean(local_sum: torch.Tensor, local_count: torch.Tensor, cp_group,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """Σ over CP ranks of local_sum / Σ of local_count: the loss of the unsharded sequence, the same value
    on every rank. Its gradient reaches only this rank's local_sum (identity backward of the sum), scaled
    by `grad_scale` (see the module docstring: P when the gradient reduction averages over CP ranks).
    A batch without a single labelled token gives 0 with zero gradients (as the MLM loss does unsharded)."""
    # One all-reduce for both numbers; the count carries no gradient.
    both = torch.stack([upcast(local_sum), local_count.to(upcast(local_sum).dtype).detach()])
    both = _SumOverRanks.apply(both, cp_group)
    loss = both[0] / both[1].clamp_min(1)
    return _ScaleGrad.apply(loss, grad_scale) if grad_scale != 1.0 else loss


# --- the exchanges -----------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into P chunks along scatter_dim, send chunk j to rank j, concatenate what arrives (rank
    order) along gather_dim."""
    size = dist.get_world_size(group)
    send = [c.contiguous() for c in x.chunk(size, dim=scatter_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(size)]
    dist.all_to_all(recv, send, group=group)
    return torch.cat(recv, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim` and gather `gather_dim` across the group; backward is the inverse swap.
    Around a long conv: (B, C, L/P) sequence-sharded <-> (B, C/P, L) channel-sharded."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim=scatter_dim, gather_dim=gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, scatter_dim=gather_dim, gather_dim=scatter_dim), None, None, None


def _neighbour_exchange(send: torch.Tensor | None, send_to: int | None, recv_like: torch.Tensor,
                        recv_from: int | None, group) -> torch.Tensor:
    """Post the (optional) send and receive together, then wait: a chain of ranks cannot deadlock.
    Peers are group ranks; returns the received tensor, or zeros when there is no peer to receive from."""
    ops = []
    if send_to is not None:
        ops.append(dist.isend(send.contiguous(), dist.get_global_rank(group, send_to), group=group))
    out = recv_like.new_zeros(recv_like.shape)
    if recv_from is not None:
        ops.append(dist.irecv(out, dist.get_global_rank(group, recv_from), group=group))
    for op in ops:
        op.wait()
    return out


class _Halo(torch.autograd.Function):
    """The previous rank's tail (B, C, K-1) for this rank's causal short conv; zeros on rank 0.
    Input: this rank's own tail, which goes to the next rank. Backward returns the halo's gradient to the
    previous rank and receives the gradient of this rank's tail from the next one."""

    @staticmethod
    def forward(ctx, tail, group):
        rank, size = _rank_size(group)
        ctx.group = group
        return _neighbour_exchange(tail, rank + 1 if rank + 1 < size else None, tail,
                                   rank - 1 if rank > 0 else None, group)

    @staticmethod
    def backward(ctx, grad):
        rank, size = _rank_size(ctx.group)
        return _neighbour_exchange(grad, rank - 1 if rank > 0 else None, grad,
                                   rank + 1 if rank + 1 < size else None, ctx.group), None


def halo_short_conv(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group) -> torch.Tensor:
    """The causal depthwise conv of the unsharded sequence, on this rank's chunk z (B, C, L/P):
    weight (C, K), bias (C)."""
    h = weight.shape[-1] - 1
    if h == 0:
        return causal_short_conv(z, weight, bias)
    if z.shape[-1] < h:
        raise ValueError(f"context parallel: a chunk of {z.shape[-1]} positions is shorter than the short "
                         f"conv's halo ({h} = model.short_conv_kernel - 1): use fewer CP ranks or longer "
                         "sequences")
    halo = _Halo.apply(z[..., -h:], group)
    return causal_short_conv(torch.cat([halo, z], dim=-1), weight, bias)[..., h:]


def _channel_kernels(conv: LongConv, L: int, channels: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The filter's (k_fwd, k_rev) at length L for `channels` only: the filter MLP's trunk is shared by all
    channels, its output layer and the decay are per channel, so only those rows are evaluated."""
    f = conv.filter
    if L > f.max_len:
        raise ValueError(f"sequence length {L} exceeds the filter's max_seq_len {f.max_len}")
    decay = torch.exp(-f.t[:L] * f.deltas[channels].abs())            # (L, C)

    def kernel(mlp):
        z = f.z[:L]
        for lin in mlp.linears:
            z = f.sin(lin(z))
        return (_output_rows(mlp.out, z, channels) * decay).transpose(0, 1)       # (C, L)

    return kernel(f.mlp), (kernel(f.mlp_rev) if f.mlp_rev is not None else None)


def _output_rows(linear: nn.Module, z: torch.Tensor, rows: slice) -> torch.Tensor:
    """linear(z)[..., rows] without the other rows' products.
    Under tensor parallelism the layer is column-parallel and its `forward_rows` also copies z into the TP
    region, so the replicated filter trunk gets the gradients of every TP rank's channels."""
    if hasattr(linear, "forward_rows"):
        return linear.forward_rows(z, rows)
    return F.linear(z, linear.weight[rows], linear.bias[rows] if linear.bias is not None else None)


def context_parallel_long_conv(conv: LongConv, x: torch.Tensor, group) -> torch.Tensor:
    """longconv(x, k) + D ⊙ x of the unsharded sequence for this rank's chunk x (B, H, L/P) -> (B, H, L/P),
    computed channel-sharded between two all-to-alls."""
    c = _channel_slice(x.shape[1], group)
    xc = _AllToAll.apply(x, group, 1, 2)                              # (B, H/P, L)
    if conv.use_kernel(xc):
        # The fused Triton FFT conv (kernels.fftconv, model.kernels): after the all-to-all this rank holds
        # whole sequences of its channels, exactly what the kernel takes. The gates stay outside: x1, x2
        # are sequence-sharded.
        y = _kernel_conv(conv, xc, c)
    else:
        L = xc.shape[-1]
        n = fft_size(L)
        y = fft_conv(xc, kernel_spectrum(*_channel_kernels(conv, L, c), n), n) \
            + xc * conv.skip[c].to(xc.dtype)[:, None]
    return _AllToAll.apply(y, group, 2, 1)                           # (B, H, L/P)


def _channel_slice(H: int, group) -> slice:
    """The channels [r·H/P, (r+1)·H/P) this rank convolves between the all-to-alls."""
    rank, size = _rank_size(group)
    return slice(rank * H // size, (rank + 1) * H // size)


def _kernel_conv(conv: LongConv, xc: torch.Tensor, c: slice, **fused) -> torch.Tensor:
    """kernels.fftconv.fused_long_conv on this rank's channels c (xc (B, H/P, L), whole sequences) with those
    channels' filter taps and skip; `fused`: its gate_out / addend."""
    from ..kernels.fftconv import fused_long_conv

    return fused_long_conv(xc, *_channel_kernels(conv, xc.shape[-1], c), conv.skip[c], **fused)


def _kernels_take_channel_shards(mixer: M2SequenceMixer, like: torch.Tensor, size: int) -> bool:
    """Whether both long convs run the fused kernels on this rank's channel shard (B, H/P, L) of the
    sequence-sharded `like` (B, H, L/P). Decided before the exchange, from a stand-in of that shape and
    dtype (a 0-dim tensor expanded: no memory), so every rank decides the same."""
    convs = (mixer.long_conv, mixer.residual_conv)
    if not all(isinstance(c, LongConv) for c in convs):
        return False
    B, H, Lc = like.shape
    shard = like.new_empty(()).expand(B, H // size, Lc * size)
    return all(c.use_kernel(shard) for c in convs)


def context_parallel_gated_convs(mixer: M2SequenceMixer, v: torch.Tensor, x2: torch.Tensor, u_t: torch.Tensor,
                                 group) -> torch.Tensor:
    """(longconv(v, k) + D ⊙ v) ⊙ x2 + longconv(u, k2) + D2 ⊙ u of the unsharded sequence for this rank's
    chunks v (the gated input v ⊙ x1), x2, u_t, each (B, H, L/P) -> (B, H, L/P), with the fused kernels.

    One all-to-all brings this rank's H/P channels of all three over the whole sequence; the gated kernel
    (output gate x2 applied as it stores) and the residual kernel (adding the gated result as it stores)
    run on them; one all-to-all brings the sum back. That moves the same bytes as an exchange there and
    back around each conv (3 + 1 chunks instead of 2 + 2), with half the collectives, and the output gate
    and the sum never take a pass of their own."""
    c = _channel_slice(v.shape[1], group)
    parts = _AllToAll.apply(torch.stack([v, x2, u_t]), group, 2, 3)      # (3, B, H/P, L)
    vc, x2c, uc = parts.unbind(0)                                      # each contiguous
    y = _kernel_conv(mixer.long_conv, vc, c, gate_out=x2c)
    y = _kernel_conv(mixer.residual_conv, uc, c, addend=y)
    return _AllToAll.apply(y, group, 2, 1)                             # (B, H, L/P)


# --- the model pieces, by class swap -----------------------------------------------------------------
class _ContextParallelMixer:
    """Mixin in front of the mixer's class: M2SequenceMixer's `_forward_reference` with the short conv and both
    long convs replaced by their context-parallel versions. The per-channel steps are the mixer's own hooks
    (`_drop_channels`, `_own_channels`, `_project_out`), so in front of a tensor-parallel mixer (TP applied
    first) this runs on its H/T channels with its channel-sharded dropout and row-parallel out_linear: the CP
    exchanges then move H/T channels within the CP group. The CPU no-grad fast path and the kernel with the
    short conv fused in front are never taken: both convolve the local chunk as if it were the whole
    sequence."""

    _cp_group = None

    def _can_fuse(self, u: torch.Tensor) -> bool:
        return False

    def _forward_reference(self, u: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        group = self._cp_group
        z = self.in_linear(u).transpose(1, 2)                       # (B, 3H, L/P)
        if keep is not None:
            z = z * keep
        z = halo_short_conv(z, self.short_conv.weight[:, 0, :], self.short_conv.bias, group)
        x1, x2, v = z.split(self.hidden_size, dim=1)
        v = self._drop_channels(v * x1)
        if keep is not None:
            v = v * keep
        if self.residual_conv is None:
            # Sending x2 along would cost a third more bytes than gating here.
            y = context_parallel_long_conv(self.long_conv, v, group) * x2
            return self._project_out(self._drop_channels(y))
        u_t = self._own_channels(u.transpose(1, 2))
        if keep is not None:
            u_t = u_t * keep
        if _kernels_take_channel_shards(self, v, dist.get_world_size(group)):
            y = context_parallel_gated_convs(self, v, x2, u_t, group)
        else:
            y = context_parallel_long_conv(self.long_conv, v, group) * x2
            y = y + context_parallel_long_conv(self.residual_conv, u_t, group)
        return self._project_out(self._drop_channels(y))


class _ContextParallelBertEmbeddings:
    """BertEmbeddings for a sequence chunk: absolute positions start at the chunk's offset."""

    _cp_group = None

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        rank, size = _rank_size(self._cp_group)
        Lc = input_ids.shape[1]
        return self.embed_chunk(input_ids, token_type_ids, start=rank * Lc, total_len=Lc * size)


class _ContextParallelCausalLM:
    """out.loss = the token mean over the whole (sharded) batch, identical on every CP rank."""

    _cp_group = None
    _cp_grad_scale = 1.0

    def forward(self, input_ids, labels=None, attention_mask=None) -> ModelOutput:
        # The model's own head steps (vocab-parallel ones under tensor parallelism), summed over this chunk.
        if labels is not None and self.chunked_loss:          # model.loss_chunk_tokens: no logits kept
            out = ModelOutput(logits=None)
            local_sum = self.lm_loss(self.hidden_states(input_ids), labels, "sum")
        else:
            out = super().forward(input_ids, None, attention_mask)
            if labels is not None:
                local_sum = self.token_loss(out.logits, labels, "sum")
        if labels is not None:
            out.loss = global_token_mean(local_sum, (labels != -100).sum(), self._cp_group,
                                         self._cp_grad_scale)
        return out


class _ContextParallelMaskedLM:
    """out.loss = the mean over all labelled positions of the batch, identical on every CP rank."""

    _cp_group = None
    _cp_grad_scale = 1.0

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> ModelOutput:
        out = super().forward(input_ids, token_type_ids, attention_mask, labels)
        if labels is not None:
            count = (labels > 0).sum()                # mlm_forward's definition of a labelled position
            # mlm_forward returns the local mean (0 with a graph when nothing is labelled here).
            out.loss = global_token_mean(out.loss * count, count, self._cp_group, self._cp_grad_scale)
        return out


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type, **attrs) -> None:
    """Put `mixin` in front of the module's class (cached subclass), keeping its parameters and names."""
    cls = type(module)
    if mixin in cls.__mro__:
        raise ValueError(f"{cls.__name__}: context parallelism is already applied")
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        sub = type(f"ContextParallel{cls.__name__}", (mixin, cls), {"_cp_original_class": cls})
        sub.__module__ = cls.__module__
        _SUBCLASSES[key] = sub
    module.__class__ = _SUBCLASSES[key]
    for k, v in attrs.items():
        setattr(module, k, v)


def _check_supported(model: nn.Module, size: int) -> list[M2SequenceMixer]:
    from .sequence_parallel import is_sequence_parallel

    if is_sequence_parallel(model):
        raise ValueError("context parallelism on a sequence-parallel model is not supported: set "
                         "parallel.sequence_parallel=false or parallel.context_parallel=1")
    if not isinstance(model, (CausalLM, EncoderForMaskedLM)):
        raise ValueError(f"context parallelism supports M2-GPT (causal LM) and M2-BERT masked LM models, not "
                         f"{type(model).__name__} (sequence classification pools over the whole sequence)")
    mixers = [m for m in model.modules() if isinstance(m, M2SequenceMixer)]
    blocks = model.blocks if isinstance(model, CausalLM) else model.bert.layers
    if not mixers or len(mixers) != len(blocks):
        raise ValueError(f"context parallelism needs an M2 sequence mixer in every block; {type(model).__name__} "
                         "has attention (model.arch gpt/bert): use model.arch m2_gpt or m2_bert")
    for m in mixers:
        for conv in (m.long_conv, m.residual_conv):
            if conv is not None and not isinstance(conv, LongConv):
                raise ValueError(f"context parallelism: model.sequence_mixer must be 'fft' "
                                 f"(got a {type(conv).__name__})")
        if m.hidden_size % size:
            tp = getattr(m, "tp_size", 1)
            held = (f"model.hidden_size={m.hidden_size}" if tp == 1 else
                    f"model.hidden_size / parallel.tensor_parallel={tp} = {m.hidden_size} channels per TP rank")
            raise ValueError(f"context parallelism: {held} is not a multiple of parallel.context_parallel={size} "
                             "(the long convs are split by channel)")
    if isinstance(model, CausalLM) and model.pos_embed is not None:
        raise ValueError("context parallelism: model.position_embeddings=true is not supported for causal LMs "
                         "(M2-GPT's filters carry position; set it to false)")
    return mixers


def apply_context_parallel(model: nn.Module, cp_group, grad_reduction: str = "mean") -> nn.Module:
    """Make a built M2-GPT / M2-BERT (MLM) run on sequence chunks of the CP group `cp_group`, in place.

    Only classes are swapped (mixers, BERT embeddings, the model itself): parameter names, state_dict keys
    and values are unchanged, so checkpoints load with or without CP. Inputs are then this rank's chunk
    (`shard_batch`), logits are this rank's chunk, and `loss` is the loss of the whole batch.
    grad_reduction: "mean" if the gradient reduction averages over CP ranks (m2train's ZeRO over dp x cp),
    "sum" if it sums (then grads summed over CP ranks equal the unsharded model's)."""
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
    size = dist.get_world_size(cp_group)
    mixers = _check_supported(model, size)
    for m in mixers:
        _swap_class(m, _ContextParallelMixer, _cp_group=cp_group)
    for m in model.modules():
        if isinstance(m, BertEmbeddings):
            _swap_class(m, _ContextParallelBertEmbeddings, _cp_group=cp_group)
    top = _ContextParallelCausalLM if isinstance(model, CausalLM) else _ContextParallelMaskedLM
    _swap_class(model, top, _cp_group=cp_group,
                _cp_grad_scale=float(size) if grad_reduction == "mean" else 1.0)
    return model


def is_context_parallel(model: nn.Module) -> bool:
    return any(c in type(model).__mro__ for c in (_ContextParallelCausalLM, _ContextParallelMaskedLM))


__all__ = ["apply_context_parallel", "shard_sequence", "shard_batch", "gather_sequence", "global_token_mean",
           "halo_short_conv", "context_parallel_long_conv", "context_parallel_gated_convs",
           "is_context_parallel"]
