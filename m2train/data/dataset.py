"""StreamingDataset over a prepared split that also reports each sample's id and epoch.

MLM masking is seeded per (seed, epoch, sample id). streaming decides the epoch inside each worker when
an iteration starts (`_resume_incr_epoch`: a fresh epoch, or the one a loaded state resumes), so we record
it there and attach it, with the global sample id, to every sample.

Shared-memory prefix: every streaming dataset on a host owns a numbered /dev/shm prefix. In streaming
0.13 each rank of a node scans for the first free number on its own and non-leaders then attach to what
the leader registered; when another job on the host registers a dataset between the scans (observed with
several test sessions on one machine), the ranks disagree and construction fails ("prefix=N was not
registered by local leader"), and two leaders on one host (simulated nodes) can pick the same number at
once (FileExistsError). Here each local leader alone scans and registers (scanning again if the number was
taken meanwhile), and the other ranks of its node take its number over torch.distributed.

This relies on internals of mosaicml-streaming 0.13 (`_resume_incr_epoch`, `get_item`, the module-level
`get_shm_prefix` binding and the prefix helpers); the guard below fails loudly if a release renames them.
"""

from __future__ import annotations

import contextlib
import threading

import streaming.base.dataset as _sd
from streaming import StreamingDataset

if not (hasattr(StreamingDataset, "_resume_incr_epoch") and hasattr(StreamingDataset, "get_item")
        and hasattr(_sd, "get_shm_prefix")):
    raise ImportError("m2train.data needs mosaicml-streaming 0.13-compatible internals "
                      "(StreamingDataset._resume_incr_epoch / get_item, dataset.get_shm_prefix); "
                      "install mosaicml-streaming==0.13.*")

_original_get_shm_prefix = _sd.get_shm_prefix
_patch_lock = threading.Lock()


def _agreed_shm_prefix(streams_local, streams_remote, world, retry: int = 100):
    """get_shm_prefix, but the node's ranks cannot disagree: the leader scans and registers, then shares."""
    import torch.distributed as tdist
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _check_and_find_retrying, _check_self, _pack_locals, _unpack_locals

    if not (tdist.is_available() and tdist.is_initialized()):
        return _original_get_shm_prefix(streams_local, streams_remote, world, retry)
    _check_self(streams_local)
    prefix = None
    shm = None
    if world.is_local_leader:
        for _ in range(retry + 1):
            prefix = max(_check_and_find_retrying(streams_local, streams_remote, shm_name=name, retry=retry)
                         for name in SHM_TO_CLEAN)
            data = _pack_locals(streams_local, prefix)
            try:
                shm = SharedMemory(_sd._get_path(prefix, LOCALS), True, len(data))
            except FileExistsError:  # another job registered this number after our scan: scan again
                continue
            shm.buf[:len(data)] = data
            break
        else:
            raise RuntimeError(f"could not register a streaming shared-memory prefix for {streams_local}")
    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, prefix)
    prefix = gathered[world.node * world.ranks_per_node]  # this node's leader
    if not world.is_local_leader:
        shm = SharedMemory(_sd._get_path(prefix, LOCALS), False)
        their_locals, their_prefix = _unpack_locals(bytes(shm.buf))
        if their_locals != list(streams_local) or their_prefix != prefix:
            raise RuntimeError(f"streaming shared memory {prefix} names {their_locals}, expected {streams_local}: "
                               f"every rank of a node must build the same loaders in the same order")
    return prefix, shm


@contextlib.contextmanager
def _prefix_agreement():
    with _patch_lock:
        _sd.get_shm_prefix = _agreed_shm_prefix
        try:
            yield
        finally:
            _sd.get_shm_prefix = _original_get_shm_prefix


class TokenStream(StreamingDataset):
    """Yields {"tokens": ndarray, "sample_id": int, "epoch": int} for each sample of the split."""

    _m2_epoch: int = -1

    def __init__(self, **kwargs):
        with _prefix_agreement():
            super().__init__(**kwargs)

    def _resume_incr_epoch(self):
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._m2_epoch = int(epoch)
        return epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7):
        sample = super().get_item(sample_id, retry)
        if "tokens" not in sample:
            raise KeyError(f"sample {sample_id} has no 'tokens' column (columns: {sorted(sample)}); "
                           f"see data_prep/FORMAT.md")
        return {"tokens": sample["tokens"], "sample_id": int(sample_id), "epoch": self._m2_epoch}
