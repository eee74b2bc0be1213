"""M2-GPT (DESIGN.md §4.3): pre-LN residual blocks x += SeqMixer(LN(x)); x += MonarchGLU(LN(x)), with the
causal mixer, no learned absolute positions (the filters carry position) and a tied LM head."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .base import scaled_residual_init
from .decoding import MixerCache, mixer_step
from .glu import MonarchGLU
from .gpt import CausalLM
from .m2_bert import build_mixer


class M2GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mixer = build_mixer(cfg, bidirectional=False)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MonarchGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_type, cfg.mlp_nblocks,
                              dropout=cfg.hidden_dropout)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x)))
        if self.training and self.dropout.p > 0:
            return x + self.dropout(self.mlp(self.norm2(x)))
        # No dropout between them: the residual goes into the GLU, whose kernel adds it as Wo's output
        # is stored (no separate pass over the activations).
        return self.mlp(self.norm2(x), residual=x)

    # Incremental decoding (m2train.models.decoding): the mixer keeps its short-conv tail and long-conv
    # histories; the rest of the block is per position.
    def new_cache(self, batch: int, max_len: int, device, dtype: torch.dtype) -> MixerCache:
        return MixerCache.new(self.mixer, batch, max_len, device, dtype)

    def step(self, x: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        x = x + mixer_step(self.mixer, self.norm1(x), cache)
        return self.mlp(self.norm2(x), residual=x)


class M2GPT(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [M2GPTBlock(cfg) for _ in range(cfg.num_layers)],
                         position_embeddings=cfg.position_embeddings)

    def _init_extra(self) -> None:
        scaled_residual_init([b.mixer.out_linear for b in self.blocks], self.config.initializer_range,
                             self.config.num_layers)
