"""The Slurm job driver's decisions and settings, without a cluster (tests/test_slurm.py runs the real jobs)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2train.launch.header import Layout, job_header
from m2train.launch.job import JobConfigError, JobSettings, main
from m2train.launch.requeue import decide
from m2train.launch.slurm import SlurmJobError, job_hostnames

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rc, sig, restarts, action, code", [
    (0, None, 0, "finished", 0),
    (0, "SIGUSR1", 0, "finished", 0),          # the signal came after the last step: no requeue
    (1, None, 0, "failed", 1),                 # a crash is not a stop
    (1, "SIGUSR1", 0, "requeue", 0),
    (1, "SIGUSR1", 9, "requeue", 0),
    (1, "SIGUSR1", 10, "stopped", 3),          # M2_MAX_REQUEUES=10 reached
    (1, "SIGTERM", 0, "stopped", 3),           # scancel: the job stays cancelled
    (1, "time_budget", 0, "requeue", 0),       # train.time_budget_s stop (its marker), no signal
    (1, "time_budget", 10, "stopped", 3),
])
def test_requeue_decision(rc, sig, restarts, action, code):
    out = decide(rc, sig, restarts, max_requeues=10)
    assert (out.action, out.exit_code) == (action, code)


def test_settings_from_env_defaults_and_overrides(tmp_path):
    env = {"SLURM_JOB_ID": "77", "M2_CONFIG": "m2_gpt_tiny", "M2_DATA": "/d/gpt", "M2_RUN_DIR": "/r",
           "M2_OVERRIDES": "train.max_steps=5 'optim.lr=1e-3'", "SLURM_GPUS_ON_NODE": "4",
           "M2_LOCAL_CACHE": str(tmp_path)}
    s = JobSettings.from_env("train", env)
    assert (s.gpus_per_node, s.procs_per_node) == (4, 4)
    assert s.cache_root == tmp_path / "77"
    assert s.m2train_args() == ["train", "m2_gpt_tiny", "data.path=/d/gpt", "train.run_dir=/r", "train.max_steps=5",
                                "optim.lr=1e-3", f"data.local_cache={tmp_path / '77'}"]
    cpu = JobSettings.from_env("train", {"M2_CONFIG": "x", "M2_GPUS_PER_NODE": "0"})
    assert (cpu.gpus_per_node, cpu.procs_per_node) == (0, 1)      # CPU: one gloo process per node


def test_training_step_commands_per_launcher(tmp_path):
    """torchrun (default): one srun task per node running `job node` (its torchrun), all the node's CPUs.
    srun: one task per process running `m2train` itself, the CPUs split between them."""
    from m2train.launch.job import _training_step

    env = {"M2_CONFIG": "m2_gpt_tiny", "M2_PROCS_PER_NODE": "4", "M2_LOCAL_CACHE": str(tmp_path)}
    s = JobSettings.from_env("train", env)
    assert s.launcher == "torchrun"
    cmd = _training_step(s, 2, 32, "10.0.0.1", 12345)
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32",
                       "--kill-on-bad-exit=1"]
    assert cmd[7:10] == ["-m", "m2train.launch.job", "node"] and "--nproc-per-node" in cmd
    s = JobSettings.from_env("train", {**env, "M2_LAUNCHER": "srun"})
    cmd = _training_step(s, 2, 32, "10.0.0.1", 12345)
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8",
                       "--kill-on-bad-exit=1"]
    assert cmd[7:9] == ["-m", "m2train"] and cmd[9:] == s.m2train_args()


def test_eval_default_checkpoint_is_the_configs_run_dir():
    s = JobSettings.from_env("eval", {"M2_CONFIG": "m2_gpt_tiny", "M2_DATA": "/d", "M2_EVAL_ARGS": "--batches 3"})
    args = s.m2train_args()
    assert args[:4] == ["eval", "runs/m2_gpt_tiny/checkpoints", "--data", "/d"]
    assert args[-2:] == ["--batches", "3"]


@pytest.mark.parametrize("env, message", [
    ({}, "M2_CONFIG is not set"),
    ({"M2_CONFIG": "x", "M2_OVERRIDES": "train.max_steps"}, "is not key=value"),
    ({"M2_CONFIG": "x", "M2_GPUS_PER_NODE": "eight"}, "M2_GPUS_PER_NODE='eight' is not an integer"),
    ({"M2_CONFIG": "x", "M2_PROCS_PER_NODE": "0"}, "M2_PROCS_PER_NODE=0 must be >= 1"),
    ({"M2_CONFIG": "x", "M2_OVERRIDES": "a='b"}, "M2_OVERRIDES is not valid shell quoting"),
    ({"M2_CONFIG": "x", "M2_LAUNCHER": "mpirun"}, "M2_LAUNCHER='mpirun': use torchrun"),
])
def test_settings_errors_name_the_variable(env, message):
    with pytest.raises(JobConfigError, match=message):
        JobSettings.from_env("train", env)


def test_empty_nodelist_is_a_hard_explained_error():
    with pytest.raises(SlurmJobError, match="SLURM_JOB_NODELIST is empty"):
        job_hostnames("  ")


def test_batch_outside_slurm_fails_with_a_reason(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["batch", "train"]) == 2
    assert "SLURM_JOB_ID is not set: submit this with sbatch" in capsys.readouterr().err


def test_header_lists_commit_config_hash_nodes_and_layout():
    text = job_header(job_id="5", job_name="m2-gpt-360m", restart_count=1, max_requeues=10, repo=REPO,
                      command=["srun", "x"], config="m2_gpt_tiny", overrides=["train.max_steps=3"],
                      layout=Layout(("n1", "n2"), 8, 8, "10.0.0.1", 12345))
    assert "attempt 2 (SLURM_RESTART_COUNT=1" in text
    assert "world:        16 = 2 node(s) x 8 process(es) per node (8 GPU(s) per node)" in text
    assert "rendezvous:   10.0.0.1:12345" in text
    assert "launcher:     torchrun (one srun task per node" in text
    other = job_header(job_id="5", job_name="j", restart_count=0, max_requeues=10, repo=REPO, command=[],
                       config="m2_gpt_tiny", overrides=["train.max_steps=4"], layout=Layout(("n1",), 1, 0, "a", 1))
    hash_of = [line.split("hash ")[1] for t in (text, other) for line in t.splitlines() if "hash " in line]
    assert len(hash_of) == 2 and hash_of[0] != hash_of[1]        # the hash follows the resolved config


def test_help_documents_every_setting():
    r = subprocess.run([sys.executable, "-m", "m2train.launch.job", "batch", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for var in ("M2_CONFIG", "M2_DATA", "M2_RUN_DIR", "M2_CKPT_DIR", "M2_OVERRIDES", "M2_GPUS_PER_NODE",
                "M2_PROCS_PER_NODE", "M2_LAUNCHER", "M2_MAX_REQUEUES", "M2_STOP_TIMEOUT", "M2_LOCAL_CACHE",
                "M2_CHECKPOINT", "M2_EVAL_ARGS", "M2_PYTHON", "M2_REPO"):
        assert var in r.stdout


def test_scripts_share_the_driver_and_request_requeue():
    for name in ("m2_gpt_360m", "m2_gpt_145m", "m2_bert_80m", "m2_bert_110m", "m2_bert_260m", "m2_bert_341m"):
        text = (REPO / "slurm" / f"{name}.sh").read_text()
        assert f"M2_CONFIG=${{M2_CONFIG:-{name}}}" in text
        for line in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --open-mode=append", 'slurm/lib/job.sh" train'):
            assert line in text, (name, line)
    assert 'slurm/lib/job.sh" eval' in (REPO / "slurm" / "eval.sh").read_text()


def test_stop_marker_is_read_only_when_written_by_this_attempt(tmp_path):
    from m2train.train.signals import read_stop_marker, write_stop_marker

    assert read_stop_marker(tmp_path) is None                      # no marker: not a graceful stop
    write_stop_marker(tmp_path, 7, "time_budget", tmp_path / "checkpoints")
    marker = read_stop_marker(tmp_path, since=time.time() - 60)
    assert (marker["step"], marker["reason"]) == (7, "time_budget")
    assert read_stop_marker(tmp_path, since=time.time() + 60) is None   # left by an earlier attempt
    (tmp_path / "stopped.json").write_text("{not json")
    assert read_stop_marker(tmp_path) is None


def test_settings_run_dir_follows_the_config_and_overrides():
    s = JobSettings.from_env("train", {"M2_CONFIG": "m2_gpt_tiny", "M2_RUN_DIR": "/r/x"})
    assert s.run_dir() == Path("/r/x")
    s = JobSettings.from_env("train", {"M2_CONFIG": "m2_gpt_tiny"})
    assert s.run_dir() == Path("runs/m2_gpt_tiny")
