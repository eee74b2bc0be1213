"""Distributed launch helpers (rank/world from torchrun, the deepspeed launcher or Slurm).

Installed as `m2train.launch`."""
