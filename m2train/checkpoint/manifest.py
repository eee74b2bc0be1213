"""The checkpoint manifest: written last, it is what makes a `step_*` folder a checkpoint.

`manifest.json` lists every file of the checkpoint with its size and sha256, next to the step, the
config and the world layout it was saved with. A folder without a manifest, or whose files disagree
with it (missing, truncated, a flipped byte), is not loadable; `validate_checkpoint` says why.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "m2train-checkpoint"
FORMAT_VERSION = 1
_CHUNK = 1 << 22  # 4 MiB reads: large enough to run at disk speed, small enough for any memory


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder/file and what is wrong."""


def file_digest(path: str | os.PathLike, fsync: bool = False) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file; with fsync=True its data is also forced to disk first, so
    the manifest written after it never describes data that a power loss could still take away."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def list_files(ckpt_dir: str | os.PathLike) -> list[str]:
    """Every regular file under ckpt_dir (relative POSIX paths, sorted), except the manifest itself and
    temporary files of an unfinished write."""
    root = Path(ckpt_dir)
    out = []
    for p in root.rglob("*"):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp"):
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON under a temporary name, fsync, then rename over `path` (readers see old or new, never
    half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """The parsed manifest of a checkpoint folder (no file checks; see validate_checkpoint)."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST_NAME} (the save did not finish)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an m2train checkpoint manifest (expected \"format\": "
                              f"\"{FORMAT_NAME}\")")
    if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {data.get('format_version')!r} is newer than this "
                              f"m2train reads ({FORMAT_VERSION})")
    if not isinstance(data.get("files"), dict) or not data["files"]:
        raise CheckpointError(f"{path}: \"files\" is missing or empty")
    return data


def validate_checkpoint(ckpt_dir: str | os.PathLike, verify: str = "sha256") -> dict:
    """Check a checkpoint folder against its manifest and return the manifest.

    verify: "sha256" (sizes and contents, catches corruption), "size" (sizes only: fast, catches
    truncation), "none" (manifest present). Raises CheckpointError naming the first bad file."""
    if verify not in ("sha256", "size", "none"):
        raise ValueError(f"verify must be sha256, size or none, got {verify!r}")
    manifest = read_manifest(ckpt_dir)
    if verify == "none":
        return manifest
    root = Path(ckpt_dir)
    for rel, info in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(f"{path}: {size} bytes, {MANIFEST_NAME} says {info.get('size')} "
                                  "(truncated or rewritten)")
        if verify == "sha256":
            _, digest = file_digest(path)
            if digest != info.get("sha256"):
                raise CheckpointError(f"{path}: sha256 {digest[:12]}... does not match {MANIFEST_NAME} "
                                      f"({str(info.get('sha256'))[:12]}...): the file is corrupted")
    return manifest


__all__ = ["MANIFEST_NAME", "FORMAT_NAME", "FORMAT_VERSION", "CheckpointError", "file_digest", "list_files",
           "write_json_atomic", "write_text_atomic", "read_manifest", "validate_checkpoint"]
