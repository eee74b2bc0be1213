"""The "model parallel unit" handed to `deepspeed.initialize(mpu=...)`.

DeepSpeed (0.19.8) asks it for two groups:
- the data-parallel group: ZeRO partitions optimizer state / gradients and averages gradients over it, and
  the engine broadcasts initial weights within it. Ours is dp x cp (`groups.zero_group()`): context-parallel
  ranks hold the same parameters, tensor-parallel ranks hold different shards and must never be averaged.
- the model-parallel group: the gradient norm sums squares over it, counting a parameter on every rank when
  `is_model_parallel_parameter(p)` (our sharded tensors carry megatron's `tensor_model_parallel=True`) and a
  replicated one on model-parallel rank 0 only. Ours is the TP group, so the clipped norm equals the
  single-process norm.

It deliberately has no `initialize_sequence_parallel` attribute: DeepSpeed takes that as "Ulysses sequence
parallel" and then ignores the model-parallel group.
"""

from __future__ import annotations

import torch.distributed as dist

from . import groups


class ModelParallelUnit:
    """Answers DeepSpeed's mpu queries from m2train.parallel.groups (call init_model_parallel first)."""

    # --- tensor / model parallel: the TP group ---------------------------------------------------
    def get_model_parallel_group(self):
        return groups.tp_group()

    def get_model_parallel_rank(self) -> int:
        return groups.tp_rank()

    def get_model_parallel_world_size(self) -> int:
        return groups.tp_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return dist.get_global_rank(groups.tp_group(), 0)

    # --- data parallel as ZeRO sees it: dp x cp --------------------------------------------------
    def get_data_parallel_group(self):
        return groups.zero_group()

    def get_data_parallel_rank(self) -> int:
        return groups.zero_rank()

    def get_data_parallel_world_size(self) -> int:
        return groups.zero_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(groups.zero_group())

    # --- no pipeline parallelism -----------------------------------------------------------------
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def build_mpu() -> ModelParallelUnit | None:
    """The mpu for deepspeed.initialize, or None when there is no model parallelism (tp = cp = 1)."""
    if not groups.is_initialized() or groups.tp_size() * groups.cp_size() == 1:
        return None
    return ModelParallelUnit()


__all__ = ["ModelParallelUnit", "build_mpu"]
