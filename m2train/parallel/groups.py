"""Process groups for tensor (TP), context (CP) and data (DP) parallelism, from megatron-core.

The launcher (m2train.launch.init_distributed) creates the world; `init_model_parallel(tp, cp)` then splits
it with megatron-core's `parallel_state` in its "tp-cp-ep-dp-pp" order, so for world = dp * cp * tp:

    tp rank = rank % tp                     TP groups are contiguous ranks (cheapest links on a node)
    cp rank = (rank // tp) % cp
    dp rank = rank // (tp * cp)             what the data loader shards by

Parameters are replicated across DP *and* CP ranks (CP shards only the sequence), so ZeRO partitions and
averages gradients over the dp x cp group (`zero_group()`), while TP ranks hold different shards.

Every accessor answers for a world of one (tp = cp = dp = 1) before `init_model_parallel` is called, so
single-process code paths need no special casing.
"""

from __future__ import annotations

import torch.distributed as dist

from ..config import ConfigError

_layout: tuple[int, int] | None = None          # (tp, cp) once initialised


def check_layout(world_size: int, tp: int, cp: int) -> int:
    """Validate a (world, tp, cp) layout and return the data-parallel size world / (tp * cp)."""
    for key, value in (("parallel.tensor_parallel", tp), ("parallel.context_parallel", cp)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    if world_size % (tp * cp):
        raise ConfigError(
            f"parallel.tensor_parallel={tp} x parallel.context_parallel={cp} = {tp * cp} does not divide the "
            f"world size {world_size}: launch a multiple of {tp * cp} processes")
    return world_size // (tp * cp)


def init_model_parallel(tp: int = 1, cp: int = 1) -> None:
    """Split the launcher's world into TP / CP / DP groups (idempotent for the same layout).

    Needs torch.distributed initialised (m2train.launch.init_distributed). A second call with a different
    layout is an error: destroy_model_parallel() first."""
    global _layout
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise RuntimeError("init_model_parallel needs the process group: call m2train.launch.init_distributed()")
    check_layout(dist.get_world_size(), tp, cp)
    if _layout is not None:
        if _layout != (tp, cp):
            raise RuntimeError(f"model-parallel groups already exist with tp={_layout[0]}, cp={_layout[1]}; "
                               f"call destroy_model_parallel() before re-initialising with tp={tp}, cp={cp}")
        return
    # create_gloo_process_groups=False: on a gloo world they would duplicate the groups below, and on NCCL
    # nothing here needs the extra CPU groups.
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 create_gloo_process_groups=False)
    _layout = (tp, cp)


def destroy_model_parallel() -> None:
    """Forget the model-parallel groups (the default process group stays)."""
    global _layout
    from megatron.core import parallel_state as ps

    if _layout is not None:
        ps.destroy_model_parallel()
    _layout = None


def is_initialized() -> bool:
    return _layout is not None


def _ps():
    from megatron.core import parallel_state as ps
    return ps


# --- tensor parallel -------------------------------------------------------------------------------
def tp_group():
    """The TP process group (None in a world of one without model-parallel groups)."""
    return _ps().get_tensor_model_parallel_group() if _layout else None


def tp_rank() -> int:
    return _ps().get_tensor_model_parallel_rank() if _layout else 0


def tp_size() -> int:
    return _layout[0] if _layout else 1


# --- context parallel ------------------------------------------------------------------------------
def cp_group():
    return _ps().get_context_parallel_group() if _layout else None


def cp_rank() -> int:
    return _ps().get_context_parallel_rank() if _layout else 0


def cp_size() -> int:
    return _layout[1] if _layout else 1


# --- data parallel (what the loader shards by) -----------------------------------------------------
def dp_rank() -> int:
    """This rank's data-parallel index: ranks with the same index see the same samples (the TP and CP
    peers of one model replica)."""
    if _layout:
        return _ps().get_data_parallel_rank(with_context_parallel=False)
    return dist.get_rank() if dist.is_initialized() else 0


def dp_size() -> int:
    if _layout:
        return _ps().get_data_parallel_world_size(with_context_parallel=False)
    return dist.get_world_size() if dist.is_initialized() else 1


def dp_group():
    """Pure data-parallel group (ranks with the same tp and cp rank)."""
    return _ps().get_data_parallel_group(with_context_parallel=False) if _layout else dist.group.WORLD


# --- the group ZeRO shards and averages gradients over ---------------------------------------------
def zero_group():
    """dp x cp: every rank holding the same parameter shard (CP ranks keep the same parameters)."""
    return _ps().get_data_parallel_group(with_context_parallel=True) if _layout else dist.group.WORLD


def zero_rank() -> int:
    if _layout:
        return _ps().get_data_parallel_rank(with_context_parallel=True)
    return dist.get_rank() if dist.is_initialized() else 0


def zero_size() -> int:
    if _layout:
        return _ps().get_data_parallel_world_size(with_context_parallel=True)
    return dist.get_world_size() if dist.is_initialized() else 1


def layout() -> dict:
    """The world layout for manifests and logs: sizes of each dimension."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"world_size": world, "tensor_parallel": tp_size(), "context_parallel": cp_size(),
            "data_parallel": world // (tp_size() * cp_size())}


__all__ = ["check_layout", "init_model_parallel", "destroy_model_parallel", "is_initialized",
           "tp_group", "tp_rank", "tp_size", "cp_group", "cp_rank", "cp_size", "dp_rank", "dp_size",
           "dp_group", "zero_group", "zero_rank", "zero_size", "layout"]
