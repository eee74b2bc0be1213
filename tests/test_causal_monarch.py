"""The learned causal Monarch convolution (m2train/models/causal_monarch.py), in fp64 on small N.

Causality is checked to fp64 round-off (1e-12 relative, as for the FFT long conv in test_causality.py);
the controls show that a real leak is ~1e-1, i.e. that the check would see one."""

import pytest
import torch

from m2train.models.causal_monarch import (CausalMonarchConv, CausalMonarchLongConv, causal_monarch_conv,
                                           dense_evaluation_matrix, grid_size, monarch_eval,
                                           monarch_factors, monarch_solve)
from m2train.models.longconv import long_conv
from m2train.models.mixer import LongConv, M2SequenceMixer

DT = torch.float64


def randomise(conv: CausalMonarchConv, node_scale=0.3, level_scale=0.1, seed=0):
    """Non-DFT parameter values, well away from the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.node_offsets.copy_(torch.randn(conv.node_offsets.shape, generator=g, dtype=DT) * node_scale)
        conv.level_log_offsets.copy_(torch.randn(conv.level_log_offsets.shape, generator=g, dtype=DT)
                                     * level_scale)
    return conv


def rel_leak(fn, x, t):
    """Largest change of outputs at positions ≤ t when inputs after t are replaced (relative)."""
    x2 = x.clone()
    x2[..., t + 1:] = torch.randn_like(x2[..., t + 1:]) * 3
    y1, y2 = fn(x), fn(x2)
    return ((y1[..., :t + 1] - y2[..., :t + 1]).abs().max() / y1.abs().max()).item()


def dense_operator(M: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Re(M⁻¹((M·k̃)⊙(M·ũ)))[:L] with a dense N'×N' evaluation matrix; x (..., L), k (L,) or (H, L)."""
    Np, L = M.shape[0], x.shape[-1]
    pad = lambda v: torch.nn.functional.pad(v, (0, Np - L)).to(M.dtype)
    prod = (pad(x) @ M.T) * (pad(k) @ M.T)
    return torch.linalg.solve(M, prod.unsqueeze(-1)).squeeze(-1).real[..., :L]


def test_grid_size():
    assert [grid_size(L) for L in (1, 2, 8, 10, 128, 1024, 16384)] == [2, 2, 4, 5, 16, 46, 182]
    for L in range(1, 300):
        n = grid_size(L)
        assert n * n >= 2 * L > (n - 1) ** 2


@pytest.mark.parametrize("L,max_len", [(7, 7), (10, 10), (13, 32), (32, 32)])
def test_dft_init_equals_fft_causal_conv(L, max_len):
    conv = CausalMonarchConv(3, max_len).double()
    x, k = torch.randn(2, 3, L, dtype=DT), torch.randn(3, L, dtype=DT)
    ref = long_conv(x, k)
    assert torch.allclose(conv(x, k), ref, rtol=0, atol=1e-12 * ref.abs().max())


def test_dft_init_fp32_and_autocast():
    conv = CausalMonarchConv(4, 64)
    x, k = torch.randn(2, 4, 64), torch.randn(4, 64)
    ref = long_conv(x.double(), k.double())
    y = conv(x, k)
    assert y.dtype == torch.float32
    assert (y.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = conv(x.bfloat16(), k)
    assert yb.dtype == torch.bfloat16
    assert (yb.double() - ref).abs().max() < 2e-2 * ref.abs().max()


@pytest.mark.parametrize("normalize", [True, False])
def test_factorised_product_equals_dense_evaluation_matrix(normalize):
    conv = randomise(CausalMonarchConv(2, 12, normalize_basis=normalize).double())   # n = 5, N' = 25
    n = conv.n
    F = monarch_factors(conv.node_offsets, conv.level_log_offsets, normalize)
    M = dense_evaluation_matrix(conv.node_offsets, conv.level_log_offsets, normalize)
    eye = torch.eye(n * n, dtype=torch.complex128)
    M_fact = monarch_eval(F, eye).reshape(n * n, n * n)
    assert (M_fact - M).abs().max() < 1e-12 * M.abs().max()
    # real-input path of the first GEMM, and the inverse
    assert torch.allclose(monarch_eval(F, torch.eye(n * n, dtype=DT)).reshape(n * n, n * n), M, atol=1e-12)
    assert (monarch_solve(F, M.reshape(n, n, n * n), n * n) - eye).abs().max() < 1e-11
    # the points really solve Q(z) = X_j and are distinct
    assert torch.linalg.matrix_rank(M) == n * n
    # and the module equals the dense definition
    x, k = torch.randn(2, 2, 12, dtype=DT), torch.randn(2, 12, dtype=DT)
    assert torch.allclose(conv(x, k), dense_operator(M, x, k), atol=1e-11)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_causal_for_random_parameters_every_t(seed, normalize):
    L = 18
    conv = randomise(CausalMonarchConv(3, L, normalize_basis=normalize).double(), seed=seed)
    k = torch.randn(3, L, dtype=DT)
    x = torch.randn(2, 3, L, dtype=DT)
    # non-DFT: the operator is not the FFT convolution (and not Toeplitz)
    assert (conv(x, k) - long_conv(x, k)).abs().max() > 1e-2
    for t in range(L):
        assert rel_leak(lambda v: conv(v, k), x, t) < 1e-12, t


def test_learned_operator_is_not_toeplitz():
    L = 10
    conv = randomise(CausalMonarchConv(1, L).double())
    k = torch.randn(1, L, dtype=DT)
    cols = conv(torch.eye(L, dtype=DT)[:, None, :], k)[:, 0, :]        # row i: response to a unit impulse at i
    shifted = cols[1, 1:] - cols[0, :-1]                               # Toeplitz would make this 0
    assert shifted.abs().max() > 1e-3


def test_shorter_inputs_equal_prefix_of_max_len():
    conv = randomise(CausalMonarchConv(2, 20).double())
    k, x = torch.randn(2, 20, dtype=DT), torch.randn(1, 2, 20, dtype=DT)
    full = conv(x, k)
    assert torch.allclose(conv(x[..., :9], k[:, :9]), full[..., :9], atol=1e-12)


def test_degree_only_basis_leaks_control():
    """A basis with deg b_i = i but not in Newton form (b_i = z^i + random lower-order terms), evaluated at
    the same points, gives a non-causal operator: the check above detects it. The Newton basis through
    the same dense path does not leak."""
    L = 8
    conv = randomise(CausalMonarchConv(1, L).double())                 # n = 4, N' = 16
    n2 = conv.n ** 2
    M_newton = dense_evaluation_matrix(conv.node_offsets, conv.level_log_offsets)
    z = monarch_factors(conv.node_offsets, conv.level_log_offsets).z.reshape(-1).detach()
    T = torch.eye(n2, dtype=torch.complex128) + torch.triu(torch.randn(n2, n2, dtype=DT), 1) * 0.5
    M_degree = (z[:, None] ** torch.arange(n2)) @ T                   # column i: degree exactly i
    k, x = torch.randn(L, dtype=DT), torch.randn(2, L, dtype=DT)
    leaks = [rel_leak(lambda v: dense_operator(M_degree, v, k), x, t) for t in range(L - 1)]
    assert max(leaks) > 1e-2
    for t in range(L):
        assert rel_leak(lambda v: dense_operator(M_newton, v, k), x, t) < 1e-12


def test_gradcheck_input_filter_nodes_levels():
    conv = randomise(CausalMonarchConv(2, 6).double(), node_scale=0.2)   # n = 4
    x = torch.randn(2, 2, 6, dtype=DT, requires_grad=True)
    k = torch.randn(2, 6, dtype=DT, requires_grad=True)
    a = conv.node_offsets.detach().clone().requires_grad_()
    lv = conv.level_log_offsets.detach().clone().requires_grad_()

    def op(x, k, a, lv):
        return causal_monarch_conv(x, k, monarch_factors(a, lv))

    assert torch.autograd.gradcheck(op, (x, k, a, lv))
    # bidirectional (tied levels), reverse filter included
    k_rev = torch.randn(2, 6, dtype=DT, requires_grad=True)
    lv1 = torch.tensor([[0.05, -0.03]], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, lv, kr: causal_monarch_conv(x, k, monarch_factors(a, lv), kr),
                                    (a, lv1, k_rev))
    # and gradients reach the module's parameters
    conv(x, k).square().sum().backward()
    assert conv.node_offsets.grad.abs().sum() > 0 and conv.level_log_offsets.grad.abs().sum() > 0


def test_bidirectional_variant():
    L = 9
    conv = CausalMonarchConv(2, L, bidirectional=True).double()
    assert conv.level_log_offsets.shape == (1, 2)
    x, k, k_rev = (torch.randn(2, 2, L, dtype=DT), torch.randn(2, L, dtype=DT), torch.randn(2, L, dtype=DT))
    ref = long_conv(x, k, k_rev)
    assert (conv(x, k, k_rev) - ref).abs().max() < 1e-12 * ref.abs().max()
    randomise(conv)
    zero = torch.zeros_like(k)
    for t in range(L):
        # forward taps stay causal ...
        assert rel_leak(lambda v: conv(v, k, zero), x, t) < 1e-12
        # ... and reverse taps strictly anti-causal: inputs at ≤ t never reach outputs ≥ t
        x2 = x.clone()
        x2[..., :t + 1] = torch.randn_like(x2[..., :t + 1])
        y1, y2 = conv(x, zero, k_rev), conv(x2, zero, k_rev)
        assert (y1[..., t:] - y2[..., t:]).abs().max() < 1e-12 * y1.abs().max()
    # control: with n independent levels the wrap-around is modulo a general P(z) and the reverse taps
    # reach the past as well, which is why the bidirectional variant ties the levels
    conv.level_log_offsets = torch.nn.Parameter(torch.randn(conv.n, 2, dtype=DT) * 0.1)
    x2 = x.clone()
    x2[..., :3] = torch.randn_like(x2[..., :3])
    y1, y2 = conv(x, zero, k_rev), conv(x2, zero, k_rev)
    assert (y1[..., 3:] - y2[..., 3:]).abs().max() > 1e-3 * y1.abs().max()


def _conditioning(conv):
    F = monarch_factors(conv.node_offsets, conv.level_log_offsets)
    M = dense_evaluation_matrix(conv.node_offsets, conv.level_log_offsets)
    return (torch.linalg.cond(F.V).item(), torch.linalg.cond(F.B).max().item(), torch.linalg.cond(M).item())


def test_conditioning_bounded_during_training():
    """50 Adam steps fitting a different (random non-DFT) causal Monarch operator: the loss drops, and the
    condition numbers of the Vandermonde, the blocks and the dense M stay bounded."""
    torch.manual_seed(0)
    L = 16                                                            # n = 6, N' = 36
    target = randomise(CausalMonarchConv(4, L).double(), node_scale=0.3, level_scale=0.1, seed=3)
    conv = CausalMonarchConv(4, L).double()
    k = torch.randn(4, L, dtype=DT) * torch.exp(-torch.arange(L, dtype=DT) / 4)
    opt = torch.optim.Adam(conv.parameters(), lr=1e-2)
    conds = [_conditioning(conv)]
    losses = []
    for step in range(50):
        x = torch.randn(8, 4, L, dtype=DT)
        with torch.no_grad():
            y = target(x, k)
        loss = (conv(x, k) - y).square().mean() / y.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 9:
            conds.append(_conditioning(conv))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert conv.node_offsets.abs().max() > 0.05                        # the basis really moved
    assert conds[0][2] < 1 + 1e-9                                     # DFT: unitary up to scale
    for cV, cB, cM in conds:
        assert cV < 10 and cB < 10 and cM < 100, conds


def test_long_conv_drop_in_and_mixer_causality():
    L, H = 20, 8
    ref = LongConv(H, L, order=8, emb_dim=5, sin_freq=10.0, bidirectional=False).double()
    mono = CausalMonarchLongConv(H, L, order=8, emb_dim=5, sin_freq=10.0, bidirectional=False).double()
    missing, unexpected = mono.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["monarch.level_log_offsets", "monarch.node_offsets"]
    x = torch.randn(2, H, L, dtype=DT)
    assert torch.allclose(mono(x), ref(x), atol=1e-12)                # at init: the FFT LongConv
    # swapped into the causal mixer (as the benchmark does), with random bases: still causal
    mixer = M2SequenceMixer(H, L, bidirectional=False, filter_order=8).double()
    for name in ("long_conv", "residual_conv"):
        conv = CausalMonarchLongConv(H, L, order=8, emb_dim=5, sin_freq=10.0, bidirectional=False).double()
        randomise(conv.monarch, seed=len(name))
        setattr(mixer, name, conv)
    mixer._can_fuse = lambda u: False                                 # the fused path is FFT-only
    u = torch.randn(2, L, H, dtype=DT)
    for t in range(L):
        x2 = u.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y1, y2 = mixer(u), mixer(x2)
        assert (y1[:, :t + 1] - y2[:, :t + 1]).abs().max() < 1e-12 * y1.abs().max()


def test_warm_start_gives_the_same_operator():
    conv = randomise(CausalMonarchConv(2, 30).double())
    x, k = torch.randn(1, 2, 30, dtype=DT), torch.randn(2, 30, dtype=DT)
    y_cold = conv(x, k)                                               # cold start (no previous points)
    with torch.no_grad():
        conv.node_offsets[1].add_(1e-2)       # (a common shift of all nodes would move the points
                                              # along and leave M unchanged: translation invariance)
    y_warm_moved = conv(x, k)                                         # warm-started from the old points
    conv._points = None
    assert torch.allclose(conv(x, k), y_warm_moved, atol=1e-12)
    assert not torch.allclose(y_cold, y_warm_moved, atol=1e-6)


# --- wiring into M2-GPT through model.sequence_mixer -------------------------------------------------

def _gpt_cfg(**kw):
    from m2train.config import ModelConfig
    base = dict(arch="m2_gpt", bidirectional=False, position_embeddings=False, vocab_size=50,
                hidden_size=16, num_layers=2, intermediate_size=32, max_seq_len=24, filter_order=8,
                hidden_dropout=0.0, layer_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def test_config_switch_builds_monarch_mixer_equal_to_fft_at_init():
    from m2train.models import build_model
    from m2train.models.causal_monarch import CausalMonarchLongConv
    torch.manual_seed(0)
    fft_model = build_model(_gpt_cfg()).double().eval()
    mon_model = build_model(_gpt_cfg(sequence_mixer="monarch_causal")).double().eval()
    assert isinstance(mon_model.blocks[0].mixer.long_conv, CausalMonarchLongConv)
    assert isinstance(mon_model.blocks[0].mixer.residual_conv, CausalMonarchLongConv)
    missing, unexpected = mon_model.load_state_dict(fft_model.state_dict(), strict=False)
    assert not unexpected and all(".monarch." in k for k in missing)
    ids = torch.randint(1, 50, (2, 24))
    with torch.no_grad():                     # no-grad: the FFT model may take its fused path
        torch.testing.assert_close(mon_model(ids).logits, fft_model(ids).logits, rtol=1e-9, atol=1e-9)
    # training step through the whole model reaches the basis parameters
    mon_model.train()
    mon_model(ids, labels=ids).loss.backward()
    assert mon_model.blocks[0].mixer.long_conv.monarch.node_offsets.grad.abs().sum() > 0


def test_monarch_basis_parameter_group_is_never_decayed():
    from m2train.config import OptimConfig
    from m2train.models import build_model
    model = build_model(_gpt_cfg(sequence_mixer="monarch_causal"))
    groups = {g["name"]: g for g in model.param_groups(OptimConfig(weight_decay=0.1, monarch_basis_lr=1e-4))}
    basis = groups["monarch_basis"]
    assert basis["weight_decay"] == 0.0 and basis["lr"] == 1e-4
    assert len(basis["params"]) == 2 * 2 * 2          # nodes + levels, two convs, two layers
    # init_weights returns the basis to the DFT setting
    with torch.no_grad():
        model.blocks[0].mixer.long_conv.monarch.node_offsets.add_(0.1)
    model.init_weights()
    assert model.blocks[0].mixer.long_conv.monarch.node_offsets.abs().sum() == 0


def test_baselines_reject_monarch_sequence_mixer():
    import pytest
    from m2train.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.sequence_mixer"):
        load_config("gpt_tiny", ["model.sequence_mixer=monarch_causal"])
