"""Per-rank memory of M2-GPT under context and tensor parallelism: the formulas and their measured checks (the `memory`
report of benchmarks/parallel.py, which has the command line and the definitions).

    memory_per_rank        parameters, gradients, optimizer state (ZeRO over the dp x cp ranks) and
                           activations of one rank, with or without every-block activation checkpointing
    activation_bytes_per_layer / kernel_activation_bytes_per_layer
                           the bytes autograd keeps for one block, by part, on the torch path / with the
                           fused Triton kernels
    head_bytes             the embedding / head / loss part
    memory_check           those formulas against what autograd saves in a real forward (CP = 1 in this
                           process, CP = 2 on 2 gloo ranks)
    tensor_parallel_memory_report
                           the saved bytes per rank under TP=2 (without and with sequence parallelism), CP=2
                           and TP=2 x CP=2, against the formula
    sequence_parallel_memory_report
                           measured only: TP=2 and 4 without and with sequence parallelism at a real width
"""

from __future__ import annotations

import torch

from parallel import (_gb, _step_batch, cfg_name, count_params, layout_name, load_model_config, measure,
                      measure_layouts)


def activation_bytes_per_layer(cfg, B: int, L: int, P: int, e: int, kernels: bool = False, T: int = 1,
                               sp: bool = False) -> dict:
    """Bytes autograd keeps for backward in one M2-GPT block on one rank, by part: context parallelism over P
    ranks (chunk Lc = L/P), tensor parallelism over T ranks (with sequence parallelism when `sp`, not with
    CP), or both (TP innermost: CP's exchanges move the TP rank's H/T channels).

    From the shapes of the forward (m2train.parallel.context_parallel / tensor_parallel / sequence_parallel),
    counting each storage once; e bytes per activation element, FFT spectra complex fp32 (8 bytes). With
    P = T = 1 it is the reference forward. TP shards every channel dimension inside the mixer and the GLU by T
    and keeps the norms and the regions' inputs whole; SP also splits those by position. kernels=True: the
    fused Triton kernels' forward instead (`kernel_activation_bytes_per_layer`; CP or none only)."""
    if P > 1 and sp:
        raise NotImplementedError("sequence parallelism does not combine with CP")
    if kernels:
        if T > 1:
            raise NotImplementedError("the kernels' formula covers CP only")
        return kernel_activation_bytes_per_layer(cfg, B, L, P, e)
    H, I, O, K = cfg.hidden_size, cfg.intermediate_size, cfg.filter_order, cfg.short_conv_kernel
    Lc = L // P
    Hc = H // (P * T)                           # the long convs' channels on this rank (CP exchanges H/T)
    convs = 1 + int(cfg.residual_long_conv)
    mlps = 2 if cfg.bidirectional else 1
    n = 1 << (2 * L - 1).bit_length()                          # FFT size of the long conv
    tok = B * Lc
    # Tokens of the replicated stream a rank keeps: all of its chunk, or under SP its L/T positions.
    stream = tok // T if sp else tok
    # The residual conv reads a view of the mixer input (the in_linear input, counted with the norms) unless
    # its channels arrive by an exchange over the whole sequence: CP's or SP's all-to-all makes a new tensor.
    residual_input = B * Hc * L * e if cfg.residual_long_conv and (P > 1 or sp) else 0
    parts = {
        # LayerNorm inputs (x, x + mixer) and their mean/rstd (fp32), in_linear / GLU inputs (norm outputs)
        "norms + linear inputs": 4 * stream * H * e + 2 * 2 * stream * 4,
        # short conv input with its K-1 halo, and its output (x1, x2, v are views of it); 3H/T rows under TP
        "short conv": 2 * B * 3 * (H // T) * (Lc + K - 1) * e,
        # per long conv: the fp32 zero-padded FFT input (B, Hc, n) and its spectrum (B, Hc, n/2+1) complex64;
        # the gated conv's input v ⊙ x1 (B, Hc, L), and the residual conv's when it is a tensor of its own
        "long convs": convs * B * Hc * (n * 4 + (n // 2 + 1) * 8) + B * Hc * L * e + residual_input,
        # gated conv output (kept for ⊙ x2) and the mixer's pre-out_linear sum
        "mixer outputs": 2 * tok * (H // T) * e,
        # filters, per conv: 3 Linear -> Sin stages over (L, O) keep 3 tensors each (per MLP; replicated
        # under TP), the decay (L, Hc) of this rank's channels, the padded fp32 kernel (Hc, n) and its
        # spectrum (Hc, n/2+1)
        "filters": convs * (mlps * 9 * L * O * e + L * Hc * e + Hc * (n * 4 + (n // 2 + 1) * 8)),
        # GLU: its input (as the block-diagonal layer's reshaped copy, counted above), the (2I) up-projection,
        # GELU(gate), and the product fed to Wo (reshaped copy); I/T of each under TP
        "GLU": tok * (2 * I + I + I) // T * e,
    }
    return parts


def kernel_activation_bytes_per_layer(cfg, B: int, L: int, P: int, e: int) -> dict:
    """`activation_bytes_per_layer` with the fused Triton kernels (model.kernels; the default on a GPU): the
    torch path's parts, with those the kernels change replaced. The FFT convolutions keep no padded input
    or spectrum per sequence: the kernels keep their inputs and, only where the backward cannot recompute it
    cheaply (the three-level layout, N > ONE_PROGRAM_MAX_FFT, with an output gate), the gated conv's
    pre-gate output; of the kernel spectrum, (channels, N) fp32 real + imaginary per conv (N =
    kernel_fft_size(L)), only the filter taps it is made from (the backward recomputes it). Without CP the
    short conv runs inside the gated conv's loads (kernels/fftconv_front.py), so its output is never kept;
    under CP it runs with its halo as in the torch path, and the long convs keep their channel-sharded
    inputs: with a residual conv v ⊙ x1, x2 and u (one exchange, both convs gated in the kernels), without
    one only v ⊙ x1 (the output gate then acts on the chunk, as in the torch path)."""
    from m2train.kernels import fft_monarch

    parts = activation_bytes_per_layer(cfg, B, L, P, e)
    H, I, O, K = cfg.hidden_size, cfg.intermediate_size, cfg.filter_order, cfg.short_conv_kernel
    Hc = H // P
    convs = 1 + int(cfg.residual_long_conv)
    mlps = 2 if cfg.bidirectional else 1
    tok = B * (L // P)
    long_layout = fft_monarch.kernel_fft_size(L) > fft_monarch.ONE_PROGRAM_MAX_FFT
    if P > 1 and cfg.residual_long_conv:
        # context_parallel_gated_convs: the exchanged (3, B, H/P, L) v ⊙ x1, x2, u, the gated conv's pre-gate
        # output in the three-level layout, and the returned sum (out_linear's input)
        parts["long convs"] = 3 * B * Hc * L * e + (B * Hc * L * e if long_layout else 0)
        parts["mixer outputs"] = tok * H * e
    else:
        parts["long convs"] = convs * B * Hc * L * e
    if P == 1:
        # z = in_linear(u) without its bias (B, 3H, L), and the packed short-conv rows (3, H, K + 2) fp32
        parts["short conv"] = B * 3 * H * L * e + 3 * H * (K + 2) * 4
        # the gated conv's pre-gate output in the three-level layout (the residual conv has no output gate);
        # the residual conv's input as a channels-first copy (the kernels read unit-stride time rows; u is
        # channels-last)
        parts["long convs"] = (B * H * L * e if long_layout else 0) + (tok * H * e if cfg.residual_long_conv else 0)
        # the residual conv adds the gated one's output as it stores: only the sum (out_linear's input)
        parts["mixer outputs"] = tok * H * e
    # per conv: the MLP stages and decay as in the torch path, and the taps (Hc, L) per direction the
    # kernels keep to recompute the spectrum in the backward (fp32: the decay is)
    parts["filters"] = convs * (mlps * 9 * L * O * e + L * Hc * e + mlps * Hc * L * 4)
    # GLU kernels (kernels/glu.py GLUMLPFunction): the input (counted above) and the (2I) up-projection; the
    # product fed to Wo and GELU(gate) are recomputed in the backward
    parts["GLU"] = tok * 2 * I * e
    return parts


def model_activation_bytes(cfg, B: int, L: int, P: int, e: int, kernels: bool = False, T: int = 1,
                           sp: bool = False) -> int:
    """All layers' activation bytes plus the head's, on one CP (or TP) rank (no activation checkpointing)."""
    return cfg.num_layers * sum(activation_bytes_per_layer(cfg, B, L, P, e, kernels, T, sp).values()) \
        + head_bytes(cfg, B, L, P, e, T, sp)


def head_bytes(cfg, B: int, L: int, P: int, e: int, T: int = 1, sp: bool = False) -> int:
    """Final norm input and output (+ fp32 stats), the int64 token ids and labels, and what the loss keeps:
    the fp32 log-softmax of the (B, L/P, V) logits (V/T columns under TP: the vocab-parallel head), or with
    model.loss_chunk_tokens (m2train.models.chunked_loss) only a bool mask and a count (its masked int64
    label copy replaces the labels themselves; the logits are recomputed in backward: one (chunk, V) fp32
    block exists at a time, transiently, and is not counted here). Under SP the final norm's tensors hold
    the rank's L/T positions."""
    if cfg.loss_chunk_tokens and T > 1:
        raise NotImplementedError("the chunked loss's formula covers TP = 1 only")
    tok = B * (L // P)
    stream = tok // T if sp else tok
    common = stream * cfg.hidden_size * e * 2 + 2 * stream * 4 + 2 * tok * 8
    if cfg.loss_chunk_tokens:
        return common + tok + 8
    return common + tok * (cfg.vocab_size // T) * 4


def memory_per_rank(cfg, n_params: int, B: int, L: int, P: int, zero_stage: int, checkpointing: bool,
                    e: int = 2, kernels: bool = False) -> dict:
    """Per-rank bytes under bf16 mixed precision with ZeRO over D = P ranks (dp = 1): bf16 parameters and
    gradients, fp32 master weights + Adam moments (12 bytes/parameter), each sharded by the ZeRO stage."""
    D = P
    params = 2 * n_params / (D if zero_stage >= 3 else 1)
    grads = 2 * n_params / (D if zero_stage >= 2 else 1)
    optim = 12 * n_params / (D if zero_stage >= 1 else 1)
    layer = sum(activation_bytes_per_layer(cfg, B, L, P, e, kernels).values())
    if checkpointing:
        # every_block: each block keeps only its input; one block's activations live during its recompute
        acts = cfg.num_layers * B * (L // P) * cfg.hidden_size * e + layer
    else:
        acts = cfg.num_layers * layer
    acts += head_bytes(cfg, B, L, P, e)
    return {"params": params, "grads": grads, "optim": optim, "per_layer": layer, "activations": acts,
            "total": params + grads + optim + acts}


def memory_report(cfg, B: int, zero_stage: int) -> str:
    from dataclasses import replace
    n = count_params(cfg)
    lines = [f"### Per-rank memory (GiB): {cfg_name(cfg)}, micro-batch {B}, bf16 + fp32 Adam, "
             f"ZeRO-{zero_stage} over the CP ranks (dp = 1)", "",
             "params / grads / optimizer: sharded by ZeRO over dp x cp; act/layer: one block's saved tensors; "
             "'no ckpt' / 'ckpt': all activations (blocks + embedding/head) without / with every-block "
             "activation checkpointing; totals include params, grads and optimizer; 'chunked loss': "
             "model.loss_chunk_tokens=4096 (the logits' log-softmax is not kept); 'kernels': the same with the "
             "fused Triton kernels (model.kernels, the default on a GPU; kernel_activation_bytes_per_layer).", "",
             "| L | CP | params | grads | optim | act/layer | act (no ckpt) | act (ckpt) | total no ckpt | "
             "total ckpt | total ckpt + chunked loss | kernels: act/layer | kernels: total no ckpt | "
             "kernels: total ckpt + chunked loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for L in (2048, 8192, 32768, 131072):
        c = replace(cfg, max_seq_len=max(cfg.max_seq_len, L))
        for P in (1, 2, 4, 8):
            a = memory_per_rank(c, n, B, L, P, zero_stage, False)
            b = memory_per_rank(c, n, B, L, P, zero_stage, True)
            ch = memory_per_rank(replace(c, loss_chunk_tokens=4096), n, B, L, P, zero_stage, True)
            ka = memory_per_rank(c, n, B, L, P, zero_stage, False, kernels=True)
            kch = memory_per_rank(replace(c, loss_chunk_tokens=4096), n, B, L, P, zero_stage, True, kernels=True)
            lines.append(f"| {L} | {P} | {_gb(a['params'])} | {_gb(a['grads'])} | {_gb(a['optim'])} | "
                         f"{_gb(a['per_layer'])} | {_gb(a['activations'])} | {_gb(b['activations'])} | "
                         f"{_gb(a['total'])} | {_gb(b['total'])} | {_gb(ch['total'])} | "
                         f"{_gb(ka['per_layer'])} | {_gb(ka['total'])} | {_gb(kch['total'])} |")
    return "\n".join(lines)


def saved_in_this_process(cfg, B: int, L: int) -> int:
    """Bytes autograd saves in one training forward of the unsharded model (seed 0, `_step_batch`), the
    single-process counterpart of the ranks' `_measure_layout`."""
    from m2train.models import build_model
    from m2train.parallel.activation_checkpointing import saved_activation_bytes

    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _step_batch(cfg, B, L)
    return saved_activation_bytes(model, lambda: model(**batch).loss)


def memory_check(cfg, B: int, L: int) -> list[tuple[int, int, int]]:
    """(P, bytes autograd saves in one forward on rank 0, formula) at CP = 1 (this process) and CP = 2 (2 gloo
    ranks), fp32; the formula of the kernels' path when cfg.kernels is "triton"."""
    m1 = saved_in_this_process(cfg, B, L)
    m2 = measure(cfg, 1, 2, B, L)[0]["saved"]
    kernels = cfg.kernels == "triton"
    return [(P, m, model_activation_bytes(cfg, B, L, P, 4, kernels)) for P, m in ((1, m1), (2, m2))]


def _memory_check_table(title: str, checks: dict) -> str:
    lines = [title, "", "| L | CP | measured saved bytes (rank 0) | formula | measured / formula |",
             "|---|---|---|---|---|"]
    for L, rows in checks.items():
        lines += [f"| {L} | {P} | {m:,} | {f:,.0f} | {m / f:.3f} |" for P, m, f in rows]
    return "\n".join(lines)


def measured_memory_report(config: str, B: int, lengths: tuple[int, ...]) -> str:
    """The torch path's formula against what autograd saves in the tiny model (all layers + head)."""
    from dataclasses import replace

    base = load_model_config(config)
    checks = {L: memory_check(replace(base, max_seq_len=max(base.max_seq_len, L)), B, L) for L in lengths}
    return _memory_check_table(f"### Measured activation bytes vs formula: {config}, micro-batch {B}, fp32", checks)


# The kernels' measured check runs a narrow one-layer model: in Triton's interpreter (no GPU) every
# (sequence, channel) program runs in Python.
KERNEL_CHECK_MODEL = dict(num_layers=1, hidden_size=32, intermediate_size=128)


def kernel_memory_check(config, B: int, L: int) -> list[tuple[int, int, int]]:
    """`memory_check` with the fused Triton kernels (model.kernels=triton), on `config` narrowed to
    KERNEL_CHECK_MODEL. Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
    `main` before Triton loads)."""
    from dataclasses import replace

    base = load_model_config(config) if isinstance(config, str) else config
    return memory_check(replace(base, kernels="triton", max_seq_len=max(base.max_seq_len, L), **KERNEL_CHECK_MODEL),
                        B, L)


def kernel_memory_report(config: str, B: int, lengths: tuple[int, ...]) -> str:
    return _memory_check_table(f"### Measured activation bytes vs formula with the fused kernels: {config} narrowed "
                               f"to {KERNEL_CHECK_MODEL}, micro-batch {B}, fp32",
                               {L: kernel_memory_check(config, B, L) for L in lengths})


def tensor_parallel_memory_report(config: str, B: int, lengths: tuple[int, ...]) -> str:
    """The activation bytes autograd saves per rank in one training forward of `config` (fp32, torch path)
    on one process, under TP=2 (without and with sequence parallelism), CP=2 (2 gloo ranks) and TP=2 x CP=2
    (4), as a fraction of the single process's, and measured / `model_activation_bytes`."""
    from dataclasses import replace

    base = load_model_config(config)
    # (layouts sharing one set of processes, world)
    runs = [([(2, 1, False), (2, 1, True), (1, 2, False)], 2), ([(2, 2, False)], 4)]
    names = [layout_name(*layout) for layouts, _ in runs for layout in layouts]
    lines = [f"### Measured activation bytes per rank under TP and CP: {config}, micro-batch {B}, fp32", "",
             "| L | single process | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for L in lengths:
        cfg = replace(base, max_seq_len=max(base.max_seq_len, L))
        single = saved_in_this_process(cfg, B, L)
        cells = []
        for layouts, world in runs:
            for (T, P, sp), ranks in zip(layouts, measure_layouts(cfg, layouts, B, L, world)):
                busiest = max(r["saved"] for r in ranks)
                check = f", {busiest / model_activation_bytes(cfg, B, L, P, 4, T=T, sp=sp):.3f} of formula"
                cells.append(f"{busiest:,} ({busiest / single:.3f}x{check})")
        one = single / model_activation_bytes(cfg, B, L, 1, 4)
        lines.append(f"| {L} | {single:,} ({one:.3f} of formula) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sequence_parallel_memory_report(config: str, B: int, L: int, num_layers: int = 2, chunk: int = 512) -> str:
    """MEASURED: the activation bytes autograd saves per rank in one training forward of `config` at its full
    width, narrowed to `num_layers` layers (fp32, torch path; model.loss_chunk_tokens=`chunk`, so the head
    keeps no logits and the table shows the layers), under TP=2 and TP=4 without and with sequence
    parallelism (2 and 4 gloo processes), and on one process."""
    from dataclasses import replace

    cfg = replace(load_model_config(config), num_layers=num_layers, loss_chunk_tokens=chunk,
                  max_seq_len=max(load_model_config(config).max_seq_len, L))
    single = saved_in_this_process(cfg, B, L)
    lines = [f"### Measured activation bytes per rank, TP without and with sequence parallelism: {cfg_name(cfg)}, "
             f"micro-batch {B} x L={L}, fp32, torch path, loss chunks of {chunk} tokens", "",
             f"One process: {single:,} bytes.", "",
             "| TP | TP alone (x one process) | TP + SP (x one process) | SP / TP alone |", "|---|---|---|---|"]
    for T in (2, 4):
        tp, sp = (max(r["saved"] for r in ranks)
                  for ranks in measure_layouts(cfg, [(T, 1, False), (T, 1, True)], B, L, world=T))
        lines.append(f"| {T} | {tp:,} ({tp / single:.3f}x) | {sp:,} ({sp / single:.3f}x) | {sp / tp:.3f} |")
    return "\n".join(lines)
