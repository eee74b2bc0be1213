"""Chooses between the fused Triton kernels and the PyTorch reference paths.

One rule for every op: `model.kernels` ("auto" | "triton" | "torch"), overridden by the environment
variable M2TRAIN_KERNELS when it is set (so a user can flip a trained config without editing it, and CI
can force the interpreted kernels). "auto" means: the kernels when the tensor is on CUDA and Triton
imports; the reference path otherwise. "triton" on a CPU tensor needs TRITON_INTERPRET=1 (Triton's
interpreter), and says so instead of failing deep inside Triton.
"""

from __future__ import annotations

import functools
import os

import torch

MODES = ("auto", "triton", "torch")
ENV_VAR = "M2TRAIN_KERNELS"


class KernelUnavailable(RuntimeError):
    """The Triton path was forced but cannot run here."""


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import time
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_mode(configured: str = "auto") -> str:
    mode = os.environ.get(ENV_VAR) or configured
    if mode not in MODES:
        source = ENV_VAR if os.environ.get(ENV_VAR) else "model.kernels"
        raise ValueError(f"{source}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def use_triton(tensor: torch.Tensor, configured: str = "auto") -> bool:
    """Whether the op about to run on `tensor` should take the Triton kernel."""
    mode = resolve_mode(configured)
    if mode == "torch":
        return False
    if mode == "auto":
        return tensor.is_cuda and triton_importable()
    if not triton_importable():
        raise KernelUnavailable(f"kernels='triton' was forced ({ENV_VAR} or model.kernels) but Triton does "
                                "not import here")
    if not tensor.is_cuda and not interpreting():
        raise KernelUnavailable(f"kernels='triton' was forced for a {tensor.device} tensor: Triton kernels run "
                                "on CUDA, or on the CPU only with TRITON_INTERPRET=1 set before import")
    return True


__all__ = ["MODES", "ENV_VAR", "KernelUnavailable", "triton_importable", "interpreting", "resolve_mode",
           "use_triton"]
