"""Output heads shared by M2-BERT and the BERT baseline: MLM (tied decoder) and sequence classification."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .outputs import upcast


class MLMHead(nn.Module):
    """Linear(H,H) → GELU → LayerNorm(1e-12) → decoder tied to the word embeddings + its own bias."""

    def __init__(self, hidden_size: int, vocab_size: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        self._embeddings = [word_embeddings]     # tied: not registered a second time

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self._embeddings[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(h)))
        return F.linear(h, self.decoder_weight, self.decoder_bias)


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(upcast(logits), labels)


def mlm_forward(head, hidden: torch.Tensor, labels: torch.Tensor | None, masked_only: bool,
                loss_fn=_mean_cross_entropy):
    """Logits at every position, and with labels the mean cross-entropy over labelled positions.

    Reference semantics: a position is labelled when labels > 0 (−100 and the pad id 0 are ignored).
    With `masked_only` the head runs only at labelled positions (what training needs); the returned logits
    are then zero elsewhere, as in the reference. `head` maps hidden states to logits (an MLMHead, or the
    tensor-parallel decoder whose logits are a vocabulary shard, with its `loss_fn`)."""
    if labels is None:
        return head(hidden), None
    selected = labels > 0
    if masked_only:
        picked = head(hidden[selected])
        logits = hidden.new_zeros(*labels.shape, picked.shape[-1], dtype=picked.dtype)
        logits[selected] = picked
    else:
        logits = head(hidden)
        picked = logits[selected]
    if picked.shape[0] == 0:
        loss = picked.sum() * 0.0   # no labelled position: a zero that still has a graph
    else:
        loss = loss_fn(picked, labels[selected])
    return logits, loss


class ClassificationHead(nn.Module):
    """Pooler Linear(H,H)+tanh on token 0 ("cls") or on the mean of non-pad tokens ("mean"), dropout,
    Linear(H, num_labels). Reference names: bert.pooler.dense, classifier."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.pooling = pooling
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "mean":
            mask = (attention_mask if attention_mask is not None
                    else torch.ones(hidden.shape[:2], device=hidden.device)).to(hidden.dtype)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        else:
            pooled = hidden[:, 0]
        pooled = torch.tanh(self.pooler(pooled))
        return self.classifier(self.dropout(pooled))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:                       # regression (e.g. STS-B)
        return F.mse_loss(upcast(logits.squeeze(-1)), labels.to(upcast(logits).dtype))
    return F.cross_entropy(upcast(logits), labels)
