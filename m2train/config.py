"""Typed run configuration: YAML files (with `defaults:` includes) + dotted command-line overrides,
validated into dataclasses before any heavy work starts.

A config error always names the offending key (`model.hidden_size`), what was expected and what was
given, so that a typo in a 3-hour Slurm job fails in the first second rather than after data loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------

ARCHS = ("m2_bert", "m2_gpt", "bert", "gpt")


@dataclass
class ModelConfig:
    """Architecture of one model. Defaults are the reference M2-BERT-80M values."""

    arch: Literal["m2_bert", "m2_gpt", "bert", "gpt"] = "m2_bert"
    # Which head sits on top of the backbone. BERT-style: mlm | classification; GPT-style: causal_lm.
    head: Optional[Literal["mlm", "classification", "causal_lm"]] = None
    vocab_size: int = 30528
    hidden_size: int = 768
    num_layers: int = 12
    intermediate_size: int = 3072
    max_seq_len: int = 128
    pad_token_id: int = 0
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    # Embeddings: learned absolute positions (reference M2-BERT has them; M2-GPT does not need them).
    position_embeddings: bool = True

    # --- M2 sequence mixer -------------------------------------------------------------------
    # How the long convolutions are computed: "fft" (the reference, zero-padded FFT) or
    # "monarch_causal" (learned causal Monarch evaluation/interpolation, m2train/models/causal_monarch.py;
    # equal to "fft" at initialisation).
    sequence_mixer: Literal["fft", "monarch_causal"] = "fft"
    bidirectional: bool = True
    residual_long_conv: bool = True
    # Reference "hyena_training_additions": LayerNorm(eps 1e-5) on the mixer input (80M checkpoint).
    mixer_input_norm: bool = False
    mixer_dropout: float = 0.0
    short_conv_kernel: int = 3
    filter_order: int = 128
    filter_emb_dim: int = 5
    filter_sin_freq: float = 10.0
    # Zero the pad positions (attention_mask == 0) before every convolution. The reference does not,
    # so the default is False for checkpoint parity.
    pad_masking: bool = False

    # --- dimension mixer (GLU MLP) -----------------------------------------------------------
    mlp_type: Literal["blockdiag", "monarch", "dense"] = "blockdiag"
    mlp_nblocks: int = 4

    # --- compute kernels -------------------------------------------------------------------------
    # "auto": fused Triton kernels on CUDA when Triton is importable, the PyTorch reference path otherwise;
    # "triton" / "torch" force one path. The environment variable M2TRAIN_KERNELS overrides this
    # (m2train.kernels.dispatch).
    kernels: Literal["auto", "triton", "torch"] = "auto"

    # --- Transformer baselines -----------------------------------------------------------------
    num_heads: int = 12

    # --- heads -------------------------------------------------------------------------------
    tie_word_embeddings: bool = True
    # Causal LMs in training: compute the LM head + cross-entropy this many tokens at a time and recompute
    # the logits in backward instead of keeping them (m2train.models.chunked_loss), so the (tokens x vocab)
    # logits never exist whole - they dominate memory at long sequence lengths. The training forward then
    # returns no logits. Works under context and tensor parallelism (there: the vocab-parallel loss, each
    # chunk recomputed in backward) and every ZeRO stage (under ZeRO-3 the partitioned head weight is
    # gathered around the recompute: m2train.parallel.zero3). 0: off (logits computed and kept, as usual).
    loss_chunk_tokens: int = 0
    # MLM: with labels, evaluate the head only where labels are set (the reference behaviour).
    mlm_logits_at_masked_only: bool = True
    num_labels: int = 2
    pooling: Literal["cls", "mean"] = "cls"
    classifier_dropout: Optional[float] = None

    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.head is None:
            self.head = "causal_lm" if self.arch in ("m2_gpt", "gpt") else "mlm"

    @property
    def is_causal(self) -> bool:
        return self.arch in ("m2_gpt", "gpt")

    def validate(self, prefix: str = "model") -> None:
        def err(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}: {msg}")

        for key in ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "max_seq_len",
                    "filter_order", "mlp_nblocks", "num_heads", "short_conv_kernel", "num_labels"):
            if getattr(self, key) < 1:
                raise err(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("hidden_dropout", "mixer_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise err(key, f"must be in [0, 1), got {getattr(self, key)}")
        if self.layer_norm_eps <= 0:
            raise err("layer_norm_eps", f"must be > 0, got {self.layer_norm_eps}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise err("pad_token_id", f"must lie in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")
        if self.filter_emb_dim < 3 or self.filter_emb_dim % 2 == 0:
            raise err("filter_emb_dim", f"must be odd and >= 3 (time + cos/sin bands), got {self.filter_emb_dim}")
        causal_heads = ("causal_lm",)
        if self.is_causal and self.head not in causal_heads:
            raise err("head", f"arch {self.arch!r} is causal and supports head 'causal_lm', got {self.head!r}")
        if not self.is_causal and self.head in causal_heads:
            raise err("head", f"arch {self.arch!r} is a bidirectional encoder: use 'mlm' or 'classification'")
        if self.arch == "m2_gpt" and self.bidirectional:
            raise err("bidirectional", "M2-GPT must be causal: set model.bidirectional=false")
        if self.arch in ("bert", "gpt") and self.sequence_mixer != "fft":
            raise err("sequence_mixer", f"the Transformer baseline {self.arch!r} has no M2 sequence mixer")
        if self.arch in ("bert", "gpt") and self.hidden_size % self.num_heads:
            raise err("num_heads", f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.loss_chunk_tokens < 0:
            raise err("loss_chunk_tokens", f"must be >= 0 (0 = off), got {self.loss_chunk_tokens}")
        if self.loss_chunk_tokens and not self.is_causal:
            raise err("loss_chunk_tokens", f"applies to causal LMs (m2_gpt, gpt); arch {self.arch!r} computes "
                      "MLM logits at the masked positions only")
        if self.mlp_type == "monarch" and self.intermediate_size % self.mlp_nblocks:
            raise err("intermediate_size", f"{self.intermediate_size} must be divisible by mlp_nblocks "
                      f"{self.mlp_nblocks} for a Monarch GLU")


@dataclass
class OptimConfig:
    """Optimizer and parameter groups. Defaults are the reference M2-BERT pretraining recipe."""

    name: Literal["decoupled_adamw", "adamw"] = "decoupled_adamw"
    lr: float = 8e-4
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-5
    # Forward implicit-filter MLP + its shared Sin frequency (reference: lr 1e-3, wd 0.1).
    filter_lr: Optional[float] = 1e-3
    filter_weight_decay: float = 0.1
    # Positional features z fed to the filter MLPs (reference: lr 1e-5, no decay).
    pos_emb_lr: float = 1e-5
    pos_emb_weight_decay: float = 0.0
    # Exclude biases and LayerNorm parameters from weight decay.
    no_decay_bias_and_norm: bool = True
    # Exclude the per-channel D skips of the long convolutions from weight decay.
    no_decay_skip: bool = True
    # Learned causal Monarch basis (nodes and levels; model.sequence_mixer=monarch_causal): never decayed,
    # lr defaults to optim.lr.
    monarch_basis_lr: Optional[float] = None

    def validate(self, prefix: str = "optim") -> None:
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: need two numbers in [0, 1), got {list(self.betas)}")
        for key in ("eps", "weight_decay", "filter_weight_decay", "pos_emb_lr", "pos_emb_weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)}")
        if self.monarch_basis_lr is not None and self.monarch_basis_lr <= 0:
            raise ConfigError(f"{prefix}.monarch_basis_lr: must be > 0 (or null to use optim.lr), "
                              f"got {self.monarch_basis_lr}")
        if self.filter_lr is not None and self.filter_lr <= 0:
            raise ConfigError(f"{prefix}.filter_lr: must be > 0 (or null to use optim.lr), got {self.filter_lr}")


@dataclass
class DataConfig:
    """Where the prepared (`m2train prep`) MDS dataset is and how batches are drawn from it.

    `path` holds `train/` and `val/` split folders (each an MDS dataset with index.json) and
    `prep_stats.json`; it may be a local folder or a remote (s3://, gs://, or a second plain folder),
    in which case shards are cached under `local_cache` (default: RUN_DIR/data_cache)."""

    path: Optional[str] = None
    local_cache: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    # Loader processes per data-parallel rank (0: load in the training process).
    num_workers: int = 0
    shuffle: bool = True
    # BERT masked-LM recipe (reference M2-BERT: 30% in pretraining, 15% for evaluation; 80/10/10).
    mlm_probability: float = 0.30
    eval_mlm_probability: float = 0.15

    def validate(self, prefix: str = "data") -> None:
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers}")
        for key in ("mlm_probability", "eval_mlm_probability"):
            v = getattr(self, key)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"{prefix}.{key}: must be in (0, 1), got {v}")


@dataclass
class TrainConfig:
    """The training loop: batch sizes, schedule, precision, checkpoints, logging, stopping."""

    run_dir: Optional[str] = None          # default: runs/NAME
    seed: int = 0
    micro_batch_size: int = 8              # sequences per rank per forward
    # global = micro_batch_size x data-parallel size x grad_accum_steps; give either (or both, checked).
    global_batch_size: Optional[int] = None
    grad_accum_steps: Optional[int] = None
    max_steps: int = 1000                  # optimizer steps
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    # cosine: decay to lr * min_lr_ratio (GPT recipe); linear: decay to lr * min_lr_ratio at max_steps
    # (M2-BERT recipe: 0.02).
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0       # max global grad norm; null disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    # none | every_block | every_k (every checkpoint_every_k-th block) | mixer (sequence mixers only)
    activation_checkpointing: Literal["none", "every_block", "every_k", "mixer"] = "none"
    checkpoint_every_k: int = 2
    log_every: int = 10
    eval_every: int = 100                  # 0 disables periodic validation
    eval_batches: int = 20                 # validation batches per evaluation (per rank)
    save_every: int = 500                  # 0 disables periodic checkpoints (a final one is still written)
    checkpoint_dir: Optional[str] = None   # default: RUN_DIR/checkpoints
    keep_last: int = 3                     # retention: the newest K checkpoints ...
    keep_every: Optional[int] = None       # ... plus every step that is a multiple of M
    time_budget_s: Optional[float] = None  # save and exit cleanly before this wall-clock budget runs out
    max_nonfinite_steps: int = 5           # consecutive non-finite losses/grad norms tolerated
    on_nonfinite: Literal["stop", "rollback"] = "stop"
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "m2train"
    tensorboard: bool = True

    def validate(self, prefix: str = "train") -> None:
        for key in ("micro_batch_size", "max_steps", "log_every", "checkpoint_every_k", "keep_last",
                    "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "eval_batches", "save_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("global_batch_size", "grad_accum_steps", "keep_every"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{prefix}.{key}: must be >= 1 (or null), got {v}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{prefix}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"{prefix}.grad_clip: must be > 0 (or null to disable), got {self.grad_clip}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"{prefix}.time_budget_s: must be > 0, got {self.time_budget_s}")


@dataclass
class ParallelConfig:
    """How the model is spread over processes. data-parallel size = world / (tensor x context)."""

    zero_stage: int = 0                    # DeepSpeed ZeRO stage 0/1/2/3
    offload_optimizer: bool = False        # ZeRO optimizer state in CPU memory
    offload_params: bool = False           # ZeRO-3 parameters in CPU memory
    tensor_parallel: int = 1               # megatron-core tensor-parallel size
    context_parallel: int = 1              # sequence sharding around the long convolutions
    sequence_parallel: bool = False        # megatron SP: activations between TP regions split by position
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl with CUDA, else gloo

    def validate(self, prefix: str = "parallel") -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"{prefix}.offload_params: needs zero_stage 3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{prefix}.offload_optimizer: needs zero_stage >= 1")
        for key in ("tensor_parallel", "context_parallel"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class Config:
    """One run: the model, its optimizer, the data, the training loop and the parallel layout."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.optim.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        return self

    def to_dict(self) -> dict:
        return to_plain(self)


# --------------------------------------------------------------------------------------------------
# dict -> dataclass with type checking
# --------------------------------------------------------------------------------------------------

def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    return obj


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-12` (no dot) as a string; accept any numeric spelling.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if tp is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in value):
            return tuple(float(v) for v in value)
        raise ConfigError(f"{path}: expected a list of numbers, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        where = f"{path}.{key}" if path else str(key)
        raise ConfigError(f"{where}: unknown key{extra}; valid keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# YAML loading, includes and overrides
# --------------------------------------------------------------------------------------------------

def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or a bare name (`m2_bert_80m`) looked up in the repository's configs/."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name} (also looked in {CONFIG_DIR})")


def load_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config, merging the files named in its `defaults:` list first (later wins)."""
    path = resolve_config_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(str(p) for p in _seen)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    includes = data.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        inc_path = Path(inc)
        if not inc_path.is_absolute():
            local = path.parent / inc_path
            inc_path = local if (local.is_file() or local.with_suffix(".yaml").is_file()) else inc_path
            if not inc_path.is_file() and inc_path.with_suffix(".yaml").is_file():
                inc_path = inc_path.with_suffix(".yaml")
        merged = _deep_merge(merged, load_yaml(inc_path, _seen + (path,)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (`true`, `1e-3`, `[0.9, 0.95]`)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.hidden_size=256")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load, merge, override and validate a run config."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    return cfg.validate()


def model_config_from_dict(data: dict) -> ModelConfig:
    cfg = from_dict(ModelConfig, data, "model")
    cfg.validate()
    return cfg
