"""Create the job's process group once, the same way under every launcher.

`init_distributed()` turns whatever launcher started us (see m2train.launch.env) into the standard
env:// variables that torch.distributed, DeepSpeed and mosaicml-streaming read, picks the backend (nccl
with CUDA, else gloo), binds this process to its GPU, and initialises DeepSpeed's communication layer
(which wraps torch.distributed). A lone process gets a real world-size-1 gloo group too, so a laptop run
goes through exactly the same DeepSpeed engine code as a cluster run.
"""

from __future__ import annotations

import datetime
import os

from .env import DistEnv, LaunchEnvError, detect_env

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

_current: DistEnv | None = None


def resolve_backend(backend: str = "auto") -> str:
    """auto -> nccl when CUDA is available, else gloo. Asking for nccl without CUDA is an error."""
    import torch

    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchEnvError("parallel.backend=nccl needs CUDA GPUs; use 'gloo' (or 'auto') on a CPU")
    if backend not in ("gloo", "nccl"):
        raise LaunchEnvError(f"parallel.backend: unknown backend {backend!r} (use auto, gloo or nccl)")
    return backend


def _device_for(env: DistEnv) -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    # One GPU per local rank; more local ranks than GPUs share them round-robin (useful only for tests).
    return f"cuda:{env.local_rank % torch.cuda.device_count()}"


def init_distributed(backend: str = "auto", timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                     env: DistEnv | None = None) -> DistEnv:
    """Initialise the process group for this job (idempotent) and return this process's DistEnv.

    - env: where this process stands; detected from the environment when None.
    - backend: auto | gloo | nccl.
    - timeout: how long collectives (and the rendezvous) wait for the slowest rank.

    Exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (DeepSpeed and
    mosaicml-streaming read these), sets the CUDA device, then calls deepspeed.init_distributed. A second
    call returns the first call's DistEnv. If something else already created the default process group,
    that group is adopted after checking that its rank and size match the environment."""
    global _current
    import torch
    import torch.distributed as dist

    if _current is not None and dist.is_initialized():
        return _current
    env = env or detect_env()
    backend = resolve_backend(backend)
    device = _device_for(env)
    os.environ.update(env.torch_env())
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise LaunchEnvError(
                f"a process group already exists with rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment ({env.launcher}) says rank {env.rank} of {env.world_size}")
        backend = dist.get_backend()
    else:
        try:
            import deepspeed
        except ImportError:  # DeepSpeed is a dependency, but the group itself needs only torch
            deepspeed = None
        if deepspeed is not None:
            # auto_mpi_discovery=False: rank/world are already decided above; DeepSpeed must not probe MPI.
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                       init_method="env://", rank=env.rank, world_size=env.world_size,
                                       verbose=False)
        else:
            dist.init_process_group(backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
    _current = env.replace(device=device, backend=backend)
    return _current


def current_env() -> DistEnv | None:
    """The DistEnv of the initialised process group, or None before `init_distributed`."""
    return _current


def exit_worker(code: int, rank: int, world_size: int) -> None:
    """End a finished worker process with `code` when that code is not 0 in a multi-process run; return
    otherwise (a normal finish runs the interpreter's usual teardown).

    torchrun SIGTERMs the remaining workers as soon as one exits non-zero. Interpreter teardown (atexit
    hooks, thread joins) takes seconds, during which Python no longer runs signal handlers, so it is skipped
    and every rank reports the run's own code: rank 0 exits at once; the others wait briefly, and the
    agent's SIGTERM, if it comes first, is answered by the caller's handler with the same code."""
    if code == 0 or world_size <= 1:
        return
    import sys
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    if rank != 0:
        time.sleep(2.0)
    os._exit(code)


def shutdown_distributed() -> None:
    """Destroy the default process group (if any) so `init_distributed` can run again."""
    global _current
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None
