"""Slurm's compact host and task-count notations, expanded without needing Slurm installed.

- Host lists: "node[01-03,7],gpu5" -> node01 node02 node03 node7 gpu5. Zero padding is kept (the width of
  the range's start), several bracket groups multiply out ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
- Tasks per node: "2(x3),1" -> [2, 2, 2, 1] (three nodes with 2 tasks, then one with 1).

If our expander cannot parse a host list (a format Slurm adds later), `first_host` falls back to
`scontrol show hostnames`, the authoritative expander, when it is on PATH.

Inside a job (launch/job.py): `job_hostnames` asks scontrol and fails loudly on an empty answer;
`node_address` gives a reachable address for a node name (its NodeAddr when the name does not resolve).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


class NodelistError(ValueError):
    """A host list or tasks-per-node string we cannot parse."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise NodelistError(f"nested '[' in host list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodelistError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise NodelistError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (each range keeps the zero padding of its start)."""
    out = []
    for item in body.split(","):
        if re.fullmatch(r"\d+", item):
            out.append(item)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        if not m:
            raise NodelistError(f"bad range {item!r} in host list {whole!r}")
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise NodelistError(f"descending range {item!r} in host list {whole!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(pattern: str, whole: str) -> list[str]:
    """One comma-free host pattern with any number of [..] groups -> its hosts, in Slurm's order."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        if not pattern or any(c in pattern for c in "[]"):
            raise NodelistError(f"bad host name {pattern!r} in host list {whole!r}")
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    if any(c in head for c in "[]"):
        raise NodelistError(f"bad host name {pattern!r} in host list {whole!r}")
    rests = _expand_one(tail, whole) if tail else [""]
    return [head + mid + rest for mid in _expand_range_set(m.group(1), whole) for rest in rests]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as "node[01-03,7],gpu5" into host names, in order."""
    text = nodelist.strip()
    if not text:
        raise NodelistError("empty host list")
    hosts: list[str] = []
    for part in _split_top_level(text):
        hosts.extend(_expand_one(part.strip(), text))
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """`scontrol show hostnames NODELIST`, or None when scontrol is missing or fails."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = res.stdout.split()
    return hosts or None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list (where rank 0 runs, so it is the rendezvous address)."""
    try:
        return expand_nodelist(nodelist)[0]
    except NodelistError as err:
        hosts = scontrol_hostnames(nodelist)
        if hosts:
            return hosts[0]
        raise NodelistError(f"{err} (and `scontrol show hostnames` is not available to expand it)") from None


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE-style counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.strip().split(","):
        m = _TASKS_ITEM.match(item.strip())
        if not m:
            raise NodelistError(f"bad tasks-per-node entry {item!r} in {spec!r} (expected N or N(xM))")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


class SlurmJobError(RuntimeError):
    """The Slurm job's environment or `scontrol` answers do not say where the job runs."""


def _scontrol(*args: str) -> str:
    exe = shutil.which("scontrol")
    if exe is None:
        raise SlurmJobError("`scontrol` is not on PATH: the Slurm client commands must be installed on the "
                            "compute nodes (Debian: slurm-client)")
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise SlurmJobError(f"`scontrol {' '.join(args)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def job_hostnames(nodelist: str) -> list[str]:
    """The job's hosts, in Slurm's order, as `scontrol show hostnames` expands SLURM_JOB_NODELIST.

    scontrol (not our own expander) because it is the authority on the cluster's naming; an empty answer
    is a hard error: without it no node knows where rank 0 and the rendezvous store live."""
    if not nodelist.strip():
        raise SlurmJobError("SLURM_JOB_NODELIST is empty: run this inside a Slurm allocation (sbatch/salloc)")
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise SlurmJobError(f"`scontrol show hostnames {nodelist}` printed no host: cannot choose MASTER_ADDR "
                            "(is SLURM_CONF pointing at this cluster's slurm.conf?)")
    return hosts


def node_address(host: str) -> str:
    """An address other nodes can reach `host` at: the name itself when it resolves, else the node's
    NodeAddr from `scontrol show node` (names that are only Slurm's, e.g. several simulated nodes on one
    machine, or clusters whose node names are not in DNS)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", host))
    if m is None or m.group(1) in ("", "(null)"):
        raise SlurmJobError(f"node {host!r} does not resolve and `scontrol show node {host}` has no NodeAddr: "
                            "set MASTER_ADDR to rank 0's address")
    return m.group(1)
