"""Sharded, validated, atomically published training checkpoints.

Layout under CKPT_ROOT:

    step_00001000/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   DeepSpeed's own per-rank files
        client/rank_00000.pt ...    this rank's client state (data-loader state, anything) + RNG state
        client/common.json          step, tokens seen, config (readable without torch)
        manifest.json               written LAST by rank 0: config, world layout, every file + sha256
    latest                          the tag of the newest complete checkpoint, replaced atomically

Order of a save: every rank writes its DeepSpeed and client files -> barrier -> the file list is
hashed (spread over the ranks) -> rank 0 writes manifest.json -> rank 0 replaces `latest` -> rank 0
applies retention -> barrier. A process killed anywhere before the manifest leaves a folder without
one, which is never loaded; a truncated or flipped file is caught by its size / sha256.

CKPT_ROOT must be one folder that every rank sees (a shared filesystem on multi-node jobs): rank 0 lists
and publishes the files all ranks wrote, and DeepSpeed's ZeRO loading reads other ranks' partitions.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from . import dist as cdist
from .manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, CheckpointError, file_digest,
                       list_files, read_manifest, validate_checkpoint, write_json_atomic, write_text_atomic)
from .reshard import has_partitioned_optimizer, load_resharded
from .rng import capture_rng_state, derive_seed, reseed_all, restore_rng_state

log = logging.getLogger(__name__)

LATEST_NAME = "latest"
CLIENT_DIR = "client"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_tag(step: int) -> str:
    return f"step_{int(step):08d}"


def client_file(rank: int) -> str:
    return f"{CLIENT_DIR}/rank_{int(rank):05d}.pt"


class CheckpointManager:
    """Save / find / load checkpoints under one root. Every method that takes an engine is collective:
    all ranks call it together; find_latest() is collective when a process group is up.

    keep_last: keep the newest K complete checkpoints; keep_every: also keep every step that is a
    multiple of M (None: none). verify: how find_latest()/load() check files against the manifest
    ("sha256", "size" or "none")."""

    def __init__(self, root: str | Path, keep_last: int = 3, keep_every: int | None = None,
                 verify: str = "sha256"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.verify = verify

    # ------------------------------------------------------------------------------------------
    # save
    # ------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict | None = None, meta: dict | None = None) -> Path:
        """Write checkpoint `step` (every rank calls this). client_state: this rank's state (data loader
        ...); meta: run-level facts, e.g. {"config": cfg.to_dict(), "tokens_seen": n, "world": {...}}.
        Returns the checkpoint folder once it is complete and `latest` names it."""
        meta = dict(meta or {})
        tag = step_tag(step)
        ckpt = self.root / tag
        rank, world = cdist.rank(), cdist.world_size()
        t0 = time.perf_counter()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():
                # Same step saved again (e.g. after a rollback): the old manifest must not describe the
                # new files, so the old folder goes first.
                log.warning("checkpoint %s exists; replacing it", ckpt)
                _remove_checkpoint(ckpt)
        cdist.barrier()

        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)

        (ckpt / CLIENT_DIR).mkdir(parents=True, exist_ok=True)
        payload = {"step": int(step), "rank": rank, "world_size": world, "client": client_state or {},
                   "rng": capture_rng_state()}
        target = ckpt / client_file(rank)
        tmp = target.with_name(target.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(target)
        cdist.barrier()

        world_layout = self._world_layout(engine, meta.get("world"))
        if rank == 0:
            common = {"step": int(step), "tokens_seen": meta.get("tokens_seen"), "world": world_layout,
                      "config": meta.get("config")}
            write_json_atomic(ckpt / CLIENT_DIR / "common.json", common)
        cdist.barrier()

        # Hash the files on all ranks at once (large checkpoints: one rank alone would be slow).
        files = cdist.broadcast_object(list_files(ckpt) if rank == 0 else None)
        mine = {rel: dict(zip(("size", "sha256"), file_digest(ckpt / rel, fsync=True)))
                for rel in files[rank::world]}
        hashed: dict = {}
        for part in cdist.all_gather_object(mine):
            hashed.update(part)

        if rank == 0:
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "tag": tag,
                "step": int(step),
                "tokens_seen": meta.get("tokens_seen"),
                "world": world_layout,
                "config": meta.get("config"),
                "meta": {k: v for k, v in meta.items() if k not in ("config", "world")},
                "created_unix": time.time(),
                "versions": _versions(),
                "files": {rel: hashed[rel] for rel in files},
            }
            write_json_atomic(ckpt / MANIFEST_NAME, manifest)
            write_text_atomic(self.root / LATEST_NAME, tag + "\n")
            self._apply_retention()
            log.info("saved checkpoint %s (%d files, %.1f MB) in %.1f s", ckpt, len(files),
                     sum(v["size"] for v in hashed.values()) / 1e6, time.perf_counter() - t0)
        cdist.barrier()
        return ckpt

    @staticmethod
    def _world_layout(engine, given: dict | None) -> dict:
        from ..parallel import groups

        tp, cp = groups.tp_size(), groups.cp_size()
        layout = {
            "world": cdist.world_size(),
            # Pure data parallel: DeepSpeed's dp_world_size counts the dp x cp ranks it averages over.
            "dp": (cdist.world_size() // (tp * cp) if tp * cp > 1
                   else int(getattr(engine, "dp_world_size", cdist.world_size()))),
            "tp": tp,
            "cp": cp,
            "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage")
            else 0,
        }
        layout.update(given or {})
        return layout

    # ------------------------------------------------------------------------------------------
    # retention
    # ------------------------------------------------------------------------------------------
    def _apply_retention(self) -> None:
        """Rank 0, right after a new checkpoint became `latest`: delete complete checkpoints outside
        (newest keep_last) + (multiples of keep_every) + (the one `latest` names), and leftovers of
        unfinished saves older than the newest complete one."""
        steps = self.list_steps()
        complete = [s for s, p in steps if (p / MANIFEST_NAME).is_file()]
        if not complete:
            return
        keep = set(complete[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in complete if s % self.keep_every == 0}
        latest = self._read_latest_step()
        if latest is not None:
            keep.add(latest)
        newest = complete[-1]
        for s, path in steps:
            if s in keep:
                continue
            if s in complete:
                log.info("retention: removing checkpoint %s", path)
                _remove_checkpoint(path)
            elif s < newest:
                log.info("removing unfinished checkpoint %s (no manifest; superseded by %s)", path,
                         step_tag(newest))
                _remove_checkpoint(path)

    # ------------------------------------------------------------------------------------------
    # find
    # ------------------------------------------------------------------------------------------
    def list_steps(self) -> list[tuple[int, Path]]:
        """(step, folder) of every step_* folder under the root, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def _read_latest_step(self) -> int | None:
        path = self.root / LATEST_NAME
        if not path.is_file():
            return None
        m = _STEP_RE.match(path.read_text().strip())
        return int(m.group(1)) if m else None

    def find_latest(self) -> Path | None:
        """The newest complete, valid checkpoint: the one `latest` names, or - when it is missing,
        incomplete or corrupted - the next older valid one (with a warning naming what was skipped and
        why). None when there is none. Collective under a process group: rank 0 decides."""
        choice = self._find_latest_local() if cdist.rank() == 0 else None
        choice = cdist.broadcast_object(None if choice is None else str(choice))
        return None if choice is None else Path(choice)

    def _find_latest_local(self) -> Path | None:
        steps = self.list_steps()
        if not steps:
            return None
        latest = self._read_latest_step()
        if latest is None:
            candidates = list(reversed(steps))
        else:
            # `latest` is the authority: a newer folder is an unfinished save (or was abandoned by a
            # rollback); older ones are the fallbacks.
            candidates = [(s, p) for s, p in reversed(steps) if s <= latest]
            newer = [p.name for s, p in steps if s > latest]
            if newer:
                log.info("ignoring checkpoint folders newer than %s (latest): %s", step_tag(latest),
                         ", ".join(newer))
            if not any(s == latest for s, _ in steps):
                _warn(f"{self.root / LATEST_NAME} names {step_tag(latest)}, which does not exist")
        for s, path in candidates:
            try:
                validate_checkpoint(path, self.verify)
                return path
            except CheckpointError as e:
                _warn(f"skipping checkpoint {path}: {e}; falling back to an older one")
        return None

    # ------------------------------------------------------------------------------------------
    # load
    # ------------------------------------------------------------------------------------------
    def load(self, engine, path: str | Path | None = None, load_optimizer_states: bool = True,
             load_lr_scheduler_states: bool = True, restore_rng: bool = True) -> tuple[dict, dict]:
        """Restore `engine` (module, optimizer, LR scheduler) and this rank's RNG from a checkpoint
        folder (default: find_latest()). Returns (meta, client_state).

        meta: the manifest (step, tokens_seen, config, world, meta, files) plus "path",
        "world_changed" and "saved_world".
        client_state: what this rank passed to save(). When the data-parallel layout changed, this rank
        has no state of its own: client_state is then rank 0's saved state (the streaming loader's state
        is global: epoch + samples seen by the whole run) with "all_ranks": [state of saved rank 0, 1,
        ...] added, and the RNGs are reseeded from (seed, step, rank) instead of restored."""
        if path is None:
            path = self.find_latest()
            if path is None:
                raise CheckpointError(f"{self.root}: no complete checkpoint to load")
            manifest = read_manifest(path)
        else:
            path = Path(path)
            error, manifest = "", None
            if cdist.rank() == 0:
                try:
                    validate_checkpoint(path, self.verify)
                except CheckpointError as e:
                    error = str(e)
            error = cdist.broadcast_object(error)
            if error:
                raise CheckpointError(error)
            manifest = read_manifest(path)

        saved = manifest["world"]
        current = self._world_layout(engine, None)
        saved_mp = (int(saved.get("tp", 1)), int(saved.get("cp", 1)))
        if saved_mp != (current["tp"], current["cp"]):
            # TP shards are per-rank files of different shapes; CP changes what a rank's RNG/data mean.
            # Resharding them is not implemented: consolidate instead (m2train export) and start anew.
            raise CheckpointError(
                f"{path}: saved with tensor_parallel={saved_mp[0]}, context_parallel={saved_mp[1]} "
                f"(world {saved['world']}), but this run has tensor_parallel={current['tp']}, "
                f"context_parallel={current['cp']} (world {current['world']}); resume with the saved "
                f"parallel.tensor_parallel / parallel.context_parallel, or export the checkpoint "
                f"(m2train export) and load the weights into a new run")
        world_changed = (int(saved.get("dp", saved["world"])) != current["dp"]
                         or int(saved["world"]) != current["world"])
        if world_changed and current["tp"] * current["cp"] > 1:
            # The universal-checkpoint reshard path knows nothing of TP shards / CP replicas.
            raise CheckpointError(
                f"{path}: saved with data-parallel size {saved.get('dp')} (world {saved['world']}), this run "
                f"has {current['dp']} (world {current['world']}); a tensor/context-parallel checkpoint resumes "
                f"only with the same world layout")
        if world_changed and has_partitioned_optimizer(path):
            log.warning("resharding checkpoint %s: saved with data-parallel size %s (world %s), loading "
                        "with %s (world %s) via a DeepSpeed universal checkpoint", path, saved.get("dp"),
                        saved["world"], current["dp"], current["world"])
            load_resharded(engine, path, load_optimizer_states, load_lr_scheduler_states)
        else:
            if world_changed:
                log.warning("checkpoint %s was saved with world %s, loading with world %s (no "
                            "partitioned optimizer state: loading as is)", path, saved["world"],
                            current["world"])
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                  load_optimizer_states=load_optimizer_states,
                                                  load_lr_scheduler_states=load_lr_scheduler_states)
            if load_path is None:
                raise CheckpointError(f"{path}: DeepSpeed found no model states to load")

        rank = cdist.rank()
        if not world_changed:
            payload = _load_client(path, rank)
            client_state = payload["client"]
            if restore_rng:
                restore_rng_state(payload["rng"])
        else:
            payloads = [_load_client(path, r) for r in range(int(saved["world"]))]
            client_state = dict(payloads[0]["client"])
            client_state["all_ranks"] = [p["client"] for p in payloads]
            if restore_rng:
                base = ((manifest.get("config") or {}).get("train") or {}).get("seed", 0)
                seed = derive_seed(base, manifest["step"], rank)
                reseed_all(seed)
                log.warning("world size changed (%s -> %s): RNG of rank %d reseeded with %d (derived from "
                            "seed %s, step %d, rank)", saved["world"], current["world"], rank, seed, base,
                            manifest["step"])
        meta = dict(manifest)
        meta.update(path=str(path), world_changed=world_changed, saved_world=saved)
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return meta, client_state


def _load_client(ckpt: Path, rank: int) -> dict:
    path = ckpt / client_file(rank)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint has no client state for rank {rank})")
    # Our own file (numpy RNG tuples, python RNG state): not loadable with weights_only.
    return torch.load(path, map_location="cpu", weights_only=False)


def _remove_checkpoint(path: Path) -> None:
    # Manifest first: a deletion interrupted halfway leaves a folder that is plainly incomplete.
    (path / MANIFEST_NAME).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        import deepspeed
        out["deepspeed"] = deepspeed.__version__
    except Exception:  # pragma: no cover - deepspeed is a dependency
        pass
    return out
