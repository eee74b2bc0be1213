"""The folder of a prep job: its recorded arguments, completion markers and lock.

Shared by the workers (data_prep/worker.py), the job driver (prep.py) and finalize/merge
(data_prep/finalize.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .sources import DataError

FORMAT_VERSION = 1
STATE = ".prep"
SPLITS = ("train", "val")
TAIL = "tail"
STATS = "prep_stats.json"
PART_DONE = "part_done.json"


class PrepError(DataError):
    """A prep job that cannot proceed (bad arguments, mismatched rerun, incomplete parts)."""


def unit_name(f: int, k: int) -> str:
    return f"f{f:06d}-c{k:06d}"


def write_json(path: Path, obj) -> None:
    """Atomic: a crash leaves either the old file or the new one, never half of one."""
    # A per-process temporary name: lanes sharing a file may write its marker at the same moment.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text())


def owned_entries(job_dir: Path) -> list[Path]:
    names = {STATE, "train", "val", "tokenizer", STATS, PART_DONE}
    return [p for p in job_dir.iterdir() if p.name in names or p.name.startswith("part-")]


def lock(job_dir: Path, wait_s: float = 30.0):
    """An exclusive lock on the job folder for this process and its workers. The kernel drops it when
    the last of them exits, so a rerun after a crash is never blocked by a stale file."""
    import fcntl

    fd = os.open(job_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    # Workers of a killed job notice within one batch that their parent is gone and exit; give them
    # that long before declaring the folder busy.
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise PrepError(f"another prep job is writing {job_dir} (its lock is held); wait for it "
                                f"or stop it first") from None
            time.sleep(0.1)


def prepare_job_dir(job_dir: Path, args: dict, overwrite: bool, done_name: str) -> bool:
    """Check a rerun against the recorded arguments. Returns True when the job is already complete."""
    args_path = job_dir / STATE / "args.json"
    if overwrite:
        for p in owned_entries(job_dir):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif args_path.exists():
        old = read_json(args_path)
        if old != args:
            diff = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
            raise PrepError(f"{job_dir} holds a prep run with different arguments (differs in: "
                            f"{', '.join(diff)}); rerun with the same arguments to continue it, or pass "
                            f"--overwrite to start over")
        if (job_dir / done_name).exists():
            return True
    else:
        stray = [p.name for p in job_dir.iterdir() if p.name != ".lock"]
        if stray:
            raise PrepError(f"output folder {job_dir} is not empty and holds no prep run "
                            f"({', '.join(sorted(stray)[:5])}...); choose an empty folder or pass --overwrite")
    (job_dir / STATE / "units").mkdir(parents=True, exist_ok=True)
    (job_dir / STATE / "files").mkdir(parents=True, exist_ok=True)
    write_json(args_path, args)
    return False


def clean_incomplete_units(job_dir: Path) -> int:
    units = job_dir / STATE / "units"
    n = 0
    for split in SPLITS:
        d = job_dir / split
        if not d.is_dir():
            continue
        for sub in d.iterdir():
            if sub.is_dir() and sub.name != TAIL and not (units / f"{sub.name}.json").exists():
                shutil.rmtree(sub)
                n += 1
        shutil.rmtree(d / TAIL, ignore_errors=True)
        (d / "index.json").unlink(missing_ok=True)
    return n
