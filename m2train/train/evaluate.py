"""Validation metrics, summed correctly over data-parallel ranks.

    metrics = evaluate(model, loader, max_batches=20)

GPT (causal LM): {"loss", "perplexity", "tokens", "batches"} - loss is the mean next-token cross-entropy
over every labelled token of every rank (labels != -100), perplexity = exp(loss).
BERT (masked LM): {"loss", "mlm_loss", "mlm_accuracy", "tokens", "batches"} over the masked positions
(labels > 0, the model's own convention), tokens = masked positions counted.

Sums (not means) of loss, token count and correct predictions are all-reduced, so ranks with different
numbers of tokens (BERT masks a random count) are weighted by tokens, not averaged as means of means.
Works on a plain nn.Module or a DeepSpeed engine (its .module is used), runs under no_grad in eval mode
and puts back the mode it found.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # A DeepSpeed engine is itself an nn.Module whose forward does bookkeeping; evaluate its model.
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _is_causal(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "is_causal"):
        raise TypeError(f"evaluate needs an m2train model (with .config.is_causal); got {type(model).__name__}")
    return bool(cfg.is_causal)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[dict], max_batches: Optional[int] = None,
             group=None, autocast_dtype: Optional[torch.dtype] = None, progress: bool = False) -> dict:
    """Metrics of `model` over at most `max_batches` batches of `loader` on this rank (all of it when
    None), reduced over `group` (default: the whole world, when a process group is initialised).
    autocast_dtype: run the forward under torch.autocast with this dtype (losses are always fp32).
    progress: show a tqdm bar (for long command-line evaluations; the trainer leaves it off)."""
    net = _unwrap(model)
    causal = _is_causal(net)
    # A tensor-parallel model returns its vocab shard of the logits: gather them (TP peers then compute the
    # same sums, counted once below). A context-parallel model takes and returns this rank's sequence chunk.
    tp_group = getattr(net, "_tp_group", None)
    tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    cp_group = None
    from ..parallel.context_parallel import is_context_parallel
    if is_context_parallel(net):
        from ..parallel import groups
        cp_group = groups.cp_group()
    device = next(net.parameters()).device
    # [loss sum, tokens, correct, batches] in float64: exact token counts up to 2**53.
    totals = torch.zeros(4, dtype=torch.float64)
    was_training = net.training
    net.eval()
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    if progress:
        from tqdm import tqdm
        try:
            total = min(len(loader), max_batches) if max_batches is not None else len(loader)
        except TypeError:
            total = max_batches
        loader = tqdm(loader, total=total, desc="eval", unit="batch", file=sys.stderr)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if cp_group is not None:
                from ..parallel.context_parallel import shard_batch
                batch = shard_batch(batch, cp_group)
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            if causal:
                with autocast:
                    logits = _full_vocab(net(input_ids).logits, tp_group)
                flat_labels = labels.reshape(-1)
                loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels,
                                           ignore_index=IGNORE_INDEX, reduction="sum")
                tokens = (flat_labels != IGNORE_INDEX).sum()
                correct = torch.zeros(())
            else:
                kwargs = {k: batch[k].to(device) for k in ("attention_mask", "token_type_ids") if k in batch}
                with autocast:
                    # With labels the MLM head runs only where labels are set (the reference behaviour).
                    logits = _full_vocab(net(input_ids, labels=labels, **kwargs).logits, tp_group)
                selected = labels > 0
                picked = logits[selected].float()
                target = labels[selected]
                loss_sum = F.cross_entropy(picked, target, reduction="sum") if target.numel() else torch.zeros(())
                tokens = selected.sum()
                correct = (picked.argmax(-1) == target).sum()
            totals += torch.stack([loss_sum.double().cpu(), tokens.double().cpu(), correct.double().cpu(),
                                   torch.ones((), dtype=torch.float64)])
    finally:
        net.train(was_training)

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # gloo reduces CPU tensors, nccl needs them on the GPU.
        reduce_on = device if torch.distributed.get_backend(group) == "nccl" else torch.device("cpu")
        t = totals.to(reduce_on)
        torch.distributed.all_reduce(t, group=group)
        totals = t.cpu()
        if group is None:
            totals /= tp                     # every TP rank added the same sums
    loss_sum, tokens, correct, batches = totals.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    if causal:
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if tokens else float("nan"),
                "tokens": int(tokens), "batches": int(batches)}
    return {"loss": loss, "mlm_loss": loss, "mlm_accuracy": correct / tokens if tokens else float("nan"),
            "tokens": int(tokens), "batches": int(batches)}


def _full_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    if tp_group is None:
        return logits
    from ..parallel.tensor_parallel import gather_logits
    return gather_logits(logits, tp_group)


__all__ = ["evaluate"]


# --------------------------------------------------------------------------------------------------
# A sharded checkpoint, evaluated directly (m2train eval)
# --------------------------------------------------------------------------------------------------

def evaluate_checkpoint(ckpt, data: Optional[str] = None, split: str = "val", batches: Optional[int] = None,
                        batch_size: Optional[int] = None, seed: Optional[int] = None,
                        mlm_probability: Optional[float] = None, cache_dir: Optional[str] = None,
                        verify: str = "sha256") -> dict:
    """Evaluate a checkpoint (a step_* folder, a checkpoint root or a run directory: its latest complete
    checkpoint) on a prepared dataset, in whatever world this process is in: one process, or every rank
    of an initialised process group (each rank then reads its share of the split and the sums are
    all-reduced). The weights are consolidated from the shards, so the saving world size does not matter.

    data: prepared dataset folder (default: the checkpoint config's data.path). split: val | train (the
    train stream is endless: give `batches`). batches: per rank (default: the whole val split).
    batch_size: default the run's train.micro_batch_size. seed: shuffle / masking seed (default the run's
    train.seed). mlm_probability: BERT masking rate (default the run's data.eval_mlm_probability)."""
    import shutil
    import tempfile

    from ..checkpoint import dist as cdist
    from ..checkpoint.consolidate import load_model_from_checkpoint, resolve_checkpoint
    from ..config import ConfigError, DataConfig, from_dict
    from ..data import build_dataloader, read_prep_stats

    if split not in ("val", "train"):
        raise ConfigError(f"--split: expected val or train, got {split!r}")
    if split == "train" and batches is None:
        raise ConfigError("--split train is an endless shuffled stream: give --batches N")
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches: must be >= 1, got {batches}")
    path = resolve_checkpoint(ckpt, verify)
    model, manifest = load_model_from_checkpoint(path)
    config = manifest.get("config") or {}
    data_dict = dict(config.get("data") or {})
    data_dict["path"] = str(data) if data is not None else data_dict.get("path")
    if not data_dict["path"]:
        raise ConfigError(f"{path}: the checkpoint's config has no data.path; pass --data DIR")
    data_dict["local_cache"] = None
    data_cfg = from_dict(DataConfig, data_dict, "data")
    train_cfg = config.get("train") or {}
    batch_size = batch_size or int(train_cfg.get("micro_batch_size", 8))
    seed = int(train_cfg.get("seed", 0)) if seed is None else seed
    info = read_prep_stats(data_cfg.path)
    causal = model.config.is_causal
    if info.is_causal != causal:
        raise ConfigError(f"data {data_cfg.path}: layout {info.layout} does not suit the checkpoint's "
                          f"{model.config.arch} model")
    if info.vocab_size > model.config.vocab_size:
        raise ConfigError(f"data {data_cfg.path}: vocab_size {info.vocab_size} exceeds the model's "
                          f"model.vocab_size {model.config.vocab_size}")
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)

    own_cache = cache_dir is None
    if own_cache:  # a fresh node-local cache: never share a live training job's shard cache
        cache_dir = cdist.broadcast_object(tempfile.mkdtemp(prefix="m2train-eval-") if cdist.rank() == 0 else None)
    try:
        loader = build_dataloader(data_cfg, split=split, micro_batch_size=batch_size, seed=seed,
                                  dp_rank=cdist.rank(), dp_world=cdist.world_size(), cache_dir=cache_dir,
                                  mlm_probability=None if causal else (mlm_probability or
                                                                       data_cfg.eval_mlm_probability),
                                  info=info)
        try:
            metrics = evaluate(model, loader, batches, progress=cdist.rank() == 0)
        finally:
            loader.close()
    finally:
        cdist.barrier()
        if own_cache and cdist.rank() == 0:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return {"checkpoint": str(path), "step": manifest.get("step"), "tokens_seen": manifest.get("tokens_seen"),
            "data": str(data_cfg.path), "split": split, "batch_size": batch_size,
            "world_size": cdist.world_size(), **metrics}
