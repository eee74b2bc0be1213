"""Which samples a process gets: mapping data-parallel rank/size onto mosaicml-streaming's partitioning.

How streaming partitions (0.13, read from its source):
  * It takes the world from the environment, not from arguments: RANK, WORLD_SIZE, LOCAL_WORLD_SIZE
    (nodes = WORLD_SIZE / LOCAL_WORLD_SIZE). Every process of the job builds the dataset; the first local
    rank of each node ("local leader") downloads/decompresses shards for its node and writes the epoch's
    partition into /dev/shm for the other ranks and workers of that node.
  * Global sample order: samples are split into `num_canonical_nodes` (NCN) contiguous spans, shuffled
    (py1e, seed + epoch) and interleaved; that order depends only on NCN, the shuffle algorithm, seed and
    block size, never on the number of ranks. Position g of that order goes to rank
    (g % nodes) * ranks_per_node + (g // nodes) % ranks_per_node, so at step t the ranks together consume
    exactly positions [t*B*R, (t+1)*B*R) (B = micro batch, R = ranks). Resuming drops the first
    `sample_in_epoch` positions, which is why a 2-rank state resumes on 1 rank with nothing repeated or
    skipped. We therefore fix NCN (default 1), shuffle algorithm and block size instead of letting streaming
    default NCN to the first run's node count.
  * Tensor/context parallel ranks must see the SAME samples. streaming's `replication=r` makes groups of r
    consecutive global ranks (rank // r) act as one data-parallel rank. So with dp_world < WORLD_SIZE we
    pass replication = WORLD_SIZE / dp_world, which is right exactly when the model-parallel ranks are the
    innermost (fastest-varying) rank dimension, dp_rank == RANK // (tp * cp) - megatron-core's default
    order. Any other layout is refused with an explanation instead of silently mixing data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataWorld:
    """The process's place in the job as streaming will see it, checked against the caller's dp layout."""

    rank: int               # global rank (RANK)
    world_size: int         # WORLD_SIZE
    local_rank: int         # LOCAL_RANK
    local_world_size: int   # LOCAL_WORLD_SIZE
    dp_rank: int
    dp_world: int

    @property
    def replication(self) -> Optional[int]:
        """streaming's `replication`: how many consecutive ranks share one data-parallel rank's samples."""
        r = self.world_size // self.dp_world
        return r if r > 1 else None

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size

    @property
    def is_local_leader(self) -> bool:
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_world(dp_rank: int, dp_world: int) -> DataWorld:
    """Check the data-parallel layout against the launcher's environment and return it.

    Raises ValueError naming the variables when streaming would partition differently than asked."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1 if world == 1 else world)
    local_rank = _env_int("LOCAL_RANK", rank % local_world)
    if dp_world < 1 or not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank={dp_rank}, dp_world={dp_world}: need dp_world >= 1 and 0 <= dp_rank < dp_world")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if local_world < 1 or world % local_world:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world} "
                         f"(streaming assumes the same number of ranks on every node)")
    if world < dp_world:
        raise ValueError(f"dp_world={dp_world} but WORLD_SIZE={world}: streaming partitions by the environment; "
                         f"launch {dp_world} processes (torchrun / srun) that set RANK/WORLD_SIZE/"
                         f"LOCAL_WORLD_SIZE")
    if world % dp_world:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of dp_world={dp_world}")
    replication = world // dp_world
    if rank // replication != dp_rank:
        raise ValueError(
            f"RANK={rank} of WORLD_SIZE={world} claims data-parallel rank {dp_rank} of {dp_world}, but streaming "
            f"gives each block of {replication} consecutive ranks (its `replication`) the same samples, i.e. "
            f"data-parallel rank RANK // {replication} = {rank // replication}. Order the process grid with the "
            f"tensor/context-parallel ranks innermost (megatron-core's default tp-cp-dp order)")
    return DataWorld(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                     dp_rank=dp_rank, dp_world=dp_world)
