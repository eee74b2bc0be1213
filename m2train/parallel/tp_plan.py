"""The tensor-parallel plan: which tensor of an M2 model is split how over T ranks, and exact conversions
between the full (single-process) state dict and the per-rank shards.

`shard_rules(model, T)` -> {state-dict key: Shard | GLUOutShard}; `shard_state_dict` / `merge_state_dicts`
(pure tensor work, no process group: checkpoint consolidation and export use them from one process) and
`gather_state_dict` / `gather_tensors` (all_gather over the TP group). m2train.parallel.tensor_parallel
applies the plan to a built model; the layout and its communication are described there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ConfigError
from ..models.blockdiag import BlockDiagonalLinear
from ..models.glu import MonarchGLU
from ..models.mixer import M2SequenceMixer


# --------------------------------------------------------------------------------------------------
# How each tensor is split
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Split `dim` into `groups` equal groups and keep slice `rank` of each (groups=3: in_linear's x1/x2/v)."""

    dim: int
    groups: int = 1

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        parts = full.chunk(self.groups, dim=self.dim)
        return torch.cat([p.chunk(size, dim=self.dim)[rank] for p in parts], dim=self.dim).clone()

    def merge(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        per_rank = [t.chunk(self.groups, dim=self.dim) for t in locals_]
        return torch.cat([torch.cat([pr[g] for pr in per_rank], dim=self.dim) for g in range(self.groups)],
                         dim=self.dim)


@dataclass(frozen=True)
class GLUOutShard:
    """Wo of a block-diagonal GLU (nblocks, H/nb, I/nb): rank r keeps, for each gate block k, the columns of
    Wo that read act columns k·out_blk + r·s ... + s (s = out_blk / T), all inside one Wo block."""

    out_blk: int       # rows per [A; B] block (2I / nb)
    in_o: int          # Wo block input width (I / nb)

    def _slices(self, rank: int, size: int, nb: int):
        s = self.out_blk // size
        for k in range(nb // 2):
            c = k * self.out_blk + rank * s
            yield k, c // self.in_o, c % self.in_o, s

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        nb = full.shape[0]
        return torch.stack([full[j, :, c0:c0 + s] for _, j, c0, s in self._slices(rank, size, nb)]).clone()

    def merge(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        size, nb = len(locals_), 2 * locals_[0].shape[0]
        full = locals_[0].new_zeros(nb, locals_[0].shape[1], self.in_o)
        for r, loc in enumerate(locals_):
            for k, j, c0, s in self._slices(r, size, nb):
                full[j, :, c0:c0 + s] = loc[k]
        return full

    def output_blocks(self, rank: int, size: int, nb: int) -> list[int]:
        return [j for _, j, _, _ in self._slices(rank, size, nb)]


# --------------------------------------------------------------------------------------------------
# Planning: which tensors are split how
# --------------------------------------------------------------------------------------------------
def _glu_plan(glu: MonarchGLU, size: int, where: str) -> dict[str, object]:
    g, o, I = glu.gated_layers, glu.wo, glu.intermediate_size
    if isinstance(g, nn.Linear) and isinstance(o, nn.Linear):
        if I % size:
            raise ConfigError(f"model.intermediate_size={I} is not divisible by parallel.tensor_parallel={size}")
        return {"gated_layers.weight": Shard(0, groups=2), "wo.weight": Shard(1)}
    if not (isinstance(g, BlockDiagonalLinear) and isinstance(o, BlockDiagonalLinear)):
        raise ConfigError(f"tensor parallelism supports model.mlp_type blockdiag or dense, not "
                          f"{type(g).__name__} ({where})")
    nb = g.nblocks
    aligned = (o.nblocks == nb and nb % 2 == 0 and g.out_blk * nb == 2 * I and o.in_blk * nb == I
               and g.in_blk * nb == g.in_features and o.out_blk * nb == o.out_features
               and g.out_blk == 2 * o.in_blk)
    if not aligned:
        raise ConfigError(f"tensor parallelism needs model.mlp_nblocks (={nb}) even and dividing "
                          f"model.hidden_size and model.intermediate_size ({where})")
    if size % 2 or g.out_blk % size or o.in_blk % (g.out_blk // size):
        raise ConfigError(f"parallel.tensor_parallel={size}: a block-diagonal GLU shards by slices of its "
                          f"{nb} blocks, so the TP size must be even and divide 2*intermediate_size/"
                          f"mlp_nblocks={g.out_blk}")
    return {"gated_layers.weight": Shard(1), "wo.weight": GLUOutShard(g.out_blk, o.in_blk)}


def _mixer_plan(mixer: M2SequenceMixer, size: int) -> dict[str, object]:
    from ..models.mixer import LongConv

    H = mixer.hidden_size
    if H % size:
        raise ConfigError(f"model.hidden_size={H} is not divisible by parallel.tensor_parallel={size}")
    plan: dict[str, object] = {"in_linear.weight": Shard(0, groups=3), "in_linear.bias": Shard(0, groups=3),
                               "short_conv.weight": Shard(0, groups=3), "short_conv.bias": Shard(0, groups=3),
                               "out_linear.weight": Shard(1)}
    for conv_name in ("long_conv", "residual_conv"):
        conv = getattr(mixer, conv_name)
        if conv is None:
            continue
        if not isinstance(conv, LongConv):
            raise ConfigError(f"tensor parallelism supports model.sequence_mixer=fft only "
                              f"(got {type(conv).__name__}, whose Monarch basis is shared by all channels)")
        plan[f"{conv_name}.skip"] = Shard(0)
        plan[f"{conv_name}.filter.deltas"] = Shard(0)
        plan[f"{conv_name}.filter.mlp.out.weight"] = Shard(0)
        if conv.filter.mlp_rev is not None:
            plan[f"{conv_name}.filter.mlp_rev.out.weight"] = Shard(0)
    return plan


def check_tensor_parallel(model: nn.Module, size: int) -> None:
    """Raise a ConfigError naming the config key if `model` cannot be split over `size` TP ranks."""
    shard_rules(model, size)


def shard_rules(model: nn.Module, size: int) -> dict[str, object]:
    """{state-dict key: Shard | GLUOutShard} for every tensor split across `size` TP ranks (from the FULL
    model, or from an already sharded one: the rules are stored on it)."""
    if getattr(model, "_tp_rules", None) is not None:
        return model._tp_rules
    from ..models.bert import EncoderForMaskedLM, EncoderForSequenceClassification
    from ..models.gpt import CausalLM

    cfg = model.config
    if cfg.arch not in ("m2_gpt", "m2_bert"):
        raise ConfigError(f"parallel.tensor_parallel>1 supports model.arch m2_gpt and m2_bert, not {cfg.arch!r}")
    if size < 1:
        raise ConfigError(f"parallel.tensor_parallel: must be >= 1, got {size}")
    if cfg.vocab_size % size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tensor_parallel="
                          f"{size} (pad the vocabulary)")
    rules: dict[str, object] = {}
    if size == 1:
        return rules
    for name, module in model.named_modules():
        if isinstance(module, M2SequenceMixer):
            rules.update({f"{name}.{k}": v for k, v in _mixer_plan(module, size).items()})
        elif isinstance(module, MonarchGLU):
            rules.update({f"{name}.{k}": v for k, v in _glu_plan(module, size, name).items()})
    if isinstance(model, CausalLM):
        rules["embed.weight"] = Shard(0)
        if model.lm_head is not None:
            rules["lm_head.weight"] = Shard(0)
    elif isinstance(model, (EncoderForMaskedLM, EncoderForSequenceClassification)):
        rules["bert.embeddings.word_embeddings.weight"] = Shard(0)
        if isinstance(model, EncoderForMaskedLM):
            rules["mlm.decoder_bias"] = Shard(0)
    else:
        raise ConfigError(f"tensor parallelism does not know the model class {type(model).__name__}")
    return rules


# --------------------------------------------------------------------------------------------------
# State dicts: full <-> per-rank
# --------------------------------------------------------------------------------------------------
def shard_state_dict(full: dict, rules: dict, rank: int, size: int) -> dict:
    """This rank's state dict from a full single-process one (keys may carry a prefix such as 'module.')."""
    out = {}
    for key, value in full.items():
        rule = _rule_for(key, rules)
        out[key] = rule.shard(value, rank, size) if rule is not None else value
    return out


def merge_state_dicts(shards: list[dict], rules: dict) -> dict:
    """The full single-process state dict from every TP rank's state dict (rank order)."""
    out = {}
    for key, value in shards[0].items():
        rule = _rule_for(key, rules)
        out[key] = rule.merge([s[key] for s in shards]) if rule is not None else value
    return out


def gather_state_dict(model: nn.Module, group=None) -> dict:
    """The full state dict of a TP-sharded model, on every TP rank (all_gather of each sharded tensor)."""
    return gather_tensors(model.state_dict(), shard_rules(model, 1),
                          group if group is not None else model._tp_group)


def gather_tensors(local: dict, rules: dict, group) -> dict:
    """Full tensors from every TP rank's {state-dict key: local tensor} (e.g. parameters or their
    gradients): each sharded entry is all-gathered over `group` and merged; the others are kept as is."""
    size = dist.get_world_size(group)
    shards = [dict(local) for _ in range(size)]
    for key, value in local.items():
        if _rule_for(key, rules) is None:
            continue
        parts = [torch.empty_like(value) for _ in range(size)]
        dist.all_gather(parts, value.contiguous(), group=group)
        for r in range(size):
            shards[r][key] = parts[r]
    return merge_state_dicts(shards, rules)


def _rule_for(key: str, rules: dict):
    if key in rules:
        return rules[key]
    for prefix in ("module.", "_orig_mod."):           # DeepSpeed engine / torch.compile prefixes
        if key.startswith(prefix) and key[len(prefix):] in rules:
            return rules[key[len(prefix):]]
    return None
