"""Sharded checkpoints: DeepSpeed per-rank files + our client state + manifest; atomic `latest`.

    mgr = CheckpointManager(root, keep_last=3, keep_every=None)
    mgr.save(engine, step, client_state, meta)      # collective
    path = mgr.find_latest()                         # newest complete valid checkpoint, or None
    meta, client_state = mgr.load(engine, path)      # module, optimizer, LR scheduler, RNG

Consolidated weights for evaluation / export without an engine: m2train.checkpoint.consolidate."""

from .manager import CheckpointManager, step_tag
from .manifest import CheckpointError, read_manifest, validate_checkpoint
from .rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointManager", "CheckpointError", "capture_rng_state", "restore_rng_state", "read_manifest",
           "validate_checkpoint", "step_tag"]
