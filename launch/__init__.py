"""Distributed launch helpers (rank/world from torchrun, the deepspeed launcher or Slurm).

Installed as `m2train.launch`.

    from m2train.launch import init_distributed
    env = init_distributed()          # DistEnv(rank, world_size, local_rank, local_world_size, ...)

`detect_env()` only reads the environment (precedence: torchrun / deepspeed / RANK+WORLD_SIZE, then
srun's SLURM_* variables, then a single process); `init_distributed()` also exports the standard
variables and creates the process group once. Importing this package does not import torch."""

from .distributed import current_env, exit_worker, init_distributed, resolve_backend, shutdown_distributed
from .env import DistEnv, LaunchEnvError, detect_env, free_port, slurm_port
from .slurm import NodelistError, expand_nodelist, expand_tasks_per_node, first_host

__all__ = ["DistEnv", "LaunchEnvError", "NodelistError", "current_env", "detect_env", "expand_nodelist",
           "expand_tasks_per_node", "first_host", "free_port", "init_distributed", "resolve_backend",
           "shutdown_distributed", "slurm_port", "exit_worker"]
