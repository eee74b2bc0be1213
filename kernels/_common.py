"""What the Monarch / block-diagonal / GLU Triton kernels share: tile configs, dot precision, dtype rules.

Decided once, at import time, because Triton fixes autotune configs when a kernel is defined:
- on a GPU, a handful of sm_90-sized tile configs are autotuned per problem shape;
- under TRITON_INTERPRET=1 (no GPU) exactly one config, since autotuning several needs a device to time
  them, and operands are cast to fp32 before tl.dot because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import torch
import triton

from .dispatch import interpreting

INTERPRET = interpreting()

# dtypes the kernels take; anything else (fp64, integer) runs the PyTorch reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def matmul_configs() -> list[triton.Config]:
    """Tile configs (BLOCK_M rows x BLOCK_N outputs of one block, BLOCK_K reduction) for the block matmuls.

    Blocks of the released models are 192..768 wide (H/4, 2I/4 at H = 768..1792), so 64..128-wide tiles
    fill them with little masking; 3-4 pipeline stages keep the H100's shared memory (227 KiB) in budget
    even for fp32 operands, and a config that does not fit is skipped by the autotuner."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]


def weight_grad_configs() -> list[triton.Config]:
    """Tiles for dW = dYᵀ·X: BLOCK_N x BLOCK_K outputs, reduced over BLOCK_M rows per step."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]


def elementwise_block() -> tuple[int, int]:
    """(rows, columns) per program of the elementwise GLU backward kernel."""
    return (32, 32) if INTERPRET else (64, 128)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands follow torch's own matmul TF32 switch, so the kernel is exactly
    as precise as the torch.bmm reference it replaces (IEEE fp32 by default); 16-bit operands ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype inside autocast (what torch.bmm would use),
    else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def weight_grad_splits(rows: int, programs_per_split: int, device: torch.device) -> int:
    """How many row ranges dW is reduced over in parallel (partial sums added afterwards): enough programs
    to fill the GPU twice over, but every range keeps >= 512 rows so the extra fp32 partials stay cheap."""
    if INTERPRET or device.type != "cuda":
        return 1
    want = triton.cdiv(2 * num_sms(device), max(programs_per_split, 1))
    return max(1, min(want, rows // 512))
