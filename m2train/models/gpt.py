"""The causal-LM shell shared by M2-GPT and the Transformer GPT baseline: token embedding, pre-LN blocks,
final LayerNorm and an LM head tied to the embedding.

Labels are aligned with positions: labels[:, t] is the token that should follow input_ids[:, t] (the data
loader shifts them); -100 marks positions without a target. With model.loss_chunk_tokens > 0 a training
forward with labels returns the loss only (logits=None): see m2train.models.chunked_loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .base import M2TrainModel
from .chunked_loss import linear_cross_entropy
from .decoding import DecodeState, check_room
from .outputs import ModelOutput, upcast


class CausalLM(M2TrainModel):
    def __init__(self, cfg: ModelConfig, blocks: list[nn.Module], position_embeddings: bool = False):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if position_embeddings else None
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # How `lm_loss` makes the head weight whole around its products (chunked_loss.linear_cross_entropy's
        # gather_weight): None when it always is; m2train.parallel sets it under ZeRO-3.
        self.head_weight_gather = None
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.hidden_states(input_ids)
        if labels is not None and self.chunked_loss:
            return ModelOutput(logits=None, loss=self.lm_loss(hidden, labels, "mean"))
        logits = self.lm_logits(hidden)
        loss = self.token_loss(logits, labels, "mean") if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)

    # The head steps a vocab-sharded model (m2train.parallel.tensor_parallel) overrides; context parallelism
    # calls them with reduction "sum" to form the loss over all sequence chunks.
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden (B, L, H) -> logits (B, L, V)."""
        return F.linear(hidden, self.lm_head_weight)

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of logits (B, L, V) against labels (B, L) over positions whose label is not -100."""
        return F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten(), ignore_index=-100,
                               reduction=reduction)

    @property
    def chunked_loss(self) -> bool:
        """Training with model.loss_chunk_tokens > 0: the loss comes from `lm_loss`, without logits."""
        return self.training and self.config.loss_chunk_tokens > 0

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of the LM head on hidden (B, L, H) against labels (B, L), model.loss_chunk_tokens
        tokens at a time with the logits recomputed in backward (m2train.models.chunked_loss)."""
        return linear_cross_entropy(hidden.flatten(0, 1), self.lm_head_weight, labels.flatten(),
                                    self.config.loss_chunk_tokens, reduction, self.head_weight_gather)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding -> blocks -> final LayerNorm: the (B, L, H) input of the LM head."""
        L = input_ids.shape[1]
        if L > self.config.max_seq_len:
            raise ValueError(f"input length {L} exceeds model.max_seq_len={self.config.max_seq_len}")
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed.weight[:L]
        h = self.dropout(h)
        for block in self.blocks:
            h = block(h)
        return self.final_norm(h)

    # Incremental decoding (m2train.models.decoding; m2train.models.generation drives it).
    def new_decode_state(self, batch: int, max_len: int | None = None) -> DecodeState:
        """Empty per-block caches for `batch` sequences of at most `max_len` positions (default
        model.max_seq_len), on the model's device and in its dtype."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= self.config.max_seq_len:
            raise ValueError(f"decode max_len {max_len} must be in 1..model.max_seq_len={self.config.max_seq_len}")
        # The decoding steps are the single-process math: a model whose layers m2train.parallel swapped for
        # sharded ones (TP, CP, SP) would silently run them on its shards alone.
        swapped = sorted({type(m).__name__ for m in self.modules()
                          if type(m).__module__.startswith("m2train.parallel")})
        if swapped:
            raise NotImplementedError(f"incremental decoding runs on a single-process model, not one parallelised by "
                                      f"m2train.parallel ({', '.join(swapped)}); generate from its checkpoint or "
                                      "export (`m2train generate`), which loads the whole model")
        missing = sorted({type(b).__name__ for b in self.blocks if not hasattr(b, "step")})
        if missing:
            raise NotImplementedError(f"{', '.join(missing)} has no incremental decoding step")
        ref = self.embed.weight
        return DecodeState(max_len, [b.new_cache(batch, max_len, ref.device, ref.dtype) for b in self.blocks])

    def decode(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits (B, T, V) of the T tokens `input_ids` (B, T) that follow the state's positions (the whole
        prompt first, then one token per step); equal to the full forward's logits at those positions.
        Inference only: run under torch.no_grad() in eval mode."""
        T = input_ids.shape[1]
        check_room(state.length, T, state.max_len)
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed.weight[state.length:state.length + T]
        for block, cache in zip(self.blocks, state.caches):
            h = block.step(h, cache)
        state.length += T
        return self.lm_logits(self.final_norm(h))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H): the embedding when tied, else the LM head's own weight."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight
