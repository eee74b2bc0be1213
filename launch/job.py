"""The driver behind every sbatch script in slurm/: one Python program instead of shell logic in each script.

    python -m m2train.launch.job batch {train|eval}     # the batch process (slurm/lib/job.sh execs it)
    python -m m2train.launch.job node [options] -- ARGS # one per node, started by the batch process via srun

`batch` reads the job's settings from M2_* environment variables (see `--help` or ENV_HELP), works out the
world layout and the rendezvous address, prints the job header, runs one `srun` step with one task per node
(`node`) - or, with M2_LAUNCHER=srun, one task per training process - and when the step ends finishes,
fails, or requeues the job (launch/requeue.py). It is the process
Slurm signals with `--signal=B:USR1@300` or `scancel --signal=USR1 --batch`: it forwards the stop to the
step, whose trainers checkpoint and exit 3, then requeues the job.

`node` starts `torchrun` for its node (static rendezvous at MASTER_ADDR:MASTER_PORT, node rank
SLURM_NODEID), waits for it and every worker, then removes the node's streaming cache folder and the
/dev/shm entries naming it.

With M2_LAUNCHER=srun there is no torchrun: srun starts every training process itself (each reads its rank
from SLURM_PROCID / SLURM_LOCALID, m2train.launch.env; MASTER_ADDR/PORT come from the batch process), srun
forwards the stop signal to all of them, and a second, one-task-per-node step (`clean`) removes the node
caches afterwards. Clusters that pin GPUs or CPUs per task (task/cgroup, gpu binding) or forbid nested
launchers want this form.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from m2train.config import ConfigError
from m2train.train.signals import read_stop_marker

from .env import slurm_port
from .header import LAUNCHERS, Layout, job_header
from .requeue import TIME_BUDGET, decide, requeue
from .slurm import SlurmJobError, job_hostnames, node_address

ENV_HELP = """environment variables (the sbatch scripts in slurm/ set the defaults shown there):
  M2_CONFIG          config name under configs/ or a YAML path (train; eval uses it for the default
                     checkpoint location)
  M2_DATA            prepared dataset folder or URL -> data.path (default: the config's data.path)
  M2_RUN_DIR         -> train.run_dir (default: the config's, runs/NAME)
  M2_CKPT_DIR        -> train.checkpoint_dir (default: RUN_DIR/checkpoints)
  M2_OVERRIDES       more key=value config overrides, shell-quoted, e.g. "train.max_steps=1000 optim.lr=1e-3"
  M2_GPUS_PER_NODE   GPUs each node uses (default: SLURM_GPUS_ON_NODE, else 0 = CPU processes with gloo)
  M2_PROCS_PER_NODE  training processes per node (default: M2_GPUS_PER_NODE, or 1 without GPUs)
  M2_LAUNCHER        torchrun (default: srun starts one torchrun per node) or srun (srun starts every
                     training process as its own Slurm task, no torchrun)
  M2_MAX_REQUEUES    how often a stopped job may requeue itself (default 10; SLURM_RESTART_COUNT counts)
  M2_STOP_TIMEOUT    seconds the workers get to checkpoint after the stop signal before they are killed
                     (default 240: inside the 300 s warning of --signal=B:USR1@300)
  M2_LOCAL_CACHE     node-local folder for decompressed streaming shards (default ${TMPDIR:-/tmp}/m2train-
                     cache-$USER); each job uses M2_LOCAL_CACHE/JOB_ID/<host>-node<i>, removed when its node
                     is done
  M2_CHECKPOINT      eval: checkpoint folder or root (default: M2_CKPT_DIR, else RUN_DIR/checkpoints)
  M2_EVAL_ARGS       eval: more `m2train eval` options, e.g. "--split val --batches 100"
  MASTER_PORT        rendezvous port (default: derived from SLURM_JOB_ID, the same on every node)
  Set by the scripts' shell part: M2_PYTHON (interpreter), M2_REPO (checkout to run from, default
  SLURM_SUBMIT_DIR). Exported NCCL/OpenMP defaults (each only when unset): OMP_NUM_THREADS = CPUs per task /
  processes per node, NCCL_DEBUG=WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING=1, PYTHONUNBUFFERED=1."""

DEFAULT_MAX_REQUEUES = 10
DEFAULT_STOP_TIMEOUT = 240
_PR_SET_CHILD_SUBREAPER = 36
# The signals the batch process turns into a graceful stop of the training step.
_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class JobConfigError(ValueError):
    """An M2_* variable is missing or malformed."""


def _env_int(env: Mapping[str, str], key: str, default: int | None, minimum: int = 0) -> int:
    raw = env.get(key, "")
    if raw == "":
        if default is None:
            raise JobConfigError(f"{key} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise JobConfigError(f"{key}={raw!r} is not an integer") from None
    if value < minimum:
        raise JobConfigError(f"{key}={value} must be >= {minimum}")
    return value


def _gpus_on_node(env: Mapping[str, str]) -> int:
    """SLURM_GPUS_ON_NODE is what Slurm actually allocated on this node (absent without GRES)."""
    raw = env.get("SLURM_GPUS_ON_NODE", "")
    return int(raw) if raw.isdigit() else 0


@dataclass(frozen=True)
class JobSettings:
    mode: str                      # train | eval
    config: str | None
    overrides: tuple[str, ...]     # config overrides for `m2train train` (M2_DATA/RUN_DIR/CKPT_DIR included)
    gpus_per_node: int
    procs_per_node: int
    launcher: str                  # torchrun | srun
    max_requeues: int
    stop_timeout: int
    cache_root: Path               # this job's node-local cache root (JOB_ID folder)
    checkpoint: str | None         # eval
    eval_args: tuple[str, ...]

    @classmethod
    def from_env(cls, mode: str, env: Mapping[str, str]) -> "JobSettings":
        config = env.get("M2_CONFIG") or None
        if mode == "train" and config is None:
            raise JobConfigError("M2_CONFIG is not set: name a config under configs/ (e.g. m2_gpt_360m) or a "
                                 "YAML file")
        try:
            extra = shlex.split(env.get("M2_OVERRIDES", ""))
        except ValueError as err:
            raise JobConfigError(f"M2_OVERRIDES is not valid shell quoting: {err}") from None
        bad = [o for o in extra if "=" not in o]
        if bad:
            raise JobConfigError(f"M2_OVERRIDES: {bad[0]!r} is not key=value")
        overrides = [f"{key}={env[var]}" for var, key in (("M2_DATA", "data.path"), ("M2_RUN_DIR", "train.run_dir"),
                                                         ("M2_CKPT_DIR", "train.checkpoint_dir")) if env.get(var)]
        gpus = _env_int(env, "M2_GPUS_PER_NODE", _gpus_on_node(env))
        procs = _env_int(env, "M2_PROCS_PER_NODE", gpus if gpus > 0 else 1, minimum=1)
        job_id = env.get("SLURM_JOB_ID", "")
        default_cache = Path(env.get("TMPDIR") or "/tmp") / f"m2train-cache-{env.get('USER') or os.getuid()}"
        cache_root = Path(env.get("M2_LOCAL_CACHE") or default_cache) / (job_id or f"pid{os.getpid()}")
        launcher = env.get("M2_LAUNCHER") or "torchrun"
        if launcher not in LAUNCHERS:
            raise JobConfigError(f"M2_LAUNCHER={launcher!r}: use torchrun (one torchrun per node) or srun (one "
                                 "Slurm task per process)")
        try:
            eval_args = shlex.split(env.get("M2_EVAL_ARGS", ""))
        except ValueError as err:
            raise JobConfigError(f"M2_EVAL_ARGS is not valid shell quoting: {err}") from None
        return cls(mode=mode, config=config, overrides=tuple(overrides + extra), gpus_per_node=gpus,
                   procs_per_node=procs, launcher=launcher,
                   max_requeues=_env_int(env, "M2_MAX_REQUEUES", DEFAULT_MAX_REQUEUES),
                   stop_timeout=_env_int(env, "M2_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT, minimum=1),
                   cache_root=cache_root.resolve(), checkpoint=env.get("M2_CHECKPOINT") or env.get("M2_CKPT_DIR"),
                   eval_args=tuple(eval_args))

    def m2train_args(self) -> list[str]:
        """The `m2train ...` command every worker runs."""
        if self.mode == "train":
            return ["train", self.config, *self.overrides, f"data.local_cache={self.cache_root}"]
        checkpoint = self.checkpoint or self._default_checkpoint()
        data = [o.split("=", 1)[1] for o in self.overrides if o.startswith("data.path=")]
        return ["eval", checkpoint, *(["--data", data[-1]] if data else []), "--cache-dir", str(self.cache_root),
                *self.eval_args]

    def _default_checkpoint(self) -> str:
        if self.config is None:
            raise JobConfigError("eval: set M2_CHECKPOINT (a checkpoint folder or root) or M2_CONFIG (then "
                                 "RUN_DIR/checkpoints of that config is evaluated)")
        from m2train.config import load_config, resolve_config_path

        cfg = load_config(resolve_config_path(self.config), list(self.overrides))
        run_dir = cfg.train.run_dir or f"runs/{cfg.name}"
        return str(Path(cfg.train.checkpoint_dir or Path(run_dir) / "checkpoints"))

    def run_dir(self) -> Path | None:
        """RUN_DIR of the training run (relative to the checkout), or None if the config does not load."""
        from m2train.config import load_config, resolve_config_path

        try:
            cfg = load_config(resolve_config_path(self.config), list(self.overrides))
        except (ConfigError, OSError) as err:
            _print(f"cannot resolve the run directory ({err})")
            return None
        return Path(cfg.train.run_dir or f"runs/{cfg.name}")


def _cpus_per_node(env: Mapping[str, str]) -> int:
    """CPUs the job has on each node: --cpus-per-task (one task per node), else what Slurm allocated here."""
    return _env_int(env, "SLURM_CPUS_PER_TASK", 0) or _env_int(env, "SLURM_CPUS_ON_NODE", 1)


def _step_environment(env: Mapping[str, str], settings: JobSettings) -> dict[str, str]:
    """The environment srun passes to every node: NCCL/OpenMP defaults unless the user set them."""
    out = dict(env)
    cpus = _cpus_per_node(env)
    defaults = {"OMP_NUM_THREADS": str(max(1, cpus // settings.procs_per_node)), "NCCL_DEBUG": "WARN",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "PYTHONUNBUFFERED": "1"}
    for key, value in defaults.items():
        out.setdefault(key, value)
    return out


def _training_step(settings: JobSettings, nodes: int, cpus: int, addr: str, port: int) -> list[str]:
    """The srun command of the training (or eval) step. CPUs are requested explicitly because srun does not
    inherit --cpus-per-task from sbatch (Slurm >= 22.05)."""
    if settings.launcher == "srun":
        # One task per process. A stopped run's trainers leave through a barrier after their checkpoint
        # (m2train.train.trainer), so --kill-on-bad-exit cannot cut a save short; it does end the step
        # as soon as a crashed rank exits instead of leaving the others blocked in a collective.
        procs = settings.procs_per_node
        return ["srun", f"--nodes={nodes}", f"--ntasks={nodes * procs}", f"--ntasks-per-node={procs}",
                f"--cpus-per-task={max(1, cpus // procs)}", "--kill-on-bad-exit=1",
                sys.executable, "-m", "m2train", *settings.m2train_args()]
    # One task per node (a torchrun bound to one CPU would starve its workers: it gets the node's CPUs).
    node_cmd = [sys.executable, "-m", "m2train.launch.job", "node", "--nnodes", str(nodes),
                "--nproc-per-node", str(settings.procs_per_node), "--master-addr", addr, "--master-port",
                str(port), "--stop-timeout", str(settings.stop_timeout), "--cache-dir",
                str(settings.cache_root), "--", *settings.m2train_args()]
    return [*_per_node_srun(nodes, cpus), "--kill-on-bad-exit=1", *node_cmd]


def _per_node_srun(nodes: int, cpus: int) -> list[str]:
    """The start of an srun step with one task on each node, `cpus` CPUs each."""
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"]


def _clean_caches_step(settings: JobSettings, nodes: int, env: Mapping[str, str]) -> None:
    """M2_LAUNCHER=srun: no per-node process outlives the trainers, so one more step (one task per node) removes
    the node-local streaming caches, as `node` does after torchrun in the default form."""
    cmd = [*_per_node_srun(nodes, 1), sys.executable, "-m", "m2train.launch.job", "clean", "--cache-dir",
           str(settings.cache_root)]
    try:
        rc = subprocess.run(cmd, env=dict(env), timeout=300).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc != 0:
        _print(f"cache clean-up step ended with {rc}; node-local caches may remain under {settings.cache_root}")


def _print(msg: str) -> None:
    print(f"[m2train job {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_batch(mode: str, env: Mapping[str, str] | None = None) -> int:
    """The batch process of a train or eval job. Returns its exit code."""
    env = dict(os.environ if env is None else env)
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id:
        raise SlurmJobError("SLURM_JOB_ID is not set: submit this with sbatch (see slurm/README.md)")
    settings = JobSettings.from_env(mode, env)
    hosts = job_hostnames(env.get("SLURM_JOB_NODELIST", ""))
    # Decided once here and passed to every node, so all torchruns agree on the rendezvous.
    addr = env.get("MASTER_ADDR") or node_address(hosts[0])
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_port(job_id)
    layout = Layout(tuple(hosts), settings.procs_per_node, settings.gpus_per_node, addr, port, settings.launcher)
    restart = _env_int(env, "SLURM_RESTART_COUNT", 0)
    srun_cmd = _training_step(settings, len(hosts), _cpus_per_node(env), addr, port)
    print(job_header(job_id=job_id, job_name=env.get("SLURM_JOB_NAME", "?"), restart_count=restart,
                     max_requeues=settings.max_requeues, repo=Path.cwd(), command=srun_cmd,
                     config=settings.config, overrides=list(settings.overrides), layout=layout), flush=True)

    stop: dict = {"signal": None}
    proc: subprocess.Popen | None = None

    def on_stop(signum, frame):
        name = signal.Signals(signum).name
        if stop["signal"] is not None:
            return
        stop["signal"] = name
        _print(f"got {name}: asking the training step to checkpoint and stop")
        if proc is not None and proc.poll() is None:
            # srun forwards USR1 to every process of the step: torchrun passes it on, the trainers stop at
            # the same step and save. USR1 rather than TERM, because srun answers TERM by killing the step.
            proc.send_signal(signal.SIGUSR1)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_stop)
    step_start = time.time()
    step_env = _step_environment(env, settings)
    if settings.launcher == "srun":
        # Every task reads the rendezvous from here (m2train.launch.env), so all agree on node 0's address
        # even where its host name does not resolve.
        step_env.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    proc = subprocess.Popen(srun_cmd, env=step_env)
    if stop["signal"] is not None:       # the signal came while srun was starting
        proc.send_signal(signal.SIGUSR1)
    rc = proc.wait()
    _print(f"training step exited with code {rc}")
    if settings.launcher == "srun":
        _clean_caches_step(settings, len(hosts), step_env)
    if mode != "train":
        return rc
    stop_reason = stop["signal"]
    if rc != 0 and stop_reason is None:
        # No signal, yet the step may have stopped gracefully (train.time_budget_s): torchrun turned the
        # trainers' exit 3 into 1, so ask the run's stop marker, written only after its checkpoint is saved.
        run_dir = settings.run_dir()
        marker = read_stop_marker(run_dir, since=step_start) if run_dir is not None else None
        if marker is not None and marker.get("reason") == "time_budget":
            stop_reason = TIME_BUDGET
    outcome = decide(rc, stop_reason, restart, settings.max_requeues)
    _print(outcome.reason)
    if outcome.action == "requeue":
        try:
            requeue(job_id)
        except RuntimeError as err:
            _print(f"{err}; the checkpoint is saved: resubmit the job to resume")
            return 3
    return outcome.exit_code


# --------------------------------------------------------------------------------------------- per node
def _become_subreaper() -> None:
    """Adopt orphaned descendants: if torchrun dies before its workers (a second stop signal interrupts its
    shutdown wait), the workers are reparented to us, and we wait for their checkpoint instead of ending the
    step (which would make Slurm kill them mid-save)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: no orphan adoption, torchrun's own shutdown still applies


def _reap_all(deadline: float) -> None:
    while time.time() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.2)


def _clean_node_cache(cache_root: Path, node_rank: int) -> None:
    """Remove this node's streaming cache folder and release /dev/shm entries that name its subfolders (left
    when a worker was killed). Two simulated nodes on one host have separate folders (node index in the
    name), so one node never deletes the other's cache."""
    node_dir = cache_root / f"{socket.gethostname()}-node{node_rank}"
    if not node_dir.is_dir():
        return
    try:
        from m2train.data.cache import release_stale_registrations

        released = release_stale_registrations([str(p) for p in node_dir.iterdir() if p.is_dir()])
        if released:
            _print(f"node {node_rank}: released {released} stale streaming /dev/shm registration(s)")
    except ValueError as err:            # still mapped by a live process: leave it alone
        _print(f"node {node_rank}: keeping {node_dir}: {err}")
        return
    shutil.rmtree(node_dir, ignore_errors=True)
    try:
        cache_root.rmdir()               # the last node out removes the job folder
    except OSError:
        pass


def run_node(args: argparse.Namespace, m2train_args: list[str]) -> int:
    """One node's torchrun. Returns its exit code."""
    env = dict(os.environ)
    node_rank = _env_int(env, "SLURM_NODEID", 0)
    # torchrun handles only TERM/INT/HUP/QUIT by default; USR1 would kill it. Handling USR1 makes it pass
    # the signal to its workers and wait up to --shutdown-timeout for them to checkpoint and exit.
    handled = env.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    if "SIGUSR1" not in handled.split(","):
        env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = handled + ",SIGUSR1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.nnodes), "--node-rank",
           str(node_rank), "--nproc-per-node", str(args.nproc_per_node), "--master-addr", args.master_addr,
           "--master-port", str(args.master_port), "--max-restarts", "0", "--shutdown-timeout",
           str(args.stop_timeout), "-m", "m2train", *m2train_args]
    _print(f"node {node_rank} ({socket.gethostname()}): {' '.join(cmd)}")
    _become_subreaper()
    got: list[str] = []

    def note(signum, frame):
        # The whole step got the signal from Slurm (torchrun and the workers included): nothing to forward.
        if not got:
            got.append(signal.Signals(signum).name)
            _print(f"node {node_rank}: {got[0]} received; torchrun and the workers are stopping")

    proc = subprocess.Popen(cmd, env=env)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, note)      # after Popen: a Python handler resets to default in the child
    rc = proc.wait()
    _reap_all(time.time() + args.stop_timeout)
    _clean_node_cache(Path(args.cache_dir), node_rank)
    _print(f"node {node_rank}: torchrun exited with code {rc}")
    # A negative code means killed by that signal: report it the shell's way (128 + signal number).
    return rc if rc >= 0 else 128 - rc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m2train.launch.job", description=__doc__,
                                epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("batch", help="run a train or eval job from inside sbatch (the batch process)",
                       epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("mode", choices=("train", "eval"), help="train: m2train train, requeues on a stop signal; "
                   "eval: m2train eval of a checkpoint, no requeue")
    n = sub.add_parser("node", help="(started by `batch` through srun) run this node's torchrun")
    n.add_argument("--nnodes", type=int, required=True, help="nodes in the job")
    n.add_argument("--nproc-per-node", type=int, required=True, help="workers on each node")
    n.add_argument("--master-addr", required=True, help="address of node 0 (torchrun's static rendezvous)")
    n.add_argument("--master-port", type=int, required=True, help="rendezvous port")
    n.add_argument("--stop-timeout", type=int, default=DEFAULT_STOP_TIMEOUT,
                   help="seconds the workers get to checkpoint after a stop signal")
    n.add_argument("--cache-dir", required=True, help="the job's node-local streaming cache root")
    n.add_argument("m2train_args", nargs=argparse.REMAINDER, help="-- then the m2train command")
    c = sub.add_parser("clean", help="(started by `batch` through srun with M2_LAUNCHER=srun) remove this node's "
                                     "streaming cache folder")
    c.add_argument("--cache-dir", required=True, help="the job's node-local streaming cache root")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "batch":
            return run_batch(args.mode)
        if args.cmd == "clean":
            _clean_node_cache(Path(args.cache_dir), _env_int(os.environ, "SLURM_NODEID", 0))
            return 0
        rest = args.m2train_args[1:] if args.m2train_args[:1] == ["--"] else args.m2train_args
        if not rest:
            raise JobConfigError("node: give the m2train command after --")
        return run_node(args, rest)
    except (JobConfigError, SlurmJobError, ConfigError) as err:
        print(f"m2train Slurm job: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
