"""Turn a list of decoded MDS samples into a batch of tensors (runs inside loader workers).

Each sample arrives as {"tokens": ndarray, "sample_id": int, "epoch": int} (see dataset.TokenStream);
sample id and epoch only seed the MLM masking and are not part of the batch.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .masking import MLMMasker


def _stack(samples: list, expected_len: int, where: str) -> np.ndarray:
    rows = []
    for s in samples:
        t = s["tokens"]
        if t.ndim != 1 or t.shape[0] != expected_len:
            raise ValueError(f"{where}: sample {s['sample_id']} has {tuple(t.shape)} tokens, expected "
                             f"({expected_len},) from prep_stats.json; the shards and prep_stats.json "
                             f"disagree (re-run `m2train prep`)")
        rows.append(t)
    return np.stack(rows).astype(np.int64)


class GPTCollate:
    """gpt_packed windows of seq_len + 1 tokens -> input_ids = tokens[:-1], labels = tokens[1:]."""

    def __init__(self, seq_len: int, where: str):
        self.seq_len = seq_len
        self.where = where

    def __call__(self, samples: list) -> dict:
        tokens = torch.from_numpy(_stack(samples, self.seq_len + 1, self.where))
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


class MLMCollate:
    """bert_doc / bert_packed samples -> input_ids (corrupted), attention_mask (1 = real token), labels.

    `fixed_epoch`: use this epoch for masking instead of the sample's (validation: every evaluation pass
    masks identically)."""

    def __init__(self, seq_len: int, masker: MLMMasker, pad_id: Optional[int], where: str,
                 fixed_epoch: Optional[int] = None):
        self.seq_len = seq_len
        self.masker = masker
        self.pad_id = pad_id
        self.where = where
        self.fixed_epoch = fixed_epoch

    def __call__(self, samples: list) -> dict:
        tokens = _stack(samples, self.seq_len, self.where)
        input_ids = np.empty_like(tokens)
        labels = np.empty_like(tokens)
        for i, s in enumerate(samples):
            epoch = s["epoch"] if self.fixed_epoch is None else self.fixed_epoch
            input_ids[i], labels[i] = self.masker(tokens[i], epoch, s["sample_id"])
        if self.pad_id is None:
            attention = np.ones_like(tokens)
        else:
            attention = (tokens != self.pad_id).astype(np.int64)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
                "labels": torch.from_numpy(labels)}
