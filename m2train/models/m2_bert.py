"""M2-BERT, reference-exact (DESIGN.md §4.2): post-norm layers `LN(y + GLU(y))` with y = SeqMixer(h)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .bert import EncoderForMaskedLM, EncoderForSequenceClassification
from .glu import MonarchGLU
from .mixer import M2SequenceMixer


def build_mixer(cfg: ModelConfig, bidirectional: bool) -> M2SequenceMixer:
    return M2SequenceMixer(
        cfg.hidden_size, cfg.max_seq_len, bidirectional=bidirectional,
        residual_long_conv=cfg.residual_long_conv, input_norm=cfg.mixer_input_norm,
        dropout=cfg.mixer_dropout, short_conv_kernel=cfg.short_conv_kernel,
        filter_order=cfg.filter_order, filter_emb_dim=cfg.filter_emb_dim,
        filter_sin_freq=cfg.filter_sin_freq, pad_masking=cfg.pad_masking, long_conv=cfg.sequence_mixer)


class M2BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer = build_mixer(cfg, bidirectional=cfg.bidirectional)
        self.mlp = MonarchGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_type, cfg.mlp_nblocks,
                              dropout=cfg.hidden_dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # No residual around the mixer: that is the reference architecture. norm(y + GLU(y)), the residual
        # passed in so that the kernels can add it as Wo's output is stored.
        y = self.mixer(h, attention_mask)
        return self.norm(self.mlp(y, residual=y))


def m2_bert_layers(cfg: ModelConfig) -> list[nn.Module]:
    return [M2BertLayer(cfg) for _ in range(cfg.num_layers)]


class M2BertForMaskedLM(EncoderForMaskedLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, m2_bert_layers(cfg))


class M2BertForSequenceClassification(EncoderForSequenceClassification):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, m2_bert_layers(cfg))
