"""`m2train train CONFIG [key=value ...]`: argument parsing and help text; the loop is in trainer.py."""

from __future__ import annotations

import argparse
from .signals import EXIT_CODE_TABLE

EPILOG = f"""\
launching:
  one process (no launcher):  m2train train m2_gpt_tiny data.path=runs/sample_data
  torchrun:                   torchrun --nproc-per-node 2 -m m2train train CONFIG parallel.zero_stage=2
  deepspeed launcher:         deepspeed --num_gpus 8 --module m2train train CONFIG ...
  Slurm:                      srun python -m m2train train CONFIG ...   (see slurm/)
  Rank and world size come from the launcher's environment; every run goes through a DeepSpeed engine
  (gloo on CPU, nccl on GPU).

model parallelism (M2-GPT / M2-BERT; data parallel = world / (tensor x context)):
  parallel.tensor_parallel=T   megatron-style TP over T contiguous ranks: mixer channels, GLU blocks and the
                               vocabulary are split; needs T | hidden_size, vocab_size and T even for
                               block-diagonal GLUs; ZeRO 0-2. Checkpoints hold one module file per TP rank
                               and resume only with the same T (export / eval merge them).
  parallel.sequence_parallel=true
                               with TP (M2-GPT, not with CP): between the TP regions each rank keeps only
                               its L/T positions (norms, dropout, residuals, the regions' inputs); needs
                               T | the sequence length. Same checkpoints as TP alone.
  parallel.context_parallel=C  sequences split over C ranks around the long convolutions (long contexts);
                               needs C | hidden_size / T and C | the sequence length.
  Both at once: T x C ranks per replica (TP innermost), e.g. 4 processes, T = C = 2:
    torchrun --nproc-per-node 4 -m m2train train CONFIG parallel.tensor_parallel=2 parallel.context_parallel=2

resuming:
  Rerun the same command: it resumes from the newest complete checkpoint under train.checkpoint_dir
  (default RUN_DIR/checkpoints) - step, tokens seen, model/optimizer, data-loader position and RNG - and
  drops metrics.jsonl records written after that checkpoint before appending. A different number of
  data-parallel ranks may resume a run (the data stream continues without repeats or gaps).

stopping:
  SIGTERM or SIGUSR1 on any rank: all ranks stop at the same step boundary, save a checkpoint and exit 3.
  train.time_budget_s=SECONDS does the same when one more step plus a save would exceed the budget
  (counted from process start; set it a few minutes below the job's time limit).

non-finite steps:
  A non-finite loss or gradient norm skips that update (no optimizer or schedule step; counted as
  skipped_steps in metrics.jsonl). train.max_nonfinite_steps in a row stop the run (exit 4), or with
  train.on_nonfinite=rollback reload the last checkpoint and continue with the next unseen batches.
  Testing aid: M2TRAIN_INJECT_NAN_STEPS=5,6 makes the loss NaN at steps 5 and 6 (once per process).

outputs (RUN_DIR = train.run_dir, default runs/NAME):
  config.yaml (resolved), metrics.jsonl (step, loss, lr, grad_norm, tokens_seen, tokens_per_s, mfu,
  skipped_steps, eval metrics), tb/ (TensorBoard), wandb/ (offline unless WANDB_API_KEY and
  train.wandb=online), checkpoints/step_NNNNNNNN/ + checkpoints/latest.

{EXIT_CODE_TABLE}
"""


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="pretrain an M2-GPT / M2-BERT (or baseline) with DeepSpeed; resumes automatically",
        description="Train the model CONFIG describes on a prepared dataset (data.path, written by "
                    "`m2train prep`). Any config key can be overridden as key=value (dotted, YAML values), "
                    "e.g. train.max_steps=200 parallel.zero_stage=2 train.precision=bf16. The config is "
                    "validated (batch layout, dataset shape vs model, intervals) before anything heavy runs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file, or a name under configs/ (e.g. m2_gpt_tiny)")
    p.add_argument("--check", action="store_true",
                   help="validate the config against the dataset and the launcher's world size, print the "
                        "resolved config and exit without training")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.max_steps=100")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.check:
        import yaml

        from ..config import to_plain
        from ..launch import detect_env
        from .trainer import prepare
        from .validate import resolve_batch
        prepare(cfg)
        resolve_batch(cfg, detect_env().world_size)
        print(yaml.safe_dump(to_plain(cfg), sort_keys=False), end="")
        return 0
    from .trainer import train
    return train(cfg)
