"""Pieces every BERT-style encoder shares (M2-BERT and the Transformer BERT baseline): embeddings and the
MLM / sequence-classification models that put a head on an encoder backbone."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .base import M2TrainModel
from .heads import ClassificationHead, MLMHead, classification_loss, mlm_forward
from .outputs import ModelOutput


class BertEmbeddings(nn.Module):
    """word + token type + (optional) learned absolute position, LayerNorm, dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = (nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
                                    if cfg.position_embeddings else None)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.max_seq_len = cfg.max_seq_len

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_chunk(input_ids, token_type_ids, start=0, total_len=input_ids.shape[1])

    def embed_chunk(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, start: int,
                    total_len: int) -> torch.Tensor:
        """Embeddings of positions start .. start+len of a sequence of `total_len` tokens (context
        parallelism hands each rank one chunk; absolute positions must still count from the sequence start)."""
        if total_len > self.max_seq_len:
            raise ValueError(f"input length {total_len} exceeds model.max_seq_len={self.max_seq_len}")
        h = self.word_embeddings(input_ids)
        if token_type_ids is None:
            h = h + self.token_type_embeddings.weight[0]
        else:
            h = h + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            h = h + self.position_embeddings.weight[start:start + input_ids.shape[1]]
        return self.dropout(self.norm(h))


class EncoderBackbone(nn.Module):
    """Embeddings followed by a stack of layers `layer(h, attention_mask) -> h`."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        h = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return h


class EncoderForMaskedLM(M2TrainModel):
    """A BERT-style encoder with the MLM head. `build_layers(cfg)` returns the encoder layers."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]):
        super().__init__(cfg)
        self.bert = EncoderBackbone(cfg, layers)
        self.mlm = MLMHead(cfg.hidden_size, cfg.vocab_size, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> ModelOutput:
        hidden = self.bert(input_ids, token_type_ids, attention_mask)
        logits, loss = mlm_forward(self.mlm, hidden, labels, self.config.mlm_logits_at_masked_only)
        return ModelOutput(logits=logits, loss=loss)


class EncoderForSequenceClassification(M2TrainModel):
    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]):
        super().__init__(cfg)
        self.bert = EncoderBackbone(cfg, layers)
        dropout = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout
        self.classifier = ClassificationHead(cfg.hidden_size, cfg.num_labels, cfg.pooling, dropout)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> ModelOutput:
        hidden = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(hidden, attention_mask)
        loss = classification_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)
