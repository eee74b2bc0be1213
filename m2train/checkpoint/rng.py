"""Random-number-generator state of one process: python `random`, numpy, torch CPU and every CUDA device.

A resumed run continues bit-identically only if dropout masks, MLM masking and shuffling draw the same
numbers they would have drawn without the interruption, so every generator a training step may touch is
captured with the checkpoint and restored on resume (per rank: each rank has its own streams)."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng_state() -> dict:
    """This process's generator states as a picklable dict (torch tensors stay on the CPU)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what `capture_rng_state` returned (in the same process layout)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            # A different number of visible devices: restoring would misassign streams; seeding the
            # devices we have is the honest option.
            log.warning("checkpoint holds CUDA RNG states of %d devices, %d are visible: CUDA generators "
                        "not restored", len(cuda), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all(cuda)


def derive_seed(base_seed: int, step: int, rank: int) -> int:
    """A deterministic seed for (run seed, step, rank), used when saved per-rank states cannot be reused
    (the world size changed). Mixing with large odd constants keeps nearby (step, rank) pairs apart."""
    return (int(base_seed) * 0x9E3779B1 + int(step) * 0x85EBCA77 + int(rank) * 0xC2B2AE3D) % (2 ** 31 - 1)


def reseed_all(seed: int) -> None:
    """Seed python, numpy, torch and CUDA generators from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


__all__ = ["capture_rng_state", "restore_rng_state", "derive_seed", "reseed_all"]
