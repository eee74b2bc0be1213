"""Graceful stop: SIGTERM / SIGUSR1 set a flag; the trainer reduces it across ranks at every step
boundary (so a signal that reached only one rank still stops all of them at the same step), saves a
checkpoint and exits with EXIT_STOPPED.

Slurm sends SIGTERM (or `--signal=USR1@120`) before preemption or the time limit; torchrun forwards
SIGTERM to its workers.
"""

from __future__ import annotations

import os
import signal
import sys
import time

# Written by rank 0 into RUN_DIR when a run stops early with its checkpoint saved (EXIT_STOPPED), removed
# when a run starts. Launchers read it because the exit code alone is lost on the way: torchrun reports a
# worker's 3 as 1. {"step": N, "reason": "signal" | "time_budget", "checkpoint_dir": ..., "time": unix s}
STOP_MARKER = "stopped.json"


def write_stop_marker(run_dir, step: int, reason: str, checkpoint_dir) -> None:
    import json
    from pathlib import Path

    path = Path(run_dir) / STOP_MARKER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "reason": reason, "checkpoint_dir": str(checkpoint_dir),
                               "time": time.time()}))
    os.replace(tmp, path)


def read_stop_marker(run_dir, since: float = 0.0) -> dict | None:
    """The stop marker of RUN_DIR if a run wrote it at or after `since` (unix seconds), else None."""
    import json
    from pathlib import Path

    try:
        marker = json.loads((Path(run_dir) / STOP_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or float(marker.get("time", 0)) < since:
        return None
    return marker


# Exit codes of `m2train train` (documented in `m2train train --help`).
EXIT_FINISHED = 0        # max_steps reached, final checkpoint written
EXIT_ERROR = 1           # unexpected error (traceback printed)
EXIT_CONFIG = 2          # invalid config / data / resume mismatch, before any training
EXIT_STOPPED = 3         # stopped early (signal or time budget), checkpoint saved: rerun to resume
EXIT_NONFINITE = 4       # too many consecutive non-finite steps: stopped without saving

EXIT_CODE_TABLE = f"""exit codes:
  {EXIT_FINISHED}  finished: train.max_steps reached, final checkpoint saved
  {EXIT_ERROR}  unexpected error
  {EXIT_CONFIG}  bad config, data or checkpoint (nothing trained)
  {EXIT_STOPPED}  stopped early by SIGTERM/SIGUSR1 or train.time_budget_s, checkpoint saved: rerun the same
     command to resume
  {EXIT_NONFINITE}  stopped: train.max_nonfinite_steps consecutive non-finite losses/grad norms
     (the message names the step; the last checkpoint is intact)
  Every rank exits with the same code. torchrun turns any non-zero worker code into its own exit 1 and
  prints each rank's code in its failure summary; srun reports the tasks' codes."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_with_code_on_sigterm(code: int) -> None:
    """Once a rank's run is over (checkpoint saved, logs closed, final barrier passed), answer SIGTERM by
    exiting with the run's own exit code at once.

    Under torchrun the first worker to exit non-zero (e.g. 3 after a graceful stop) makes the agent SIGTERM
    the other workers; a rank still tearing down its interpreter would otherwise be reported as killed by
    the signal, although all its work is done."""
    def handler(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    signal.signal(signal.SIGTERM, handler)


class StopRequest:
    """Remembers that a stop signal arrived (the handler only sets a flag: async-signal safe)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.time()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def process_start_time() -> float:
    """When this process started (so the budget also covers imports and setup); now if unknown."""
    try:
        import psutil
        return psutil.Process().create_time()
    except Exception:  # psutil missing or /proc unreadable: count from here
        return time.time()


class TimeBudget:
    """Decides when to stop so that one more step plus a checkpoint save still fit in `budget_s`, counted
    from `start` (default: now; the trainer passes the process start time).

    The step time is a running maximum of recent steps (a cautious estimate); the save time is the last
    measured save, or a guess of 10 step times before the first save has been measured."""

    def __init__(self, budget_s: float | None, start: float | None = None, margin: float = 1.2) -> None:
        self.budget_s = budget_s
        self.start = time.time() if start is None else start
        self.margin = margin
        self.step_s = 0.0
        self.save_s: float | None = None

    def record_step(self, seconds: float) -> None:
        self.step_s = max(seconds, 0.9 * self.step_s)

    def record_save(self, seconds: float) -> None:
        self.save_s = seconds

    def exhausted(self, now: float | None = None) -> bool:
        if self.budget_s is None:
            return False
        now = time.time() if now is None else now
        save = self.save_s if self.save_s is not None else 10 * self.step_s
        return (now - self.start) + self.margin * (self.step_s + save) >= self.budget_s
