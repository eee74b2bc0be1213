"""Transformer baselines with the same interfaces as the M2 models, for speed and quality comparisons:
BERT (post-LN, bidirectional SDPA, GELU MLP) and GPT (pre-LN, causal SDPA, GELU MLP, learned positions)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .base import scaled_residual_init
from .bert import EncoderForMaskedLM, EncoderForSequenceClassification
from .decoding import AttentionCache, attention_step
from .gpt import CausalLM


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float, causal: bool):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads(x)
        mask = None
        if attention_mask is not None and not self.causal:
            mask = attention_mask[:, None, None, :].bool()          # keys that may be attended
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.merge(y)

    # The two projections, shared with incremental decoding (m2train.models.decoding.attention_step).
    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, heads, L, head_dim) of x (B, L, H)."""
        B, L, H = x.shape
        return self.qkv(x).view(B, L, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """The attention output (B, heads, L, head_dim) through the output projection: (B, L, H)."""
        B, _, L, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class BertLayer(nn.Module):
    """HF BERT layer: h = LN(h + Attn(h)); h = LN(h + MLP(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, 0.0, causal=False)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_dropout)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(h + self.dropout(self.attn(h, attention_mask)))
        return self.norm2(h + self.mlp(h))


class BertForMaskedLM(EncoderForMaskedLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [BertLayer(cfg) for _ in range(cfg.num_layers)])


class BertForSequenceClassification(EncoderForSequenceClassification):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [BertLayer(cfg) for _ in range(cfg.num_layers)])


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, 0.0, causal=True)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_dropout)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))

    # Incremental decoding (m2train.models.decoding): a KV cache.
    def new_cache(self, batch: int, max_len: int, device, dtype: torch.dtype) -> AttentionCache:
        return AttentionCache.new(self.attn, self.norm1.normalized_shape[0], batch, max_len, device, dtype)

    def step(self, x: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        x = x + attention_step(self.attn, self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class GPT(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [GPTBlock(cfg) for _ in range(cfg.num_layers)], position_embeddings=True)

    def _init_extra(self) -> None:
        projections = [m for b in self.blocks for m in (b.attn.out, b.mlp.fc2)]
        scaled_residual_init(projections, self.config.initializer_range, self.config.num_layers)
