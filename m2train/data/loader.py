"""`build_dataloader`: batches from a prepared split, data-parallel aware, exactly resumable.

The train loader is an endless iterator: when an epoch ends it starts the next one (reshuffled with
seed + epoch), so the trainer just calls next() for max_steps. Its state (streaming's epoch, samples
consumed in that epoch by all data-parallel ranks together, NCN and shuffle seed) resumes mid-epoch
exactly, also on a different number of data-parallel ranks. The val loader is deterministic (no shuffle,
masks fixed) and every `iter(loader)` starts again from its first sample.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from .cache import default_cache_root, next_local_dir, prepare_local_dir
from .info import DatasetInfo, is_remote, join_path, read_prep_stats
from .world import DataWorld, resolve_world

log = logging.getLogger(__name__)

STATE_FORMAT = "m2train.data/1"
# Shuffle parameters fixed for the life of a run: the global sample order must depend on the seed alone,
# not on how many ranks or nodes happen to run it (see world.py).
SHUFFLE_ALGO = "py1e"
DEFAULT_SHUFFLE_BLOCK_SIZE = 1 << 18
DEFAULT_NUM_CANONICAL_NODES = 1


class TokenLoader:
    """Iterates batches (dicts of tensors) over one split; see the module docstring for train vs val."""

    def __init__(self, *, info: DatasetInfo, split: str, folder: str, train: bool, dataset, loader,
                 world: DataWorld, seed: int, micro_batch_size: int, local_dir: Path):
        self.info = info
        self.split = split
        self.folder = folder
        self.train = train
        self.world = world
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.local_dir = local_dir
        self._dataset = dataset
        self._loader = loader
        self._pass: Optional[Iterator] = None     # the current epoch's batch iterator
        self._pass_batches = 0
        self._empty_passes = 0
        self._epoch = -1

    # ---------------------------------------------------------------- iteration
    def __len__(self) -> int:
        """Batches per epoch on this data-parallel rank."""
        return len(self._loader)

    @property
    def epoch(self) -> int:
        """Epoch of the most recent batch (-1 before the first)."""
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks together)."""
        return self._dataset.num_samples

    def __iter__(self):
        if self.train:
            return self  # one endless stream: a second `for` continues where the first stopped
        return self._val_pass()

    def __next__(self) -> dict:
        if not self.train:
            raise TypeError("the val loader is not an iterator; use `for batch in loader` (a fresh pass each time)")
        while True:
            if self._pass is None:
                self._pass = iter(self._loader)
                self._pass_batches = 0
            try:
                batch = next(self._pass)
            except StopIteration:
                self._pass = None
                if self._pass_batches == 0:
                    # One empty pass is normal (a state saved at the very end of an epoch); two in a row
                    # means no rank can fill a batch.
                    self._empty_passes += 1
                    if self._empty_passes >= 2:
                        raise RuntimeError(
                            f"{self.folder}: an epoch yields no batch ({self.num_samples} samples over "
                            f"{self.world.dp_world} data-parallel ranks, micro batch {self.micro_batch_size}, "
                            f"drop_last={self._loader.drop_last})") from None
                continue
            if self._pass_batches == 0:
                # streaming's shared epoch counter was advanced when this pass started.
                self._epoch = self._dataset.next_epoch - 1
            self._pass_batches += 1
            self._empty_passes = 0
            return batch

    def _val_pass(self) -> Iterator[dict]:
        self._close_pass()
        it = iter(self._loader)
        self._pass = it
        try:
            yield from it
        finally:
            if self._pass is it:
                self._pass = None

    def _close_pass(self) -> None:
        """Stop the current pass's workers (before a new pass or a state load reuses the shared memory)."""
        it = self._pass
        self._pass = None
        if it is not None and hasattr(it, "close"):
            # Closing the generator drops torch's worker iterator, which shuts its workers down.
            it.close()
        # Without workers, streaming's prefetch threads run in this process and keep downloading and
        # decompressing ahead until told to stop; stop them (and wait) so nothing writes to the cache after.
        threads = getattr(self._dataset, "_iterator", None)
        if threads is not None:
            threads.exit()

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """JSON-serialisable position in the data stream (the same on every data-parallel rank)."""
        return {"format": STATE_FORMAT, "split": self.split, "layout": self.info.layout, "seed": self.seed,
                "dp_world": self.world.dp_world, "micro_batch_size": self.micro_batch_size,
                "streaming": self._loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from any data-parallel size); the next batch is the one after it."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a data loader state ({STATE_FORMAT}): {str(state)[:200]}")
        for key in ("split", "layout", "seed"):
            mine = {"split": self.split, "layout": self.info.layout, "seed": self.seed}[key]
            if state.get(key) != mine:
                raise ValueError(f"data loader state was saved with {key}={state.get(key)!r}, this loader has "
                                 f"{key}={mine!r}; resuming would change the sample order or masks")
        if not self.train:
            return  # val passes always start from the beginning
        self._close_pass()
        self._loader.load_state_dict(state["streaming"])
        # streaming ignores a saved state older than its own epoch counter (it treats it as stale), so
        # rewinding a loader that has already iterated (a rollback) must rewind the counter too. Every
        # rank of a node writes the same value before any of them starts the next pass.
        self._dataset.next_epoch = max(0, int(state["streaming"]["epoch"]))
        # StreamingDataLoader counts samples yielded in the current pass; none yet since the load.
        self._loader.num_samples_yielded = 0
        self._empty_passes = 0

    def close(self) -> None:
        self._close_pass()


def build_dataloader(data_cfg, split: str = "train", micro_batch_size: int = 8, seed: int = 0,
                     dp_rank: int = 0, dp_world: int = 1, cache_dir: Optional[str | os.PathLike] = None,
                     mlm_probability: Optional[float] = None, *, drop_last: Optional[bool] = None,
                     num_canonical_nodes: int = DEFAULT_NUM_CANONICAL_NODES,
                     shuffle_block_size: int = DEFAULT_SHUFFLE_BLOCK_SIZE,
                     cache_limit: Optional[int | str] = None,
                     info: Optional[DatasetInfo] = None) -> TokenLoader:
    """A loader over `data_cfg.path`'s train or val split for data-parallel rank `dp_rank` of `dp_world`.

    data_cfg: m2train.config.DataConfig (path, local_cache, train_split/val_split folder names, num_workers,
        shuffle, mlm_probability / eval_mlm_probability).
    split: "train" (endless, shuffled with `seed`, resumable) or "val" (one deterministic pass per iter()).
    cache_dir: node-local folder for decompressed shards (default data_cfg.local_cache, else a temp dir).
    mlm_probability: None -> data_cfg's train/eval probability (BERT layouts only).
    drop_last: drop each epoch's incomplete final batch (default: True for train, keeping every batch the
        same shape; False for val). Every rank gets equally many batches either way.
    dp_rank / dp_world: this process's data-parallel coordinates. With tensor/context parallelism,
        dp_world = WORLD_SIZE / (tp * cp) and dp_rank = RANK // (tp * cp): the model-parallel ranks must be
        the innermost rank dimension (megatron-core's default); anything else is refused (see world.py).
    num_canonical_nodes / shuffle_block_size: fixed shuffle geometry; a resumed state keeps the values it
        was saved with. Raise NCN (to a multiple or divisor of the node count) for many-node runs on remote
        data so that each node reads fewer shards.
    cache_limit: bytes (or "100gb") of decompressed shards kept per node before the coldest are evicted;
        None keeps the whole split (a full decompressed copy per loader and node).
    info: an already-read DatasetInfo (skips reading prep_stats.json again).
    When WORLD_SIZE > 1, torch.distributed must be initialised and every rank must call this with the same
    arguments in the same order.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    train = split == "train"
    world = resolve_world(dp_rank, dp_world)
    dist_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world.world_size > 1 and not dist_ready:
        raise RuntimeError(f"WORLD_SIZE={world.world_size}: initialise torch.distributed before "
                           f"build_dataloader (streaming synchronises ranks through it)")

    cache_root = Path(cache_dir if cache_dir is not None else (data_cfg.local_cache or default_cache_root()))
    if info is None:
        info = read_prep_stats(data_cfg.path, cache_dir=cache_root / "prep_stats")
    folder_name = data_cfg.train_split if train else data_cfg.val_split
    remote_split = join_path(info.path, folder_name)
    if not is_remote(remote_split):
        remote_split = os.path.abspath(remote_split)  # workers and other ranks may not share our cwd
        _check_split_folder(Path(remote_split), info, folder_name)

    local_dir = next_local_dir(cache_root, folder_name, world.node)
    prepare_local_dir(remote_split, local_dir, world.is_local_leader, dist_ready)

    collate = _make_collate(info, data_cfg, train, seed, mlm_probability, remote_split)
    drop_last = train if drop_last is None else drop_last

    from streaming import StreamingDataLoader

    from .dataset import TokenStream

    dataset = TokenStream(
        remote=remote_split, local=str(local_dir), batch_size=micro_batch_size,
        shuffle=bool(train and data_cfg.shuffle), shuffle_algo=SHUFFLE_ALGO, shuffle_seed=seed,
        shuffle_block_size=shuffle_block_size, num_canonical_nodes=num_canonical_nodes,
        partition_algo="relaxed", replication=world.replication, cache_limit=cache_limit,
    )
    per_rank = -(-dataset.num_samples // world.dp_world)
    if drop_last and per_rank < micro_batch_size:
        raise ValueError(f"{remote_split}: {dataset.num_samples} samples give each of {world.dp_world} "
                         f"data-parallel ranks {per_rank} < micro_batch_size {micro_batch_size}: no full batch")
    workers = data_cfg.num_workers
    loader = StreamingDataLoader(
        dataset, batch_size=micro_batch_size, collate_fn=collate, num_workers=workers, drop_last=drop_last,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        # Each iter() draws a worker base seed; from a private generator it leaves the global torch RNG
        # (dropout) alone, so a resumed run, which starts a fresh pass mid-epoch, stays bit-exact.
        generator=torch.Generator().manual_seed(seed),
    )
    log.info("data %s: %d samples, %d batches/epoch on dp rank %d/%d, cache %s", remote_split,
             dataset.num_samples, len(loader), dp_rank, dp_world, local_dir)
    return TokenLoader(info=info, split=split, folder=remote_split, train=train, dataset=dataset, loader=loader,
                       world=world, seed=seed, micro_batch_size=micro_batch_size, local_dir=local_dir)


def _check_split_folder(folder: Path, info: DatasetInfo, split: str) -> None:
    """A missing, foreign or half-rewritten split folder fails here, naming the path, not in a worker."""
    import json

    index = folder / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"split folder {folder} has no index.json (expected an MDS split written by "
                                f"`m2train prep`; {info.path}/prep_stats.json lists {sorted(info.splits)})")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not an MDS index ({e})") from e
    if not shards:
        raise ValueError(f"{index}: the split has no shards")
    want = f"ndarray:{info.dtype}"
    for shard in shards:
        names, encs = shard.get("column_names", []), shard.get("column_encodings", [])
        if "tokens" not in names:
            raise ValueError(f"{index}: shard {shard.get('raw_data', {}).get('basename')} has no 'tokens' column "
                             f"(columns {names}); see data_prep/FORMAT.md")
        enc = encs[names.index("tokens")]
        if not enc.startswith("ndarray"):
            raise ValueError(f"{index}: column 'tokens' is {enc!r}, expected {want!r}")
    stated = info.split_samples(split)
    found = sum(int(shard.get("samples", 0)) for shard in shards)
    if stated is not None and stated != found:
        raise ValueError(f"{index} lists {found} samples but {info.path}/prep_stats.json says splits.{split}."
                         f"samples = {stated}: the folder was changed after preparation (re-run `m2train prep`)")


def _make_collate(info: DatasetInfo, data_cfg, train: bool, seed: int, mlm_probability: Optional[float],
                  where: str):
    from .collate import GPTCollate, MLMCollate
    from .masking import MLMMasker

    if info.is_causal:
        return GPTCollate(info.seq_len, where)
    p = mlm_probability
    if p is None:
        p = data_cfg.mlm_probability if train else data_cfg.eval_mlm_probability
    masker = MLMMasker(p, info.mask_id, info.vocab_size, info.structural_ids, seed)
    # Validation masks use epoch 0 on every pass, so repeated evaluations score the same corrupted inputs.
    return MLMCollate(info.seq_len, masker, info.pad_id, where, fixed_epoch=None if train else 0)

