"""Analytic FLOP counts per token for every architecture (m2_bert, m2_gpt, bert, gpt), by component.

Counted from the config alone (no model is built), following what the code in m2train.models computes.

Conventions (one FLOP = one real multiply or add; a fused multiply-add is 2 FLOPs):

- Dense matmul in→out: 2·in·out per token; a bias adds `out` (counted as elementwise).
- Block-diagonal (nblocks blocks of out_blk×in_blk): 2·nblocks·out_blk·in_blk per token
  (= 2·in·out/nblocks when the sizes divide; with padding the padded sizes are what runs).
- Order-2 Monarch P·L·Pᵀ·R: both factors, 2·nblocks·(mid_blk·in_blk + out_blk·mid_blk).
- FFT: a complex FFT of size n costs 5·n·log2(n) real FLOPs (the usual radix-2 count), a real FFT (rfft or
  irfft) of size n half of that, 2.5·n·log2(n). n = longconv.fft_size(L), the next power of two ≥ 2L.
  An FFT convolution costs per channel, per sequence: rfft(input) + complex pointwise product
  (6 FLOPs per bin, n/2+1 bins) + irfft, divided by L for per token.
- Kernel spectra are per *forward*, not per sample: the filter MLP runs over L positions, is multiplied by
  the exponential decay and every channel's kernel gets one rfft; this is shared by the whole batch, so it
  is amortised over batch_size·L tokens. The default batch_size=1 is the pessimistic (largest) figure.
- Attention (Transformer baselines): QKᵀ and AV cost 2·L_eff·H each per token. Bidirectional: L_eff = L.
  Causal: `causal_attention="needed"` (default) counts only the unmasked keys, L_eff = (L+1)/2 on average,
  which is what a block-skipping kernel (FlashAttention) roughly does; `causal_attention="full"` counts
  L_eff = L, what the SDPA math backend computes (and what torch's FlopCounterMode reports for SDPA).
  Softmax: SOFTMAX_FLOPS per score.
- Elementwise: LayerNorm LAYERNORM_FLOPS per element, exact-erf GELU GELU_FLOPS per element, a gating
  product or residual add 1, the D skip 2 (multiply + add), the depthwise short conv 2·K per channel,
  Sin activation 2 (frequency multiply + sin), decay 3 (t·|δ|, exp, multiply). Transcendentals (erf, sin,
  exp, tanh) count as 1 FLOP. Embedding lookups, dropout, dtype casts, transposes and padding count 0.
- Not counted: the loss (softmax cross-entropy, O(V) per labelled token, ≪ 2·H·V), the optimizer step
  (per parameter per step, not per token).

Training = forward + backward, with per-kind factors (TRAINING_FACTOR):
- matmul: 3 (backward = grad-input + grad-weight matmuls, each as large as the forward one);
- fft (FFT convolution of the activations): 3. Forward: rfft(v), product with the kernel spectrum K, irfft.
  Backward: rfft of the output gradient g (the adjoint of irfft), g·conj(K) for the input, g·conj(V) for
  the kernel spectrum, irfft (the adjoint of rfft): 2 FFTs + 2 products, i.e. twice the forward;
- fft_kernel (the rfft turning each filter into its spectrum): 2 (one FFT back, nothing else);
- elementwise: 3 (an approximation: the backward of a product or a LayerNorm needs about two passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..config import ModelConfig
from .longconv import fft_size

LAYERNORM_FLOPS = 7      # mean (1), centre+square+accumulate (3), normalise (1), affine (2) per element
GELU_FLOPS = 5           # x/sqrt(2), erf, +1, ·0.5, ·x
SOFTMAX_FLOPS = 5        # max, subtract, exp, sum, divide per score
SIN_FLOPS = 2            # freq·x, sin
DECAY_FLOPS = 3          # t·|δ|, exp, multiply
COMPLEX_MUL_FLOPS = 6    # (a+bi)(c+di): 4 multiplies, 2 adds

# monarch_conv: the learned causal Monarch long conv (model.sequence_mixer=monarch_causal), complex GEMMs
# whose backward, like any GEMM's, costs twice the forward.
TRAINING_FACTOR = {"matmul": 3.0, "fft": 3.0, "fft_kernel": 2.0, "elementwise": 3.0, "monarch_conv": 3.0}
KINDS = tuple(TRAINING_FACTOR)

FILTER_INNER_LAYERS = 2  # FilterMLP: Linear(emb→O), Sin, [Linear(O→O), Sin] × 2, Linear(O→H)


def real_fft_flops(n: int) -> float:
    """FLOPs of one real FFT (rfft or irfft) of size n: half a complex FFT, 2.5·n·log2(n)."""
    return 2.5 * n * math.log2(n)


def fft_conv_flops_per_channel(L: int) -> float:
    """Per-channel, per-sequence FLOPs of an FFT convolution of a length-L signal with a known kernel
    spectrum: rfft + complex product on n/2+1 bins + irfft, n = fft_size(L)."""
    n = fft_size(L)
    return 2 * real_fft_flops(n) + COMPLEX_MUL_FLOPS * (n // 2 + 1)


@dataclass(frozen=True)
class FlopItem:
    component: str
    kind: str            # one of KINDS
    flops: float         # forward FLOPs per token

    @property
    def training_flops(self) -> float:
        return self.flops * TRAINING_FACTOR[self.kind]


def monarch_conv_flops_per_channel(L: int) -> float:
    """Learned causal Monarch conv of one channel, n = ceil(sqrt(2L)) (N' = n² points; causal_monarch.py):
    evaluation = an n×n complex Vandermonde on the real (n, n) input (4n³) + n complex n×n blocks (8n³);
    pointwise product (6n²); interpolation = inverse blocks (8n³) + inverse Vandermonde (8n³). The shared
    factor build (roots, blocks, inverses: O(n³) once per forward for all channels) is not counted."""
    from .causal_monarch import grid_size
    n = grid_size(L)
    return 28 * n ** 3 + COMPLEX_MUL_FLOPS * n * n


def monarch_kernel_flops_per_channel(L: int) -> float:
    """M·k̃ for one channel's kernel (real input: 4n³ + 8n³), once per forward."""
    from .causal_monarch import grid_size
    return 12 * grid_size(L) ** 3


def _structured_matmul(kind: str, n_in: int, n_out: int, nblocks: int) -> float:
    """Forward FLOPs per token of one H_in→H_out layer of the given structure (no bias)."""
    if kind == "dense":
        return 2.0 * n_in * n_out
    in_blk, out_blk = math.ceil(n_in / nblocks), math.ceil(n_out / nblocks)
    if kind == "blockdiag":
        return 2.0 * nblocks * out_blk * in_blk
    if kind == "monarch":
        mid_blk = min(in_blk, out_blk)
        return 2.0 * nblocks * (mid_blk * in_blk + out_blk * mid_blk)
    raise ValueError(f"unknown structured linear kind {kind!r}")


def flop_items(model_cfg: ModelConfig, seq_len: int | None = None, *, batch_size: int = 1,
               head_fraction: float = 1.0,
               causal_attention: Literal["needed", "full"] = "needed") -> list[FlopItem]:
    """Every counted operation as (component, kind, forward FLOPs per token), summed over layers.

    batch_size: sequences per forward, over which the kernel spectra are amortised.
    head_fraction: fraction of positions at which the MLM/LM head runs (1.0: logits everywhere; M2-BERT
    training with mlm_logits_at_masked_only evaluates it only at the masked ~30%)."""
    cfg = model_cfg
    L = int(seq_len if seq_len is not None else cfg.max_seq_len)
    if L < 1:
        raise ValueError(f"seq_len must be >= 1, got {L}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if causal_attention not in ("needed", "full"):
        raise ValueError(f"causal_attention must be 'needed' or 'full', got {causal_attention!r}")
    H, I, V, N = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    LN = LAYERNORM_FLOPS * H
    items: list[FlopItem] = []

    def add(component: str, kind: str, flops: float, per_layer: bool = True) -> None:
        items.append(FlopItem(component, kind, float(flops) * (N if per_layer else 1)))

    encoder = cfg.arch in ("m2_bert", "bert")

    # ---- embeddings -----------------------------------------------------------------------------
    if encoder:
        # word lookup (0) + token type (H) + position (H) + LayerNorm
        add("embeddings", "elementwise", H + (H if cfg.position_embeddings else 0) + LN, per_layer=False)
    else:
        pos = cfg.position_embeddings or cfg.arch == "gpt"     # the GPT baseline always has them
        if pos:
            add("embeddings", "elementwise", H, per_layer=False)

    # ---- sequence mixer ---------------------------------------------------------------------------
    if cfg.arch in ("m2_bert", "m2_gpt"):
        bidirectional = cfg.bidirectional if cfg.arch == "m2_bert" else False
        nconv = 2 if cfg.residual_long_conv else 1
        K, O, E = cfg.short_conv_kernel, cfg.filter_order, cfg.filter_emb_dim
        if cfg.mixer_input_norm:
            add("mixer.input_norm", "elementwise", LN)
        add("mixer.in_proj", "matmul", 2 * H * 3 * H)
        add("mixer.in_proj", "elementwise", 3 * H)                      # bias
        if cfg.pad_masking:
            add("mixer.pad_mask", "elementwise", 3 * H + H + (H if cfg.residual_long_conv else 0))
        add("mixer.short_conv", "elementwise", 2 * K * 3 * H)
        # v·x1, (·)·x2, and + residual conv
        add("mixer.gating", "elementwise", 2 * H + (H if cfg.residual_long_conv else 0))
        if cfg.sequence_mixer == "monarch_causal":
            add("mixer.long_conv_monarch", "monarch_conv", nconv * H * monarch_conv_flops_per_channel(L) / L)
        else:
            add("mixer.long_conv_fft", "fft", nconv * H * fft_conv_flops_per_channel(L) / L)
        add("mixer.skip", "elementwise", nconv * 2 * H)
        # Implicit filters: per forward, amortised over batch_size·L tokens.
        tokens = batch_size * L
        nmlp = nconv * (2 if bidirectional else 1)
        dims = [E] + [O] * (FILTER_INNER_LAYERS + 1)
        mlp_mm = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])) + 2 * O * H
        mlp_ew = sum(b + SIN_FLOPS * b for b in dims[1:]) + DECAY_FLOPS * H   # biases, Sin, decay
        add("mixer.filters", "matmul", nmlp * L * mlp_mm / tokens)
        add("mixer.filters", "elementwise", nmlp * L * mlp_ew / tokens)
        if cfg.sequence_mixer == "monarch_causal":
            add("mixer.filters", "monarch_conv", nconv * H * monarch_kernel_flops_per_channel(L) / tokens)
        else:
            add("mixer.filters", "fft_kernel", nconv * H * real_fft_flops(fft_size(L)) / tokens)
        add("mixer.out_proj", "matmul", 2 * H * H)
        add("mixer.out_proj", "elementwise", H)
    else:
        causal = cfg.arch == "gpt"
        if causal:
            l_eff = L if causal_attention == "full" else (L + 1) / 2
        else:
            l_eff = L
        add("attn.qkv", "matmul", 2 * H * 3 * H)
        add("attn.qkv", "elementwise", 3 * H)
        add("attn.scores", "matmul", 2 * 2 * l_eff * H)                # QKᵀ and AV
        add("attn.softmax", "elementwise", SOFTMAX_FLOPS * l_eff * cfg.num_heads)
        add("attn.out_proj", "matmul", 2 * H * H)
        add("attn.out_proj", "elementwise", H)

    # ---- dimension mixer ----------------------------------------------------------------------------
    if cfg.arch in ("m2_bert", "m2_gpt"):
        kind, nb = cfg.mlp_type, cfg.mlp_nblocks
        add("glu.in", "matmul", _structured_matmul(kind, H, 2 * I, nb))     # no bias
        add("glu.act", "elementwise", GELU_FLOPS * I + I)                    # gelu(gate)·value
        add("glu.out", "matmul", _structured_matmul(kind, I, H, nb))
        add("glu.out", "elementwise", H)                                     # bias
    else:
        add("mlp.fc1", "matmul", 2 * H * I)
        add("mlp.fc1", "elementwise", I)
        add("mlp.act", "elementwise", GELU_FLOPS * I)
        add("mlp.fc2", "matmul", 2 * I * H)
        add("mlp.fc2", "elementwise", H)

    # ---- norms and residual adds ----------------------------------------------------------------------
    if cfg.arch == "m2_bert":
        add("norms_residual", "elementwise", H + LN)            # LN(y + GLU(y))
    else:                                                       # two LayerNorms, two residual adds
        add("norms_residual", "elementwise", 2 * H + 2 * LN)

    # ---- heads ------------------------------------------------------------------------------------------
    if cfg.head == "mlm":
        f = head_fraction
        add("head.transform", "matmul", f * 2 * H * H, per_layer=False)
        add("head.transform", "elementwise", f * (H + GELU_FLOPS * H + LN), per_layer=False)
        add("head.decoder", "matmul", f * 2 * H * V, per_layer=False)
        add("head.decoder", "elementwise", f * V, per_layer=False)      # decoder bias
    elif cfg.head == "classification":
        if cfg.pooling == "mean":
            add("head.pool", "elementwise", 2 * H, per_layer=False)
        # pooler Linear + tanh and classifier, once per sequence
        add("head.classifier", "matmul", (2 * H * H + 2 * H * cfg.num_labels) / L, per_layer=False)
        add("head.classifier", "elementwise", (2 * H + cfg.num_labels) / L, per_layer=False)
    else:  # causal_lm
        add("head.final_norm", "elementwise", LN, per_layer=False)
        add("head.lm_head", "matmul", head_fraction * 2 * H * V, per_layer=False)
    return items


def _by_component(items: list[FlopItem], training: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for it in items:
        out[it.component] = out.get(it.component, 0.0) + (it.training_flops if training else it.flops)
    out["total"] = sum(v for v in out.values())
    return out


def forward_flops_per_token(model_cfg: ModelConfig, seq_len: int | None = None, **kwargs) -> dict[str, float]:
    """Forward FLOPs per token by component (summed over layers), plus 'total'.
    Keyword arguments: batch_size, head_fraction, causal_attention (see flop_items)."""
    return _by_component(flop_items(model_cfg, seq_len, **kwargs), training=False)


def training_flops_per_token(model_cfg: ModelConfig, seq_len: int | None = None, **kwargs) -> dict[str, float]:
    """Forward + backward FLOPs per token by component, plus 'total' (factors: TRAINING_FACTOR)."""
    return _by_component(flop_items(model_cfg, seq_len, **kwargs), training=True)


def flops_by_kind(model_cfg: ModelConfig, seq_len: int | None = None, training: bool = False,
                  **kwargs) -> dict[str, float]:
    """FLOPs per token by kind (matmul / fft / fft_kernel / elementwise), plus 'total'. The 'matmul'
    figure is what torch.utils.flop_counter.FlopCounterMode measures (it counts matmuls and SDPA only)."""
    out = {k: 0.0 for k in KINDS}
    for it in flop_items(model_cfg, seq_len, **kwargs):
        out[it.kind] += it.training_flops if training else it.flops
    out["total"] = sum(out.values())
    return out
