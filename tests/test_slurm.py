"""The sbatch scripts in slurm/ on a real local Slurm cluster (slurm/dev/start_cluster.sh: slurmctld + two
slurmd simulated nodes + munge), CPU only (GPUs per node 0, gloo).

Skipped when the Slurm binaries are missing or we are not root, unless M2TRAIN_REQUIRE_SLURM=1 (CI), which
turns that into a failure. Jobs are polled with `scontrol show job` (not `sbatch --wait`, which polls every
~10 s); finished jobs stay visible for MinJobAge=600 s (no accounting database).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Small runs of the tiny CPU config: no periodic eval/save (the final checkpoint is always written), a loss
# line every step so the log shows where the job is.
TINY = "train.warmup_steps=1 train.save_every=0 train.eval_every=0 train.log_every=1 train.micro_batch_size=2"


def _missing_slurm() -> str | None:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
        if shutil.which(exe) is None and not Path("/usr/sbin", exe).exists():
            return f"{exe} not installed (bash slurm/dev/install.sh)"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-node cluster; yields the environment that points the Slurm commands at it."""
    reason = _missing_slurm()
    if reason:
        if os.environ.get("M2TRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"M2TRAIN_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(REPO / "slurm/dev/start_cluster.sh"), "--nodes", "2", "--dir", str(root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"start_cluster.sh failed:\n{r.stdout}\n{r.stderr}"
    conf = r.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    env = dict(os.environ, SLURM_CONF=conf, PATH=os.environ["PATH"] + ":/usr/sbin")
    try:
        yield env
    finally:
        pids = [int(p.read_text()) for p in (root / "run").glob("*.pid")]
        subprocess.run(["bash", str(REPO / "slurm/dev/stop_cluster.sh"), str(root), "--remove"], timeout=120)
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        assert not alive, f"stop_cluster.sh left daemons running: {alive}"


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    r = subprocess.run([sys.executable, "-m", "m2train", "sample-data", str(out), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def _sbatch(env: dict, script: str, options: list[str], job_env: dict) -> str:
    r = subprocess.run(["sbatch", "--parsable", *options, str(REPO / script)], cwd=REPO,
                       env={**env, **job_env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job(env: dict, job_id: str) -> dict:
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _wait(env: dict, job_id: str, timeout: float, log: Path | None = None, done=None) -> dict:
    """Poll until the job is finished (or `done(info)` holds); on timeout, fail showing the job's log."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE", "PREEMPTED"}
    end = time.time() + timeout
    while time.time() < end:
        info = _job(env, job_id)
        if (done(info) if done else info["JobState"] in final):
            return info
        time.sleep(1)
    text = log.read_text() if log and log.exists() else "(no log)"
    raise AssertionError(f"job {job_id} not done after {timeout} s: {_job(env, job_id)}\n{text[-4000:]}")


def _train_env(sample_data: Path, run_dir: Path, max_steps: int) -> dict:
    return {"M2_PYTHON": sys.executable, "M2_CONFIG": "m2_gpt_tiny", "M2_DATA": str(sample_data / "gpt"),
            "M2_RUN_DIR": str(run_dir), "M2_OVERRIDES": f"train.max_steps={max_steps} {TINY}",
            "M2_LOCAL_CACHE": str(run_dir.parent / "cache")}


# The #SBATCH defaults are for GPU nodes; command-line options override them (sbatch's documented order:
# command line > SBATCH_* variables > #SBATCH lines), so the scripts run here unchanged.
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_gpt_360m_script_unchanged_on_cpu_completes(cluster, sample_data, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(cluster, "slurm/m2_gpt_360m.sh", ["--nodes=1", *CPU_NODE, f"--output={log}"],
                  _train_env(sample_data, run, max_steps=3))
    info = _wait(cluster, job, 240, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["Restarts"] == "0"                       # a normally finishing job does not requeue
    assert (run / "checkpoints" / "latest").exists()
    steps = [m for m in _metrics(run) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in steps)
    # The job header: commit, config hash, nodes, layout, rendezvous at the node's NodeAddr (n1/n2 do not
    # resolve).
    commit = re.search(r"git commit:\s+([0-9a-f]{40})(\+dirty)?\n", text)
    assert commit, text[:2000]
    # The checkout's HEAD then (others may have committed since): an ancestor of HEAD now, or HEAD itself.
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit.group(1), "HEAD"], cwd=REPO).returncode == 0
    assert re.search(r"config:\s+m2_gpt_tiny\s+hash [0-9a-f]{16}", text)
    assert re.search(r"world:\s+1 = 1 node\(s\) x 1 process\(es\) per node \(0 GPU\(s\)", text)
    assert re.search(r"rendezvous:\s+127\.0\.0\.1:\d+", text)
    assert "finished 3 steps" in text
    # The node removed its streaming cache folder when it was done.
    assert not (tmp_path / "cache" / job).exists()

    # slurm/eval.sh (unchanged too) evaluates that checkpoint.
    eval_log, result = tmp_path / "eval.out", tmp_path / "eval.json"
    job = _sbatch(cluster, "slurm/eval.sh", [*CPU_NODE, f"--output={eval_log}"],
                  {"M2_PYTHON": sys.executable, "M2_CHECKPOINT": str(run / "checkpoints"),
                   "M2_DATA": str(sample_data / "gpt"), "M2_EVAL_ARGS": f"--batches 2 --out {result}",
                   "M2_LOCAL_CACHE": str(tmp_path / "cache")})
    info = _wait(cluster, job, 240, eval_log)
    assert info["JobState"] == "COMPLETED", eval_log.read_text()[-3000:]
    metrics = json.loads(result.read_text())
    assert metrics["batches"] == 2 and 1.0 < metrics["perplexity"] < 2048 * 2


def _preempt_once_and_check_resumed(cluster: dict, job: str, log: Path, run: Path, max_steps: int) -> str:
    """Once training is under way (a loss line for step 2 is in the log), USR1 to the batch process; then
    the job must stop at one step K with a checkpoint, requeue itself once, resume at K and finish, with
    every step in metrics.jsonl exactly once. Returns the job's log."""
    _wait(cluster, job, 300, log,
          done=lambda info: log.exists() and re.search(rf"step\s+2/{max_steps}", log.read_text()) is not None)
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    info = _wait(cluster, job, 420, log, done=lambda i: i["JobState"] == "COMPLETED" or
                 (i["JobState"] in ("FAILED", "CANCELLED") and i["Restarts"] != "0"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1", text[-4000:]
    stopped = re.search(r"stopped at step (\d+) \(signal SIGUSR1\); checkpoint saved", text)
    assert stopped, text[-4000:]
    k = int(stopped.group(1))
    assert 2 <= k < max_steps
    assert "requeueing (attempt 2)" in text
    assert re.search(rf"resumed from \S+step_{k:08d}\S* at step {k}\b", text), text[-4000:]
    assert f"finished {max_steps} steps" in text
    # metrics.jsonl: every step once, in order, across both attempts.
    assert [m["step"] for m in _metrics(run) if "loss" in m] == list(range(1, max_steps + 1))
    return text


def test_usr1_checkpoints_requeues_and_resumes(cluster, sample_data, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    # Room for the signal to arrive mid-run: from the log showing step 2 to the trainer seeing SIGUSR1 takes
    # a poll, scancel and the batch script's forwarding (~1-3 s), and a tiny-model step can take ~20 ms on an
    # idle machine, so with 10 steps a fresh-clone CI run once finished all of them first (stopped at 10).
    max_steps = 200
    job = _sbatch(cluster, "slurm/m2_gpt_360m.sh", ["--nodes=1", *CPU_NODE, f"--output={log}"],
                  _train_env(sample_data, run, max_steps))
    text = _preempt_once_and_check_resumed(cluster, job, log, run, max_steps)
    assert "attempt 2 (SLURM_RESTART_COUNT=1" in text


def test_two_nodes_one_torchrun_each(cluster, sample_data, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = _sbatch(cluster, "slurm/m2_gpt_360m.sh", ["--nodes=2", *CPU_NODE, f"--output={log}"],
                  _train_env(sample_data, run, max_steps=2))
    info = _wait(cluster, job, 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["NodeList"] == "n[1-2]"
    assert re.search(r"world:\s+2 = 2 node\(s\) x 1 process", text)
    for node in (0, 1):                                  # one torchrun per node, node ranks 0 and 1
        assert re.search(rf"node {node} \(\S+\): .*torch\.distributed\.run --nnodes 2 --node-rank {node} ", text)
    assert "on 2 process(es) [gloo" in text              # the trainer's world: 2 ranks
    assert (run / "checkpoints" / "latest").exists()
    assert [m["step"] for m in _metrics(run) if "loss" in m] == [1, 2]


def test_srun_launcher_one_task_per_process_checkpoints_requeues_and_resumes(cluster, sample_data, tmp_path):
    """M2_LAUNCHER=srun on 2 nodes x 2 processes (no torchrun): the tasks form the world from Slurm's
    variables, USR1 to the batch process reaches all four through srun, they stop at one step, save, the job
    requeues itself and the second attempt resumes there; the clean-up step empties the node caches."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    max_steps = 200
    env = {**_train_env(sample_data, run, max_steps), "M2_LAUNCHER": "srun", "M2_PROCS_PER_NODE": "2"}
    job = _sbatch(cluster, "slurm/m2_gpt_360m.sh", ["--nodes=2", *CPU_NODE, f"--output={log}"], env)
    text = _preempt_once_and_check_resumed(cluster, job, log, run, max_steps)
    assert re.search(r"world:\s+4 = 2 node\(s\) x 2 process", text)
    assert "launcher:     srun (one Slurm task per process)" in text
    assert "torch.distributed.run" not in text                       # no torchrun anywhere
    assert re.search(r"srun --nodes=2 --ntasks=4 --ntasks-per-node=2 --cpus-per-task=1 --kill-on-bad-exit=1 ",
                     text)
    assert "on 4 process(es) [gloo" in text
    cache = Path(env["M2_LOCAL_CACHE"]) / job
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))[:10]


def test_two_nodes_tensor_and_context_parallel(cluster, sample_data, tmp_path):
    """TP=2 x CP=2 over 2 nodes x 2 processes: TP pairs inside a node, CP pairs across the nodes."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    env = _train_env(sample_data, run, max_steps=2)
    env["M2_OVERRIDES"] += " parallel.tensor_parallel=2 parallel.context_parallel=2 parallel.zero_stage=1"
    job = _sbatch(cluster, "slurm/m2_gpt_360m.sh", ["--nodes=2", *CPU_NODE, f"--output={log}"],
                  {**env, "M2_PROCS_PER_NODE": "2"})
    info = _wait(cluster, job, 400, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert re.search(r"world:\s+4 = 2 node\(s\) x 2 process", text)
    assert "on 4 process(es) [gloo, ZeRO-1, fp32, tensor parallel 2, context parallel 2]" in text
    world = json.loads((run / "checkpoints" / "step_00000002" / "manifest.json").read_text())["world"]
    assert (world["tp"], world["cp"], world["dp"], world["world"]) == (2, 2, 1, 4)
    assert [m["step"] for m in _metrics(run) if "loss" in m] == [1, 2]


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prep_array_and_merge_equal_a_single_prep(cluster, sample_data, tmp_path):
    tok = sample_data / "tokenizer" / "tokenizer.model"
    glob = str(sample_data / "raw" / "c4" / "*.json.gz")
    common = ["--layout", "gpt_packed", "--seq-len", "256", "--val-fraction", "0.005"]
    env = {**cluster, "M2_PYTHON": sys.executable, "SOURCE": "c4", "INPUT": glob, "TOKENIZER": str(tok),
           "OUT": str(tmp_path / "array"), "LAYOUT": "gpt_packed", "SEQ_LEN": "256", "ARRAY_SIZE": "3",
           "SBATCH_ARGS": f"--cpus-per-task=1 --mem=1G --output={tmp_path}/%x-%A_%a.out"}
    r = subprocess.run(["bash", str(REPO / "slurm/prep_array.sh")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"submitted prep array (\d+) \(3 tasks\) and merge job (\d+)", r.stdout)
    assert m, r.stdout
    # The single job runs meanwhile (one worker, as each array task with one CPU).
    single = subprocess.run([sys.executable, "-m", "m2train", "prep", "--source", "c4", "--input", glob,
                             "--tokenizer", str(tok), "--out", str(tmp_path / "single"), *common, "--workers", "1",
                             "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    info = _wait(cluster, m.group(2), 300)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    for task in range(3):
        assert _job(cluster, f"{m.group(1)}_{task}")["JobState"] == "COMPLETED"
    assert not list((tmp_path / "array").glob("part-*")), "merge left the per-task parts behind"
    merged, ref = _tree_digest(tmp_path / "array"), _tree_digest(tmp_path / "single")
    assert any(name.startswith("train/") and "/shard." in name for name in ref)
    assert merged == ref                                 # byte-identical index, shards and stats
