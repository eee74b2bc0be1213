"""Loading a ZeRO checkpoint into a different data-parallel size.

ZeRO-1/2/3 (and DeepSpeed's bf16 optimizer) save the fp32 master weights and Adam moments as one flat
partition per rank, and DeepSpeed's normal load refuses a different DP size. DeepSpeed's own answer is the
"universal" checkpoint: `deepspeed.checkpoint.ds_to_universal` rewrites the partitions as one folder per
parameter (fp32, exp_avg, exp_avg_sq, full shapes), and an engine whose config says
`checkpoint.load_universal` slices that into its own partitions. We convert into a scratch folder next to
the checkpoint (rank 0, once), switch the running engine to universal loading for this one call, and
remove the scratch folder afterwards, so callers only ever see `CheckpointManager.load`.

Checkpoints without partitioned optimizer files (ZeRO-0 fp32: the full optimizer state sits in
mp_rank_00_model_states.pt, identical on every rank) load into any DP size with the normal path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from pathlib import Path

from . import dist as cdist
from .manifest import CheckpointError

log = logging.getLogger(__name__)

RESHARD_DIR = ".reshard"


def has_partitioned_optimizer(ckpt_dir: str | Path) -> bool:
    """True when the checkpoint holds per-rank optimizer partitions (DeepSpeed's *optim_states.pt)."""
    return any(Path(ckpt_dir).glob("*optim_states.pt"))


def convert_to_universal(ckpt_dir: str | Path, out_dir: str | Path) -> None:
    """Write DeepSpeed's universal form of `ckpt_dir` into `out_dir` (replaced if present)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(ckpt_dir), output_folder=str(out_dir),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True,
                              # our engines do not register universal-checkpoint metadata (no TP/PP
                              # slicing to describe); the converter then treats every tensor as whole.
                              inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            ds_to_universal(args)
    except Exception as e:  # the converter raises bare AssertionErrors; say which checkpoint failed
        raise CheckpointError(f"{ckpt_dir}: could not convert to a DeepSpeed universal checkpoint for "
                              f"resharding: {type(e).__name__}: {e}") from e
    log.debug("ds_to_universal output:\n%s", chatter.getvalue())


def load_resharded(engine, ckpt_dir: str | Path, load_optimizer_states: bool = True,
                   load_lr_scheduler_states: bool = True) -> None:
    """Load `ckpt_dir` (saved with another DP size) into `engine`: every rank must call this."""
    ckpt_dir = Path(ckpt_dir)
    scratch_root = ckpt_dir.parent / RESHARD_DIR
    tag = ckpt_dir.name
    error = ""
    if cdist.rank() == 0:
        try:
            convert_to_universal(ckpt_dir, scratch_root / tag)
        except CheckpointError as e:
            error = str(e)
    error = cdist.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(scratch_root), tag=tag,
                                              load_optimizer_states=load_optimizer_states,
                                              load_lr_scheduler_states=load_lr_scheduler_states)
    finally:
        config.load_universal_checkpoint = previous
    cdist.barrier()
    if cdist.rank() == 0:
        shutil.rmtree(scratch_root, ignore_errors=True)   # the converter also leaves files beside the tag
    if load_path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed found nothing to load in its universal form")
    if load_optimizer_states:
        _restore_group_hyperparameters(engine, ckpt_dir)


def _restore_group_hyperparameters(engine, ckpt_dir: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load copies parameter group 0's hyperparameters (lr,
    weight_decay, initial_lr, ...) into every group; our models have several groups (filter, pos_emb,
    no_decay) with their own values. Put back each group's own values from the original rank-0 optimizer
    file (group order does not depend on the world size). ZeRO-1/2 load them correctly; this is a no-op
    there."""
    import torch

    files = sorted(ckpt_dir.glob("*zero_pp_rank_0_*optim_states.pt"))
    base = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    if not files or base is None:
        return
    saved = torch.load(files[0], map_location="cpu", weights_only=False).get("optimizer_state_dict", {})
    saved = saved.get("optimizer_state_dict", saved)  # ZeRO-3 nests the torch optimizer's state once more
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        return   # ZeRO-1/2 "base_optimizer_state": already restored group by group
    if len(groups) != len(base.param_groups):
        raise CheckpointError(f"{files[0]}: {len(groups)} optimizer parameter groups, the engine has "
                              f"{len(base.param_groups)}; cannot restore per-group settings")
    for dst, src in zip(base.param_groups, groups):
        for key, value in src.items():
            if key != "params":
                dst[key] = value
