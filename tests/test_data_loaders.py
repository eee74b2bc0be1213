"""m2train.data loaders over real MDS shards written per data_prep/FORMAT.md (tests/data_fixtures.py)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import (SPECIALS, TEXTS, bert_id_samples, decode_id, gpt_id_samples, make_id_dataset,
                           make_text_dataset, sample_ids_of_batch, write_prepared)
from m2train.config import DataConfig
from m2train.data import IGNORE_INDEX, MLMMasker, build_dataloader, read_prep_stats

V = 512          # fixture vocabulary
L = 16           # fixture seq_len
N_TRAIN = 96
B = 4            # micro batch: 24 batches per epoch


@pytest.fixture(scope="module")
def gpt_data(tmp_path_factory):
    return make_id_dataset(tmp_path_factory.mktemp("gpt"), "gpt_packed", n_train=N_TRAIN, n_val=10, seq_len=L,
                           vocab_size=V)


@pytest.fixture(scope="module")
def bert_data(tmp_path_factory):
    return make_id_dataset(tmp_path_factory.mktemp("bert"), "bert_doc", n_train=N_TRAIN, n_val=10, seq_len=L,
                           vocab_size=V)


def loader(path, tmp_path, split="train", workers=0, **kw):
    cfg = DataConfig(path=str(path), num_workers=workers, shuffle=kw.pop("shuffle", True))
    return build_dataloader(cfg, split=split, micro_batch_size=kw.pop("micro_batch_size", B),
                            seed=kw.pop("seed", 0), cache_dir=tmp_path / "cache", **kw)


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------------------------------- prep_stats
def test_read_prep_stats(gpt_data, bert_data):
    info = read_prep_stats(gpt_data)
    assert (info.layout, info.seq_len, info.vocab_size, info.dtype) == ("gpt_packed", L, V, "uint16")
    assert info.is_causal and info.sample_len == L + 1
    assert info.split_samples("train") == N_TRAIN
    b = read_prep_stats(bert_data)
    assert not b.is_causal and b.sample_len == L and b.mask_id == 4 and b.pad_id == 0
    assert b.structural_ids == (0, 2, 3)  # pad, bos=cls, eos=sep; unk and mask are not structural


def test_prep_stats_errors_name_the_file(tmp_path, gpt_data):
    with pytest.raises(FileNotFoundError, match="m2train prep"):
        read_prep_stats(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prep_stats(tmp_path / "nowhere")
    stats = json.loads((gpt_data / "prep_stats.json").read_text())
    for mutate, pattern in [
        (lambda s: s.pop("layout"), r"prep_stats.json: missing key 'layout'"),
        (lambda s: s.update(layout="gpt"), "layout 'gpt' is not one of"),
        (lambda s: s.update(seq_len="16"), "'seq_len'"),
        (lambda s: s.update(vocab_size=70000), "uint16 cannot hold"),
        (lambda s: s["special_tokens"].update(eos=V), "special_tokens.eos"),
        (lambda s: s.update(layout="bert_doc", special_tokens={**s["special_tokens"], "mask": None}),
         "needs special_tokens.mask"),
    ]:
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        s = json.loads(json.dumps(stats))
        mutate(s)
        (bad / "prep_stats.json").write_text(json.dumps(s))
        with pytest.raises(ValueError, match=pattern) as e:
            read_prep_stats(bad)
        assert str(bad / "prep_stats.json") in str(e.value)
    (bad / "prep_stats.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_prep_stats(bad)


def test_missing_split_folder_names_the_path(tmp_path, gpt_data):
    cfg = DataConfig(path=str(gpt_data), val_split="validation")
    with pytest.raises(FileNotFoundError, match=str(gpt_data / "validation")):
        build_dataloader(cfg, split="val", cache_dir=tmp_path)


def test_world_layout_errors(gpt_data, tmp_path, monkeypatch):
    cfg = DataConfig(path=str(gpt_data))
    with pytest.raises(ValueError, match="WORLD_SIZE=1"):
        build_dataloader(cfg, dp_rank=1, dp_world=2, cache_dir=tmp_path)
    # 4 ranks, dp 2 (tp 2): rank 1 belongs to dp rank 0 when tensor-parallel ranks are innermost.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="RANK // 2 = 0"):
        build_dataloader(cfg, dp_rank=1, dp_world=2, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="initialise torch.distributed"):
        build_dataloader(cfg, dp_rank=0, dp_world=2, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------- batches
def test_gpt_batches_shift_and_content(gpt_data, tmp_path):
    ld = loader(gpt_data, tmp_path)
    assert len(ld) == N_TRAIN // B
    batches = take(ld, len(ld))
    seen = []
    for b in batches:
        assert set(b) == {"input_ids", "labels"}
        assert b["input_ids"].shape == b["labels"].shape == (B, L)
        assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
        # labels[:, t] is the token after input_ids[:, t]
        assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
        ids = sample_ids_of_batch(b, "gpt_packed", V)
        window = torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1)
        expect = torch.tensor(np.stack(gpt_id_samples(ids, L, V)), dtype=torch.int64)
        assert torch.equal(window, expect)
        seen += ids
    assert sorted(seen) == list(range(N_TRAIN))   # one epoch = every sample once
    assert seen != list(range(N_TRAIN))           # shuffled


def test_bert_batches_layout_and_masking_rules(bert_data, tmp_path):
    ld = loader(bert_data, tmp_path)
    for b in take(ld, len(ld)):
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        for v in b.values():
            assert v.shape == (B, L) and v.dtype == torch.int64
        ids = sample_ids_of_batch(b, "bert_doc", V)
        orig = torch.tensor(np.stack(bert_id_samples(ids, L, V)), dtype=torch.int64)
        assert torch.equal(b["attention_mask"], (orig != SPECIALS["pad"]).long())
        masked = b["labels"] != IGNORE_INDEX
        assert torch.equal(b["labels"][masked], orig[masked])
        assert torch.equal(b["input_ids"][~masked], orig[~masked])   # unselected positions untouched
        special = (orig == 0) | (orig == 2) | (orig == 3)
        assert not (masked & special).any()                           # never cls/sep/pad
        assert not (b["input_ids"][~special] == SPECIALS["pad"]).any()  # random tokens are never specials


def test_gpt_text_decodes_back(tmp_path):
    path, sp = make_text_dataset(tmp_path / "text", "gpt_packed", seq_len=24)
    ld = loader(path, tmp_path, shuffle=False, micro_batch_size=2, drop_last=False)
    stream = []
    for b in take(ld, len(ld)):
        for x, y in zip(b["input_ids"], b["labels"]):
            stream += x.tolist() + y[-1:].tolist()
    docs, cur = [], []
    for t in stream:
        if t == SPECIALS["eos"]:
            docs.append(sp.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert len(docs) >= len(TEXTS) - 1      # the partial last window (end of the last text) is dropped
    assert docs == TEXTS[:len(docs)]


def test_bert_text_decodes_back(tmp_path):
    path, sp = make_text_dataset(tmp_path / "text", "bert_doc", seq_len=96)
    ld = loader(path, tmp_path, split="val", micro_batch_size=2)
    (b,) = list(ld)
    orig = torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"])
    for row, mask, text in zip(orig, b["attention_mask"], TEXTS[:2]):
        ids = row[mask.bool()].tolist()
        assert ids[0] == SPECIALS["cls"] and ids[-1] == SPECIALS["sep"]
        assert sp.decode(ids[1:-1]) == text


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("layout", ["gpt_packed", "bert_doc"])
def test_exact_resume_mid_epoch_and_across_epoch_boundary(layout, workers, gpt_data, bert_data, tmp_path):
    path = gpt_data if layout == "gpt_packed" else bert_data
    per_epoch = N_TRAIN // B
    total = per_epoch + 10                                   # runs into epoch 1
    ref_loader = loader(path, tmp_path, workers=workers)
    ref = take(ref_loader, total)
    assert ref_loader.epoch == 1
    epoch0 = [i for b in ref[:per_epoch] for i in sample_ids_of_batch(b, layout, V)]
    epoch1 = [i for b in ref[per_epoch:] for i in sample_ids_of_batch(b, layout, V)]
    assert sorted(epoch0) == list(range(N_TRAIN)) and epoch1 != epoch0[:len(epoch1)]  # reshuffled

    for k in (7, per_epoch, per_epoch + 3):                  # mid epoch 0, at the boundary, mid epoch 1
        first = loader(path, tmp_path, workers=workers)
        assert_same_batches(take(first, k), ref[:k])
        state = json.loads(json.dumps(first.state_dict()))   # must survive a JSON checkpoint
        first.close()
        resumed = loader(path, tmp_path, workers=workers)
        resumed.load_state_dict(state)
        assert resumed.state_dict()["streaming"] == state["streaming"]   # round-trips before iterating
        assert_same_batches(take(resumed, total - k), ref[k:])
        resumed.close()


def test_order_and_masks_do_not_depend_on_worker_count(bert_data, tmp_path):
    a = take(loader(bert_data, tmp_path, workers=0), 30)
    b = take(loader(bert_data, tmp_path, workers=2), 30)
    assert_same_batches(a, b)


def test_resume_refuses_a_different_seed(bert_data, tmp_path):
    ld = loader(bert_data, tmp_path)
    take(ld, 2)
    other = loader(bert_data, tmp_path, seed=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(ld.state_dict())


def test_load_state_mid_iteration_restarts_from_the_state(gpt_data, tmp_path):
    ld = loader(gpt_data, tmp_path, workers=2)
    ref = take(ld, 10)
    ld2 = loader(gpt_data, tmp_path, workers=2)
    take(ld2, 3)
    state = ld2.state_dict()
    take(ld2, 4)                          # keep going, then rewind (e.g. a rollback to a checkpoint)
    ld2.load_state_dict(state)
    assert_same_batches(take(ld2, 7), ref[3:])


def test_seed_changes_order(gpt_data, tmp_path):
    a = [sample_ids_of_batch(x, "gpt_packed", V) for x in take(loader(gpt_data, tmp_path, seed=0), 5)]
    b = [sample_ids_of_batch(x, "gpt_packed", V) for x in take(loader(gpt_data, tmp_path, seed=1), 5)]
    assert a != b


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("workers", [0, 2])
def test_val_is_deterministic_and_restarts_each_pass(bert_data, tmp_path, workers):
    val = loader(bert_data, tmp_path, split="val", workers=workers)
    full = list(val)
    assert len(full) == len(val) == 3                      # 10 samples, micro batch 4, last batch kept
    ids = [i for b in full for i in sample_ids_of_batch(b, "bert_doc", V)]
    assert ids == list(range(10_000, 10_010))              # stored order, nothing dropped
    partial = take(iter(val), 2)                           # an evaluation of eval_batches=2 ...
    assert_same_batches(partial, full[:2])
    assert_same_batches(list(val), full)                   # ... and the next one starts over, same masks
    rate = (full[0]["labels"] != IGNORE_INDEX).sum() / (full[0]["attention_mask"].sum() - 2 * B)
    assert 0.0 < rate < 0.4


def test_train_and_val_loaders_live_side_by_side(gpt_data, bert_data, tmp_path):
    """Two loaders in one process (and a second pair on the same cache dir) do not collide in /dev/shm."""
    tr, va = loader(gpt_data, tmp_path, workers=2), loader(gpt_data, tmp_path, split="val", workers=2)
    tr2, va2 = loader(gpt_data, tmp_path), loader(gpt_data, tmp_path, split="val")
    assert len({tr.local_dir, va.local_dir, tr2.local_dir, va2.local_dir}) == 4
    for _ in range(3):
        assert_same_batches(take(tr, 4), take(tr2, 4))
        assert_same_batches(list(va), list(va2))


@pytest.mark.slow  # a subprocess that imports streaming: 10-50 s on a busy 2-core machine
def test_stale_shared_memory_of_a_killed_run_is_released(gpt_data, tmp_path):
    """A run killed without cleanup leaves /dev/shm entries naming its cache folder; the restarted run
    (same cache dir, same folder names) must start anyway, and release only those entries."""
    cache = tmp_path / "cache"
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from m2train.config import DataConfig\n"
        "from m2train.data import build_dataloader\n"
        f"ld = build_dataloader(DataConfig(path={str(gpt_data)!r}), cache_dir={str(cache)!r})\n"
        "next(ld)\n"
        "print(ld.local_dir, flush=True)\n"
        # SIGKILL the whole session, Python's shared-memory resource tracker included (as a node failure
        # or a preempted Slurm job does): no destructor or tracker gets to unlink anything.
        "import signal; os.killpg(0, signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         start_new_session=True)
    assert out.returncode == -9, out.stderr
    local_dir = out.stdout.strip().splitlines()[-1]
    from m2train.data import cache as cache_mod

    def registrations():
        hits = []
        for entry in os.listdir("/dev/shm"):
            if entry.endswith("_locals"):
                data = Path("/dev/shm", entry).read_bytes()
                if local_dir.encode() in data:
                    hits.append(entry)
        return hits

    assert registrations(), "the killed run should have left its registration behind"
    # A restarted process counts loaders from 0 again: same folder name as the killed run's.
    saved = cache_mod._build_counter
    cache_mod._build_counter = itertools.count(0)
    try:
        ld = build_dataloader(DataConfig(path=str(gpt_data)), cache_dir=cache)
    finally:
        cache_mod._build_counter = saved
    assert str(ld.local_dir) == local_dir
    assert len(take(ld, 3)) == 3
    assert len(registrations()) == 1                       # only the live loader's own registration


# ------------------------------------------------------------------------------------------- masking
def test_masking_statistics_and_determinism():
    vocab = 1000
    structural = (0, 2, 3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, vocab, size=(400, 128))
    tokens[:, 0] = 2
    tokens[:, 100:] = 0                                    # padding
    tokens[:, 99] = 3
    for p in (0.30, 0.15):
        m = MLMMasker(p, mask_id=4, vocab_size=vocab, structural_ids=structural, seed=7)
        inp, lab = zip(*(m(t, epoch=0, sample_id=i) for i, t in enumerate(tokens)))
        inp, lab = np.stack(inp), np.stack(lab)
        selected = lab != IGNORE_INDEX
        eligible = ~np.isin(tokens, structural)
        assert not (selected & ~eligible).any()
        assert (inp[~selected] == tokens[~selected]).all()
        n = selected.sum()
        assert abs(n / eligible.sum() - p) < 0.01, n / eligible.sum()
        frac_mask = (inp[selected] == 4).mean()
        frac_same = (inp[selected] == tokens[selected]).mean()
        frac_rand = 1 - frac_mask - frac_same
        assert abs(frac_mask - 0.8) < 0.02 and abs(frac_rand - 0.1) < 0.02 and abs(frac_same - 0.1) < 0.02
        assert not np.isin(inp[selected & (inp != 4)], structural).any()
    m = MLMMasker(0.3, 4, vocab, structural, seed=7)
    a = m(tokens[0], 3, 11)
    assert all(np.array_equal(x, y) for x, y in zip(a, m(tokens[0], 3, 11)))           # same triple
    for other in (m(tokens[0], 4, 11), m(tokens[0], 3, 12),
                  MLMMasker(0.3, 4, vocab, structural, seed=8)(tokens[0], 3, 11)):
        assert not np.array_equal(a[1], other[1])                                       # any change


def test_loader_masking_rates_and_epoch_dependence(bert_data, tmp_path):
    def rate(batches):
        sel = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        orig = [torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"]) for b in batches]
        eligible = sum(int((~((o == 0) | (o == 2) | (o == 3))).sum()) for o in orig)
        return sel / eligible

    per_epoch = N_TRAIN // B
    train = take(loader(bert_data, tmp_path), 2 * per_epoch)
    assert abs(rate(train) - 0.30) < 0.05
    low = take(loader(bert_data, tmp_path, mlm_probability=0.15), per_epoch)
    assert abs(rate(low) - 0.15) < 0.04

    # the same sample is masked differently in epoch 0 and epoch 1
    def by_id(batches):
        out = {}
        for b in batches:
            for i, row in zip(sample_ids_of_batch(b, "bert_doc", V), b["labels"]):
                out[i] = row
        return out
    e0, e1 = by_id(train[:per_epoch]), by_id(train[per_epoch:])
    assert sum(not torch.equal(e0[i], e1[i]) for i in e0) > N_TRAIN // 2


def test_bert_packed_has_no_padding(tmp_path):
    path = write_prepared(tmp_path / "packed", "bert_packed", L, V,
                          {"train": bert_id_samples(range(16), L, V, "bert_packed"),
                           "val": bert_id_samples(range(100, 104), L, V, "bert_packed")})
    ld = loader(path, tmp_path)
    for b in take(ld, len(ld)):
        assert (b["attention_mask"] == 1).all()
        assert sorted(sample_ids_of_batch(b, "bert_packed", V)) == sorted(set(sample_ids_of_batch(b, "bert_packed", V)))


def test_wrong_sample_length_is_a_clear_error(tmp_path):
    # prep_stats says seq_len 16 but the shards hold 12-token windows.
    path = write_prepared(tmp_path / "bad", "gpt_packed", L, V,
                          {"train": [s[:12] for s in gpt_id_samples(range(8), L, V)],
                           "val": gpt_id_samples(range(2), L, V)})
    with pytest.raises(ValueError, match=r"sample \d+ has \(12,\) tokens, expected \(17,\)"):
        next(loader(path, tmp_path))


# ------------------------------------------------------------------------------------------- cache, bench
def test_reused_cache_folder_follows_a_re_prepared_dataset(tmp_path, monkeypatch):
    """A restarted job reuses its cache folder names; if the dataset was prepared again in between, the
    stale decompressed shards must not be served (streaming never re-reads a cached index.json)."""
    from m2train.data import cache as cache_mod

    path = tmp_path / "data"
    write_prepared(path, "gpt_packed", L, V, {"train": gpt_id_samples(range(8), L, V),
                                              "val": gpt_id_samples(range(2), L, V)})
    monkeypatch.setattr(cache_mod, "_build_counter", itertools.count(0))
    first = loader(path, tmp_path, shuffle=False, micro_batch_size=8)
    assert sample_ids_of_batch(next(first), "gpt_packed", V) == list(range(8))
    first.close()
    del first
    import shutil
    shutil.rmtree(path)
    write_prepared(path, "gpt_packed", L, V, {"train": gpt_id_samples(range(50, 58), L, V),
                                              "val": gpt_id_samples(range(2), L, V)})
    monkeypatch.setattr(cache_mod, "_build_counter", itertools.count(0))
    again = loader(path, tmp_path, shuffle=False, micro_batch_size=8)
    assert sample_ids_of_batch(next(again), "gpt_packed", V) == list(range(50, 58))


def test_loader_throughput_measurement(gpt_data):
    from m2train.data.bench import main, measure_loader_throughput

    r = measure_loader_throughput(str(gpt_data), micro_batch_size=B, batches=30)   # crosses an epoch
    assert r["batches"] == 30 and r["samples"] == 30 * B and r["samples_per_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * L, rel=0.01)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


# ------------------------------------------------------------------------------------------- real prep output
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Datasets written by the real prep job (m2train.data_prep): several work units plus tail/."""
    from m2train.data_prep.prep import PrepConfig, run_prep
    from m2train.data_prep.sources import SourceSpec

    from data_fixtures import train_sentencepiece

    d = tmp_path_factory.mktemp("prep")
    _, proto = train_sentencepiece(TEXTS)
    (d / "tok.model").write_bytes(proto)
    docs = [f"Document {i}. {TEXTS[i % len(TEXTS)]} {TEXTS[(i * 7) % len(TEXTS)]}" for i in range(60)]
    for name, part in (("a", docs[:30]), ("b", docs[30:])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    out = {}
    for layout in ("gpt_packed", "bert_doc", "bert_packed"):
        run_prep(PrepConfig(source=SourceSpec(kind="jsonl", inputs=(str(d / "a.jsonl"), str(d / "b.jsonl"))),
                            tokenizer=str(d / "tok.model"), out=str(d / layout), layout=layout, seq_len=32,
                            val_fraction=0.1, workers=1, docs_per_unit=8, progress=False))
        out[layout] = d / layout
    return out, docs


@pytest.mark.parametrize("layout", ["gpt_packed", "bert_doc", "bert_packed"])
def test_loader_reads_real_prep_output(prepared, layout, tmp_path):
    import sentencepiece as spm

    paths, docs = prepared
    path = paths[layout]
    info = read_prep_stats(path)
    sp = spm.SentencePieceProcessor(model_file=str(Path(info.tokenizer_dir) / "tokenizer.model"))
    norm = lambda t: " ".join(t.split())
    texts = [norm(t) for t in docs]

    ld = loader(path, tmp_path, shuffle=False, drop_last=False)
    batches = take(ld, len(ld))
    assert sum(len(b["input_ids"]) for b in batches) == info.split_samples("train")
    eos, cls, sep = info.special_tokens["eos"], info.special_tokens["cls"], info.special_tokens["sep"]
    if layout == "gpt_packed":
        stream = [t for b in batches for x, y in zip(b["input_ids"], b["labels"]) for t in x.tolist() + y[-1:].tolist()]
        pieces = [norm(sp.decode(p)) for p in np.split(np.array(stream), np.flatnonzero(np.array(stream) == eos))]
        # Between two EOS: mostly a whole document; at a work-unit boundary the start of the unit's last
        # document (its rest went to tail/) runs into the next unit's first document.
        whole = [p for p in pieces[1:-1] if p in texts]
        assert len(set(whole)) == len(whole) >= info.splits["train"]["documents"] - 2 * info.stats["units"]
    else:
        for b in batches:
            orig = torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"])
            for row, m in zip(orig, b["attention_mask"]):
                ids = row[m.bool()].tolist()
                assert ids[0] == cls
                body = [t for t in ids[1:] if t != sep]
                if layout == "bert_doc":
                    assert ids[-1] == sep and norm(sp.decode(body)) in " ".join(texts)
                else:
                    assert (m == 1).all()

    # Shuffled, resumable, the whole split once per epoch.
    shuffled = loader(path, tmp_path, drop_last=False)
    ref = take(shuffled, len(shuffled) + 3)
    resumed = loader(path, tmp_path, drop_last=False)
    resumed.load_state_dict(json.loads(json.dumps((lambda l: (take(l, 5), l.state_dict())[1])(
        loader(path, tmp_path, drop_last=False)))))
    assert_same_batches(take(resumed, len(ref) - 5), ref[5:])


def test_split_that_disagrees_with_prep_stats_is_refused(tmp_path):
    path = write_prepared(tmp_path / "d", "gpt_packed", L, V, {"train": gpt_id_samples(range(8), L, V),
                                                               "val": gpt_id_samples(range(2), L, V)})
    stats = json.loads((path / "prep_stats.json").read_text())
    stats["splits"]["train"]["samples"] = 9
    (path / "prep_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"lists 8 samples but .*splits.train.samples = 9"):
        loader(path, tmp_path)


def test_relative_dataset_path(gpt_data, tmp_path, monkeypatch):
    monkeypatch.chdir(gpt_data.parent)
    ld = loader(Path(gpt_data.name), tmp_path, workers=2)
    assert sorted(i for b in take(ld, len(ld)) for i in sample_ids_of_batch(b, "gpt_packed", V)) == list(range(N_TRAIN))


def test_a_live_loaders_cache_folder_is_not_taken_over(gpt_data, tmp_path, monkeypatch):
    """Two jobs wrongly given one cache folder: the second is refused, naming the folder; the first keeps
    working."""
    from m2train.data import cache as cache_mod

    monkeypatch.setattr(cache_mod, "_build_counter", itertools.count(0))
    first = loader(gpt_data, tmp_path, workers=2)
    ref = take(first, 3)
    monkeypatch.setattr(cache_mod, "_build_counter", itertools.count(0))
    with pytest.raises(ValueError, match=f"cache folder {first.local_dir} is in use by a running loader"):
        loader(gpt_data, tmp_path)
    assert len(take(first, len(first))) == len(first)     # into the next epoch: new workers attach fine
    assert len(ref) == 3
