"""Activation checkpointing: keep only a module's inputs during forward, recompute its insides in backward.

    apply_activation_checkpointing(model, "every_block")      # or none | every_k | mixer

Modes:
- none:        nothing (and undoes an earlier call).
- every_block: every residual block (model.blocks for causal LMs, model.bert.layers for encoders).
- every_k:     the k-th, 2k-th, ... block (1-based: blocks k-1, 2k-1, ... counting from 0); k=1 is every block.
- mixer:       only the sequence mixers (M2SequenceMixer or self-attention) inside each block: they hold
               most of the activations (3H-wide in_linear output, FFT buffers / attention), the MLP keeps
               its own.

How: the chosen modules get their class swapped for a subclass whose forward runs the original forward
under torch.utils.checkpoint(use_reentrant=False). The modules stay where they are, so parameter names
and state_dict keys do not change and checkpoints load with or without checkpointing. The non-reentrant
variant is the one that works under DeepSpeed ZeRO-2/3 (ENVIRONMENT.md), supports keyword arguments and
inputs that do not require grad, and restores the RNG state so dropout masks match in the recompute.

Forward hooks of a checkpointed module itself run once (not again in the recompute); those of its
submodules run in both passes. ZeRO-3 gathers parameters per module, so the blocks and mixers we wrap hold
no parameters of their own (only their submodules do), which keeps the recompute's gathers correct.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "every_block", "every_k", "mixer")


class _CheckpointedForward:
    """Mixin placed in front of a module's class: forward = checkpoint(original forward)."""

    _m2_checkpointed = True

    def forward(self, *args, **kwargs):
        original = super().forward
        # Without autograd there is nothing to save, so nothing to gain (and checkpoint would warn).
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)


_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """The cached subclass `Checkpointed<cls>` with the checkpointing forward in front."""
    if cls not in _SUBCLASSES:
        sub = type(f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls), {"_m2_original_class": cls})
        sub.__module__ = cls.__module__
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def is_checkpointed(module: nn.Module) -> bool:
    return getattr(type(module), "_m2_checkpointed", False)


def checkpoint_module(module: nn.Module) -> None:
    """Make `module` recompute its forward in backward (in place; idempotent)."""
    if not is_checkpointed(module):
        module.__class__ = _checkpointed_class(type(module))


def uncheckpoint_module(module: nn.Module) -> None:
    if is_checkpointed(module):
        module.__class__ = type(module)._m2_original_class


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of an m2train model, in order: model.blocks (M2-GPT, GPT) or model.bert.layers
    (M2-BERT, BERT, their classifiers)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None and hasattr(model, "bert"):
        blocks = getattr(model.bert, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"activation checkpointing: {type(model).__name__} has neither .blocks nor "
                         ".bert.layers (an nn.ModuleList of blocks); apply it before wrapping the model "
                         "(e.g. in a DeepSpeed engine)")
    return list(blocks)


def _mixer_types() -> tuple[type, ...]:
    from ..models.mixer import M2SequenceMixer
    from ..models.transformer import SelfAttention
    return (M2SequenceMixer, SelfAttention)


def _mixers(block: nn.Module) -> Iterator[nn.Module]:
    types = _mixer_types()
    found = [m for m in block.modules() if isinstance(m, types)]
    if not found:
        raise ValueError(f"activation checkpointing mode 'mixer': no sequence mixer (M2SequenceMixer or "
                         f"SelfAttention) inside {type(block).__name__}")
    return iter(found)


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Undo `apply_activation_checkpointing` on every module of `model`."""
    for m in model.modules():
        uncheckpoint_module(m)


def apply_activation_checkpointing(model: nn.Module, mode: str = "every_block", every_k: int = 2) -> nn.Module:
    """Checkpoint the modules `mode` selects, in place, replacing any earlier choice; returns `model`
    (the same object: nothing is wrapped). `checkpointed_module_names(model)` lists what was chosen.

    Call it on the bare model, after tensor/context parallelism and before the DeepSpeed engine wraps it."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing: unknown mode {mode!r} (use one of {', '.join(MODES)})")
    remove_activation_checkpointing(model)
    if mode == "none":
        return model
    blocks = model_blocks(model)
    if mode == "every_block":
        chosen = blocks
    elif mode == "every_k":
        if every_k < 1:
            raise ValueError(f"train.checkpoint_every_k: must be >= 1, got {every_k}")
        chosen = [b for i, b in enumerate(blocks) if (i + 1) % every_k == 0]
    else:
        chosen = [m for b in blocks for m in _mixers(b)]
    for m in chosen:
        checkpoint_module(m)
    return model


def checkpointed_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the checkpointed modules, e.g. ["blocks.0", "blocks.1"]."""
    return [name for name, m in model.named_modules() if is_checkpointed(m)]


# --------------------------------------------------------------------------------------------------
# measuring what backward keeps alive
# --------------------------------------------------------------------------------------------------

def saved_activation_bytes(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of activations held for backward when `step()` (a forward returning the loss) finishes.

    Counts every tensor autograd saves (via saved_tensors_hooks) plus the inputs that checkpointed modules
    keep for their recompute (non-reentrant checkpoint stores those itself, outside the hooks), once per
    storage, excluding parameter and buffer storages (weights are not activations). The tensors saved
    inside checkpointed regions are dropped by the checkpoint's own hooks and never reach ours, which is
    exactly the memory checkpointing saves."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def note(t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in weights and s.data_ptr() != 0:
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())

    def pack(t):
        note(t)
        return t

    def pre_hook(module, args, kwargs):
        if torch.is_grad_enabled():
            for a in (*args, *kwargs.values()):
                note(a)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True)
               for m in model.modules() if is_checkpointed(m)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
    finally:
        for h in handles:
            h.remove()
    del loss
    return sum(seen.values())
