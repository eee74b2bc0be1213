"""`m2train train` with parallel.tensor_parallel=2 end to end: 2 ranks under torchrun on gloo, DeepSpeed
ZeRO-1 with the m2train mpu, real MDS shards and checkpoints.

- the TP=2 (and the CP=2) loss curve (20 steps) matches the single-process one within fp32 tolerance, and so do the
  clipped gradient norms (clipping is active: train.grad_clip is tiny);
- a TP=2 checkpoint resumes: steps 11..20 after a resume from step 10 equal the uninterrupted run;
- resuming with another TP layout is refused naming both layouts;
- `m2train export` of the TP=2 checkpoint gives a single-process model whose logits equal the TP=2
  model's (loaded from the per-rank files in 2 spawned processes); `m2train eval` on the TP=2 checkpoint
  from one process reproduces the run's own validation loss;
- TP=2 and CP=2 together (4 ranks), and TP=2 with sequence parallelism: the same curve, an exact resume, and
  eval from one process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from data_fixtures import gpt_id_samples, write_prepared
from test_checkpoint_helpers import run_distributed
from test_train_e2e import run, losses
from m2train.train.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 20
TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64",
        "model.max_seq_len=32", "model.filter_order=16", "train.micro_batch_size=4",
        "train.global_batch_size=4", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_every=10", "train.eval_batches=2", "train.save_every=10", "train.keep_last=10",
        "train.grad_clip=0.05", "train.wandb=disabled", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "gpt32"
    return write_prepared(out, "gpt_packed", 32, 256, {"train": gpt_id_samples(range(24), 32, 256),
                                                       "val": gpt_id_samples(range(1000, 1008), 32, 256)})


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("single")
    run(d, data, *TINY, "parallel.zero_stage=1")
    return d


@pytest.fixture(scope="module")
def tp2(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tp2")
    run(d, data, *TINY, "parallel.zero_stage=1", "parallel.tensor_parallel=2", nproc=2)
    return d


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_tp2_zero1_matches_single_process_loss_curve(single, tp2):
    ref, got = _records(single), _records(tp2)
    assert list(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert math.isclose(got[step]["loss"], ref[step]["loss"], rel_tol=1e-4), (step, got[step], ref[step])
        # The clipped norm counts every TP shard once (the mpu): equal to the single-process norm.
        assert math.isclose(got[step]["grad_norm"], ref[step]["grad_norm"], rel_tol=1e-3), step
        assert got[step]["tokens_seen"] == ref[step]["tokens_seen"]
    assert got[STEPS]["loss"] < got[1]["loss"] - 0.1          # it trains
    assert ref[1]["grad_norm"] > 0.05                        # so clipping was active
    val_ref = [r for r in read_metrics(single / "metrics.jsonl") if "val_loss" in r]
    val_got = [r for r in read_metrics(tp2 / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val_got] == [10, 20]
    for a, b in zip(val_got, val_ref):
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-4)
    # One DeepSpeed module file per TP rank.
    ckpt = tp2 / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "mp_rank_00_model_states.pt").is_file() and (ckpt / "mp_rank_01_model_states.pt").is_file()
    world = json.loads((ckpt / "manifest.json").read_text())["world"]
    assert (world["tp"], world["dp"], world["world"]) == (2, 1, 2)


def _rewind_to(run_dir: Path, step: int) -> None:
    """What a run killed right after its step-`step` checkpoint leaves behind."""
    ckpts = run_dir / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{step:08d}\n")
    lines = [ln for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_tp2_checkpoint_resume_equals_uninterrupted(data, tp2, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(tp2, resumed)
    _rewind_to(resumed, 10)
    over = [*TINY, "parallel.zero_stage=1", "parallel.tensor_parallel=2", f"train.run_dir={resumed}"]
    log = run(resumed, data, *over, nproc=2)
    assert "resumed from" in log
    assert losses(resumed) == losses(tp2)                  # == at every step: exact


def test_resume_with_another_tp_layout_is_refused(tp2):
    # The layout check runs before the engine is touched, so no engine (and no second run) is needed.
    from m2train.checkpoint import CheckpointManager
    from m2train.checkpoint.manifest import CheckpointError

    mgr = CheckpointManager(tp2 / "checkpoints")
    with pytest.raises(CheckpointError, match=r"saved with tensor_parallel=2, context_parallel=1 \(world 2\), "
                                              r"but this run has tensor_parallel=1, context_parallel=1"):
        mgr.load(None)


def _tp_logits(rank, world, ckpt_dir, ids):
    """The TP=2 model of the checkpoint, each rank loading its own DeepSpeed module file."""
    from m2train.checkpoint.consolidate import model_config_of
    from m2train.checkpoint.manifest import read_manifest
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.tensor_parallel import apply_tensor_parallel, gather_logits

    groups.init_model_parallel(tp=world)
    model = build_model(model_config_of(read_manifest(ckpt_dir), ckpt_dir))
    model = apply_tensor_parallel(model, groups.tp_group()).eval()
    states = torch.load(Path(ckpt_dir) / f"mp_rank_{rank:02d}_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    model.load_state_dict(states, strict=True)
    with torch.no_grad():
        logits = gather_logits(model(ids).logits, groups.tp_group())
    groups.destroy_model_parallel()
    return logits


def test_tp2_export_logits_and_eval_from_one_process(data, tp2, tmp_path):
    # In this (single, group-less) process: what `m2train export` / `m2train eval` call (their CLI wrappers
    # are covered by test_eval_export.py).
    from m2train.models import from_pretrained
    from m2train.train.evaluate import evaluate_checkpoint
    from m2train.train.export import export_checkpoint

    ckpt = tp2 / "checkpoints" / f"step_{STEPS:08d}"
    out = export_checkpoint(ckpt, tmp_path / "export", include_tokenizer=False)
    model = from_pretrained(out)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        single_logits = model(ids).logits
    tp_logits = run_distributed(_tp_logits, 2, str(ckpt), ids)
    for lg in tp_logits:
        assert ((lg - single_logits).norm() / single_logits.norm()).item() < 1e-5

    metrics = evaluate_checkpoint(ckpt, batches=2, cache_dir=str(tmp_path / "cache"))
    val = [r for r in read_metrics(tp2 / "metrics.jsonl") if r.get("step") == STEPS and "val_loss" in r][0]
    assert metrics["world_size"] == 1
    assert math.isclose(metrics["loss"], val["val_loss"], rel_tol=1e-5), (metrics, val)


def test_cp2_zero1_run_matches_single_process(data, single, tmp_path):
    """The trainer's context-parallel path (engineer CP's layers): each rank trains on its sequence chunk,
    ZeRO averages over dp x cp, the logged loss / norm / validation equal the single-process run's."""
    d = tmp_path / "cp2"
    run(d, data, *TINY, "parallel.zero_stage=1", "parallel.context_parallel=2", nproc=2)
    _assert_same_curve(d, single)


def _assert_same_curve(run_dir: Path, single: Path) -> list[float]:
    """The run's loss, clipped norm, tokens and validation losses equal the single-process run's (fp32
    tolerance); returns its validation losses."""
    ref, got = _records(single), _records(run_dir)
    assert list(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert math.isclose(got[step]["loss"], ref[step]["loss"], rel_tol=1e-4), (step, got[step], ref[step])
        assert math.isclose(got[step]["grad_norm"], ref[step]["grad_norm"], rel_tol=1e-3), step
        assert got[step]["tokens_seen"] == ref[step]["tokens_seen"]
    val_ref = [r["val_loss"] for r in read_metrics(single / "metrics.jsonl") if "val_loss" in r]
    val_got = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert len(val_got) == 2 and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(val_got, val_ref))
    return val_got


TP2_CP2 = ["parallel.zero_stage=1", "parallel.tensor_parallel=2", "parallel.context_parallel=2"]


@pytest.fixture(scope="module")
def tp2cp2(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tp2cp2")
    run(d, data, *TINY, *TP2_CP2, nproc=4)
    return d


def test_tp2_cp2_run_matches_single_process_resumes_and_evaluates(data, single, tp2cp2, tmp_path):
    """TP and CP together, 4 ranks (TP pairs inside each CP pair, dp = 1): the loss curve, clipped norms and
    validation equal the single-process run's; one module file per TP rank; a resume from step 10 repeats
    steps 11..20 exactly; `m2train eval` from one process reproduces the run's validation loss."""
    from m2train.train.evaluate import evaluate_checkpoint

    val_got = _assert_same_curve(tp2cp2, single)
    ckpt = tp2cp2 / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("mp_rank_*_model_states.pt")) == \
        ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    world = json.loads((ckpt / "manifest.json").read_text())["world"]
    assert (world["tp"], world["cp"], world["dp"], world["world"]) == (2, 2, 1, 4)

    metrics = evaluate_checkpoint(ckpt, batches=2, cache_dir=str(tmp_path / "cache"))
    assert math.isclose(metrics["loss"], val_got[-1], rel_tol=1e-5), (metrics, val_got)
    _assert_resume_repeats(tp2cp2, data, TP2_CP2, 4, tmp_path)


def _assert_resume_repeats(run_dir: Path, data: Path, overrides: list[str], nproc: int, tmp_path: Path) -> None:
    """A copy of the run rewound to its step-10 checkpoint and rerun repeats steps 11..20 exactly."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    _rewind_to(resumed, 10)
    log = run(resumed, data, *TINY, *overrides, f"train.run_dir={resumed}", nproc=nproc)
    assert "resumed from" in log
    assert losses(resumed) == losses(run_dir)              # == at every step: exact


TP2_SP = ["parallel.zero_stage=1", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]


def test_tp2_sequence_parallel_run_matches_single_process_resumes_and_evaluates(data, single, tmp_path):
    """TP=2 with sequence parallelism (2 ranks): the loss curve, clipped norms (the LayerNorms' gradients are
    summed over the TP ranks' positions) and validation equal the single-process run's; a resume from step 10
    repeats steps 11..20 exactly; `m2train eval` from one process reproduces the validation loss."""
    from m2train.train.evaluate import evaluate_checkpoint

    d = tmp_path / "tp2sp"
    log = run(d, data, *TINY, *TP2_SP, nproc=2)
    assert "tensor parallel 2 + sequence parallel" in log
    val_got = _assert_same_curve(d, single)
    metrics = evaluate_checkpoint(d / "checkpoints" / f"step_{STEPS:08d}", batches=2,
                                  cache_dir=str(tmp_path / "cache"))
    assert math.isclose(metrics["loss"], val_got[-1], rel_tol=1e-5), (metrics, val_got)
    _assert_resume_repeats(d, data, TP2_SP, 2, tmp_path)
