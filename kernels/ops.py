"""The one op API the models call for Monarch-family layers: each op takes the configured kernel mode
(ModelConfig.kernels, via m2train.models.base.kernel_mode) and runs the Triton kernel or the PyTorch
reference (the models' own functions, unchanged, so kernels off is bit-for-bit the reference).

Triton runs when `use_triton` (kernels/dispatch.py) says so *and* the call is one the kernels support;
otherwise the reference runs (`unsupported_reason` says why; with kernels='triton' forced, a warning
names the reason once per op and reason). Kernel limits:
- dtypes fp32 / bf16 / fp16 (fp64 etc. -> reference); inputs and weights on one device;
- at least one row (an empty batch -> reference);
- glu_blockdiag additionally needs the up-projection's blocks to tile H and 2I exactly with an even
  number of blocks (gate block k pairs with value block k + nblocks/2), true for every released size.
Triton modules are imported only when a kernel is about to run, so CPU-only users never import Triton
and TRITON_INTERPRET can still be set late (it must precede the kernels' definition).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .dispatch import resolve_mode, use_triton

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


def _check_residual(residual: torch.Tensor | None, x: torch.Tensor, out_features: int) -> None:
    """A residual must have the output's exact shape: the kernels read it row by row (a same-size tensor of
    another shape would be added silently scrambled), and no path broadcasts it."""
    if residual is not None and residual.shape != (*x.shape[:-1], out_features):
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from the output's "
                         f"{(*x.shape[:-1], out_features)}")


@functools.lru_cache(maxsize=None)
def _warn_fallback(op: str, reason: str) -> None:
    # Once per (op, reason): a forced kernel that cannot run says why, without flooding every layer call.
    warnings.warn(f"m2train.kernels: {op} runs the PyTorch reference although kernels='triton' was forced: "
                  f"{reason}", stacklevel=3)


def _triton_ok(op: str, x: torch.Tensor, mode: str, *weights: torch.Tensor | None, shape_reason=None) -> bool:
    if not use_triton(x, mode):
        return False
    reason = unsupported_reason(x, *weights) or shape_reason
    if reason is None:
        return True
    if resolve_mode(mode) == "triton" and x.numel() > 0:        # an empty batch is not worth a warning
        _warn_fallback(op, reason)
    return False


def kernels_enabled(x: torch.Tensor, mode: str = "auto") -> bool:
    """Whether an op on `x` under `mode` would try the Triton path (before shape checks)."""
    return use_triton(x, mode)


def blockdiag_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                     out_features: int, mode: str = "auto", residual: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal layer (m2train.models.blockdiag semantics): x (..., in_features) -> (..., out_features),
    plus `residual` (same shape as the output) when given - in the kernel's epilogue on the Triton path."""
    width = None if x.shape[-1] == in_features else f"input width {x.shape[-1]} != in_features {in_features}"
    _check_residual(residual, x, out_features)
    if _triton_ok("blockdiag_linear", x, mode, weight, bias, shape_reason=width):
        from .blockdiag import blockdiag_linear as kernel
        return kernel(x, weight, bias, out_features, residual)
    from m2train.models.blockdiag import blockdiag_linear_reference
    out = blockdiag_linear_reference(x, weight, bias, in_features, out_features)
    return out + residual if residual is not None else out


def monarch_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
                   in_features: int, out_features: int, mode: str = "auto") -> torch.Tensor:
    """Order-2 Monarch P·L·Pᵀ·R (m2train.models.monarch semantics), permutations fused in the kernels."""
    width = None if x.shape[-1] == in_features else f"input width {x.shape[-1]} != in_features {in_features}"
    if _triton_ok("monarch_linear", x, mode, w1, w2, bias, shape_reason=width):
        from .monarch import monarch_linear as kernel
        return kernel(x, w1, w2, bias, out_features)
    from m2train.models.monarch import monarch_linear_reference
    return monarch_linear_reference(x, w1, w2, bias, in_features, out_features)


def glu_blockdiag(x: torch.Tensor, weight: torch.Tensor, intermediate_size: int,
                  mode: str = "auto", apply=None) -> torch.Tensor:
    """gelu(A·x) ⊙ (B·x), [A; B] = one block-diagonal H -> 2I layer without bias (first I outputs = gate).
    `apply(fn, x2, *args)` replaces `fn.apply` for the kernel's autograd Function (sequence parallelism
    gathers the input inside it, m2train.parallel.tp_regions.gathered_apply); with it the kernel must take
    the call (`glu_blockdiag_supported`): there is no reference path for that input."""
    if apply is not None and not glu_blockdiag_supported(x, weight, intermediate_size, mode):
        raise RuntimeError("glu_blockdiag: the Triton kernel does not take this call, and a custom apply "
                           "has no reference path; check glu_blockdiag_supported first")
    if use_triton(x, mode):
        from .glu import supported_shape
        shape = None if supported_shape(weight, x.shape[-1], intermediate_size) else (
            f"blocks {tuple(weight.shape)} do not pair gate/value halves of H={x.shape[-1]}, I={intermediate_size} "
            "(needs an even nblocks tiling H and 2I exactly)")
        if _triton_ok("glu_blockdiag", x, mode, weight, shape_reason=shape):
            from .glu import glu_blockdiag as kernel
            return kernel(x, weight, intermediate_size, apply=apply)
    # Reference formula; with kernels on but an unsupported shape, the projection still takes its kernel.
    h = blockdiag_linear(x, weight, None, x.shape[-1], 2 * intermediate_size, mode)
    gate, value = h.split(intermediate_size, dim=-1)
    return F.gelu(gate) * value


def glu_blockdiag_supported(x: torch.Tensor, weight: torch.Tensor, intermediate_size: int,
                            mode: str = "auto") -> bool:
    """Whether `glu_blockdiag` runs its Triton kernel on this call (no fallback, no warning)."""
    if not use_triton(x, mode):
        return False
    from .glu import supported_shape
    return supported_shape(weight, x.shape[-1], intermediate_size) and unsupported_reason(x, weight) is None


def _mlp_out_features(w_out: torch.Tensor, out_features: int | None) -> int:
    """The MLP's output width: the Wo layer's (which truncates when its blocks overhang it), or by default
    all of w_out's (nblocks, out_blk, ..) rows."""
    return out_features if out_features is not None else w_out.shape[0] * w_out.shape[1]


def glu_mlp(x: torch.Tensor, w_up: torch.Tensor, w_out: torch.Tensor, bias: torch.Tensor | None,
            intermediate_size: int, mode: str = "auto", residual: torch.Tensor | None = None,
            out_features: int | None = None, apply=None) -> torch.Tensor | None:
    """The block-diagonal GLU MLP Wo·(gelu(A·x) ⊙ (B·x)) + bo [+ residual] as one autograd op whose backward
    recomputes the (tokens, I) activation instead of keeping it (kernels/glu.py GLUMLPFunction); None when
    the kernels cannot take the call (kernels off, blocks that do not tile H, 2I, I and `out_features`
    exactly, dtype or device), and the caller runs the two-step path (whose ops fall back, and warn, for the
    same reason). `apply`: as for `glu_blockdiag`."""
    nblocks, out_blk, act_blk = w_out.shape
    out_features = _mlp_out_features(w_out, out_features)
    _check_residual(residual, x, out_features)
    if not use_triton(x, mode) or nblocks * act_blk != intermediate_size or nblocks * out_blk != out_features:
        return None
    from .glu import glu_mlp_train, supported_shape
    if not supported_shape(w_up, x.shape[-1], intermediate_size) or unsupported_reason(x, w_up, w_out, bias):
        return None
    return glu_mlp_train(x, w_up, w_out, bias, intermediate_size, residual, apply=apply)


def glu_mlp_inference(x: torch.Tensor, w_up: torch.Tensor, w_out: torch.Tensor, bias: torch.Tensor | None,
                      intermediate_size: int, mode: str = "auto", residual: torch.Tensor | None = None,
                      out_features: int | None = None) -> torch.Tensor | None:
    """The block-diagonal GLU MLP Wo·(gelu(A·x) ⊙ (B·x)) + bo [+ residual] in one kernel (kernels/glu_mlp.py),
    for forwards without autograd; None when that kernel cannot take the call (autograd on, another
    layout - e.g. a Wo whose blocks overhang `out_features` -, dtype or device), and the caller runs the
    two-step path."""
    out_features = _mlp_out_features(w_out, out_features)
    _check_residual(residual, x, out_features)
    if torch.is_grad_enabled() or not use_triton(x, mode):
        return None
    from .glu_mlp import supported
    if not supported(w_up, w_out, x.shape[-1], intermediate_size, out_features):
        return None
    if unsupported_reason(x, w_up, w_out, bias) is not None:
        return None                    # the two-step path's ops fall back (and warn) for the same reason
    from .glu_mlp import glu_mlp_forward
    return glu_mlp_forward(x, w_up, w_out, bias, residual)


__all__ = ["blockdiag_linear", "monarch_linear", "glu_blockdiag", "glu_mlp", "glu_mlp_inference", "kernels_enabled",
           "unsupported_reason"]
