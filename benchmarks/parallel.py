"""Communication and memory of tensor (TP), sequence (SP, on top of TP) and context (CP) parallelism for M2-GPT.

    traffic   bytes communicated per training step (forward + backward), by kind (all-reduce, all-to-all,
              all-gather, reduce-scatter, send/recv halo), per rank and in total, for M2-GPT-360M at TP = 1,
              2, 4, 8 (CP = 1; with and without SP), CP = 1, 2, 4 (TP = 1) and both together, computed from
              the model config; the data-parallel / ZeRO gradient traffic separately.
    check     the same formulas against MEASURED traffic: gloo processes run one training step of the
              tiny M2-GPT (configs/m2_gpt_tiny.yaml) at TP=2, TP=2 with SP, at CP=2 (2 processes) and at
              TP=2 x CP=2 (4)
              with every torch.distributed collective wrapped to count calls and bytes. Any difference from
              the formula, per rank and per kind, in calls or bytes, fails (exit 1).
    memory    (formulas in benchmarks/parallel_memory.py) per-rank memory of M2-GPT-360M at L = 2048 ...
              131,072 and CP = 1 ... 8: parameters,
              gradients, optimizer state (ZeRO over the dp x cp ranks), activations per layer from the
              model's shapes, with and without activation checkpointing; then a measured check on the tiny
              model (bytes autograd saves for backward, CP=1 in this process and CP=2 on 2 gloo ranks);
              the same with the fused Triton kernels (model.kernels, the GPU default: no per-sequence FFT
              buffers, the short conv inside the gated conv), measured on a narrowed tiny model (in
              Triton's interpreter without a GPU); and, measured only, the bytes per rank under TP=2,
              CP=2 and TP=2 x CP=2 against one process, and under TP=2 and 4 without and with SP at the
              360M width (2 layers; `sp-memory` runs this last table alone).
    all       all of them (the default).

    python benchmarks/parallel.py                       # everything, Markdown on stdout
    python benchmarks/parallel.py check                 # only the measured traffic check
    python benchmarks/parallel.py traffic --seq-len 8192 --micro-batch 2

Definitions. "payload" is the size of the tensor(s) a rank hands to a collective (what the check compares
exactly); "wire" is what a rank sends under the usual algorithms, derived from the payload: ring all-reduce
2(P-1)/P·S, all-gather (P-1)·S_in, reduce-scatter (P-1)/P·S_in, all-to-all the chunks for other ranks
((P-1)/P·S), send = S. Traffic of the 360M tables assumes bf16 activations (2 bytes; what the DeepSpeed bf16
engine runs) and fp32 for the loss statistics; the check runs fp32 (CPU).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send_recv")
PHASES = ("fwd", "bwd")


def load_model_config(name: str):
    from m2train.config import load_config
    return load_config(name).model


# =====================================================================================================
# Traffic: the formulas
# =====================================================================================================
@dataclass
class Traffic:
    """Per rank: {(phase, kind): [calls, payload bytes, wire bytes]}, phase "fwd" or "bwd"."""

    kinds: dict = field(default_factory=lambda: {(p, k): [0, 0, 0] for p in PHASES for k in KINDS})

    def add(self, phase: str, kind: str, payload: int, wire: float) -> None:
        k = self.kinds.setdefault((phase, kind), [0, 0, 0])
        k[0] += 1
        k[1] += payload
        k[2] += wire

    def wire(self, kind: str | None = None, phase: str | None = None) -> float:
        return sum(v[2] for (p, k), v in self.kinds.items() if kind in (None, k) and phase in (None, p))

    def payload(self, kind: str | None = None, phase: str | None = None) -> int:
        return sum(v[1] for (p, k), v in self.kinds.items() if kind in (None, k) and phase in (None, p))


def _ring_all_reduce(t: Traffic, phase: str, nbytes: int, P: int) -> None:
    t.add(phase, "all_reduce", nbytes, 2 * (P - 1) / P * nbytes)


def _check_m2_gpt(cfg) -> None:
    if cfg.arch != "m2_gpt":
        raise SystemExit(f"benchmarks/parallel.py models M2-GPT only (model.arch m2_gpt), got {cfg.arch!r}")
    if cfg.sequence_mixer != "fft":
        raise SystemExit("benchmarks/parallel.py: model.sequence_mixer must be 'fft' (TP/CP support only that)")


def model_parallel_traffic(cfg, B: int, L: int, T: int, P: int, e: int, sp: bool = False) -> list[Traffic]:
    """One training step of M2-GPT under TP=T and CP=P (m2train.parallel: TP applied first, so the CP exchanges
    move each TP rank's H/T channels), per rank in global rank order (TP innermost: rank = cp_rank·T +
    tp_rank). e: bytes per activation element; the loss statistics are fp32. sp: TP with sequence
    parallelism (not with CP)."""
    _check_m2_gpt(cfg)
    if sp and (T < 2 or P > 1):
        raise SystemExit("sequence parallelism needs TP > 1 and CP = 1")
    ranks = []
    for cp_rank in range(P):
        t = Traffic()
        if sp:
            _sp_collectives(t, cfg, B * L, L, T, e)
        elif T > 1:
            _tp_collectives(t, cfg, B * L // P, L, T, e)
        if P > 1:
            _cp_collectives(t, cfg, B, L, P, cfg.hidden_size // T, cp_rank, e)
        ranks += [t] * T                                     # TP peers make the same calls
    return ranks


def tp_traffic(cfg, B: int, L: int, T: int, e: int) -> list[Traffic]:
    """TP=T alone (m2train.parallel.tensor_parallel), per TP rank."""
    return model_parallel_traffic(cfg, B, L, T, 1, e)


def cp_traffic(cfg, B: int, L: int, P: int, e: int) -> list[Traffic]:
    """CP=P alone (m2train.parallel.context_parallel), per CP rank."""
    return model_parallel_traffic(cfg, B, L, 1, P, e)


def _filter_feature_all_reduces(t: Traffic, cfg, L: int, T: int, e: int) -> None:
    """One layer's backward all-reduces of the (L, O) filter MLP features copied to the TP region (one per
    filter MLP: 2 per long conv bidirectional, 1 causal), with or without SP."""
    convs = 1 + int(cfg.residual_long_conv)
    mlps = 2 if cfg.bidirectional else 1
    for _ in range(convs * mlps):
        _ring_all_reduce(t, "bwd", L * cfg.filter_order * e, T)


def _tp_collectives(t: Traffic, cfg, N: int, L: int, T: int, e: int) -> None:
    """A TP rank's all-reduces for N tokens (the CP chunk's under CP); the filters run at the full L."""
    act = N * cfg.hidden_size * e
    _ring_all_reduce(t, "fwd", act, T)                       # vocab-parallel embedding
    for _ in range(cfg.num_layers):
        _ring_all_reduce(t, "fwd", act, T)                   # row-parallel out_linear
        _ring_all_reduce(t, "fwd", act, T)                   # GLU partial output
        _ring_all_reduce(t, "bwd", act, T)                   # mixer input copied to the TP region
        _ring_all_reduce(t, "bwd", act, T)                   # GLU input copied to the TP region
        _filter_feature_all_reduces(t, cfg, L, T, e)
    for _ in range(3):                                       # CE max, target logit, sum exp (fp32)
        _ring_all_reduce(t, "fwd", N * 4, T)
    _ring_all_reduce(t, "bwd", act, T)                       # LM-head input copied to the TP region


def _sp_collectives(t: Traffic, cfg, N: int, L: int, T: int, e: int) -> None:
    """A TP rank's collectives under sequence parallelism (m2train.parallel.sequence_parallel), N = B·L tokens.
    Each region's first layer all-gathers this rank's N/T tokens (forward) and gathers them again in backward
    before reduce-scattering the input gradient; each exit reduce-scatters the partial (N, H) and all-gathers
    its gradient; parameters applied to this rank's positions (norms, post-exit biases) all-reduce their
    gradients; the residual long conv's input moves by all-to-all (N·H/T per rank). Unchunked loss."""
    H = cfg.hidden_size
    act, part = N * H * e, N * H * e // T
    wire_rs = (T - 1) / T * act                              # a ring reduce-scatter (or all-gather) of act

    def entry():                                             # a region's first layer (gathered_apply)
        t.add("fwd", "all_gather", part, (T - 1) * part)
        t.add("bwd", "all_gather", part, (T - 1) * part)     # the input gathered again for the backward
        t.add("bwd", "reduce_scatter", act, wire_rs)         # its gradient back to this rank's positions

    def exit_():                                             # a region's partial output (scatter_to_sp)
        t.add("fwd", "reduce_scatter", act, wire_rs)
        t.add("bwd", "all_gather", part, (T - 1) * part)

    def replicated(n_params: int):                           # copy_to_tp on a parameter: gradient all-reduce
        _ring_all_reduce(t, "bwd", n_params * 4, T)

    exit_()                                                  # vocab-parallel embedding
    for _ in range(cfg.num_layers):
        for _ in range(2 + int(cfg.mixer_input_norm)):       # LayerNorm weight and bias
            replicated(H)
            replicated(H)
        entry()                                              # in_linear
        if cfg.residual_long_conv:
            for phase in PHASES:                             # the residual conv's own channels, and back
                t.add(phase, "all_to_all", part, (T - 1) / T * part)
        _filter_feature_all_reduces(t, cfg, L, T, e)
        exit_()                                              # out_linear
        replicated(H)                                        # its bias
        entry()                                              # the GLU's up-projection
        exit_()                                              # Wo
        replicated(H)                                        # Wo's bias
    replicated(H)                                            # the final norm's weight and bias
    replicated(H)
    entry()                                                  # the LM head
    for _ in range(3):                                       # CE max, target logit, sum exp (fp32)
        _ring_all_reduce(t, "fwd", N * 4, T)


def _cp_collectives(t: Traffic, cfg, B: int, L: int, P: int, H: int, r: int, e: int) -> None:
    """CP rank r's exchanges of H channels (H/T under TP)."""
    K = cfg.short_conv_kernel
    convs = 1 + int(cfg.residual_long_conv)
    chunk = B * H * (L // P) * e                             # one (B, H, L/P) operand of an all-to-all
    halo = B * 3 * H * (K - 1) * e                           # the last K-1 positions of the 3H channels
    for _ in range(cfg.num_layers):
        # seq -> channel and back, around each long conv, forward and again (inverse) backward
        for phase in PHASES:
            for _ in range(2 * convs):
                t.add(phase, "all_to_all", chunk, (P - 1) / P * chunk)
        if K > 1:
            if r < P - 1:
                t.add("fwd", "send_recv", halo, halo)        # my tail to the next rank
            if r > 0:
                t.add("bwd", "send_recv", halo, halo)        # the halo's gradient to the previous rank
    _ring_all_reduce(t, "fwd", 2 * 4, P)                     # the global token mean: (sum, count) in fp32


def zero_traffic(n_params: int, D: int, stage: int, e_grad: int = 2, e_param: int = 2) -> float:
    """Wire bytes per rank per step of the gradient/parameter traffic of DeepSpeed ZeRO over D = dp x cp
    ranks (ring algorithms): stage 0 all-reduces the gradients, 1/2 reduce-scatter them and all-gather the
    updated parameters (the same volume), 3 also all-gathers the parameters in forward and backward."""
    if D == 1:
        return 0.0
    base = 2 * (D - 1) / D * n_params * e_grad
    return base + (2 * (D - 1) / D * n_params * e_param if stage == 3 else 0.0)


def count_params(cfg) -> int:
    from m2train.models import build_model
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def _gb(x: float) -> str:
    return f"{x / 2**30:.3f}"


def _mb(x: float) -> str:
    return f"{x / 2**20:.2f}"


# (TP, CP, sequence parallel) rows of the traffic tables: TP alone, TP with SP, CP alone, both (TP innermost).
TRAFFIC_LAYOUTS = [(1, 1, False), (2, 1, False), (4, 1, False), (8, 1, False), (2, 1, True), (4, 1, True),
                   (8, 1, True), (1, 2, False), (1, 4, False), (2, 2, False), (4, 2, False), (8, 2, False),
                   (2, 4, False)]


def layout_name(T: int, P: int, sp: bool = False) -> str:
    return f"TP={T}{' SP' if sp else ''} CP={P}"


def traffic_report(cfg, B: int, L: int, e: int, zero_stage: int, dp: int) -> str:
    n = count_params(cfg)
    lines = [f"### Traffic per training step: {cfg_name(cfg)}, micro-batch {B} x L={L}, activations "
             f"{e} bytes/element (forward + backward)",
             "",
             "Wire MiB per rank (payload handed to the collectives in parentheses, MiB); 'total' = all TP x CP "
             "ranks of one replica. Halo send/recv: the busiest (middle) rank.",
             "",
             "| layout | all-reduce | all-to-all | all-gather | reduce-scatter | send/recv halo | fwd / bwd | "
             f"per rank | total | ZeRO-{zero_stage} grads + params, dp={dp} (per rank) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for T, P, sp in TRAFFIC_LAYOUTS:
        ranks = model_parallel_traffic(cfg, B, L, T, P, e, sp)
        busiest = max(ranks, key=lambda t: t.wire())
        cells = [f"{_mb(busiest.wire(k))} ({_mb(busiest.payload(k))})" for k in KINDS]
        cells.append(f"{_mb(busiest.wire(phase='fwd'))} / {_mb(busiest.wire(phase='bwd'))}")
        per_rank = busiest.wire()
        total = sum(t.wire() for t in ranks)
        # ZeRO over dp x cp ranks; each TP rank holds ~1/T of the parameters.
        zero = zero_traffic(n // T, dp * P, zero_stage)
        lines.append(f"| {layout_name(T, P, sp)} | " + " | ".join(cells) + f" | {_mb(per_rank)} | {_mb(total)} | "
                     f"{_mb(zero)} |")
    lines += ["", f"Parameters: {n:,}. The last column is the data-parallel traffic, separate from the "
              "model-parallel traffic before it: ZeRO reduces bf16 gradients (and all-gathers the updated "
              "parameters) over D = dp x cp ranks, 2(D-1)/D x 2 bytes x (parameters / TP) per rank with ring "
              "algorithms, independent of L; stage 3 adds as much again for the forward/backward parameter "
              "all-gathers."]
    return "\n".join(lines)


def cfg_name(cfg) -> str:
    return f"M2-GPT H={cfg.hidden_size} x {cfg.num_layers} layers (I={cfg.intermediate_size}, V={cfg.vocab_size})"


# =====================================================================================================
# Traffic: measured (2 gloo processes, every collective wrapped)
# =====================================================================================================
class CommCounter:
    """Wraps torch.distributed's collectives (module attributes, so callers that look them up at call time
    are counted: our code, megatron-core's cross-entropy) and records calls and bytes by kind."""

    NAMES = ("all_reduce", "all_to_all", "all_to_all_single", "all_gather", "all_gather_into_tensor",
             "all_gather_single", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "broadcast",
             "isend", "send", "batch_isend_irecv")

    def __init__(self):
        self.traffic = Traffic()
        self.phase = "fwd"                                   # set by the caller before the backward
        self.other: list[str] = []
        self._saved: dict = {}

    def __enter__(self):
        import torch.distributed as dist
        for name in self.NAMES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        import torch.distributed as dist

        def counted(*args, **kwargs):
            group = kwargs.get("group")
            P = dist.get_world_size(group)
            if name == "all_reduce":
                _ring_all_reduce(self.traffic, self.phase, args[0].nbytes, P)
            elif name == "all_to_all":
                inputs = args[1] if len(args) > 1 else kwargs["input_tensor_list"]
                me = dist.get_rank(group)
                payload = sum(x.nbytes for x in inputs)
                self.traffic.add(self.phase, "all_to_all", payload, payload - inputs[me].nbytes)
            elif name in ("all_gather", "all_gather_single"):
                t = args[1] if len(args) > 1 else kwargs["tensor" if name == "all_gather" else "input_tensor"]
                self.traffic.add(self.phase, "all_gather", t.nbytes, (P - 1) * t.nbytes)
            elif name == "reduce_scatter_single":
                t = args[1] if len(args) > 1 else kwargs["input"]
                self.traffic.add(self.phase, "reduce_scatter", t.nbytes, (P - 1) / P * t.nbytes)
            elif name in ("isend", "send"):
                t = args[0]
                self.traffic.add(self.phase, "send_recv", t.nbytes, t.nbytes)
            else:                                            # not expected in a step: reported, and fails
                self.other.append(name)
            return fn(*args, **kwargs)

        return counted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_batch(cfg, B: int, L: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    return {"input_ids": ids, "labels": torch.randint(0, cfg.vocab_size, (B, L), generator=g)}


def _measure_layout(config, tp: int, cp: int, B: int, L: int, sp: bool = False) -> dict:
    """On this rank: build the model, apply TP (with SP when `sp`) and / or CP, count one forward + backward,
    then measure the bytes autograd saves in one more forward."""
    import torch.distributed as dist
    from m2train.models import build_model
    from m2train.parallel import groups
    from m2train.parallel.activation_checkpointing import saved_activation_bytes
    from m2train.parallel.context_parallel import apply_context_parallel, shard_batch

    groups.init_model_parallel(tp, cp)
    cfg = load_model_config(config) if isinstance(config, str) else config
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _step_batch(cfg, B, L)
    if tp > 1:
        from m2train.parallel.tensor_parallel import apply_tensor_parallel
        model = apply_tensor_parallel(model, groups.tp_group())
    if sp:
        from m2train.parallel.sequence_parallel import apply_sequence_parallel
        model = apply_sequence_parallel(model, groups.tp_group())
    if cp > 1:
        model = apply_context_parallel(model, groups.cp_group())
        batch = shard_batch(batch, groups.cp_group())
    dist.barrier()                                   # group set-up traffic is not the step's
    with CommCounter() as counter:
        loss = model(**batch).loss
        counter.phase = "bwd"
        loss.backward()
    dist.barrier()
    model.zero_grad(set_to_none=True)
    saved = saved_activation_bytes(model, lambda: model(**batch).loss)
    groups.destroy_model_parallel()
    return {"kinds": counter.traffic.kinds, "other": counter.other, "saved": saved}


def _worker(rank, world, port, config, layouts, B, L, queue):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world)
        res = [_measure_layout(config, *layout[:2], B, L, *layout[2:]) for layout in layouts]
        queue.put((rank, res))
        dist.destroy_process_group()
    except BaseException:
        import traceback
        queue.put((rank, {"error": traceback.format_exc()}))


def measure(config, tp: int, cp: int, B: int, L: int, world: int = 2) -> list[dict]:
    """Run `world` gloo processes (tp * cp == world) and return each rank's counted traffic."""
    return measure_layouts(config, [(tp, cp)], B, L, world)[0]


def measure_layouts(config, layouts: list[tuple], B: int, L: int, world: int = 2) -> list[list[dict]]:
    """Like `measure` for several (tp, cp) or (tp, cp, sequence parallel) layouts in one set of processes:
    [layout][rank] -> result."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, config, layouts, B, L, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, res = queue.get(timeout=600)
            if isinstance(res, dict):
                raise SystemExit(f"rank {rank} failed:\n{res['error']}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [[results[r][i] for r in range(world)] for i in range(len(layouts))]


def compare_traffic(measured: list[dict], formula: list[Traffic], layout: str) -> tuple[list[str], bool]:
    """Markdown rows and whether every rank's calls and payload bytes match the formula for every kind, in
    the forward and in the backward separately."""
    rows, ok = [], True
    for r, (m, f) in enumerate(zip(measured, formula, strict=True)):
        if m["other"]:
            ok = False
            rows.append(f"| {layout} | {r} | unexpected collectives {m['other']} | | | NO |")
        for phase in PHASES:
            for kind in KINDS:
                mc, mb, _ = m["kinds"].get((phase, kind), [0, 0, 0])
                fc, fb, _ = f.kinds.get((phase, kind), [0, 0, 0])
                match = (mc, mb) == (fc, fb)
                ok &= match
                if mc or fc:
                    rows.append(f"| {layout} | {r} | {phase} {kind} | {mc} / {fc} | {mb:,} / {fb:,} | "
                                f"{'yes' if match else 'NO'} |")
    return rows, ok


def check_report(config: str, B: int, L: int) -> tuple[str, bool]:
    """Measured vs formula for TP=2, TP=2 with SP and CP=2 (2 gloo processes) and TP=2 x CP=2 (4) on `config`
    (fp32): exact per rank, kind, calls and bytes."""
    cfg = load_model_config(config)
    lines = [f"### Measured vs formula: {config} ({cfg_name(cfg)}), micro-batch {B} x L={L}, fp32, gloo "
             "processes (2, and 4 for TP=2 x CP=2)", "",
             "| layout | rank | kind | calls measured / formula | payload bytes measured / formula | match |",
             "|---|---|---|---|---|---|"]
    ok = True
    runs = [([(2, 1, False), (2, 1, True), (1, 2, False)], 2), ([(2, 2, False)], 4)]
    for layouts, world in runs:
        for layout, measured in zip(layouts, measure_layouts(config, layouts, B, L, world)):
            formula = model_parallel_traffic(cfg, B, L, layout[0], layout[1], 4, *layout[2:])
            rows, good = compare_traffic(measured, formula, layout_name(*layout))
            lines += rows
            ok &= good
    return "\n".join(lines), ok


# =====================================================================================================
def main(argv=None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")     # the kernels' memory check, before Triton loads
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=("all", "traffic", "check", "memory", "sp-memory"),
                    help="which report (default: all; sp-memory: the last table of memory alone)")
    ap.add_argument("--config", default=str(ROOT / "configs/m2_gpt_360m.yaml"),
                    help="model config of the traffic and memory tables (default configs/m2_gpt_360m.yaml)")
    ap.add_argument("--check-config", default=str(ROOT / "configs/m2_gpt_tiny.yaml"),
                    help="the small config measured on CPU (default configs/m2_gpt_tiny.yaml)")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048, 32768],
                    help="sequence length(s) of the traffic tables (default 2048 32768)")
    ap.add_argument("--dp", type=int, default=2,
                    help="data-parallel replicas assumed for the ZeRO gradient-traffic column (default 2)")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per step (traffic, memory)")
    ap.add_argument("--bytes", type=int, default=2,
                    help="bytes per activation element in the 360M tables (2 = bf16, 4 = fp32)")
    ap.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3),
                    help="DeepSpeed ZeRO stage of the gradient-traffic column and the memory table")
    ap.add_argument("--check-seq-len", type=int, default=64, help="sequence length of the measured check")
    ap.add_argument("--check-batch", type=int, default=2, help="micro-batch of the measured checks")
    args = ap.parse_args(argv)
    ok = True
    cfg = load_model_config(args.config)
    if args.what in ("all", "traffic"):
        for L in args.seq_len:
            print(traffic_report(cfg, args.micro_batch, L, args.bytes, args.zero_stage, args.dp), "\n")
    if args.what in ("all", "check"):
        text, ok = check_report(args.check_config, args.check_batch, args.check_seq_len)
        print(text, "\n")
        print("formula == measured for every rank, kind, call count and byte count" if ok else
              "MISMATCH between the traffic formula and the measured traffic (rows marked NO)", "\n")
    if args.what in ("all", "memory"):
        from parallel_memory import (kernel_memory_report, measured_memory_report, memory_report,
                                     tensor_parallel_memory_report)
        print(memory_report(cfg, args.micro_batch, args.zero_stage), "\n")
        print(measured_memory_report(args.check_config, args.check_batch, (256, 1024, 4096)), "\n")
        print(kernel_memory_report(args.check_config, args.check_batch, (32, 256)), "\n")
        print(tensor_parallel_memory_report(args.check_config, args.check_batch, (256, 1024)), "\n")
    if args.what in ("all", "memory", "sp-memory"):
        from parallel_memory import sequence_parallel_memory_report
        print(sequence_parallel_memory_report(args.config, args.micro_batch, args.seq_len[0]), "\n")
    if not ok:
        print("FAILED: the traffic formula does not match the measured traffic", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
