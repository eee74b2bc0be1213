"""Text generation with a causal LM (M2-GPT or the GPT baseline): greedy decoding or sampling with
temperature, top-k and nucleus (top-p) filtering, stopping at an end-of-sequence token.

By default the prompt is run once and every further token is one incremental decoding step
(m2train.models.decoding); `use_cache=False` instead runs the whole forward over the prefix for every token
(the reference the cached path is tested against, and what a model without decoding steps needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .gpt import CausalLM


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits.

    temperature 0 is greedy (argmax); otherwise the logits are divided by it, then only the top_k most
    likely tokens (0: all) and the smallest set whose probability reaches top_p (1.0: all) stay candidates."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """fp32 logits (B, V) scaled by 1/temperature, with the tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the most likely one always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token (B,) of each row of logits (B, V)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, sampling).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class Generation:
    """tokens (B, P + n): the prompts followed by n generated tokens; new_tokens[b]: row b's generated ids up
    to (not including) its end-of-sequence token; stopped[b]: "eos" or "length"."""

    tokens: torch.Tensor
    new_tokens: list[list[int]]
    stopped: list[str]


@torch.no_grad()
def generate(model: CausalLM, prompt_ids: torch.Tensor, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), eos_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_token: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Continue each row of prompt_ids (B, P) by up to max_new_tokens tokens. A row stops at eos_token_id;
    generation ends when every row has stopped (rows that stopped early are padded with eos_token_id in
    `tokens`). on_token, when given, is called with each step's tokens (B,) as they are picked (streaming
    output). The model runs in eval mode (restored afterwards); P + max_new_tokens may not exceed
    model.max_seq_len, since the filters (and positions) stop there."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"generation needs a causal LM (M2-GPT or GPT), not {type(model).__name__}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (batch, length) with length >= 1, got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, P = prompt_ids.shape
    limit = model.config.max_seq_len
    if P + max_new_tokens > limit:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds model.max_seq_len={limit}")
    vocab = model.config.vocab_size
    if int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= vocab:
        raise ValueError(f"prompt ids must be in 0..{vocab - 1} (model.vocab_size={vocab})")

    was_training = model.training
    model.eval()
    try:
        tokens = prompt_ids.to(model.lm_head_weight.device)
        state = model.new_decode_state(B, P + max_new_tokens) if use_cache else None
        logits = model.decode(tokens, state)[:, -1] if use_cache else model(tokens).logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for i in range(max_new_tokens):
            nxt = next_tokens(logits, sampling, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, eos_token_id)
                done |= nxt == eos_token_id
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if on_token is not None:
                on_token(nxt)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            logits = model.decode(nxt[:, None], state)[:, -1] if use_cache else model(tokens).logits[:, -1]
    finally:
        model.train(was_training)

    new_tokens, stopped = [], []
    for row in tokens[:, P:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            new_tokens.append(row[:row.index(eos_token_id)])
            stopped.append("eos")
        else:
            new_tokens.append(row)
            stopped.append("length")
    return Generation(tokens, new_tokens, stopped)


__all__ = ["SamplingConfig", "Generation", "generate", "filter_logits", "next_tokens"]
