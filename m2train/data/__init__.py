"""Streaming datasets and loaders over prepared MDS shards (GPT packed windows, BERT masked LM).

    info = read_prep_stats(path)                  # DatasetInfo: layout, seq_len, vocab_size, special ids
    loader = build_dataloader(data_cfg, "train", micro_batch_size=8, seed=0, dp_rank=r, dp_world=n,
                              cache_dir=run_dir / "data_cache")
    batch = next(loader)                          # train: endless, crosses epochs, resumable
    state = loader.state_dict(); loader2.load_state_dict(state)

Modules: info (prep_stats.json), loader (build_dataloader, TokenLoader), world (data-parallel layout vs
streaming's partitioning), masking (MLM 80/10/10, seeded per sample), collate (batches), dataset
(StreamingDataset subclass), cache (local folders and /dev/shm hygiene), bench (loader throughput).
mosaicml-streaming is imported lazily: `read_prep_stats` works without paying its import time.
"""

from .info import DatasetInfo, read_prep_stats
from .loader import TokenLoader, build_dataloader
from .masking import IGNORE_INDEX, MLMMasker

__all__ = ["DatasetInfo", "read_prep_stats", "build_dataloader", "TokenLoader", "MLMMasker", "IGNORE_INDEX"]
