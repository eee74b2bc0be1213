"""`m2train sample-data`: the embedded BBC News sample, from raw files to a loadable dataset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sample_data_builds_and_is_reused(tmp_path):
    out = tmp_path / "sample"
    r = subprocess.run([sys.executable, "-m", "m2train", "sample-data", str(out), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    stats = json.loads((out / "gpt" / "prep_stats.json").read_text())
    assert stats["layout"] == "gpt_packed" and stats["seq_len"] == 256 and stats["vocab_size"] == 2048
    assert stats["documents"]["read"] == stats["documents"]["written"] == 2225     # every BBC article
    assert stats["splits"]["train"]["samples"] == result["gpt_packed"]["train_samples"] > 5000
    assert stats["splits"]["val"]["samples"] > 0
    assert len(list((out / "raw" / "c4").glob("*.json.gz"))) == 4
    assert len(list((out / "raw" / "pile").glob("*.jsonl.zst"))) == 2
    # Idempotent: a second call reuses everything (no file rewritten) and adds a requested layout.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    from m2train.data_prep.sample_data import make_sample_data

    again = make_sample_data(out, layouts=("gpt_packed", "bert_doc"), progress=False)
    assert again["gpt_packed"] == result["gpt_packed"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    doc = json.loads((out / "bert_doc" / "prep_stats.json").read_text())
    assert doc["splits"]["train"]["samples"] == doc["splits"]["train"]["documents"]
