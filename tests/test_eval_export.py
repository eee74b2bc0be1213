"""evaluate() across ranks, `m2train eval` of a sharded checkpoint in one process, and `m2train export`
round trips, for a 1-rank ZeRO-0 checkpoint (M2-GPT and M2-BERT) and a 2-rank ZeRO-3 checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_fixtures import TEXTS, make_id_dataset, train_sentencepiece
from test_checkpoint_helpers import make_engine, run_distributed

from m2train.checkpoint import CheckpointManager
from m2train.checkpoint.consolidate import load_model_from_checkpoint
from m2train.cli import main as cli_main
from m2train.config import DataConfig, to_plain
from m2train.models import from_pretrained
from m2train.train.evaluate import evaluate, evaluate_checkpoint

VOCAB = 512
SEQ = 16


def _probe_ids():
    return torch.randint(5, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(42))


def _train_save(rank, world, root, data_path, arch, zero_stage):
    import deepspeed

    from conftest import tiny_model_cfg
    from m2train.data import build_dataloader

    cfg = tiny_model_cfg(arch, vocab_size=VOCAB)
    engine = make_engine(cfg, zero_stage=zero_stage, world=world, micro_batch=2)
    data_cfg = DataConfig(path=data_path)
    kw = dict(micro_batch_size=2, seed=0, dp_rank=rank, dp_world=world,
              cache_dir=f"{root}/../cache")  # one cache per node
    train_loader = build_dataloader(data_cfg, "train", **kw)
    for _ in range(3):
        out = engine(**next(train_loader))
        engine.backward(out.loss)
        engine.step()
    val_loader = build_dataloader(data_cfg, "val", **kw)
    metrics = evaluate(engine, val_loader)
    assert engine.module.training          # evaluate put train mode back
    meta = {"config": {"name": f"tiny_{arch}", "model": to_plain(cfg), "data": to_plain(data_cfg),
                       "train": {"micro_batch_size": 2, "seed": 0}},
            "tokens_seen": 3 * 2 * world * SEQ}
    CheckpointManager(root).save(engine, 3, client_state={"data": train_loader.state_dict()}, meta=meta)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    train_loader.close()
    val_loader.close()
    result = {"metrics": metrics, "weights": weights}
    if world > 1:
        # `m2train eval` under the launcher's world: each rank reads its share, sums are all-reduced.
        result["eval_in_world"] = evaluate_checkpoint(root)
    return result


def _zero0_worker(rank, world, jobs):
    return [_train_save(rank, world, *job, zero_stage=0) for job in jobs]


def _zero3_worker(rank, world, root, data_path):
    return _train_save(rank, world, root, data_path, "m2_gpt", zero_stage=3)


def _dataset(tmp_path, arch):
    layout = "gpt_packed" if arch == "m2_gpt" else "bert_doc"
    data = make_id_dataset(tmp_path / "data", layout, n_train=48, n_val=12, seq_len=SEQ, vocab_size=VOCAB)
    _, proto = train_sentencepiece(TEXTS)     # a real tokenizer file for export to carry along
    (data / "tokenizer").mkdir()
    (data / "tokenizer" / "tokenizer.model").write_bytes(proto)
    return data


def _check_round_trip(tmp_path, arch, data, root, results, capsys):
    in_memory = results[0]["metrics"]
    assert results[-1]["metrics"] == in_memory           # every rank got the all-reduced numbers
    ckpt = root / "step_00000003"

    # m2train eval, one process, from the shards (the data path comes from the checkpoint's config).
    got = evaluate_checkpoint(root)
    assert got["step"] == 3 and got["checkpoint"] == str(ckpt) and got["world_size"] == 1
    assert got["tokens"] == in_memory["tokens"] and got["batches"] == in_memory["batches"]
    assert got["loss"] == pytest.approx(in_memory["loss"], rel=1e-6, abs=0)
    if arch == "m2_gpt":
        assert got["tokens"] == 12 * SEQ                   # every val token, once
        assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    else:
        assert 0 < got["tokens"] < 12 * SEQ                # masked positions only
        assert got["mlm_accuracy"] == pytest.approx(in_memory["mlm_accuracy"], abs=1.5 / got["tokens"])

    out_json = tmp_path / "metrics.json"
    capsys.readouterr()
    assert cli_main(["eval", str(ckpt), "--data", str(data), "--out", str(out_json), "--verify", "size"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == got["loss"]   # stdout is exactly the JSON
    assert json.loads(out_json.read_text())["loss"] == got["loss"]

    # m2train export: consolidated weights equal the trained ones bit for bit; logits identical.
    out = tmp_path / "export"
    assert cli_main(["export", str(tmp_path / "run"), str(out)]) == 0
    from safetensors.torch import load_file
    exported = load_file(str(out / "model.safetensors"))
    trained = results[0]["weights"]
    assert set(exported) == set(trained)
    for k, v in exported.items():
        assert torch.equal(v, trained[k].float()), k
    reloaded = from_pretrained(out)
    from_ckpt, _ = load_model_from_checkpoint(ckpt)
    with torch.no_grad():
        assert torch.equal(reloaded(_probe_ids()).logits, from_ckpt(_probe_ids()).logits)
    meta = json.loads((out / "export.json").read_text())
    assert meta["step"] == 3 and meta["source_checkpoint"] == str(ckpt.resolve())
    assert meta["tokenizer"]["found_via"] == "data.path/tokenizer" and meta["tokenizer"]["files"] == ["tokenizer.model"]
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == (data / "tokenizer" / "tokenizer.model").read_bytes()
    assert cli_main(["export", str(ckpt), str(out)]) == 1   # refuses to overwrite
    if arch == "m2_gpt":
        # m2train generate straight from the shards (tokenizer found as export finds it) = from the export.
        gen = ["--prompt", "The river", "--temperature", "0", "--max-new-tokens", "6", "--json"]
        capsys.readouterr()
        assert cli_main(["generate", str(tmp_path / "run"), "--verify", "size"] + gen) == 0
        from_shards = json.loads(capsys.readouterr().out)
        assert cli_main(["generate", str(out)] + gen) == 0
        assert json.loads(capsys.readouterr().out) == from_shards and len(from_shards["new_tokens"]) <= 6


@pytest.mark.slow
def test_eval_and_export_zero0_one_rank(tmp_path, capsys):
    jobs, dirs = [], {}
    for arch in ("m2_gpt", "m2_bert"):
        d = tmp_path / arch
        dirs[arch] = (_dataset(d, arch), d / "run" / "checkpoints")
        jobs.append((str(dirs[arch][1]), str(dirs[arch][0]), arch))
    (per_job,) = run_distributed(_zero0_worker, 1, jobs)
    for (arch, (data, root)), result in zip(dirs.items(), per_job):
        _check_round_trip(tmp_path / arch, arch, data, root, [result], capsys)


@pytest.mark.slow
def test_eval_and_export_zero3_two_ranks(tmp_path, capsys):
    data = _dataset(tmp_path, "m2_gpt")
    root = tmp_path / "run" / "checkpoints"
    results = run_distributed(_zero3_worker, 2, str(root), str(data))
    for res in results:
        in_world = res["eval_in_world"]
        assert in_world["world_size"] == 2 and in_world["tokens"] == res["metrics"]["tokens"]
        assert in_world["loss"] == pytest.approx(res["metrics"]["loss"], rel=1e-6, abs=0)
    _check_round_trip(tmp_path, "m2_gpt", data, root, results, capsys)


def test_evaluate_is_token_weighted_and_restores_mode():
    """Two batches with different numbers of labelled tokens: the loss is the per-token mean over both,
    not the mean of the two batch means."""
    from conftest import tiny_model_cfg
    from m2train.models import build_model
    import torch.nn.functional as F

    model = build_model(tiny_model_cfg("m2_gpt", vocab_size=VOCAB)).train()
    g = torch.Generator().manual_seed(0)
    batches = []
    for n_labelled in (3, 13):
        x = torch.randint(5, VOCAB, (1, SEQ), generator=g)
        y = torch.randint(5, VOCAB, (1, SEQ), generator=g)
        y[:, n_labelled:] = -100
        batches.append({"input_ids": x, "labels": y})
    m = evaluate(model, batches)
    assert model.training
    model.eval()
    with torch.no_grad():
        sums = [F.cross_entropy(model(b["input_ids"]).logits[0], b["labels"][0], reduction="sum").item()
                for b in batches]
    assert m["tokens"] == 16 and m["batches"] == 2
    assert m["loss"] == pytest.approx(sum(sums) / 16, rel=1e-6)
    assert evaluate(model, batches, max_batches=1)["tokens"] == 3


def test_eval_and_export_errors(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "not a checkpoint folder" in capsys.readouterr().err
