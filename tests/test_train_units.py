"""Trainer pieces that need no process group: batch layout, config/data checks, metrics.jsonl rewinding,
the time budget, the stop flag, the update veto, the CLI help."""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from m2train.config import ConfigError, load_config
from m2train.train import signals
from m2train.train.engine import SkippableStep, deepspeed_config
from m2train.train.metrics import read_metrics, truncate_metrics
from m2train.train.validate import check_data_compat, check_intervals, resolve_batch


def cfg_with(*overrides):
    return load_config("m2_gpt_tiny", ["data.path=/nonexistent", *overrides])


@pytest.mark.parametrize("over,world,accum,glob", [
    ([], 1, 1, 8),
    (["train.global_batch_size=32"], 2, 2, 32),
    (["train.grad_accum_steps=3"], 2, 3, 48),
    (["train.global_batch_size=48", "train.grad_accum_steps=3"], 2, 3, 48),
])
def test_resolve_batch(over, world, accum, glob):
    cfg = cfg_with("train.micro_batch_size=8", *over)
    assert resolve_batch(cfg, world) == world
    assert (cfg.train.grad_accum_steps, cfg.train.global_batch_size) == (accum, glob)
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == glob and ds["gradient_accumulation_steps"] == accum


@pytest.mark.parametrize("over,world,needle", [
    (["train.global_batch_size=20"], 2, "train.global_batch_size=20 is not a multiple"),
    (["train.global_batch_size=32", "train.grad_accum_steps=3"], 2, "train.grad_accum_steps (3)"),
    (["parallel.tensor_parallel=2"], 3, "parallel.tensor_parallel=2"),   # 2 does not divide a world of 3
])
def test_resolve_batch_errors_name_keys(over, world, needle):
    with pytest.raises(ConfigError, match=r".*" + needle.replace("(", r"\(").replace(")", r"\)")):
        resolve_batch(cfg_with("train.micro_batch_size=8", *over), world)


@pytest.mark.parametrize("over,needle", [
    (["train.warmup_steps=50", "train.max_steps=20"], "train.warmup_steps=50"),
    (["train.save_every=500", "train.max_steps=20", "train.warmup_steps=0", "train.eval_every=0"],
     "train.save_every=500"),
    (["data.path=null"], "data.path"),
])
def test_interval_errors(over, needle):
    with pytest.raises(ConfigError, match=needle):
        check_intervals(cfg_with(*over))


def info(**kw):
    base = dict(layout="gpt_packed", seq_len=128, vocab_size=2000, special_tokens={"pad": 0, "eos": 3, "mask": None})
    base.update(kw)
    return SimpleNamespace(**base)


def test_data_compat():
    cfg = cfg_with()
    check_data_compat(cfg, info())
    with pytest.raises(ConfigError, match="model.max_seq_len=256 is shorter"):
        check_data_compat(cfg, info(seq_len=512))
    with pytest.raises(ConfigError, match="model.vocab_size=2048 is smaller"):
        check_data_compat(cfg, info(vocab_size=4000))
    with pytest.raises(ConfigError, match="layout 'bert_doc'"):
        check_data_compat(cfg, info(layout="bert_doc"))
    bert = load_config("m2_bert_tiny", ["data.path=/x"])
    with pytest.raises(ConfigError, match="'mask'"):
        check_data_compat(bert, info(layout="bert_doc", seq_len=128))


def test_truncate_metrics_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')          # killed mid-write
    assert truncate_metrics(path, 5) == 3
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(path, 0) == 5
    assert path.read_text() == ""


def test_time_budget_reserves_a_step_and_a_save():
    b = signals.TimeBudget(100.0, start=0.0, margin=1.0)
    b.record_step(5.0)
    assert not b.exhausted(now=40.0)        # 40 + 5 + 10*5 = 95 < 100
    assert b.exhausted(now=46.0)
    b.record_save(1.0)
    assert not b.exhausted(now=90.0)        # 90 + 5 + 1
    assert b.exhausted(now=95.0)
    assert not signals.TimeBudget(None).exhausted()


def test_stop_request_sets_flag_on_sigusr1():
    stop = signals.StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
    finally:
        stop.uninstall()


def test_skippable_step_vetoes_one_update():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    guard = SkippableStep(opt)
    p.grad = torch.ones(3)
    guard.skip_next = True
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state and not guard.applied
    guard.skip_next = False
    opt.step()
    assert guard.applied and (p.detach() < 1).all()


def test_train_help_documents_exit_codes_and_hooks():
    out = subprocess.run([sys.executable, "-m", "m2train", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for needle in ("exit codes", "SIGUSR1", "M2TRAIN_INJECT_NAN_STEPS", "torchrun", "srun", "time_budget_s",
                   "metrics.jsonl", "--check"):
        assert needle in out


def test_causal_monarch_warm_start_round_trip():
    from m2train.models import build_model
    from m2train.train.trainer import monarch_warm_starts, restore_monarch_warm_starts
    from conftest import tiny_model_cfg

    model = build_model(tiny_model_cfg("m2_gpt", sequence_mixer="monarch_causal", max_seq_len=16))
    x = torch.randint(0, 101, (1, 16))
    model(x, labels=x)
    saved = monarch_warm_starts(model)
    assert saved and all(v is not None for v in saved.values())
    fresh = build_model(tiny_model_cfg("m2_gpt", sequence_mixer="monarch_causal", max_seq_len=16))
    restore_monarch_warm_starts(fresh, saved)
    assert all(torch.equal(fresh.get_submodule(k)._points, v) for k, v in saved.items())


def test_finished_rank_answers_launcher_sigterm_with_its_exit_code():
    # torchrun SIGTERMs the other workers as soon as one exits non-zero (3 after a graceful stop); a rank
    # that already finished must report its own code, not death by signal.
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time; from m2train.train.signals import exit_with_code_on_sigterm; "
            "exit_with_code_on_sigterm(3); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3
    assert time.time() - t0 < 10


def test_replica_seeds_are_shared_by_tp_peers_only():
    """One RNG stream per (dp replica, CP rank): every layout's ranks (megatron order, TP innermost) get
    distinct seeds except TP peers, which must draw the same masks for the activations they replicate."""
    from m2train.train.trainer import replica_seed

    for tp, cp, dp in [(1, 1, 4), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 2, 1), (2, 4, 3)]:
        seeds = {}
        for rank in range(tp * cp * dp):
            cp_rank, dp_rank = (rank // tp) % cp, rank // (tp * cp)
            seeds.setdefault(replica_seed(7, dp_rank, cp, cp_rank), set()).add((dp_rank, cp_rank))
        assert len(seeds) == cp * dp and all(len(v) == 1 for v in seeds.values()), (tp, cp, dp, seeds)
    assert [replica_seed(7, r) for r in range(3)] == [8, 9, 10]      # pure data parallel: as before CP existed
