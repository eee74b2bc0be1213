"""m2train models: M2-BERT, M2-GPT, their Monarch building blocks and Transformer baselines.

Models never import torch.distributed; parallelism is applied from m2train.parallel."""

from __future__ import annotations

from ..config import ModelConfig
from .base import M2TrainModel
from .blockdiag import BlockDiagonalLinear
from .m2_bert import M2BertForMaskedLM, M2BertForSequenceClassification
from .m2_gpt import M2GPT
from .monarch import MonarchLinear
from .outputs import ModelOutput
from .pretrained import from_pretrained, save_pretrained
from .transformer import GPT, BertForMaskedLM, BertForSequenceClassification

MODEL_CLASSES = {
    ("m2_bert", "mlm"): M2BertForMaskedLM,
    ("m2_bert", "classification"): M2BertForSequenceClassification,
    ("m2_gpt", "causal_lm"): M2GPT,
    ("bert", "mlm"): BertForMaskedLM,
    ("bert", "classification"): BertForSequenceClassification,
    ("gpt", "causal_lm"): GPT,
}


def build_model(model_cfg: ModelConfig | dict) -> M2TrainModel:
    """Build (and initialise) the model a config describes."""
    if isinstance(model_cfg, dict):
        from ..config import model_config_from_dict
        model_cfg = model_config_from_dict(model_cfg)
    model_cfg.validate()
    return MODEL_CLASSES[(model_cfg.arch, model_cfg.head)](model_cfg)


__all__ = ["build_model", "from_pretrained", "save_pretrained", "ModelConfig", "ModelOutput", "M2TrainModel", "BlockDiagonalLinear",
           "MonarchLinear", "M2BertForMaskedLM", "M2BertForSequenceClassification", "M2GPT", "GPT",
           "BertForMaskedLM", "BertForSequenceClassification"]
