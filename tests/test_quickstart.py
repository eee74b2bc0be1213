"""The README's first command: `m2train quickstart` trains a tiny M2-GPT on real text and improves."""

import json

import pytest
import torch

from m2train.cli import main


@pytest.mark.slow
def test_quickstart_trains_on_bundled_corpus(tmp_path):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--steps", "40", "--eval-every", "20", "--val-windows", "32",
               "--batch-size", "8", "--out", str(out)])
    assert rc == 0                                 # 0 only if validation loss improved
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s"} <= set(records[0])
    assert "val_loss" in records[19] and "val_loss" in records[39]
    assert records[39]["val_loss"] < records[0]["loss"]
    from m2train.models.pretrained import from_pretrained
    model = from_pretrained(out / "model").eval()
    ids = torch.randint(1, 100, (1, 16))
    assert torch.isfinite(model(ids).logits).all()


def test_quickstart_on_a_user_jsonl_corpus(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    text = "The quick brown fox jumps over the lazy dog. " * 20
    corpus.write_text("\n".join(json.dumps({"text": f"{i} {text}"}) for i in range(60)))
    rc = main(["quickstart", "--corpus", str(corpus), "--steps", "12", "--eval-every", "6",
               "--batch-size", "4", "--seq-len", "32", "--out", str(tmp_path / "o"),
               "model.vocab_size=300", "model.num_layers=1"])
    assert rc == 0


def test_quickstart_rejects_bad_corpus(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(SystemExit) as e:
        main(["quickstart", "--corpus", str(corpus), "--out", str(tmp_path / "o")])
    assert "bad.jsonl:2" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["quickstart", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert "not found" in str(e.value)
