"""The one op API the models call for Monarch-family layers: each op takes the configured kernel mode
(ModelConfig.kernels, via m2train.models.base.kernel_mode) and runs the Triton kernel or the PyTorch
reference (the models' own functions, unchanged, so kernels off is bit-for-bit the reference).

Triton runs when `use_triton` (kernels/dispatch.py) says so *and* the call is one the kernels support;
otherwise the reference runs, and `unsupported_reason` says why. Kernel limits:
- dtypes fp32 / bf16 / fp16 (fp64 etc. -> reference); inputs and weights on one device;
- at least one row (an empty batch -> reference);
- glu_blockdiag additionally needs the up-projection's blocks to tile H and 2I exactly with an even
  number of blocks (gate block k pairs with value block k + nblocks/2), true for every released size.
Triton modules are imported only when a kernel is about to run, so CPU-only users never import Triton
and TRITON_INTERPRET can still be set late (it must precede the kernels' definition).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(x: torch.Tensor, *weights: torch.Tensor | None) -> str | None:
    """Why the Triton kernels cannot take this call (None when they can)."""
    if x.dtype not in _DTYPES:
        return f"input dtype {x.dtype} (kernels take fp32/bf16/fp16)"
    if x.numel() == 0:
        return "empty input"
    for w in weights:
        if w is not None and w.device != x.device:
            return f"weight on {w.device}, input on {x.device}"
        if w is not None and w.dtype not in _DTYPES:
            return f"weight dtype {w.dtype} (kernels take fp32/bf16/fp16)"
    return None


def kernels_enabled(x: torch.Tensor, mode: str = "auto") -> bool:
    """Whether an op on `x` under `mode` would try the Triton path (before shape checks)."""
    return use_triton(x, mode)


def blockdiag_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                     out_features: int, mode: str = "auto") -> torch.Tensor:
    """Block-diagonal layer (m2train.models.blockdiag semantics): x (..., in_features) -> (..., out_features)."""
    if x.shape[-1] == in_features and use_triton(x, mode) and unsupported_reason(x, weight, bias) is None:
        from .blockdiag import blockdiag_linear as kernel
        return kernel(x, weight, bias, out_features)
    from m2train.models.blockdiag import blockdiag_linear_reference
    return blockdiag_linear_reference(x, weight, bias, in_features, out_features)


def monarch_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
                   in_features: int, out_features: int, mode: str = "auto") -> torch.Tensor:
    """Order-2 Monarch P·L·Pᵀ·R (m2train.models.monarch semantics), permutations fused in the kernels."""
    if x.shape[-1] == in_features and use_triton(x, mode) and unsupported_reason(x, w1, w2, bias) is None:
        from .monarch import monarch_linear as kernel
        return kernel(x, w1, w2, bias, out_features)
    from m2train.models.monarch import monarch_linear_reference
    return monarch_linear_reference(x, w1, w2, bias, in_features, out_features)


def glu_blockdiag(x: torch.Tensor, weight: torch.Tensor, intermediate_size: int,
                  mode: str = "auto") -> torch.Tensor:
    """gelu(A·x) ⊙ (B·x), [A; B] = one block-diagonal H -> 2I layer without bias (first I outputs = gate)."""
    if use_triton(x, mode) and unsupported_reason(x, weight) is None:
        from .glu import supported_shape
        if supported_shape(weight, x.shape[-1], intermediate_size):
            from .glu import glu_blockdiag as kernel
            return kernel(x, weight, intermediate_size)
    # Reference formula; with kernels on but an unsupported shape, the projection still takes its kernel.
    h = blockdiag_linear(x, weight, None, x.shape[-1], 2 * intermediate_size, mode)
    gate, value = h.split(intermediate_size, dim=-1)
    return F.gelu(gate) * value


__all__ = ["blockdiag_linear", "monarch_linear", "glu_blockdiag", "kernels_enabled", "unsupported_reason"]
