"""BERT masked-LM corruption, deterministic per (seed, epoch, sample).

Each sample draws from its own numpy Generator seeded with (seed, epoch, sample id): which positions are
masked therefore does not depend on which rank or worker loads the sample, in which order, or whether the
run was resumed. No global RNG is touched.

Recipe (BERT / reference M2-BERT): every non-structural position is selected with probability p
(0.30 in M2-BERT pretraining, 0.15 for evaluation); a selected position becomes [MASK] with probability
0.8, a random ordinary token with 0.1, and stays unchanged with 0.1. Labels hold the original id at
selected positions and -100 elsewhere. Structural tokens (cls/sep/pad/bos/eos) are never selected, so
neither is padding.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
# Separates this stream from any other use of the same (seed, epoch, sample) triple.
_MLM_STREAM = 0x4D4C4D


class MLMMasker:
    """Applies the 80/10/10 masking recipe to one token sequence at a time."""

    def __init__(self, probability: float, mask_id: int, vocab_size: int, structural_ids, seed: int):
        if not 0.0 < probability < 1.0:
            raise ValueError(f"mlm probability must be in (0, 1), got {probability}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 for masking, got {seed}")
        self.probability = float(probability)
        self.mask_id = int(mask_id)
        self.seed = int(seed)
        self.structural = np.asarray(sorted(set(int(i) for i in structural_ids)), dtype=np.int64)
        # A lookup table is several times faster than np.isin on every sample.
        self._is_structural = np.zeros(vocab_size, dtype=bool)
        self._is_structural[self.structural] = True
        # Random replacements are ordinary tokens: never [MASK] or a structural token.
        excluded = np.append(self.structural, self.mask_id)
        self.replacement_pool = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), excluded)
        if self.replacement_pool.size == 0:
            raise ValueError("the vocabulary has no ordinary tokens to use as random replacements")

    def rng(self, epoch: int, sample_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(sample_id), _MLM_STREAM])

    def __call__(self, tokens: np.ndarray, epoch: int, sample_id: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens: int64 (L,). Returns (input_ids, labels), both int64 (L,)."""
        rng = self.rng(epoch, sample_id)
        n = tokens.shape[0]
        # Draw fixed-size arrays whatever the outcome, so each decision uses the same stream position
        # for every position of every sample.
        select_u = rng.random(n)
        action_u = rng.random(n)
        replacement = self.replacement_pool[rng.integers(0, self.replacement_pool.size, size=n)]

        eligible = ~self._is_structural[tokens]
        selected = eligible & (select_u < self.probability)
        to_mask = selected & (action_u < 0.8)
        to_random = selected & (action_u >= 0.8) & (action_u < 0.9)

        input_ids = tokens.copy()
        input_ids[to_mask] = self.mask_id
        input_ids[to_random] = replacement[to_random]
        labels = np.full_like(tokens, IGNORE_INDEX)
        labels[selected] = tokens[selected]
        return input_ids, labels
