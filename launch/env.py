"""Who am I in the job? Rank, world size and rendezvous address from whichever launcher started us.

Precedence, first match wins:

1. torchrun / the `deepspeed` launcher / any launcher that sets RANK and WORLD_SIZE ("env://" style).
   These win over Slurm because the common multi-node recipe is one `torchrun` (or `deepspeed`) per node
   started by `srun`: there SLURM_PROCID numbers the per-node launchers, not the training processes.
   The launcher is reported as "torchrun" (TORCHELASTIC_RUN_ID set), "deepspeed" (its CROSS_RANK /
   LOCAL_SIZE set) or "env" (RANK/WORLD_SIZE set by hand or by another tool).
2. srun: SLURM_PROCID, SLURM_NTASKS (world size; SLURM_STEP_NUM_TASKS wins when set) and a step id
   (SLURM_STEP_ID; srun sets all of them for every task). The batch script itself and an salloc shell
   see SLURM_PROCID=0 and the allocation's SLURM_NTASKS but no step id (checked with Slurm 22.05): they
   run as a single process, with a warning when the allocation has more tasks, instead of waiting forever
   for ranks nobody started. Local rank from SLURM_LOCALID, tasks on this node from
   SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ("2(x3),1" forms, indexed by SLURM_NODEID) or
   SLURM_NTASKS_PER_NODE; MASTER_ADDR = first host of SLURM_STEP_NODELIST /
   SLURM_JOB_NODELIST (expanded), MASTER_PORT derived from SLURM_JOB_ID so every task computes the same
   one without talking to the others. MASTER_ADDR / MASTER_PORT already in the environment win.
3. Nothing: a single process (world 1) on 127.0.0.1 and a free port.

Only reads the environment; `init_distributed` (m2train.launch.distributed) writes the standard variables
back and creates the process group.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Mapping

from .slurm import NodelistError, expand_tasks_per_node, first_host

# Slurm-derived rendezvous ports live in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's ephemeral range
# (32768+), so the port is unlikely to be taken by some client socket on the rank-0 host.
SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000


class LaunchEnvError(RuntimeError):
    """The launcher's environment variables are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. `device` and `backend` are filled in by `init_distributed`."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str                 # torchrun | deepspeed | env | slurm | single
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def replace(self, **changes) -> "DistEnv":
        return dataclasses.replace(self, **changes)

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed (env://), DeepSpeed and mosaicml-streaming read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def slurm_port(job_id: str) -> int:
    """The rendezvous port every task of Slurm job `job_id` derives on its own."""
    digits = "".join(c for c in job_id if c.isdigit())     # array jobs: "1234_7" -> 12347
    if not digits:
        raise LaunchEnvError(f"SLURM_JOB_ID={job_id!r} has no digits to derive MASTER_PORT from; "
                             "set MASTER_PORT")
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def _int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"environment variable {key}={raw!r} is not an integer") from None


def _first_int(env: Mapping[str, str], *keys: str) -> tuple[str, int] | None:
    for key in keys:
        if env.get(key, "") != "":
            return key, _int(env, key)
    return None


def _port(env: Mapping[str, str]) -> int:
    port = _int(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise LaunchEnvError(f"environment variable MASTER_PORT={port} is not a TCP port")
    return port


def _check(d: DistEnv, source: str) -> DistEnv:
    if d.world_size < 1:
        raise LaunchEnvError(f"{source}: world size must be >= 1, got {d.world_size}")
    if not 0 <= d.rank < d.world_size:
        raise LaunchEnvError(f"{source}: rank {d.rank} is outside [0, world size {d.world_size})")
    if d.local_world_size < 1 or d.local_world_size > d.world_size:
        raise LaunchEnvError(f"{source}: local world size {d.local_world_size} must be in [1, world size "
                             f"{d.world_size}]")
    if not 0 <= d.local_rank < d.local_world_size:
        raise LaunchEnvError(f"{source}: local rank {d.local_rank} is outside [0, local world size "
                             f"{d.local_world_size})")
    return d


def _from_rank_vars(env: Mapping[str, str]) -> DistEnv:
    """torchrun, the deepspeed launcher, or RANK/WORLD_SIZE set by hand."""
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    else:
        launcher = "env"
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    # The deepspeed launcher says LOCAL_SIZE instead of LOCAL_WORLD_SIZE. Without either we assume one
    # node (every rank local), which is what hand-set RANK/WORLD_SIZE on one machine means.
    lws = _first_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    local_world = lws[1] if lws else world
    local_rank = _int(env, "LOCAL_RANK") if env.get("LOCAL_RANK", "") != "" else rank % local_world
    if world > 1 and not env.get("MASTER_ADDR"):
        raise LaunchEnvError(f"RANK/WORLD_SIZE are set ({launcher}) but MASTER_ADDR is not: set it to the "
                             "host of rank 0")
    if world > 1 and not env.get("MASTER_PORT"):
        raise LaunchEnvError(f"RANK/WORLD_SIZE are set ({launcher}) but MASTER_PORT is not")
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _port(env) if env.get("MASTER_PORT") else free_port()
    return _check(DistEnv(rank, world, local_rank, local_world, addr, port, launcher),
                  f"{launcher} environment (RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE)")


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS") if env.get("SLURM_STEP_NUM_TASKS") else _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID", "") != "" else 0
    node_id = _int(env, "SLURM_NODEID") if env.get("SLURM_NODEID", "") != "" else 0
    local_world = None
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            try:
                counts = expand_tasks_per_node(env[key])
            except NodelistError as err:
                raise LaunchEnvError(f"environment variable {key}: {err}") from None
            if node_id >= len(counts):
                raise LaunchEnvError(f"SLURM_NODEID={node_id} but {key}={env[key]!r} lists only "
                                     f"{len(counts)} node(s)")
            local_world = counts[node_id]
            break
    if local_world is None and env.get("SLURM_NTASKS_PER_NODE"):
        local_world = _int(env, "SLURM_NTASKS_PER_NODE")
    if local_world is None:
        # No per-node count at all: one node holding every task is the only safe reading.
        local_world = world
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                    if env.get(k)), None)
        if key is None:
            if world > 1:
                raise LaunchEnvError("Slurm task (SLURM_PROCID set) without SLURM_JOB_NODELIST or "
                                     "MASTER_ADDR: cannot tell where rank 0 runs")
            addr = "127.0.0.1"
        else:
            try:
                addr = first_host(env[key])
            except NodelistError as err:
                raise LaunchEnvError(f"environment variable {key}: {err}") from None
    if env.get("MASTER_PORT"):
        port = _port(env)
    elif env.get("SLURM_JOB_ID"):
        port = slurm_port(env["SLURM_JOB_ID"])
    elif world == 1:
        port = free_port()
    else:
        raise LaunchEnvError("Slurm task without SLURM_JOB_ID or MASTER_PORT: cannot agree on a port")
    return _check(DistEnv(rank, world, local_rank, local_world, addr, port, "slurm"),
                  "Slurm environment (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/tasks per node)")


# Slurm numbers its special steps (batch script, extern, interactive shell) from the top of uint32 down;
# srun steps count up from 0.
_FIRST_SPECIAL_STEP_ID = 0xFFFFFFF0


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """True for a task srun started. The batch script itself (and an salloc shell) also sees
    SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no step id: treating it as rank 0 of SLURM_NTASKS
    would wait forever for ranks nobody started."""
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or ""
    return step.isdigit() and int(step) < _FIRST_SPECIAL_STEP_ID


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank/size and the rendezvous address from the environment
    (`os.environ` unless `environ` is given). See the module docstring for the precedence."""
    env = os.environ if environ is None else environ
    if env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != "":
        return _from_rank_vars(env)
    if env.get("RANK", "") != "" or env.get("WORLD_SIZE", "") != "":
        missing = "WORLD_SIZE" if env.get("RANK", "") != "" else "RANK"
        raise LaunchEnvError(f"RANK and WORLD_SIZE must be set together ({missing} is missing)")
    if env.get("SLURM_PROCID", "") != "" and env.get("SLURM_NTASKS", "") != "":
        if _in_srun_step(env):
            return _from_slurm(env)
        if env.get("SLURM_NTASKS") not in ("0", "1"):
            warnings.warn(
                f"inside a Slurm allocation of SLURM_NTASKS={env['SLURM_NTASKS']} tasks but not started by srun "
                "(no SLURM_STEP_ID): running as a single process; start the job with `srun` (or torchrun) to "
                "use every task", stacklevel=2)
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _port(env) if env.get("MASTER_PORT") else free_port()
    return DistEnv(0, 1, 0, 1, addr, port, "single")
