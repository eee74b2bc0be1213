"""The M2 sequence mixer: gradcheck, reference short conv, filters, pad masking."""

import torch

from m2train.models.filter import ImplicitFilter, positional_features
from m2train.models.mixer import M2SequenceMixer
from m2train.models.short_conv import CausalShortConv


def small_mixer(**kw):
    args = dict(max_len=16, bidirectional=True, filter_order=8)
    args.update(kw)
    return M2SequenceMixer(6, **args).double()


def test_mixer_gradcheck_bidirectional_and_causal():
    for bidirectional in (True, False):
        mixer = small_mixer(bidirectional=bidirectional, input_norm=bidirectional)
        u = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: mixer(x), (u,), eps=1e-6, atol=1e-6)
        # gradients w.r.t. the parameters too (filter MLPs, shared freq, z, skips, projections)
        params = [p for p in mixer.parameters()]
        def f(*ps):
            return torch.func.functional_call(mixer, {n: p for (n, _), p in zip(mixer.named_parameters(), ps)}, (u.detach(),))
        assert torch.autograd.gradcheck(f, tuple(p.detach().requires_grad_() for p in params), eps=1e-6, atol=1e-5)


def test_short_conv_equals_reference_conv1d():
    C, L = 5, 11
    conv = CausalShortConv(C, 3).double()
    ref = torch.nn.Conv1d(C, C, 3, groups=C, padding=2).double()
    ref.weight.data.copy_(conv.weight)
    ref.bias.data.copy_(conv.bias)
    x = torch.randn(2, C, L, dtype=torch.float64)
    torch.testing.assert_close(conv(x), ref(x)[..., :L], rtol=1e-12, atol=1e-12)


def test_filter_matches_reference_formula():
    H, Lmax, order = 4, 12, 8
    f = ImplicitFilter(H, Lmax, order=order, bidirectional=True).double()
    z, t = positional_features(Lmax, 5)
    # z = [t, cos(f1 w), cos(f2 w), -sin(f1 w), -sin(f2 w)], f = linspace(1e-4, 1, 2)
    w = 2 * torch.pi * torch.arange(Lmax, dtype=torch.float64) / Lmax
    torch.testing.assert_close(z[:, 0], torch.linspace(0, 1, Lmax).float())
    torch.testing.assert_close(z[:, 2], torch.cos(w).float())
    torch.testing.assert_close(z[:, 4], (-torch.sin(w)).float())
    L = 7
    k_fwd, k_rev = f(L)
    h = f.z[:L]
    for lin in f.mlp.linears:
        h = torch.sin(f.sin.freq * lin(h))
    h = f.mlp.out(h) * torch.exp(-f.t[:L] * f.deltas.abs())
    torch.testing.assert_close(k_fwd, h.T)
    assert k_rev.shape == (H, L) and not torch.allclose(k_rev, k_fwd)
    # one frequency parameter, shared by both MLPs and all three activations
    freqs = [p for n, p in f.named_parameters() if "freq" in n]
    assert len(freqs) == 1
    # decay: deltas = linspace(ln(1e-2)/1.5, ln(1e-2)/0.3, H)
    torch.testing.assert_close(f.deltas, torch.linspace(torch.log(torch.tensor(1e-2)).item() / 1.5,
                                                        torch.log(torch.tensor(1e-2)).item() / 0.3, H).double())


def test_pad_masking_makes_real_tokens_independent_of_padding():
    mixer = small_mixer(bidirectional=True, pad_masking=True, max_len=32)
    real = torch.randn(1, 10, 6, dtype=torch.float64)
    outs = []
    for n_pad in (3, 15):
        pad = torch.randn(1, n_pad, 6, dtype=torch.float64) * 5    # arbitrary junk at pad positions
        u = torch.cat([real, pad], dim=1)
        mask = torch.cat([torch.ones(1, 10), torch.zeros(1, n_pad)], dim=1)
        outs.append(mixer(u, mask)[:, :10])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    # the reference behaviour (no masking) does depend on the padding
    mixer.pad_masking = False
    a = mixer(torch.cat([real, torch.randn(1, 3, 6, dtype=torch.float64)], 1))[:, :10]
    b = mixer(torch.cat([real, torch.randn(1, 15, 6, dtype=torch.float64)], 1))[:, :10]
    assert not torch.allclose(a, b)


def test_length_beyond_filter_max_len_is_a_clear_error():
    mixer = small_mixer(max_len=8)
    try:
        mixer(torch.randn(1, 9, 6, dtype=torch.float64))
    except ValueError as e:
        assert "max_seq_len" in str(e)
    else:
        raise AssertionError("expected a ValueError")
