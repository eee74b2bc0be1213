"""The few collective operations checkpointing needs, safe to call without a process group (then they
act as a world of one)."""

from __future__ import annotations

import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank."""
    if not active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not active() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ok(ok: bool, error: str = "") -> str:
    """Agree across ranks whether a local step succeeded: returns "" when every rank was ok, else the
    first failing rank's message (so every rank raises together instead of some hanging in the next
    collective)."""
    results = all_gather_object((ok, error))
    for r, (good, msg) in enumerate(results):
        if not good:
            return f"rank {r}: {msg}"
    return ""
