"""Per-loader cache folders and the /dev/shm registrations streaming keeps for them.

Why each loader gets its own local folder (CACHE/<host>-node<i>/<split>-<n>):
  * shards are zstd-compressed; streaming decompresses them into `local`. Reading the prepared folder in
    place would write there (it may be read-only, or shared by concurrent jobs that do not lock each other),
    so the prepared folder is always streaming's `remote` and `local` is a cache we own.
  * `local` must be node-local and is shared by the ranks of one node (the local leader fills it): host name
    and node index keep two nodes that share a network CACHE (or one host) apart.
  * two live datasets must not share one `local` (each keeps its own record of which shards are there and
    evicts independently): n, a per-process counter, keeps train and val loaders and repeated builds in one
    process apart. Every rank builds the same loaders
    in the same order (SPMD), so the ranks of a node agree on n.

Stale registrations: a killed run leaves /dev/shm entries naming its `local` folders, and a restarted run
reuses those names. streaming's own `clean_stale_shared_memory()` unlinks EVERY streaming entry on the
host, including live loaders of other jobs (and this process's other loader), so we only release entries
that name our own folders and that no live process has mapped (Linux /proc/*/maps), on the local leader,
before the dataset registers; the other ranks wait for it. A live one (two jobs given the same cache
folder) is an error naming the folder.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_SHM_DIR = Path("/dev/shm")
_LOCALS_RE = re.compile(r"^(\d{6})_locals$")
_build_counter = itertools.count()


def default_cache_root() -> Path:
    """A node-local default when the caller gives no cache dir: TMPDIR/m2train-data-<uid>/<job key>."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        job = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"
    if job is None:
        job = f"pid{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"m2train-data-{os.getuid()}" / job


def next_local_dir(cache_root: Path, split: str, node: int) -> Path:
    """CACHE/<host>-node<i>/<split>-<n> for the next loader this process builds (i = RANK // LOCAL_WORLD_SIZE:
    nodes simulated on one host, e.g. a local Slurm test cluster, still get separate folders)."""
    return Path(cache_root).resolve() / f"{socket.gethostname()}-node{node}" / f"{split}-{next(_build_counter)}"


def release_stale_registrations(local_dirs: list[str]) -> int:
    """Unlink streaming's /dev/shm entries whose registration names any of `local_dirs` (left by killed runs).
    Returns how many were released; raises ValueError if a live process still uses one."""
    if not _SHM_DIR.is_dir():  # not Linux: streaming's shm lives elsewhere; nothing we can inspect
        return 0
    from streaming.base.constant import SHM_TO_CLEAN

    wanted = {os.path.abspath(d) for d in local_dirs}
    released = 0
    for entry in os.listdir(_SHM_DIR):
        m = _LOCALS_RE.match(entry)
        if not m:
            continue
        try:
            data = (_SHM_DIR / entry).read_bytes()
        except OSError:
            continue
        if len(data) < 4:
            continue
        size = int.from_bytes(data[:4], "little", signed=True)
        names = data[4:size].decode("utf-8", "replace").split("\0")[:-1] if size > 4 else []
        if not wanted.intersection(names):
            continue
        prefix = m.group(1)
        if _mapped_by_a_live_process(str(_SHM_DIR / entry)):
            # streaming itself would not notice (it skips numbers whose lock files exist): two loaders would
            # fill and evict one folder independently.
            raise ValueError(f"cache folder {sorted(wanted & set(names))[0]} is in use by a running loader "
                             f"(/dev/shm/{entry}); give each job its own cache dir (data.local_cache)")
        for name in SHM_TO_CLEAN:
            try:
                (_SHM_DIR / f"{prefix}_{name}").unlink()
            except FileNotFoundError:
                pass
        released += 1
        log.info("released stale streaming shared memory %s_* naming %s", prefix, sorted(wanted & set(names)))
    return released


def _mapped_by_a_live_process(shm_path: str) -> bool:
    """Whether any process we can inspect has `shm_path` mapped (streaming keeps its registry mapped for the
    dataset's lifetime, in the dataset's process and its forked workers)."""
    needle = shm_path.encode()
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        # Not this process: streaming maps every registration it scans while registering an earlier loader
        # of ours (train before val), which says nothing about the scanned one being live.
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                if needle in f.read():
                    return True
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return False


def refresh_local_cache(remote_split: str, local_dir: Path) -> None:
    """Empty `local_dir` if it caches a different dataset than `remote_split` (its index.json differs).

    streaming never re-downloads an index.json that exists locally, so a cache reused after the dataset was
    re-prepared would serve stale shards. Only checked for plain-folder remotes (cheap to compare)."""
    local_index = local_dir / "index.json"
    if not local_index.exists() or "://" in remote_split:
        return
    remote_index = Path(remote_split) / "index.json"
    try:
        same = remote_index.read_bytes() == local_index.read_bytes()
    except OSError:
        same = False
    if not same:
        log.warning("cache %s holds another version of %s; clearing it", local_dir, remote_split)
        shutil.rmtree(local_dir, ignore_errors=True)


def prepare_local_dir(remote_split: str, local_dir: Path, is_local_leader: bool, distributed: bool) -> None:
    """Leader: release stale registrations of `local_dir` and drop a stale cache; everyone: wait for it.

    A failure on a leader is raised on every rank (instead of leaving the others waiting at a barrier)."""
    error = None
    if is_local_leader:
        try:
            release_stale_registrations([str(local_dir)])
            refresh_local_cache(remote_split, local_dir)
            local_dir.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
    if distributed:
        import torch.distributed as tdist

        errors = [None] * tdist.get_world_size()
        tdist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise ValueError(error)
