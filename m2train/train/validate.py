"""Checks that need more than one config section (or the dataset): run before any heavy work, and every
message names the key to change."""

from __future__ import annotations

from ..config import Config, ConfigError
from ..parallel import check_parallel_config

GPT_LAYOUTS = ("gpt_packed",)
BERT_LAYOUTS = ("bert_doc", "bert_packed")


def resolve_batch(cfg: Config, world_size: int) -> int:
    """Fill in train.grad_accum_steps / train.global_batch_size so that
    global = micro_batch_size x data-parallel size x grad_accum_steps, or explain which key is wrong.
    Returns the data-parallel size."""
    t = cfg.train
    dp = check_parallel_config(cfg, world_size)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size is None and t.grad_accum_steps is None:
        t.grad_accum_steps = 1
    if t.global_batch_size is None:
        t.global_batch_size = per_step * t.grad_accum_steps
    elif t.grad_accum_steps is None:
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel size ({dp}) = {per_step}; change one of them "
                f"(or set train.grad_accum_steps instead)")
        t.grad_accum_steps = t.global_batch_size // per_step
    elif t.global_batch_size != per_step * t.grad_accum_steps:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} != train.micro_batch_size ({t.micro_batch_size}) "
            f"x data-parallel size ({dp}) x train.grad_accum_steps ({t.grad_accum_steps}) = "
            f"{per_step * t.grad_accum_steps}; give only one of global_batch_size / grad_accum_steps, or make "
            f"them agree")
    return dp


def check_intervals(cfg: Config) -> None:
    t = cfg.train
    if t.warmup_steps > t.max_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.max_steps={t.max_steps}")
    for key in ("log_every", "eval_every", "save_every"):
        v = getattr(t, key)
        if v > t.max_steps:
            raise ConfigError(f"train.{key}={v} exceeds train.max_steps={t.max_steps}: it would never run "
                              f"(use 0 to disable eval/save, or a smaller interval)")
    if t.eval_every and t.eval_batches < 1:
        raise ConfigError(f"train.eval_batches must be >= 1 when train.eval_every={t.eval_every} > 0")
    if cfg.data.path is None:
        raise ConfigError("data.path: no dataset given; point it at a folder written by `m2train prep` "
                          "(or `m2train sample-data OUT`), e.g. data.path=runs/sample_data")


def check_data_compat(cfg: Config, info) -> None:
    """The model config against the dataset's prep_stats.json (a DatasetInfo)."""
    m = cfg.model
    where = f"{cfg.data.path}/prep_stats.json"
    if m.is_causal and info.layout not in GPT_LAYOUTS:
        raise ConfigError(f"data.path: {where} has layout {info.layout!r}, but model.arch={m.arch!r} "
                          f"trains on GPT windows (layout 'gpt_packed')")
    if not m.is_causal and info.layout not in BERT_LAYOUTS:
        raise ConfigError(f"data.path: {where} has layout {info.layout!r}, but model.arch={m.arch!r} "
                          f"trains with masked LM on 'bert_doc' or 'bert_packed' data")
    if not m.is_causal and m.head != "mlm":
        raise ConfigError(f"model.head={m.head!r}: pretraining needs the 'mlm' head")
    # GPT windows hold seq_len + 1 tokens (inputs and shifted labels): the model sees seq_len.
    if info.seq_len > m.max_seq_len:
        raise ConfigError(f"model.max_seq_len={m.max_seq_len} is shorter than the data's seq_len "
                          f"{info.seq_len} ({where}); raise model.max_seq_len or re-prepare the data")
    if info.vocab_size > m.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocab_size "
                          f"{info.vocab_size} ({where})")
    if not m.is_causal:
        mask = (info.special_tokens or {}).get("mask")
        if mask is None:
            raise ConfigError(f"data.path: {where} names no 'mask' special token; masked-LM training needs one")
        pad = (info.special_tokens or {}).get("pad")
        if pad is not None and pad != m.pad_token_id:
            raise ConfigError(f"model.pad_token_id={m.pad_token_id} differs from the data's pad id {pad} "
                              f"({where})")
