"""Whole-model weights from a sharded checkpoint, in one process, without an engine or optimizer.

Used by `m2train eval` and `m2train export`. ZeRO-1/2/3 (any checkpoint with per-rank optimizer
partitions) keep the exact fp32 master weights in those partitions: DeepSpeed's
get_fp32_state_dict_from_zero_checkpoint stitches them together. ZeRO-0 keeps the full module in
mp_rank_00_model_states.pt. Tensor-parallel checkpoints hold one module file per TP rank, merged with the
model's TP plan (m2train.parallel.tp_plan.merge_state_dicts).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch

from .manager import CheckpointManager
from .manifest import MANIFEST_NAME, CheckpointError, read_manifest, validate_checkpoint
from .reshard import has_partitioned_optimizer

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path, verify: str = "sha256") -> Path:
    """A checkpoint folder from what a user typed: a step_* folder (validated), a checkpoint root
    (its latest complete checkpoint) or a run directory (RUN_DIR/checkpoints, latest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if (path / MANIFEST_NAME).is_file() or path.name.startswith("step_"):
        validate_checkpoint(path, verify)
        return path
    for root in (path, path / "checkpoints"):
        mgr = CheckpointManager(root, verify=verify)
        if mgr.list_steps():
            found = mgr.find_latest()
            if found is None:
                raise CheckpointError(f"{root}: holds checkpoint folders but none is complete and valid")
            return found
    raise CheckpointError(f"{path}: not a checkpoint folder (no {MANIFEST_NAME}), checkpoint root (no "
                          "step_* folders) or run directory (no checkpoints/)")


def consolidated_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full model state_dict (CPU tensors) stored in a checkpoint folder: fp32 master weights when
    the checkpoint has ZeRO partitions, else the module weights as saved."""
    ckpt_dir = Path(ckpt_dir)
    tp = int((read_manifest(ckpt_dir).get("world") or {}).get("tp", 1))
    if tp > 1:
        return _merge_tensor_parallel(ckpt_dir, tp)
    if has_partitioned_optimizer(ckpt_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        # DeepSpeed prints its progress to stdout; keep stdout for our results (`m2train eval` prints JSON).
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    module_file = ckpt_dir / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise CheckpointError(f"{ckpt_dir}: neither ZeRO optimizer partitions nor {module_file.name}")
    state = torch.load(module_file, map_location="cpu", weights_only=False)
    if "module" not in state or not isinstance(state["module"], dict):
        raise CheckpointError(f"{module_file}: no 'module' state_dict inside")
    return state["module"]


def _load_module_states(module_file: Path) -> dict:
    if not module_file.is_file():
        raise CheckpointError(f"{module_file.parent}: {module_file.name} is missing")
    state = torch.load(module_file, map_location="cpu", weights_only=False)
    if "module" not in state or not isinstance(state["module"], dict):
        raise CheckpointError(f"{module_file}: no 'module' state_dict inside")
    return state["module"]


def _merge_tensor_parallel(ckpt_dir: Path, tp: int) -> dict[str, torch.Tensor]:
    """A TP checkpoint: DeepSpeed wrote one module file per TP rank (mp_rank_XX_model_states.pt, by the
    data-parallel rank 0 of each TP rank). The engine is fp32 and ZeRO-1/2 copy the updated fp32
    partitions back into the module, so these are the exact master weights; merge the shards with the
    model's TP plan."""
    from ..models import build_model
    from ..parallel.tp_plan import merge_state_dicts, shard_rules

    manifest = read_manifest(ckpt_dir)
    model = build_model(model_config_of(manifest, ckpt_dir))
    shards = [_load_module_states(ckpt_dir / f"mp_rank_{r:02d}_model_states.pt") for r in range(tp)]
    return merge_state_dicts(shards, shard_rules(model, tp))


def model_config_of(manifest: dict, ckpt_dir: str | Path):
    """The ModelConfig a checkpoint was trained with (from its manifest's config)."""
    from ..config import model_config_from_dict
    config = manifest.get("config") or {}
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{Path(ckpt_dir) / MANIFEST_NAME}: no config.model recorded; cannot rebuild "
                              "the model")
    return model_config_from_dict(config["model"])


def load_model_from_checkpoint(ckpt_dir: str | Path, dtype: torch.dtype | None = torch.float32):
    """(model in eval mode on the CPU, manifest): the checkpoint's model rebuilt from its config with the
    consolidated weights loaded strictly."""
    from ..models import build_model
    from ..models.pretrained import check_state_dict

    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    model = build_model(model_config_of(manifest, ckpt_dir))
    state = consolidated_state_dict(ckpt_dir)
    expected = model.state_dict()
    # Tied weights (the LM head / MLM decoder share the word embedding) may be stored under either name
    # or both; fill the one the model expects from its twin.
    for name, tensor in list(expected.items()):
        if name not in state:
            for other, t in expected.items():
                if other in state and t.data_ptr() == tensor.data_ptr():
                    state[name] = state[other]
                    break
    check_state_dict(expected, state, str(ckpt_dir))
    if dtype is not None:
        model.to(dtype)
    model.load_state_dict(state, strict=True)   # copy_ casts to the model's dtype
    return model.eval(), manifest


__all__ = ["resolve_checkpoint", "consolidated_state_dict", "load_model_from_checkpoint", "model_config_of"]
