"""The README's first command: `m2train quickstart` prepares the sample corpus, trains, evaluates, exports."""

import json

import pytest
import torch

from m2train.cli import main


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--steps", "30", "--out", str(out), "train.log_every=5", "train.eval_every=15",
               "train.save_every=15", "train.warmup_steps=5", "train.eval_batches=4"])
    assert rc == 0                      # 0 only if the final validation loss fell below the first loss
    records = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 31, 5))
    assert records[-1]["loss"] < records[0]["loss"]
    evals = json.loads((out / "eval.json").read_text())
    assert evals["loss"] < records[0]["loss"]
    assert (out / "run" / "checkpoints" / "latest").is_file()

    from m2train.models import from_pretrained
    model = from_pretrained(out / "model").eval()
    assert (out / "model" / "tokenizer").is_dir()
    ids = torch.randint(5, 100, (1, 16))
    assert torch.isfinite(model(ids).logits).all()
    # Step 5: the exported model continued both prompts with real text (tokenizer round trip included).
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["The government said", "Shares in the company"]
    for s in samples:
        assert s["new_tokens"] and s["completion"].strip() and s["stopped"] in ("eos", "length")
        assert len(s["new_tokens"]) <= 40 and all(0 <= t < model.config.vocab_size for t in s["new_tokens"])

    # A rerun reuses the prepared data and the finished run (resumes at max_steps: nothing to train).
    rc = main(["quickstart", "--steps", "30", "--out", str(out), "train.log_every=5", "train.eval_every=15",
               "train.save_every=15", "train.warmup_steps=5", "train.eval_batches=4"])
    assert rc == 0
    again = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [r["step"] for r in records]


def test_quickstart_help_names_every_step(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quickstart", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("sample-data", "m2train train", "m2train eval", "m2train export", "m2train generate"):
        assert word in text
