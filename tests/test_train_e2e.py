"""`m2train train` end to end, as users run it: real subprocesses (one process, or 2 ranks under torchrun on
gloo), real DeepSpeed engines, real MDS shards, real checkpoints.

One tiny M2-GPT config everywhere (global batch 8 = 4 x 1 rank x 2 accumulation = 4 x 2 ranks x 1); the
train split holds 24 windows, so 8 steps cross two epochs. Runs are shared through module fixtures:
- 1 process vs 2 ranks at ZeRO 0/1/2/3: losses agree within fp32 tolerance;
- SIGKILL at a random step + rerun: losses bit-identical to an uninterrupted run (1 process with bf16
  autocast and dropout; 2 ranks ZeRO-2), metrics.jsonl holds every step once;
- SIGUSR1 to rank 1 only: both ranks stop at the same step, save, exit 3; then resume on 1 process;
- NaN injection: skipped, stopped (exit 4) or rolled back as configured; time budget; config errors.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_fixtures import gpt_id_samples, write_prepared
from m2train.train.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 8
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64",
        "model.max_seq_len=32", "model.filter_order=16", "train.micro_batch_size=4",
        "train.global_batch_size=8", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=4", "train.eval_batches=2", "train.save_every=2", "train.keep_last=10",
        "train.wandb=disabled", "train.tensorboard=false"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "gpt32"
    return write_prepared(out, "gpt_packed", 32, 256, {"train": gpt_id_samples(range(24), 32, 256),
                                                       "val": gpt_id_samples(range(1000, 1008), 32, 256)})


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("M2TRAIN_INJECT_NAN_STEPS", None)
    env.update(extra or {})
    return env


def launch(run_dir: Path, data: Path, *overrides: str, nproc: int = 1, env: dict | None = None,
           launcher: str = "torchrun"):
    from m2train.launch import free_port

    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["m2_gpt_tiny", f"data.path={data}", f"train.run_dir={run_dir}", *TINY, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "m2train", "train", *args]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--module", "m2train", "train", *args]
    else:
        cmd = [TORCHRUN, "--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "m2train", "train", *args]
    log = open(run_dir / f"console_{int(time.time() * 1000)}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True)
    proc.log_path = Path(log.name)
    return proc


def finish(proc, timeout: float = 600) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rc, proc.log_path.read_text()


def run(run_dir: Path, data: Path, *overrides: str, nproc: int = 1, env: dict | None = None,
        expect: int | None = 0, launcher: str = "torchrun") -> str:
    rc, log = finish(launch(run_dir, data, *overrides, nproc=nproc, env=env, launcher=launcher))
    if expect is not None:
        assert rc == expect, f"exit code {rc} (expected {expect}); console:\n{log[-6000:]}"
    return log


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


def wait_for_step(proc, run_dir: Path, step: int, timeout: float = 600) -> None:
    t0 = time.time()
    while last_step(run_dir) < step:
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.log_path.read_text()[-4000:]}"
        assert time.time() - t0 < timeout, f"step {step} not reached in {timeout} s"
        time.sleep(0.02)


def losses(run_dir: Path) -> dict[int, float]:
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in recs}


# --------------------------------------------------------------------------------------------------
# Reference runs (module-scoped: several tests compare against them)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_fp32(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("single_fp32")
    run(d, data, "parallel.zero_stage=0")
    return d


@pytest.fixture(scope="module")
def zero2_2ranks(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zero2")
    run(d, data, "parallel.zero_stage=2", nproc=2)
    return d


def test_single_process_run_writes_everything(single_fp32):
    cfg = (single_fp32 / "config.yaml").read_text()
    assert "grad_accum_steps: 2" in cfg and "global_batch_size: 8" in cfg      # resolved, not as given
    recs = read_metrics(single_fp32 / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        for key in ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "skipped_steps"):
            assert key in r, key
    assert recs[-1]["tokens_seen"] == STEPS * 8 * 32 and recs[-1]["skipped_steps"] == 0
    assert "val_loss" in recs[3] and "val_perplexity" in recs[3] and "val_loss" in recs[-1]
    assert (single_fp32 / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    # Warmup then decay: the lr peaks at the end of warmup and falls after.
    lrs = [r["lr"] for r in recs]
    assert lrs[0] < lrs[1] and lrs[2] > lrs[-1]


@pytest.mark.parametrize("stage,nproc,tol", [(0, 1, 1e-5), (2, 2, 1e-4), (3, 2, 1e-4)])
def test_chunked_lm_loss_trains_like_the_plain_loss(stage, nproc, tol, data, single_fp32, tmp_path):
    """model.loss_chunk_tokens (LM head + cross-entropy in chunks of 50 tokens, logits recomputed in
    backward) through the whole trainer: the same loss at every step and the same validation loss as the
    plain single-process run, also under ZeRO-2 and ZeRO-3 on 2 ranks (ZeRO-3: the partitioned head weight
    is gathered around the backward's recompute, m2train.parallel.zero3; without that the run crashes)."""
    run(tmp_path, data, f"parallel.zero_stage={stage}", "model.loss_chunk_tokens=50", nproc=nproc)
    ref, got = read_metrics(single_fp32 / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for r, g in zip(ref, got):
        assert abs(g["loss"] - r["loss"]) < tol * r["loss"], (r, g)
        assert ("val_loss" in g) == ("val_loss" in r)
        if "val_loss" in r:
            assert abs(g["val_loss"] - r["val_loss"]) < tol * r["val_loss"], (r, g)
    assert got[-1]["loss"] != got[0]["loss"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_on_two_ranks_match_one_process(stage, data, single_fp32, zero2_2ranks, tmp_path):
    if stage == 2:
        run_dir = zero2_2ranks
    else:
        run_dir = tmp_path / f"zero{stage}"
        # Stage 1 also keeps its optimizer state in CPU memory (ZeRO-Offload with our client optimizer).
        extra = ["parallel.offload_optimizer=true"] if stage == 1 else []
        # Stage 0 runs under the deepspeed launcher (it passes --local_rank and its own env), the rest
        # under torchrun.
        run(run_dir, data, f"parallel.zero_stage={stage}", *extra, nproc=2,
            launcher="deepspeed" if stage == 0 else "torchrun")
    ref, got = losses(single_fp32), losses(run_dir)
    assert list(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert math.isclose(got[step], ref[step], rel_tol=1e-4), (stage, step, got[step], ref[step])
    # Training moves the loss (the model is actually updated on every stage).
    assert got[STEPS] != got[1]


# --------------------------------------------------------------------------------------------------
# SIGKILL at a random step, rerun, bit-exact
# --------------------------------------------------------------------------------------------------

def kill_tree(proc) -> None:
    """SIGKILL the launcher and every worker (torchrun starts workers in sessions of their own, so killing
    its process group alone would leave them running), then wait until all are gone."""
    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=60)


def kill_and_resume(data: Path, run_dir: Path, overrides: list, nproc: int) -> int:
    # Random on purpose (any step must resume exactly); M2TRAIN_TEST_KILL_STEP=N reproduces a failure.
    kill_at = int(os.environ.get("M2TRAIN_TEST_KILL_STEP") or random.randint(2, STEPS - 1))
    print(f"SIGKILL at step {kill_at} (M2TRAIN_TEST_KILL_STEP={kill_at} repeats it)")
    proc = launch(run_dir, data, *overrides, nproc=nproc)
    wait_for_step(proc, run_dir, kill_at)
    kill_tree(proc)
    assert last_step(run_dir) < STEPS
    log = run(run_dir, data, *overrides, nproc=nproc)
    assert "resumed from" in log or "starting from scratch" in log
    return kill_at


def test_sigkill_resume_is_bit_exact_single_process_bf16_dropout(data, tmp_path):
    over = ["parallel.zero_stage=0", "train.precision=bf16", "model.hidden_dropout=0.1",
            "train.tensorboard=true"]
    ref_dir = tmp_path / "ref"
    run(ref_dir, data, *over)
    kill_and_resume(data, tmp_path / "killed", over, nproc=1)
    ref, got = losses(ref_dir), losses(tmp_path / "killed")
    assert list(got) == list(range(1, STEPS + 1))
    assert got == ref                                    # == on every step: bit-exact
    # bf16 autocast keeps fp32 master weights: the saved module is fp32.
    states = torch.load(ref_dir / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert {v.dtype for v in states["module"].values() if v.is_floating_point()} == {torch.float32}
    assert list((ref_dir / "tb").iterdir()), "no TensorBoard event file"


def test_sigkill_resume_is_bit_exact_two_ranks_zero2(data, zero2_2ranks, tmp_path):
    kill_and_resume(data, tmp_path / "killed", ["parallel.zero_stage=2"], nproc=2)
    ref, got = losses(zero2_2ranks), losses(tmp_path / "killed")
    assert list(got) == list(range(1, STEPS + 1))
    assert got == ref


# --------------------------------------------------------------------------------------------------
# SIGUSR1 on one rank -> both stop, save, exit 3; resume on a different data-parallel size
# --------------------------------------------------------------------------------------------------

def rank_pid(proc, rank: int) -> int:
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "m2train" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} process not found")


def test_sigusr1_on_one_rank_stops_all_then_resume_on_one_process(data, zero2_2ranks, tmp_path):
    run_dir = tmp_path / "usr1"
    proc = launch(run_dir, data, "parallel.zero_stage=2", nproc=2)
    wait_for_step(proc, run_dir, 2)
    os.kill(rank_pid(proc, 1), signal.SIGUSR1)
    rc, log = finish(proc)
    # Each worker exits 3; torchrun reports any non-zero worker code as its own exit 1 and lists them.
    assert rc == 1 and log.count("exitcode  : 3") == 2, log[-4000:]
    stopped = last_step(run_dir)
    assert 2 <= stopped < STEPS, f"stopped at {stopped}"
    assert f"stopped at step {stopped} (signal" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"

    # Same global batch on 1 process (4 x 1 x 2): model, optimizer and the data stream continue; the
    # losses follow the uninterrupted 2-rank run (fp32 tolerance: different reduction order, same samples).
    log = run(run_dir, data, "parallel.zero_stage=2")
    assert "resumed from" in log
    ref, got = losses(zero2_2ranks), losses(run_dir)
    assert list(got) == list(range(1, STEPS + 1))
    for step in range(1, stopped + 1):
        assert got[step] == ref[step]
    for step in range(stopped + 1, STEPS + 1):
        assert math.isclose(got[step], ref[step], rel_tol=1e-4), (step, got[step], ref[step])
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert recs[-1]["tokens_seen"] == STEPS * 8 * 32


def test_time_budget_stops_with_a_checkpoint(data, tmp_path):
    log = run(tmp_path, data, "train.max_steps=1000", "train.time_budget_s=1", "train.eval_every=0",
              "train.wandb=offline", env={"WANDB_MODE": "offline"}, expect=3)
    assert "train.time_budget_s=1" in log
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run"
    step = last_step(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    # What launchers read, since torchrun turns the exit code 3 into 1 (launch/job.py requeues on it).
    marker = json.loads((tmp_path / "stopped.json").read_text())
    assert (marker["step"], marker["reason"]) == (step, "time_budget")


# --------------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------------

def test_nan_steps_stop_the_run_naming_the_step(data, tmp_path):
    log = run(tmp_path, data, "parallel.zero_stage=0", "train.max_nonfinite_steps=2",
              env={"M2TRAIN_INJECT_NAN_STEPS": "3,4"}, expect=4)
    assert "step 4: 2 consecutive non-finite steps (steps 3..4" in log
    recs = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert recs[3]["loss"] == "nan" and recs[4]["skipped_steps"] == 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()


def test_nan_step_is_skipped_and_a_streak_rolls_back(data, tmp_path):
    log = run(tmp_path, data, "parallel.zero_stage=2", "train.max_nonfinite_steps=2",
              "train.on_nonfinite=rollback", env={"M2TRAIN_INJECT_NAN_STEPS": "3,5,6"})
    assert "rolled back to" in log and "(step 4)" in log
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    by_step = {r["step"]: r for r in recs}
    assert by_step[3]["loss"] == "nan" and by_step[3]["skipped_steps"] == 1
    # The skipped update left the weights finite; steps 5-6 were replayed after the rollback.
    assert all(isinstance(by_step[s]["loss"], float) for s in (4, 5, 6, 7, 8))
    assert by_step[STEPS]["rollbacks"] == 1 and by_step[STEPS]["skipped_steps"] == 1


# --------------------------------------------------------------------------------------------------
# Config errors: before any heavy work, naming the key
# --------------------------------------------------------------------------------------------------

def test_config_errors_name_keys(data, tmp_path, capsys, monkeypatch):
    from m2train.cli import main
    from m2train.config import ConfigError, load_config
    from m2train.train.trainer import prepare

    def check(*overrides):
        cfg = load_config("m2_gpt_tiny", [f"data.path={data}", *TINY, *overrides])
        prepare(cfg)

    check()
    with pytest.raises(ConfigError, match="model.max_seq_len=16 is shorter than the data's seq_len 32"):
        check("model.max_seq_len=16")
    with pytest.raises(ConfigError, match="model.vocab_size=128 is smaller"):
        check("model.vocab_size=128")
    with pytest.raises(ConfigError, match="train.eval_every=100 exceeds train.max_steps=8"):
        check("train.eval_every=100")
    with pytest.raises(ConfigError, match="data.path="):
        check(f"data.path={tmp_path / 'missing'}")

    # Through the command line (in-process: the checks run before any process group or engine exists).
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "m2_gpt_tiny", f"data.path={data}", *TINY, "train.global_batch_size=6"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size=6 is not a multiple of train.micro_batch_size (4)" in err
    assert main(["train", "--check", "m2_gpt_tiny", f"data.path={data}", *TINY]) == 0
    assert "grad_accum_steps: 2" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# M2-BERT: masked-LM batches, the BERT recipe (DecoupledAdamW, linear decay), activation checkpointing
# --------------------------------------------------------------------------------------------------

def test_m2_bert_trains_with_activation_checkpointing_under_zero3(tmp_path):
    from data_fixtures import bert_id_samples

    data = write_prepared(tmp_path / "bert", "bert_doc", 32, 256,
                          {"train": bert_id_samples(range(32), 32, 256), "val": bert_id_samples(range(900, 908), 32, 256)})
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "m2train", "train", "m2_bert_tiny", f"data.path={data}", f"train.run_dir={run_dir}",
         *[o for o in TINY if not o.startswith("model.")], "model.vocab_size=256", "model.hidden_size=32",
         "model.num_layers=2", "model.intermediate_size=64", "model.max_seq_len=32", "model.filter_order=16",
         "train.lr_schedule=linear", "train.min_lr_ratio=0.02", "train.activation_checkpointing=every_block",
         "parallel.zero_stage=3"], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert "val_mlm_accuracy" in recs[3]
    # Linear decay reaches min_lr_ratio x lr at max_steps (M2-BERT recipe), from the config's peak lr.
    peak = 8e-4
    assert recs[-1]["lr"] == pytest.approx(peak * (1 - 0.98 * (STEPS - 1 - 2) / (STEPS - 2)))
