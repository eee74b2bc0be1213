"""`m2train generate`: continue text prompts with a trained causal LM (M2-GPT or the GPT baseline), from an
exported model folder or straight from a sharded training checkpoint. Heavy imports happen in the handler
so that `m2train --help` stays fast."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_DTYPES = ("auto", "fp32", "bf16", "fp16", "fp64")


class GenerateError(RuntimeError):
    """Bad input for `m2train generate`; the message says what to change."""


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue text prompts with a trained M2-GPT / GPT (export folder or checkpoint)",
        description="Loads MODEL - an `m2train export` folder (model.safetensors + config.json, tokenizer/) or a "
                    "training checkpoint (a step_* folder, a checkpoint root or a run directory; its tokenizer "
                    "is found as `m2train export` finds it) - tokenizes each prompt and continues it. The prompt "
                    "runs once; every further token is one incremental decoding step (the mixers keep their "
                    "short-conv tails and long-conv histories, a transformer its keys and values), so a token "
                    "costs O(context) instead of a whole forward. Greedy with --temperature 0, else sampling "
                    "with temperature, top-k and top-p. A prompt is preceded by the end-of-text token, as every "
                    "document in the packed training data is (--no-eos-prefix: not), and a continuation stops "
                    "at that token. Prints each prompt with its continuation, or JSON lines with --json; the "
                    "speed goes to stderr.")
    p.add_argument("model", help="an m2train export folder, or a checkpoint folder / root / run directory")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeat for several); an empty prompt generates from the end-of-text token alone")
    p.add_argument("--prompt-file", default=None, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per continuation (default 64)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="continuations per prompt, generated as one batch (default 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all (default 50)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="sample among the most likely tokens that together reach this probability (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): same seed, same text")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="compute dtype (default auto: the export's saved dtype, fp32 for a checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or file to use instead of the model's")
    p.add_argument("--no-eos-prefix", action="store_true", help="do not put the end-of-text token before prompts")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole prefix for every token instead of decoding incrementally (slow; "
                        "for checking)")
    p.add_argument("--json", action="store_true", help="print one JSON object per continuation")
    p.add_argument("--out", default=None, help="also write the continuations to this file as JSON lines")
    p.add_argument("--verify", choices=("sha256", "size", "none"), default="sha256",
                   help="checkpoint files check against the manifest (sha256 default, size, none)")
    p.set_defaults(handler=run_generate)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise GenerateError(f"--prompt-file {path}: not a file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise GenerateError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def load_model_and_tokenizer(source: str, dtype: str = "auto", device: str = "cpu", tokenizer: str | None = None,
                             verify: str = "sha256"):
    """(causal LM in eval mode on `device`, tokenizer) from an export folder or a training checkpoint."""
    import torch

    from .checkpoint.consolidate import load_model_from_checkpoint, resolve_checkpoint
    from .data_prep.tokenizers import load_tokenizer
    from .models.gpt import CausalLM
    from .models.pretrained import CONFIG_NAME, WEIGHTS_NAME, from_pretrained
    from .train.export import DTYPES, find_tokenizer

    torch_dtype = {**DTYPES, "auto": None, "fp64": torch.float64}[dtype]
    path = Path(source)
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        model = from_pretrained(path, map_location=device, dtype=torch_dtype)
        tok_path = Path(tokenizer) if tokenizer else path / "tokenizer"
        if not tok_path.exists():
            raise GenerateError(f"{path}: exported without a tokenizer; pass --tokenizer")
    else:
        ckpt = resolve_checkpoint(path, verify)
        model, manifest = load_model_from_checkpoint(ckpt, dtype=torch_dtype or torch.float32)
        model.to(device)
        tok_path = find_tokenizer(manifest, ckpt, tokenizer)[0]
    if not isinstance(model, CausalLM):
        cfg = model.config
        raise GenerateError(f"{source}: holds a {cfg.arch} model with a {cfg.head} head; generation needs a "
                            "causal LM (m2_gpt or gpt)")
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > model.config.vocab_size:
        raise GenerateError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model only "
                            f"{model.config.vocab_size}: not the tokenizer it was trained with")
    return model, tok


def _completion_text(tok, prompt_ids: list[int], new_ids: list[int], prompt_text: str | None = None) -> str:
    """The text the new tokens add after the prompt. Decoding them alone would lose what depends on the
    token before (sentencepiece drops the leading space of a sequence's first word), so the prompt and its
    continuation are decoded together and the prompt's own text (`prompt_text`: tok.decode(prompt_ids),
    decoded here unless given) is cut off."""
    if prompt_ids:
        before = tok.decode(prompt_ids) if prompt_text is None else prompt_text
        whole = tok.decode(prompt_ids + new_ids)
        if whole.startswith(before):
            return whole[len(before):]
    return tok.decode(new_ids)


class _TextStream:
    """Prints a single continuation's text as its tokens arrive. Only text that the next tokens cannot change
    is printed: a prefix of the decoded continuation so far without its trailing replacement marks (a
    byte-fallback character split over tokens decodes to such marks until its last byte arrives); the caller
    prints whatever is left once the continuation is complete."""

    def __init__(self, tok, prompt_ids: list[int], eos: int | None):
        self.tok, self.prompt_ids, self.eos = tok, prompt_ids, eos
        self.prompt_text = tok.decode(prompt_ids)        # the same for every token: decoded once
        self.new: list[int] = []
        self.shown = ""
        self.done = False

    def __call__(self, step_tokens) -> None:
        token = int(step_tokens[0])
        if self.done or token == self.eos:
            self.done = True
            return
        self.new.append(token)
        text = _completion_text(self.tok, self.prompt_ids, self.new, self.prompt_text)
        safe = text.rstrip("\ufffd")        # (an incomplete character may decode to one mark per byte)
        if safe.startswith(self.shown) and len(safe) > len(self.shown):
            print(safe[len(self.shown):], end="", flush=True)
            self.shown = safe


def run_generate(args) -> int:
    try:
        return _generate(args)
    except Exception as e:  # noqa: BLE001 - known user errors get one line; anything else keeps its traceback
        from .checkpoint import CheckpointError
        from .data_prep.tokenizers import TokenizerError
        from .models.pretrained import PretrainedFormatError
        from .train.export import ExportError

        if isinstance(e, (GenerateError, CheckpointError, TokenizerError, PretrainedFormatError, ExportError,
                          ValueError)):
            print(f"m2train generate: {e}", file=sys.stderr)
            return 1
        raise


def _generate(args) -> int:
    import torch

    from .models.generation import SamplingConfig, generate

    prompts = _read_prompts(args)
    if args.num_samples < 1:
        raise GenerateError(f"--num-samples must be >= 1, got {args.num_samples}")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(args.model, args.dtype, device, args.tokenizer, args.verify)
    eos = tok.special_tokens.get("eos")
    generator = torch.Generator(device=device).manual_seed(args.seed)

    records = []
    total_new, t_start = 0, time.perf_counter()
    for i, (text, body) in enumerate(zip(prompts, tok.encode_batch(prompts))):
        ids = [eos] + body if eos is not None and not args.no_eos_prefix else body
        if not ids:
            raise GenerateError(f"prompt {i + 1} is empty and the tokenizer has no end-of-text token to start from")
        batch = torch.tensor([ids] * args.num_samples, dtype=torch.long)
        # One continuation in plain text is printed as it is generated; several, or JSON, once complete.
        stream = None if args.json or args.num_samples > 1 else _TextStream(tok, body, eos)
        if stream is not None:
            print(f"=== prompt {i + 1}, sample 1 ===\n{text}", end="", flush=True)
        out = generate(model, batch, args.max_new_tokens, sampling, eos_token_id=eos, generator=generator,
                       use_cache=not args.no_cache, on_token=stream)
        for s, (new, stopped) in enumerate(zip(out.new_tokens, out.stopped)):
            total_new += len(new) + (stopped == "eos")
            completion = _completion_text(tok, body, new)
            records.append({"prompt_index": i, "sample": s, "prompt": text, "completion": completion,
                            "prompt_tokens": len(ids), "new_tokens": new, "stopped": stopped})
            if args.json:
                print(json.dumps(records[-1]), flush=True)
                continue
            if stream is None:
                print(f"=== prompt {i + 1}, sample {s + 1} ===\n{text}", end="")
            shown = stream.shown if stream is not None else ""
            # (Should decoding ever have rewritten text already shown, the whole continuation follows.)
            print(completion[len(shown):] if completion.startswith(shown) else "\n" + completion)
            print(f"[{len(new)} new tokens, stopped at {stopped}]", flush=True)
    seconds = time.perf_counter() - t_start
    if args.out is not None:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"m2train generate: {total_new} tokens in {seconds:.2f} s ({total_new / max(seconds, 1e-9):.1f} tokens/s, "
          f"{'full recompute' if args.no_cache else 'incremental decoding'}, {device}, "
          f"{str(model.lm_head_weight.dtype).replace('torch.', '')})", file=sys.stderr)
    return 0


__all__ = ["register", "run_generate", "load_model_and_tokenizer", "GenerateError"]
