"""What ZeRO-3 needs from the models beyond DeepSpeed's module hooks.

ZeRO-3 keeps each parameter partitioned over the data-parallel ranks and gathers it only while the module
that owns it runs forward or backward. The chunked LM loss (model.loss_chunk_tokens,
m2train.models.chunked_loss) recomputes the head's logits inside its own backward, outside the embedding
module that owns the tied head weight, where nothing has gathered it: `enable_chunked_loss` gives the model
a gather for exactly that weight, exactly there.
"""

from __future__ import annotations

import contextlib

import torch


def gather_if_partitioned(param: torch.Tensor):
    """A context in which a ZeRO-3 parameter holds its full value: gathered on entry and partitioned again
    on exit when it is partitioned now, nothing when it is already whole (DeepSpeed's own hooks gathered it,
    or it is not a ZeRO-3 parameter). A collective: every data-parallel rank must enter it, as they all
    run the same backward."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

    if getattr(param, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE:
        return contextlib.nullcontext()
    return GatheredParameters([param])


def enable_chunked_loss(model: torch.nn.Module) -> None:
    """Let a causal LM's chunked loss gather its head weight under ZeRO-3 (a no-op for other models)."""
    if hasattr(model, "head_weight_gather"):
        model.head_weight_gather = gather_if_partitioned


__all__ = ["gather_if_partitioned", "enable_chunked_loss"]
