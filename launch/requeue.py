"""What a Slurm job does when its training step has ended: finish, requeue itself, or fail.

The batch process is told to stop by Slurm: SIGUSR1 from `--signal=B:USR1@300` before the time limit or
from `scancel --signal=USR1 --batch` (how a user or a preemption hook asks for checkpoint-and-requeue), or
SIGTERM from `scancel` and preemption. Either way it forwards the stop to the training step, whose ranks
save a checkpoint and exit 3 (torchrun reports that as 1). Only USR1 requeues: SIGTERM is also what a plain
`scancel` sends, and a cancelled job must stay cancelled (Slurm requeues jobs preempted with
PreemptMode=REQUEUE by itself). At most `max_requeues` requeues (Slurm counts attempts in
SLURM_RESTART_COUNT), so a run that crashes right after every restart cannot requeue forever. A job that
finished (exit 0) never requeues, even if a signal arrived after its last step. A run that stopped itself
because `train.time_budget_s` ran out (its stop marker says so, see m2train.train.signals.STOP_MARKER) counts
as a USR1 stop: checkpoint saved, requeue to continue.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


# The stop reason run_batch passes to `decide` for a step that stopped on its own time budget.
TIME_BUDGET = "time_budget"


@dataclass(frozen=True)
class Outcome:
    action: str        # "finished" | "requeue" | "stopped" | "failed"
    exit_code: int     # what the batch process exits with
    reason: str


def decide(step_rc: int, stop_signal: str | None, restart_count: int, max_requeues: int) -> Outcome:
    """The action for a training step that exited with `step_rc`, after `stop_signal` (or none) reached the
    batch process, on attempt `restart_count` (0 for the first run)."""
    if step_rc == 0:
        return Outcome("finished", 0, "training step finished")
    if stop_signal is None:
        return Outcome("failed", step_rc, f"training step failed with exit code {step_rc}")
    if stop_signal not in ("SIGUSR1", TIME_BUDGET):
        return Outcome("stopped", 3, f"stopped by {stop_signal} (scancel or preemption): checkpoint saved, not "
                                     "requeueing (Slurm requeues preempted jobs itself when PreemptMode=REQUEUE; "
                                     "resubmit to resume)")
    if restart_count >= max_requeues:
        return Outcome("stopped", 3, f"stopped by {stop_signal}; not requeued: SLURM_RESTART_COUNT="
                                     f"{restart_count} reached M2_MAX_REQUEUES={max_requeues}")
    return Outcome("requeue", 0, f"stopped by {stop_signal}; requeueing (attempt {restart_count + 2})")


def requeue(job_id: str) -> None:
    """`scontrol requeue JOB`: Slurm ends this attempt and queues the job again (it restarts with
    SLURM_RESTART_COUNT + 1; the job must be requeueable: `#SBATCH --requeue`)."""
    exe = shutil.which("scontrol")
    if exe is None:
        raise RuntimeError("cannot requeue: `scontrol` is not on PATH")
    res = subprocess.run([exe, "requeue", job_id], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"`scontrol requeue {job_id}` failed (exit {res.returncode}): {res.stderr.strip()} "
                           "(was the job submitted with --requeue?)")
