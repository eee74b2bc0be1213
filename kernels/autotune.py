"""Inspect and ahead-of-time compile the Monarch / block-diagonal / GLU kernels' autotune configs.

Triton can compile for a GPU architecture on a machine without one (its bundled ptxas produces the
cubin), which catches everything that would otherwise only fail on the first GPU launch: type errors,
layouts the backend cannot lower, register/shared-memory use per config. The interpreter (used by the
CPU tests) checks none of that, so this is the CPU-side guard for the GPU path.

    python -m m2train.kernels.autotune --list              # the configs each kernel autotunes over
    python -m m2train.kernels.autotune --arch 90           # compile every kernel (first config) for sm_90
    python -m m2train.kernels.autotune --all-configs       # ... every config, fp32/bf16/fp16 (minutes)

TRITON_INTERPRET must be unset: under the interpreter @triton.jit yields functions that cannot compile.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

# Integer arguments that are multiples of 16 for every released model size; Triton specialises such
# arguments at launch (tt.divisibility), which is what enables vectorised, pipelined loads - so the check
# compiles the variant a real launch gets.
_DIVISIBLE_INTS = {"M", "in_limit", "out_limit", "stride_xm", "stride_rm", "stride_ym", "s_gb", "s_gn", "s_ob",
                   "s_on", "ACT_BLK", "stride_dym", "stride_hm",
                   "stride_am", "stride_dm", "stride_dhm", "x_blk", "y_blk", "dy_blk", "stride_wb", "stride_wn",
                   "stride_ws", "IN_BLK", "OUT_BLK", "INTER", "rows_per_split"}


@dataclass
class KernelSpec:
    name: str
    kernel: object                 # the autotuned (or plain) Triton kernel
    fp32_pointers: tuple           # pointer arguments that are always fp32 (the rest take the dtype)
    constexprs: dict               # fixed constexpr arguments (besides the tile config)
    ones: tuple = ()               # integer arguments equal to 1 in the plain layer (Triton makes them constexpr)


def kernel_specs(dtype_name: str) -> list[KernelSpec]:
    from . import blockdiag, glu, glu_mlp
    prec = "ieee" if dtype_name == "fp32" else "tf32"
    return [
        KernelSpec("blockdiag (bias)", blockdiag._blockdiag_kernel, (),
                   {"HAS_BIAS": True, "HAS_RES": False, "CAST_FP32": False, "PRECISION": prec},
                   ("x_elem", "y_elem", "stride_wk")),
        # the GLU's Wo with the layer's residual added in the epilogue (M2-BERT y + GLU(y), M2-GPT blocks)
        KernelSpec("blockdiag (bias+res)", blockdiag._blockdiag_kernel, (),
                   {"HAS_BIAS": True, "HAS_RES": True, "CAST_FP32": False, "PRECISION": prec},
                   ("x_elem", "y_elem", "stride_wk")),
        # the input gradient dY·W: W read transposed (unit stride along the output index)
        KernelSpec("blockdiag dX", blockdiag._blockdiag_kernel, (),
                   {"HAS_BIAS": False, "HAS_RES": False, "CAST_FP32": False, "PRECISION": prec},
                   ("x_elem", "y_elem", "stride_wn")),
        # Monarch's second factor: transposed layout (element stride nblocks), the permutation in the loads
        KernelSpec("monarch L factor", blockdiag._blockdiag_kernel, (),
                   {"HAS_BIAS": True, "HAS_RES": False, "CAST_FP32": False, "PRECISION": prec},
                   ("x_blk", "y_blk", "stride_wk")),
        KernelSpec("blockdiag dW", blockdiag._weight_grad_kernel, ("dw_ptr",),
                   {"CAST_FP32": False, "PRECISION": prec}, ("x_elem", "dy_elem", "stride_wk")),
        KernelSpec("glu forward", glu._glu_fwd_kernel, (),
                   {"STORE_H": True, "CAST_FP32": False, "PRECISION": prec}, ("stride_wk",)),
        KernelSpec("glu backward", glu._glu_bwd_kernel, (), {"STORE_ACT": False}),
        # the training MLP's backward (GLUMLPFunction): the activation recomputed in the same pass
        KernelSpec("glu backward + act", glu._glu_bwd_kernel, (), {"STORE_ACT": True}),
        # the inference MLP in one kernel; BLOCK_O = 256 holds an M2-BERT-80M Wo block (H/4 = 192 outputs)
        KernelSpec("glu mlp (inference)", glu_mlp._glu_mlp_fwd_kernel, (),
                   {"HAS_BIAS": True, "HAS_RES": True, "CAST_FP32": False, "PRECISION": prec, "BLOCK_O": 256},
                   ("s_gk", "s_ok")),
    ]


def _configs(kernel):
    import triton
    if hasattr(kernel, "configs"):
        return list(kernel.configs)
    from ._common import elementwise_block
    bm, bn = elementwise_block()                                  # glu backward: fixed launch tiles
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4)]


def compile_spec(spec: KernelSpec, dtype_name: str, config, arch: int) -> int:
    """Compile one kernel/config for sm_`arch`; returns its shared memory in bytes (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.kernel.fn if hasattr(spec.kernel, "configs") else spec.kernel     # unwrap the Autotuner
    constexprs = {**spec.constexprs, **config.kwargs, **{name: 1 for name in spec.ones}}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in spec.fp32_pointers else f"*{dtype_name}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in _DIVISIBLE_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.metadata.shared


def compile_check(arch: int = 90, dtypes=("bf16", "fp32"), all_configs: bool = False) -> list[tuple]:
    """Compile the kernels for sm_`arch`: [(kernel, dtype, config kwargs, shared bytes)]; raises the first
    compile error, naming the kernel, dtype and config."""
    from .dispatch import interpreting
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile the kernels for a GPU target")
    report = []
    for dtype_name in dtypes:
        for spec in kernel_specs(dtype_name):
            configs = _configs(spec.kernel)
            for config in configs if all_configs else configs[:1]:
                try:
                    shared = compile_spec(spec, dtype_name, config, arch)
                except Exception as exc:
                    raise RuntimeError(f"{spec.name} ({dtype_name}, {config.kwargs}, warps={config.num_warps}, "
                                       f"stages={config.num_stages}) does not compile for sm_{arch}: {exc}") from exc
                report.append((spec.name, dtype_name, dict(config.kwargs), shared))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m m2train.kernels.autotune",
        description="List the autotune configs of the Monarch/block-diagonal/GLU Triton kernels, or compile "
                    "them ahead of time for a GPU architecture (no GPU needed; TRITON_INTERPRET must be unset).")
    parser.add_argument("--list", action="store_true", help="print each kernel's autotune configs and exit")
    parser.add_argument("--arch", type=int, default=90,
                        help="CUDA compute capability to compile for, as an integer (90 = H100/H200; default 90)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"],
                        help="activation dtypes to compile (default: bf16 fp32)")
    parser.add_argument("--all-configs", action="store_true",
                        help="compile every autotune config, not only the first of each kernel (slow: minutes)")
    args = parser.parse_args(argv)
    if args.list:
        for spec in kernel_specs("bf16"):
            print(spec.name)
            for c in _configs(spec.kernel):
                print(f"    {c.kwargs} num_warps={c.num_warps} num_stages={c.num_stages}")
        return 0
    try:
        report = compile_check(args.arch, tuple(args.dtypes), args.all_configs)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    smem_limit = 232448                      # bytes of shared memory per block on sm_90
    for name, dtype_name, kwargs, shared in report:
        note = "" if shared <= smem_limit else "  (over the sm_90 limit: the autotuner skips it)"
        print(f"ok  sm_{args.arch} {dtype_name:5s} {name:20s} {kwargs} shared={shared}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
