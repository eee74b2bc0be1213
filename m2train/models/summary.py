"""`m2train model-summary`: parameters by component and analytic FLOPs per token of a config.

The model is built on the meta device, so even the largest configs cost no memory and no init time.
FLOPs come from m2train.models.flops (counted from the config, FFTs and block-diagonal layers exactly);
the "6N rule" line shows how far the usual estimate is from the actual count for these architectures.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config, ConfigError, ModelConfig
from .longconv import fft_size
from .flops import KINDS, flops_by_kind, forward_flops_per_token, training_flops_per_token

# Display order of the parameter components; anything unrecognised lands in "other".
PARAM_COMPONENTS = (
    "embeddings: word (tied decoder)",
    "embeddings: position",
    "embeddings: token type",
    "seq mixer: in projection",
    "seq mixer: short conv",
    "seq mixer: long-conv filter MLPs",
    "seq mixer: filter positional features z",
    "seq mixer: D skips",
    "seq mixer: causal Monarch basis (nodes, levels)",
    "seq mixer: out projection",
    "attention: qkv projection",
    "attention: out projection",
    "dimension mixer: GLU in (gate+value)",
    "dimension mixer: GLU out",
    "MLP: fc1",
    "MLP: fc2",
    "norms (LayerNorm)",
    "head: MLM transform",
    "head: MLM decoder bias",
    "head: LM head (untied)",
    "head: pooler + classifier",
    "other",
)

FLOP_LABELS = {
    "embeddings": "embeddings (adds + LayerNorm)",
    "mixer.input_norm": "seq mixer: input LayerNorm",
    "mixer.in_proj": "seq mixer: in projection",
    "mixer.pad_mask": "seq mixer: pad masking",
    "mixer.short_conv": "seq mixer: short conv",
    "mixer.gating": "seq mixer: gating + residual add",
    "mixer.long_conv_fft": "seq mixer: FFT long convs",
    "mixer.long_conv_monarch": "seq mixer: causal Monarch long convs",
    "mixer.skip": "seq mixer: D skips",
    "mixer.filters": "seq mixer: filters (MLP + rfft, per seq)",
    "mixer.out_proj": "seq mixer: out projection",
    "attn.qkv": "attention: qkv projection",
    "attn.scores": "attention: QK^T + AV",
    "attn.softmax": "attention: softmax",
    "attn.out_proj": "attention: out projection",
    "glu.in": "dimension mixer: GLU in",
    "glu.act": "dimension mixer: GELU gate",
    "glu.out": "dimension mixer: GLU out",
    "mlp.fc1": "MLP: fc1",
    "mlp.act": "MLP: GELU",
    "mlp.fc2": "MLP: fc2",
    "norms_residual": "block norms + residual adds",
    "head.transform": "head: MLM transform",
    "head.decoder": "head: MLM decoder (2HV)",
    "head.pool": "head: mean pooling",
    "head.classifier": "head: pooler + classifier",
    "head.final_norm": "head: final LayerNorm",
    "head.lm_head": "head: LM head (2HV)",
}


def build_meta_model(model_cfg: ModelConfig) -> nn.Module:
    """The model a config describes, with every tensor on the meta device (no memory, no real init)."""
    from . import build_model
    with torch.device("meta"):
        return build_model(model_cfg)


def _classify(path: str, pname: str, owner: nn.Module, ancestors: list[nn.Module]) -> str:
    from .causal_monarch import CausalMonarchConv, CausalMonarchLongConv
    from .filter import ImplicitFilter
    from .glu import MonarchGLU
    from .heads import ClassificationHead, MLMHead
    from .mixer import LongConv, M2SequenceMixer
    from .short_conv import CausalShortConv
    from .transformer import MLP, SelfAttention

    last = path.rsplit(".", 1)[-1]

    def under(cls) -> nn.Module | None:
        for a in reversed(ancestors):
            if isinstance(a, cls):
                return a
        return None

    if isinstance(owner, nn.LayerNorm):
        return "norms (LayerNorm)"
    if isinstance(owner, nn.Embedding):
        if "position" in last or "pos" in last:
            return "embeddings: position"
        if "token_type" in last:
            return "embeddings: token type"
        return "embeddings: word (tied decoder)"
    if under(ImplicitFilter) is not None:
        return ("seq mixer: filter positional features z" if isinstance(owner, ImplicitFilter) and pname == "z"
                else "seq mixer: long-conv filter MLPs")
    if pname == "skip" and isinstance(owner, (LongConv, CausalMonarchLongConv)):
        return "seq mixer: D skips"
    if isinstance(owner, CausalMonarchConv):
        return "seq mixer: causal Monarch basis (nodes, levels)"
    if isinstance(owner, CausalShortConv):
        return "seq mixer: short conv"
    # Projections identified by the attribute that holds them in their enclosing block.
    projections = (
        (M2SequenceMixer, {"in_linear": "seq mixer: in projection", "out_linear": "seq mixer: out projection"}),
        (SelfAttention, {"qkv": "attention: qkv projection", "out": "attention: out projection"}),
        (MonarchGLU, {"gated_layers": "dimension mixer: GLU in (gate+value)", "wo": "dimension mixer: GLU out"}),
        (MLP, {"fc1": "MLP: fc1", "fc2": "MLP: fc2"}),
    )
    for cls, labels in projections:
        block = under(cls)
        if block is not None:
            return next((label for attr, label in labels.items() if owner is getattr(block, attr, None)),
                        "other")
    if under(MLMHead) is not None:
        return "head: MLM decoder bias" if "bias" in pname and isinstance(owner, MLMHead) else "head: MLM transform"
    if under(ClassificationHead) is not None:
        return "head: pooler + classifier"
    if isinstance(owner, nn.Linear) and last == "lm_head":
        return "head: LM head (untied)"
    return "other"


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters by component (each shared tensor, e.g. the tied decoder, counted once), plus 'total'."""
    modules = dict(model.named_modules())
    counts = {c: 0 for c in PARAM_COMPONENTS}
    seen: set[int] = set()
    for path, module in modules.items():
        parts = path.split(".") if path else []
        ancestors = [modules[".".join(parts[:i])] for i in range(len(parts) + 1)]
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            counts[_classify(path, pname, module, ancestors)] += p.numel()
    out = {c: n for c, n in counts.items() if n}
    out["total"] = sum(out.values())
    return out


def _fmt_count(n: float) -> str:
    return f"{n:,.0f}"


def _fmt_flops(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:.3f} G"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f} "


def summarize(model_cfg: ModelConfig | Config, seq_len: int | None = None, *, batch_size: int = 1,
              name: str | None = None) -> str:
    """A printable table of parameters by component and forward/training FLOPs per token."""
    if isinstance(model_cfg, Config):
        name = name or model_cfg.name
        model_cfg = model_cfg.model
    cfg = model_cfg
    L = int(seq_len if seq_len is not None else cfg.max_seq_len)
    if not 1 <= L <= cfg.max_seq_len:
        raise ConfigError(f"--seq-len: must be in [1, model.max_seq_len={cfg.max_seq_len}], got {L}")

    model = build_meta_model(cfg)
    params = parameter_breakdown(model)
    n_total = params["total"]
    n_embed = sum(v for k, v in params.items() if k.startswith("embeddings"))

    lines: list[str] = []
    title = f"{name}: " if name else ""
    lines.append(f"{title}arch {cfg.arch}, head {cfg.head}: H={cfg.hidden_size}, I={cfg.intermediate_size}, "
                 f"layers={cfg.num_layers}, vocab={cfg.vocab_size}, max_seq_len={cfg.max_seq_len}"
                 + (f", GLU {cfg.mlp_type}/{cfg.mlp_nblocks} blocks" if cfg.arch.startswith("m2") else ""))
    lines.append("")
    lines.append("Parameters (tied decoder counted once; 'per layer' = component / layers)")
    w = max(len(c) for c in params) + 2
    lines.append(f"  {'component':<{w}}{'params':>14}{'per layer':>13}{'share':>8}")
    per_layer_keys = ("seq mixer", "attention", "dimension mixer", "MLP")
    for comp, n in params.items():
        if comp == "total":
            continue
        pl = _fmt_count(n / cfg.num_layers) if comp.startswith(per_layer_keys) else ""
        lines.append(f"  {comp:<{w}}{_fmt_count(n):>14}{pl:>13}{100 * n / n_total:>7.1f}%")
    lines.append(f"  {'total':<{w}}{_fmt_count(n_total):>14}{'':>13}{'':>8}  ({n_total / 1e6:.2f}M; "
                 f"{(n_total - n_embed) / 1e6:.2f}M without embeddings)")
    lines.append("")

    fwd = forward_flops_per_token(cfg, L, batch_size=batch_size)
    trn = training_flops_per_token(cfg, L, batch_size=batch_size)
    if cfg.arch in ("m2_bert", "m2_gpt"):
        lines.append(f"FLOPs per token at L={L} (kernel spectra amortised over a batch of {batch_size} "
                     f"sequence{'s' if batch_size != 1 else ''}; a real FFT of size n costs 2.5·n·log2 n, "
                     f"n = {fft_size(L)})")
    else:
        lines.append(f"FLOPs per token at L={L}")
    w = max(len(FLOP_LABELS.get(c, c)) for c in fwd) + 2
    lines.append(f"  {'component':<{w}}{'forward':>13}{'training':>13}{'share':>8}")
    for comp in fwd:
        if comp == "total":
            continue
        label = FLOP_LABELS.get(comp, comp)
        lines.append(f"  {label:<{w}}{_fmt_flops(fwd[comp]):>13}{_fmt_flops(trn[comp]):>13}"
                     f"{100 * trn[comp] / trn['total']:>7.1f}%")
    lines.append(f"  {'total':<{w}}{_fmt_flops(fwd['total']):>13}{_fmt_flops(trn['total']):>13}")
    kinds = flops_by_kind(cfg, L, training=True, batch_size=batch_size)
    lines.append("  training FLOPs by kind: " + ", ".join(
        f"{k} {100 * kinds[k] / kinds['total']:.1f}%" for k in KINDS if kinds[k]))
    lines.append(f"  GFLOPs per token: forward {fwd['total'] / 1e9:.4f}, training (fwd+bwd) "
                 f"{trn['total'] / 1e9:.4f}")
    six_n = 6 * n_total
    six_n_ne = 6 * (n_total - n_embed)
    lines.append(f"  6N rule would say {six_n / 1e9:.4f} GFLOPs per training token (N = {n_total / 1e6:.2f}M; "
                 f"6·N_non-embedding = {six_n_ne / 1e9:.4f}); analytic count = {trn['total'] / six_n:.2f}x 6N")
    if cfg.head == "mlm":
        masked = training_flops_per_token(cfg, L, batch_size=batch_size, head_fraction=0.3)["total"]
        lines.append(f"  note: the MLM head is counted at every position; with mlm_logits_at_masked_only and "
                     f"30% masking, training is {masked / 1e9:.4f} GFLOPs per token")
    if cfg.arch == "gpt":
        full = training_flops_per_token(cfg, L, batch_size=batch_size, causal_attention="full")["total"]
        lines.append(f"  note: causal attention counts the unmasked half (L_eff=(L+1)/2); an SDPA kernel that "
                     f"computes the full L x L scores does {full / 1e9:.4f} GFLOPs per training token")
    if cfg.arch in ("m2_bert", "m2_gpt"):
        filt = trn.get("mixer.filters", 0.0)
        lines.append(f"  note: the filters (MLP + kernel rfft) run once per forward, not per sample: their "
                     f"{100 * filt / trn['total']:.1f}% share shrinks as 1/batch")
    return "\n".join(lines)


def main(args) -> int:
    """CLI entry: `m2train model-summary CONFIG [--seq-len N] [overrides...]`."""
    from ..config import load_config
    cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
    print(summarize(cfg, getattr(args, "seq_len", None)))
    return 0


__all__ = ["summarize", "parameter_breakdown", "build_meta_model", "main"]
