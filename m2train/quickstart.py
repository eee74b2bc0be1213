"""`m2train quickstart`: the README's main job, end to end on the CPU with the real tools.

It runs, as separate commands (printed, so a user can rerun or adapt any of them):
  1. `m2train sample-data OUT/data`  - the embedded sample corpus (2,225 BBC News articles) written as
     C4-format json.gz, a sentencepiece tokenizer trained on it, and GPT-packed MDS shards;
  2. `m2train train CONFIG`          - the DeepSpeed trainer (one process, gloo) with periodic validation,
     metrics.jsonl and sharded checkpoints under OUT/run;
  3. `m2train eval OUT/run`          - perplexity of the final checkpoint on the validation split;
  4. `m2train export OUT/run OUT/model` - consolidated safetensors + config.json + tokenizer;
  5. `m2train generate OUT/model`   - the exported model continues two prompts (OUT/samples.jsonl).
Each step is a subprocess so that a failure points at the exact command, and every piece runs exactly as a
user would run it. Rerunning the quickstart reuses the prepared data and resumes training from its latest
checkpoint.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


# Openings in the style of the sample corpus (BBC News): what the tiny model has seen most of.
SAMPLE_PROMPTS = ("The government said", "Shares in the company")


def _run(cmd: list[str], what: str) -> None:
    print(f"\n[quickstart] {what}\n$ {shlex.join(cmd)}", flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"m2train quickstart: step failed ({what}, exit code {rc}): {shlex.join(cmd)}")


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_quickstart(args) -> int:
    out = Path(args.out).resolve()
    data_dir = out / "data"
    run_dir = out / "run"
    model_dir = out / "model"
    m2 = [sys.executable, "-m", "m2train"]
    t0 = time.time()

    prep = m2 + ["sample-data", str(data_dir), "--seq-len", str(args.seq_len)]
    if args.workers is not None:
        prep += ["--workers", str(args.workers)]
    _run(prep, "1/5 prepare the sample corpus (C4-format json.gz -> tokenizer -> MDS shards)")

    train = m2 + ["train", args.config, f"data.path={data_dir / 'gpt'}", f"train.run_dir={run_dir}"]
    if args.steps is not None:
        train += [f"train.max_steps={args.steps}"]
    train += list(args.overrides)
    _run(train, "2/5 train (DeepSpeed engine, one CPU process)")

    metrics_out = out / "eval.json"
    _run(m2 + ["eval", str(run_dir), "--data", str(data_dir / "gpt"), "--out", str(metrics_out)],
         "3/5 evaluate the final checkpoint on the validation split")
    _run(m2 + ["export", str(run_dir), str(model_dir), "--overwrite"],
         "4/5 export consolidated weights + config + tokenizer")
    _run(m2 + ["generate", str(model_dir), "--max-new-tokens", "40", "--out", str(out / "samples.jsonl")]
         + [arg for prompt in SAMPLE_PROMPTS for arg in ("--prompt", prompt)],
         "5/5 continue two prompts with the exported model (incremental decoding)")

    records = _read_metrics(run_dir / "metrics.jsonl")
    evals = json.loads(metrics_out.read_text()) if metrics_out.is_file() else {}
    vals = [r for r in records if "val_loss" in r]
    print("\n[quickstart] summary")
    if records:
        print(f"  train loss: {records[0]['loss']:.3f} (step {records[0]['step']}) -> "
              f"{records[-1]['loss']:.3f} (step {records[-1]['step']})")
    for r in vals:
        print(f"  step {r['step']:>5}: val loss {r['val_loss']:.3f}")
    final_loss = evals.get("loss")
    if final_loss is not None:
        print(f"  final checkpoint: val loss {final_loss:.3f}, perplexity {evals.get('perplexity', float('nan')):.1f}")
    print(f"  metrics: {run_dir / 'metrics.jsonl'}\n  samples: {out / 'samples.jsonl'}\n  model:   {model_dir}  "
          f"(m2train.models.from_pretrained('{model_dir}'))\n  wall clock: {time.time() - t0:.0f} s")
    if not records or final_loss is None:
        print("m2train quickstart: no training metrics or evaluation found", file=sys.stderr)
        return 1
    if final_loss >= records[0]["loss"]:
        print(f"m2train quickstart: validation loss {final_loss:.3f} did not fall below the first training "
              f"loss {records[0]['loss']:.3f}", file=sys.stderr)
        return 1
    return 0
