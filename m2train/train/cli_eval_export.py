"""`m2train eval` and `m2train export`: argument parsing and the JSON/console output around
m2train.train.evaluate.evaluate_checkpoint and m2train.train.export.export_checkpoint.
Heavy imports happen inside the handlers so that `m2train --help` stays fast."""

from __future__ import annotations

import json
import os
import sys

_CKPT_HELP = ("a checkpoint folder (CKPT_ROOT/step_NNNNNNNN), a checkpoint root (its latest complete "
              "checkpoint) or a run directory (RUN_DIR/checkpoints, latest)")
_VERIFY_HELP = ("how to check the checkpoint's files against its manifest before using them: sha256 "
                "(default; catches corruption), size (fast; catches truncation) or none")


def register_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a sharded checkpoint (perplexity for GPT, MLM loss/accuracy for BERT)",
        description="Evaluates a training checkpoint directly from its DeepSpeed shards, in any world size: "
                    "one CPU process, or every rank under torchrun / srun (each rank then reads its share "
                    "of the split and the token-weighted sums are all-reduced). Weights are consolidated "
                    "from the ZeRO partitions into the model the checkpoint's config describes; no "
                    "optimizer is built. Prints the metrics as one JSON object.")
    p.add_argument("checkpoint", help=_CKPT_HELP)
    p.add_argument("--data", default=None,
                   help="prepared dataset folder (m2train prep output; default: the checkpoint config's data.path)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="which split to evaluate (default val; train needs --batches: it is an endless stream)")
    p.add_argument("--batches", type=int, default=None,
                   help="batches per rank to evaluate (default: one full pass over the val split)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per batch (default: the run's train.micro_batch_size)")
    p.add_argument("--seed", type=int, default=None,
                   help="shuffle and masking seed (default: the run's train.seed)")
    p.add_argument("--mlm-probability", type=float, default=None,
                   help="BERT only: fraction of tokens masked (default: the run's data.eval_mlm_probability)")
    p.add_argument("--cache-dir", default=None,
                   help="node-local folder for decompressed shards (default: a temporary folder, removed after)")
    p.add_argument("--out", default=None, help="also write the JSON metrics to this file")
    p.add_argument("--verify", choices=("sha256", "size", "none"), default="sha256", help=_VERIFY_HELP)
    p.set_defaults(handler=run_eval)


def register_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as model.safetensors + config.json + tokenizer",
        description="Consolidates a sharded training checkpoint into a self-contained folder: "
                    "model.safetensors and config.json (load with "
                    "m2train.models.from_pretrained(OUT)), the tokenizer under OUT/tokenizer/ "
                    "(from --tokenizer, else DATA/tokenizer of the run's data.path, else RUN_DIR/tokenizer), "
                    "export.json (step, tokens seen, source checkpoint, tokenizer origin) and a short README.md.")
    p.add_argument("checkpoint", help=_CKPT_HELP)
    p.add_argument("out", help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or file to include instead of the run's")
    p.add_argument("--no-tokenizer", action="store_true", help="export the weights and config only")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the saved weights (default fp32: the exact master weights)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.add_argument("--verify", choices=("sha256", "size", "none"), default="sha256", help=_VERIFY_HELP)
    p.set_defaults(handler=run_export)


def _maybe_init_distributed() -> None:
    """Join the launcher's process group when started with several ranks (torchrun, srun, deepspeed)."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    if world > 1:
        from ..launch import init_distributed
        init_distributed()


def run_eval(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from ..checkpoint import CheckpointError
    from ..checkpoint import dist as cdist
    from .evaluate import evaluate_checkpoint

    _maybe_init_distributed()
    try:
        result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, batches=args.batches,
                                     batch_size=args.batch_size, seed=args.seed,
                                     mlm_probability=args.mlm_probability, cache_dir=args.cache_dir,
                                     verify=args.verify)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"m2train eval: {e}", file=sys.stderr)
        return 1
    if cdist.rank() == 0:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    return 0


def run_export(args) -> int:
    from ..checkpoint import CheckpointError
    from .export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer,
                                include_tokenizer=not args.no_tokenizer, dtype=args.dtype,
                                overwrite=args.overwrite, verify=args.verify)
    except (CheckpointError, ExportError) as e:
        print(f"m2train export: {e}", file=sys.stderr)
        return 1
    meta = json.loads((out / "export.json").read_text())
    print(f"exported step {meta['step']} ({meta['tokens_seen']} tokens) from {meta['source_checkpoint']} to {out}"
          + ("" if meta["tokenizer"] is None else f"; tokenizer from {meta['tokenizer']['source']}"))
    return 0


__all__ = ["register_eval", "register_export", "run_eval", "run_export"]
