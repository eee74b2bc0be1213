"""The header a Slurm job prints before it starts: what code, which config, where, in what layout.

Written so that two job logs can be compared at a glance (same commit? same config hash?) and so that a
requeued attempt says which attempt it is."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """How the job's processes are spread: `nodes` hosts, `procs_per_node` training processes on each, started
    by one torchrun per node or directly as Slurm tasks (launcher "torchrun" | "srun")."""

    hosts: tuple[str, ...]
    procs_per_node: int
    gpus_per_node: int
    master_addr: str
    master_port: int
    launcher: str = "torchrun"

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.procs_per_node


# M2_LAUNCHER's values (launch/job.py checks against these) and how the header describes them.
LAUNCHERS = {"torchrun": "torchrun (one srun task per node, torchrun starts its processes)",
             "srun": "srun (one Slurm task per process)"}


def git_commit(repo: str | Path) -> str:
    """HEAD of the checkout the job runs from, with "+dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def config_hash(config: str, overrides: list[str]) -> str:
    """sha256 (first 16 hex digits) of the fully resolved config (defaults merged, overrides applied), so a
    changed default in a base file shows up even when the command line is the same."""
    from m2train.config import load_config, resolve_config_path, to_plain

    cfg = load_config(resolve_config_path(config), overrides)
    text = json.dumps(to_plain(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_header(*, job_id: str, job_name: str, restart_count: int, max_requeues: int, repo: str | Path,
               command: list[str], config: str | None, overrides: list[str], layout: Layout) -> str:
    """The lines printed at the top of every attempt of a job."""
    lines = [
        "=" * 72,
        f"m2train Slurm job {job_id} ({job_name}), attempt {restart_count + 1} "
        f"(SLURM_RESTART_COUNT={restart_count}, requeues allowed: {max_requeues})",
        f"git commit:   {git_commit(repo)}",
    ]
    if config is not None:
        lines.append(f"config:       {config}  hash {config_hash(config, overrides)}")
    lines += [
        f"overrides:    {' '.join(overrides) if overrides else '(none)'}",
        f"nodes:        {len(layout.hosts)}: {' '.join(layout.hosts)}",
        f"world:        {layout.world_size} = {len(layout.hosts)} node(s) x {layout.procs_per_node} "
        f"process(es) per node ({layout.gpus_per_node} GPU(s) per node)",
        f"launcher:     {LAUNCHERS.get(layout.launcher, layout.launcher)}",
        f"rendezvous:   {layout.master_addr}:{layout.master_port}",
        f"command:      {' '.join(command)}",
        "=" * 72,
    ]
    return "\n".join(lines)
