"""`m2train tokenizer train`: train a sentencepiece tokenizer on a deterministic sample of a source.

Kept free of torch imports so `m2train --help` stays fast."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

from .sources import KINDS, DataError, SourceFile, SourceSpec, discover_files, read_documents

log = logging.getLogger(__name__)

META_FILE = "tokenizer_meta.json"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the meaningless ones of required or flag options."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, [], False):
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    """Add `tokenizer` (with its `train` subcommand) to the `m2train` subcommands."""
    p = subparsers.add_parser(
        "tokenizer", help="train a sentencepiece tokenizer on a sample of C4 / PILE / jsonl / text / HF data",
        description="Tokenizer tools. `m2train tokenizer train` trains a sentencepiece model (BPE or "
                    "unigram, byte fallback, ids pad 0, unk 1, bos/[CLS] 2, eos/[SEP] 3, [MASK] 4) on a "
                    "deterministic sample of a source. A trained DIR, or any local Hugging Face tokenizer "
                    "directory (GPT-2 vocab.json + merges.txt, bert-base-uncased vocab.txt, tokenizer.json), "
                    "can then be given to `m2train prep --tokenizer`.")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = sub.add_parser(
        "train", help="train a sentencepiece model on a sample of a source",
        formatter_class=_HelpFormatter,
        description="Samples documents from the source deterministically (files in a seeded order, an "
                    "equal share of documents from the start of each file, topped up from files that "
                    "have more when some run short), trains sentencepiece on them, and writes "
                    f"OUT/tokenizer.model plus OUT/{META_FILE} (vocab size, model type, sample size, "
                    "skipped documents by reason, sha256 of the source file list and of the model). "
                    "Bad documents (malformed JSON, invalid UTF-8, missing/empty text, oversized, "
                    "truncated files) are skipped and counted, as in `m2train prep`.")
    add_source_arguments(t)
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument("--vocab-size", type=int, default=32000,
                   help="number of pieces, special and byte-fallback pieces included")
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece algorithm")
    t.add_argument("--sample-docs", type=int, default=200_000,
                   help="documents to train on (fewer if the source has fewer good documents)")
    t.add_argument("--normalization", choices=("identity", "nfkc", "nmt_nfkc"), default="identity",
                   help="identity keeps text exactly (newlines, spaces); nfkc adds Unicode NFKC; "
                        "nmt_nfkc also folds whitespace runs and newlines into single spaces")
    t.add_argument("--seed", type=int, default=0, help="seed of the file order used for sampling")
    t.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="sentencepiece trainer threads")
    t.add_argument("--overwrite", action="store_true", help="replace an existing OUT/tokenizer.model")
    t.set_defaults(handler=run_train)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The options that describe a source (--source, --input, --text-field, --pile-include,
    --pile-exclude, --max-doc-bytes); shared by every command that reads raw documents."""
    p.add_argument("--source", required=True, choices=KINDS,
                   help="input format: c4 (json/json.gz lines with text, timestamp, url), pile (jsonl/"
                        "jsonl.zst with text and meta.pile_set_name), jsonl (any JSON lines, see "
                        "--text-field), text (one document per .txt file), hf (a local Hugging Face "
                        "dataset folder: save_to_disk .arrow files, parquet or json files)")
    p.add_argument("--input", required=True, action="append", metavar="PATH_OR_GLOB",
                   help="input file, directory or glob, e.g. 'c4/en/c4-train.*.json.gz' (quote globs); "
                        "repeat for several")
    p.add_argument("--text-field", default="text", help="field holding the document (jsonl, hf)")
    p.add_argument("--pile-include", action="append", default=[], metavar="SUBSET",
                   help="only PILE documents whose meta.pile_set_name is SUBSET (repeatable)")
    p.add_argument("--pile-exclude", action="append", default=[], metavar="SUBSET",
                   help="skip PILE documents whose meta.pile_set_name is SUBSET (repeatable)")
    p.add_argument("--max-doc-bytes", type=int, default=10_000_000,
                   help="skip documents larger than this many UTF-8 bytes")


def source_spec_from_args(args) -> SourceSpec:
    """The SourceSpec that add_source_arguments' options describe."""
    return SourceSpec(args.source, tuple(args.input), text_field=args.text_field,
                      pile_include=tuple(args.pile_include), pile_exclude=tuple(args.pile_exclude),
                      max_doc_bytes=args.max_doc_bytes)


def sample_documents(spec: SourceSpec, files: list[SourceFile], n_docs: int,
                     seed: int = 0, progress=None) -> tuple[list[str], Counter]:
    """Up to `n_docs` good documents spread over all files, deterministically.

    Files are visited in a seeded order; each gets an equal share of what is still needed, taken
    from its start (C4 and PILE files are shuffled already). Rounds repeat over the files that
    filled their share until enough documents are found or every file is used up. Returns the
    documents and the count of documents read by outcome ("good" or a skip reason)."""
    order = list(files)
    random.Random(seed).shuffle(order)
    next_index = {f.path: 0 for f in order}
    docs: list[str] = []
    counts: Counter = Counter()
    active = order
    while active and len(docs) < n_docs:
        quota = max(1, math.ceil((n_docs - len(docs)) / len(active)))
        still = []
        for f in active:
            if len(docs) >= n_docs:
                still.append(f)
                break
            taken = 0
            it = read_documents(spec, f, start=next_index[f.path])
            for i, text, reason in it:
                next_index[f.path] = i + 1
                counts[reason or "good"] += 1
                if text is None:
                    continue
                docs.append(text)
                taken += 1
                if progress is not None:
                    progress.update(1)
                if taken >= quota or len(docs) >= n_docs:
                    still.append(f)      # may have more: visit again if others run short
                    break
            it.close()
        active = still if len(docs) < n_docs else []
    return docs, counts


def sources_sha256(files: list[SourceFile]) -> str:
    """Hash of the source file list (paths relative to their common folder, and sizes), so moving the
    data elsewhere keeps the identity."""
    paths = [f.path for f in files]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    listing = [[os.path.relpath(f.path, root), f.bytes] for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def run_train(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _train(args)
    except DataError as e:
        print(f"m2train tokenizer train: error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .sentencepiece_tokenizer import train_sentencepiece
    from .tokenizers import load_tokenizer

    if args.vocab_size < 300:
        # 256 byte-fallback pieces + 5 specials must fit, with room left for real pieces.
        raise DataError(f"--vocab-size {args.vocab_size} is too small (byte fallback alone needs 261)")
    if args.sample_docs < 1:
        raise DataError("--sample-docs must be at least 1")
    out = Path(args.out)
    model_path = out / "tokenizer.model"
    if model_path.exists() and not args.overwrite:
        raise DataError(f"{model_path} exists; pass --overwrite to replace it")
    spec = source_spec_from_args(args)
    files = discover_files(spec)
    total_bytes = sum(f.bytes for f in files)
    print(f"source: {args.source}, {len(files)} file(s), {total_bytes / 1e6:.1f} MB")

    t0 = time.time()
    # Per-file skip warnings go through tqdm so they do not tear the progress bar.
    with logging_redirect_tqdm(), tqdm(total=args.sample_docs, desc="sampling documents", unit="doc",
                                       unit_scale=True) as bar:
        docs, counts = sample_documents(spec, files, args.sample_docs, args.seed, progress=bar)
    skipped = {r: c for r, c in sorted(counts.items()) if r != "good"}
    if not docs:
        raise DataError(f"no valid document in {', '.join(args.input)} "
                        f"({sum(skipped.values())} read, skipped: {skipped or 'none'})")
    sample_bytes = sum(len(d.encode("utf-8")) for d in docs)
    t_sample = time.time() - t0
    print(f"sampled {len(docs):,} documents ({sample_bytes / 1e6:.1f} MB) in {t_sample:.1f}s"
          + (f"; skipped {sum(skipped.values()):,} ({', '.join(f'{r}={c}' for r, c in skipped.items())})"
             if skipped else ""))

    t1 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.model.tmp"
    train_sentencepiece(docs, tmp, vocab_size=args.vocab_size, model_type=args.model_type,
                        normalization=args.normalization, num_threads=max(1, args.threads))
    os.replace(tmp, model_path)     # a half-written model never sits under the final name
    t_train = time.time() - t1
    tok = load_tokenizer(out)

    # Compression on (at most) 2,000 sampled documents: a quick check that the model is sensible.
    probe = docs[:2000]
    n_tokens = sum(len(ids) for ids in tok.encode_batch(probe))
    probe_bytes = sum(len(d.encode("utf-8")) for d in probe)
    meta = {
        "format_version": 1,
        "created_by": "m2train tokenizer train",
        "kind": "sentencepiece",
        "model_type": args.model_type,
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": args.vocab_size,
        "normalization": args.normalization,
        "byte_fallback": True,
        "special_tokens": tok.special_tokens,
        "sha256": tok.sha256(),
        "sample": {"documents": len(docs), "bytes": sample_bytes, "seed": args.seed,
                   "read": sum(counts.values()), "skipped": skipped},
        "source": {"kind": args.source, "inputs": list(args.input), "text_field": args.text_field,
                   "pile_include": list(args.pile_include), "pile_exclude": list(args.pile_exclude),
                   "max_doc_bytes": args.max_doc_bytes, "files": len(files),
                   "bytes": total_bytes, "files_sha256": sources_sha256(files)},
        "bytes_per_token": round(probe_bytes / max(1, n_tokens), 3),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    note = "" if tok.vocab_size == args.vocab_size else \
        f" (asked for {args.vocab_size}: the sample is too small for more pieces)"
    print(f"trained sentencepiece {args.model_type}: {tok.vocab_size:,} pieces{note} in {t_train:.1f}s; "
          f"{probe_bytes / max(1, n_tokens):.2f} bytes/token on {len(probe):,} sampled documents")
    print(f"wrote {model_path} and {out / META_FILE} (sha256 {tok.sha256()[:16]}…)")
    return 0
