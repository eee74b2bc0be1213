"""What the Monarch / block-diagonal / GLU Triton kernels share: tile configs, dot precision, dtype rules.

Decided once, at import time, because Triton fixes autotune configs when a kernel is defined:
- on a GPU, a handful of sm_90-sized tile configs are autotuned per problem shape;
- under TRITON_INTERPRET=1 (no GPU) exactly one config, since autotuning several needs a device to time
  them, and operands are cast to fp32 before tl.dot because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from .dispatch import interpreting

INTERPRET = interpreting()

# dtypes the kernels take; anything else (fp64, integer) runs the PyTorch reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def matmul_configs() -> list[triton.Config]:
    """Tile configs (BLOCK_M rows x BLOCK_N outputs of one block, BLOCK_K reduction) for the block matmuls.

    Blocks of the released models are 192..3584 wide (H/4, 2I/4 at H = 768..1792), so 64..128-wide tiles
    fill them with little masking; 32-wide ones are for Monarch layers with many small blocks (sqrt(n)).
    3-4 pipeline stages keep the H100's shared memory (227 KiB) in budget even for fp32 operands; a config
    that does not fit is skipped by the autotuner, and `prune_wide_tiles` drops tiles far wider than a block.
    Few configs on purpose: every one costs a compile and a timing run per shape on the first GPU call."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


def glu_configs() -> list[triton.Config]:
    """The fused GLU holds two accumulators (gate and value) and streams two operand pairs, so its tiles are
    half the area of the plain matmul's for the same registers and shared memory."""
    if INTERPRET:
        return matmul_configs()
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ]


def glu_mlp_configs() -> list[triton.Config]:
    """The one-kernel GLU MLP (kernels/glu_mlp.py): BLOCK_M rows x BLOCK_N activation columns per step
    (BLOCK_K of the input per up-projection step); the output accumulator is BLOCK_M x BLOCK_O fp32,
    BLOCK_O = next_pow2(H / nblocks): 256 up to H = 1024, 512 up to 2048. An offline sm_90a compile (bf16,
    Triton 3.6 and 3.8) spills nothing with these at either width except 64 x 64 at 512 (20 / 140 B);
    4-warp variants spilled (24-316 B) and were dropped."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    ]


def weight_grad_configs() -> list[triton.Config]:
    """Tiles for dW = dYᵀ·X: BLOCK_N x BLOCK_K outputs, reduced over BLOCK_M rows per step."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


def prune_wide_tiles(configs, nargs, **kwargs):
    """Autotuner pre-filter: a tile more than twice as wide as the block (rounded up to a power of two,
    at least 32) only computes masked zeros, so it is never timed. Always keeps the narrowest config."""
    def fits(cfg):
        kw = cfg.kwargs
        return (kw["BLOCK_N"] <= max(32, triton.next_power_of_2(nargs["OUT_BLK"]))
                and kw["BLOCK_K"] <= max(32, triton.next_power_of_2(nargs["IN_BLK"])))
    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))]


def elementwise_block() -> tuple[int, int]:
    """(rows, columns) per program of the elementwise GLU backward kernel."""
    return (32, 32) if INTERPRET else (64, 128)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands follow torch's own matmul TF32 switch, so the kernel is exactly
    as precise as the torch.bmm reference it replaces (IEEE fp32 by default)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"           # Triton's default; the only setting used for 16-bit operands


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


def on_device_of(t: torch.Tensor):
    """Triton launches on the *current* CUDA device, not the tensor's: make them the same for the launch."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
