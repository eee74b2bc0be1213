"""What a run reports (rank 0 only): RUN_DIR/metrics.jsonl, a console progress line, wandb, TensorBoard.

metrics.jsonl holds one JSON object per logged step. On resume the lines for steps after the restored
checkpoint are dropped before appending, so a run killed and resumed any number of times has each step
exactly once, and the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

import torch


# --------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------

def truncate_metrics(path: Path, keep_through_step: int) -> int:
    """Drop every record with step > keep_through_step (also a torn last line from a killed process);
    rewrites the file atomically. Returns how many records were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1          # a line cut short by SIGKILL
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= keep_through_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (for tests and tools)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _json_safe(value):
    # JSON has no NaN/inf: a non-finite loss is written as the string "nan"/"inf" so the record stays valid.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------
# Peak FLOPs and MFU
# --------------------------------------------------------------------------------------------------

# Dense peak throughput per device (FLOP/s) from vendor data sheets, by precision (no sparsity).
_GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
    "V100": {"bf16": 125e12, "fp32": 15.7e12},
}


def peak_flops_per_device(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained). GPUs: a data-sheet table by name (tf32 counted as fp32);
    CPUs and unknown GPUs: the measured throughput of a large fp32 matmul on this process's threads,
    i.e. what a GEMM-bound model could reach here (an estimate: shared machines make it noisy)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks["bf16" if precision == "bf16" else "fp32"], f"data sheet ({name})"
    n = 512
    # A private generator: the global RNG streams are part of the exactly-resumable training state.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    a @ b                                           # warm up
    reps, t0 = 0, time.perf_counter()
    while reps < 4 or time.perf_counter() - t0 < 0.2:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = 2 * n ** 3 * reps / (time.perf_counter() - t0)
    return rate, f"measured fp32 matmul on {device.type}"


# --------------------------------------------------------------------------------------------------
# The logger
# --------------------------------------------------------------------------------------------------

class MetricsLogger:
    """Rank 0's sinks. `log(record)` writes metrics.jsonl and forwards numbers to wandb/TensorBoard;
    `progress(...)` prints the console line. Other ranks get a logger with enabled=False (no-ops)."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int, config_dict: dict,
                 run_name: str, wandb_mode: str = "disabled", wandb_project: str = "m2train",
                 tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        dropped = truncate_metrics(self.path, resume_step)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} record(s) after step {resume_step} "
                  f"(written after the checkpoint this run resumes from)", flush=True)
        self._file = open(self.path, "a")
        if wandb_mode != "disabled":
            self._wandb = _start_wandb(Path(run_dir), wandb_mode, wandb_project, run_name, config_dict)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)

    def rewind(self, step: int) -> None:
        """Forget records after `step` (a rollback to the checkpoint at `step`)."""
        if not self.enabled:
            return
        self._file.close()
        truncate_metrics(self.path, step)
        self._file = open(self.path, "a")

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, mode: str, project: str, name: str, config: dict):
    # Without an API key "online" would hang ~40 s on the network and fail: fall back to offline.
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("wandb: no WANDB_API_KEY set, logging offline (sync later with `wandb sync`)", flush=True)
        mode = "offline"
    import wandb
    run_id_file = run_dir / "wandb_run_id"
    # The same wandb run continues across resumes.
    # uuid4 draws from os.urandom: the python/numpy/torch RNG streams of the run stay untouched.
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:8]
    run_id_file.write_text(run_id)
    return wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                      dir=str(run_dir), config=config)


def format_progress(step: int, max_steps: int, loss: float, lr: float, grad_norm: float | None,
                    tokens_per_s: float, mfu: float | None, eta_s: float, skipped: int) -> str:
    gn = "-" if grad_norm is None else f"{grad_norm:.3f}"
    mfu_s = "-" if mfu is None else f"{100 * mfu:.1f}%"
    width = len(str(max_steps))
    line = (f"step {step:>{width}}/{max_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {gn} | "
            f"{tokens_per_s:,.0f} tok/s | MFU {mfu_s} | ETA {format_duration(eta_s)}")
    if skipped:
        line += f" | skipped {skipped}"
    return line


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
