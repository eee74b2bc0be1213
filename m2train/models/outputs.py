"""What every model returns: logits at every position (by default) and the loss when labels are given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]     # None only from a chunked-loss training forward (gpt.CausalLM)
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None

    def __getitem__(self, key: str):  # output["logits"] like Hugging Face outputs
        return getattr(self, key)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least fp32 (bf16 logits lose too much), and in fp64 for fp64 models."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
