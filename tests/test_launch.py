"""m2train.launch: launcher environment parsing (torchrun, deepspeed, srun, none), Slurm host-list
expansion, and real 2-process gloo process groups started torchrun-style and srun-style."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from m2train.launch import (DistEnv, LaunchEnvError, NodelistError, detect_env, expand_nodelist,
                            expand_tasks_per_node, first_host, free_port, slurm_port)

# --------------------------------------------------------------------------------------------------
# Slurm notations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
    ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
    ("a[008-011]", ["a008", "a009", "a010", "a011"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[9-10]", ["x9", "x10"]),
    ("h-1.cluster,h-2.cluster", ["h-1.cluster", "h-2.cluster"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["", "node[01-03", "node01-03]", "node[3-1]", "node[a-b]", "n[[1]]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(NodelistError):
        expand_nodelist(bad)


@pytest.mark.parametrize("spec, counts", [
    ("4", [4]),
    ("2(x3)", [2, 2, 2]),
    ("2(x3),1", [2, 2, 2, 1]),
    ("1,3(x2),2", [1, 3, 3, 2]),
])
def test_expand_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


def test_expand_tasks_per_node_rejects_malformed():
    with pytest.raises(NodelistError, match="2x3"):
        expand_tasks_per_node("2x3")


# --------------------------------------------------------------------------------------------------
# detect_env tables
# --------------------------------------------------------------------------------------------------

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "node01", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc"}
DEEPSPEED = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
             "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
# What srun gives a task (checked against a real Slurm 22.05: srun -n 2 env).
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_NODELIST": "node[01-03,7]", "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize("environ, expected", [
    (TORCHRUN, DistEnv(3, 8, 1, 2, "node01", 29500, "torchrun")),
    (DEEPSPEED, DistEnv(5, 8, 1, 4, "10.0.0.1", 29600, "deepspeed")),
    # hand-set RANK/WORLD_SIZE on one machine: every rank is local
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"},
     DistEnv(1, 2, 1, 2, "127.0.0.1", 1234, "env")),
    (SLURM, DistEnv(5, 7, 1, 2, "node01", slurm_port("4242"), "slurm")),
    # the last node of "2(x3),1" holds one task
    ({**SLURM, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"},
     DistEnv(6, 7, 0, 1, "node01", slurm_port("4242"), "slurm")),
    # the step's own task layout and node list win over the allocation's
    ({**SLURM, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_NODEID": "1",
      "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "node[02-03]"},
     DistEnv(3, 4, 1, 2, "node02", slurm_port("4242"), "slurm")),
    # --ntasks-per-node only
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEPID": "3", "SLURM_LOCALID": "0",
      "SLURM_NTASKS_PER_NODE": "2",
      "SLURM_NODELIST": "gpu[7-8]", "SLURM_JOB_ID": "17"},
     DistEnv(0, 4, 0, 2, "gpu7", slurm_port("17"), "slurm")),
    # MASTER_ADDR / MASTER_PORT given explicitly inside the allocation win over the derived ones
    ({**SLURM, "MASTER_ADDR": "login1", "MASTER_PORT": "23456"},
     DistEnv(5, 7, 1, 2, "login1", 23456, "slurm")),
    # torchrun started by srun (one torchrun per node): torchrun's variables win
    ({**SLURM, **TORCHRUN}, DistEnv(3, 8, 1, 2, "node01", 29500, "torchrun")),
])
def test_detect_env_table(environ, expected):
    assert detect_env(environ) == expected


@pytest.mark.parametrize("step", [None, "4294967294"])
def test_slurm_batch_script_without_srun_is_a_single_process(step):
    """The batch script sees SLURM_PROCID=0 and the allocation's SLURM_NTASKS but no srun step id: it must
    not wait for 7 ranks that were never started."""
    environ = {k: v for k, v in SLURM.items() if k not in ("SLURM_STEP_ID",)}
    environ.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    if step is not None:
        environ["SLURM_STEP_ID"] = step
    with pytest.warns(UserWarning, match="not started by srun"):
        env = detect_env(environ)
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_detect_env_single_process_gets_a_free_port():
    env = detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert env.launcher == "single" and env.master_addr == "127.0.0.1"
    assert 0 < env.master_port < 65536
    assert detect_env({"MASTER_PORT": "2222"}).master_port == 2222


def test_slurm_port_is_deterministic_and_in_range():
    assert slurm_port("4242") == slurm_port("4242")
    assert slurm_port("4242") != slurm_port("4243")
    assert all(12000 <= slurm_port(str(j)) < 32000 for j in (0, 1, 19999, 20000, 987654321))
    assert slurm_port("1234_7") == slurm_port("12347")        # array jobs


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0"}, "WORLD_SIZE is missing"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 is outside"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
    ({**SLURM, "SLURM_NODEID": "9"}, "lists only 4 node"),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "2x3"}, "SLURM_TASKS_PER_NODE"),
    ({**SLURM, "SLURM_JOB_NODELIST": "node[01-"}, "SLURM_JOB_NODELIST"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID"),
    ({**SLURM, "SLURM_LOCALID": "2"}, "local rank 2"),
])
def test_detect_env_errors_name_the_variable(environ, message):
    with pytest.raises(LaunchEnvError, match=message.replace("(", r"\(").replace("[", r"\[")):
        detect_env(environ)


def test_torch_env_round_trips():
    env = detect_env(SLURM)
    assert detect_env(env.torch_env()).replace(launcher="slurm") == env


def test_import_does_not_pull_in_torch():
    code = "import sys, m2train.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# real process groups
# --------------------------------------------------------------------------------------------------

# Each rank initialises twice (the second call must be a no-op), all-reduces rank+1 over gloo and
# writes what it saw to RESULT_DIR/rank{r}.json.
WORKER = textwrap.dedent("""
    import json, os
    from m2train.launch import init_distributed
    import torch, torch.distributed as dist
    env = init_distributed()
    again = init_distributed()
    x = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(x)
    exported = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                           "MASTER_ADDR", "MASTER_PORT")}
    result = dict(env=env.__dict__, sum=x.item(), same=again is env, backend=dist.get_backend(),
                  world=dist.get_world_size(), rank=dist.get_rank(), exported=exported)
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
""")


def _clean_env(result_dir) -> dict:
    """This test process's environment without any launcher variables (pytest may itself run under one)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", RESULT_DIR=str(result_dir))
    return env


def _results(result_dir, n: int) -> list[dict]:
    return [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(n)]


def _check_group(results: list[dict], launcher: str, port: int) -> None:
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["sum"] == 3.0 and r["same"] and r["backend"] == "gloo"
        assert r["env"]["launcher"] == launcher and r["env"]["master_port"] == port
        assert r["env"]["local_world_size"] == 2 and r["env"]["device"] == "cpu"
        assert r["exported"] == {"RANK": str(r["rank"]), "WORLD_SIZE": "2", "LOCAL_RANK": str(r["rank"]),
                                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(port)}


@pytest.mark.slow
def test_two_process_group_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)],
                          env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_group(_results(tmp_path, 2), "torchrun", port)


@pytest.mark.slow
def test_two_process_group_from_slurm_variables(tmp_path):
    """What srun gives each task (no torchrun): the port comes from the job id, the address from the node
    list, and both tasks must agree on them without talking to each other first."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    job_id = str(free_port())        # a job id whose derived port is unlikely to be in use
    port = slurm_port(job_id)
    procs = []
    for rank in range(2):
        env = _clean_env(tmp_path)
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_LOCALID=str(rank),
                   SLURM_NODEID="0",
                   SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=job_id)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    _check_group(_results(tmp_path, 2), "slurm", port)


@pytest.mark.slow
def test_single_process_gets_a_real_world_one_group(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("dist.all_reduce(x)", "dist.all_reduce(x); x *= 3"))
    proc = subprocess.run([sys.executable, str(script)], env=_clean_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _results(tmp_path, 1)
    assert r["world"] == 1 and r["sum"] == 3.0 and r["env"]["launcher"] == "single"
    assert r["backend"] == "gloo" and r["same"]


def _live_slurm() -> bool:
    """A reachable Slurm controller (e.g. the local test cluster of slurm/, via SLURM_CONF)."""
    import shutil
    if shutil.which("srun") is None or shutil.which("scontrol") is None:
        return False
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "UP" in res.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _live_slurm(), reason="needs a running Slurm cluster (srun + scontrol ping UP)")
def test_two_process_group_under_real_srun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _clean_env(tmp_path)
    for key in ("SLURM_CONF",):              # keep the cluster's config, drop any job variables
        if key in os.environ:
            env[key] = os.environ[key]
    proc = subprocess.run(["srun", "-n", "2", "-N", "1", "--time", "5", sys.executable, str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path, 2)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["sum"] == 3.0 and r["env"]["launcher"] == "slurm"
        assert r["env"]["local_rank"] == r["rank"] and r["env"]["local_world_size"] == 2
        assert 12000 <= r["env"]["master_port"] < 32000
