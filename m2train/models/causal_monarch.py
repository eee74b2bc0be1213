"""Learned causal Monarch convolution (issue 8; DESIGN.md §4.3): the paper's polynomial view of M2 made
trainable, provably causal for every parameter value, and sub-quadratic.

    y = Re( M⁻¹ ((M·k̃) ⊙ (M·ũ)) )[0:L]

ũ, k̃: the input u and filter k (length L) zero-padded to N' = n², n = ⌈√(2L_max)⌉ (the smallest n with
n² ≥ 2·L_max; we do NOT pad n up further: every size works with the GEMM formulation below, and a
larger n costs ~(n'/n)³ more). M is the evaluation matrix of a polynomial basis at N' distinct points:
M[j, i] = b_i(z_j). Then M⁻¹((M·k̃)⊙(M·ũ)) holds the coefficients, in the basis b, of the product
polynomial p_k·p_u (p_u = Σ_i ũ_i b_i): deg p_k·p_u ≤ 2L−2 < N', so interpolating at N' points recovers it
exactly.

Why it is causal
----------------
The basis is a *scaled Newton basis*: b_i(z) = c_i·∏_{s<i}(z − a_s), nodes a_s, constants c_i ≠ 0.
Since (z − a_i)·b_i ∝ b_{i+1}, multiplying b_i by any polynomial gives a combination of b_m with m ≥ i; so
b_i·b_j ∈ span{b_m : m ≥ max(i, j)} and coefficient t of p_k·p_u only involves u_i (and k_i) with
i ≤ t. This holds for ANY nodes, constants and (distinct) points. A basis that merely has deg b_i = i is not
enough: b_i·b_j then has components on b_m, m < max(i, j) (tests/test_causal_monarch.py shows the leak).

Monarch structure (order 2)
---------------------------
Nodes are periodic, a_{s+n} = a_s. With Q(z) = ∏_{s<n}(z − a_s) and q_{i0}(z) = ∏_{s<i0}(z − a_s),
b_{i1·n+i0}(z) = c_{i1,i0}·Q(z)^{i1}·q_{i0}(z). There are n distinct levels X_0..X_{n−1}; the points of
group j0 are the n roots z_{j1,j0} of Q(z) = X_{j0}. At those points Q(z)^{i1} = X_{j0}^{i1}, so with
U[i1, i0] = ũ[i1·n + i0] and c_{i1,i0} = α_{i1}·β_{i0}:

    G[j0, i0]   = Σ_{i1} α_{i1} X_{j0}^{i1} · U[i1, i0]           Vandermonde V (n×n), one GEMM for all columns
    E[j0, j1]   = Σ_{i0} β_{i0} q_{i0}(z_{j1,j0}) · G[j0, i0]     n blocks B_{j0} (n×n), one batched GEMM

M⁻¹ inverts the blocks, then the Vandermonde. Each block is a Newton–Vandermonde matrix at the roots of
Q(z) − X_{j0}, and its inverse has a closed form (Lagrange interpolation written in the Newton basis —
synthetic division of Q(z) − X by (z − w) in that basis):

    B_{j0}⁻¹[i0, j1] = h_{i0}(z_{j1,j0}) / Q'(z_{j1,j0}),   h_{i0}(w) = ∏_{i0<s<n}(w − a_s)

so all n block inverses cost O(n³) = O(N'^{3/2}) (a generic batched inverse would be O(n⁴) = O(N'²)),
and Q'(z) = Σ_s q_s(z)·h_s(z) comes from the same prefix/suffix products. The single n×n Vandermonde is
inverted with torch.linalg.inv (O(n³)). Nothing N'×N' is ever formed at run time; per forward the
shared work (points, blocks, inverses, M·k̃) is O(N'^{3/2}) and independent of the batch, and each sample
costs 4 GEMMs of O(N'^{3/2}) per channel.

DFT setting: a_s = 0 and X_{j0} = e^{2πi·j0/n} make the points all the N'-th roots of unity, b_i = z^i
and c = 1: M is the (permuted) DFT of size N' (the Cooley–Tukey four-step), and the operator equals the
zero-padded FFT causal convolution `m2train.models.longconv.long_conv`. This is the initialisation.
Away from it the operator is not Toeplitz: strictly more general than a convolution. The order of the
points never matters: permuting them permutes the rows of M, which cancels in M⁻¹(M·⊙M·).

Parameterisation (kept near the well-conditioned DFT setting)
-------------------------------------------------------------
- nodes: a_s = node_offsets[s] (complex, stored as real (n, 2) pairs, init 0).
- levels: X_j = exp(2πi·j/n + θ_j) with θ_j = level_log_offsets[j] (complex, (n, 2) reals, init 0): Re θ
  moves a level's radius, Im θ its angle.
- constants: c_{i1,i0} = α_{i1}·β_{i0}, with α_{i1} = 1/rms_j |X_j|^{i1} and β_{i0} = 1/rms_z |q_{i0}(z)|
  over all N' points (Jacobi column scaling of both factors, recomputed each forward, differentiable).
  They are exactly 1 at the DFT setting and keep a common drift of the level radius or of the nodes from
  blowing the columns up. Any nonzero c keeps the operator causal.
Complex parameters are stored as real pairs so that every optimizer (our DecoupledAdamW included, whose
second moment grad·grad would be wrong for complex tensors), clipping and weight decay see plain reals.

Roots of Q(z) = X_j, and gradients
----------------------------------
The points are found without autograd by Aberth–Ehrlich simultaneous iteration on the n polynomials
Q(z) − X_j (all at once, O(n³) per sweep), in complex128 whatever the compute dtype, started from the
exact roots of (z − ā)^n = X_j (ā = mean node; exact at the DFT setting). The solution is then
re-attached to the graph by ONE Newton step whose value is a no-op at convergence:

    z = z* − (Q(z*; a) − X) / Q'(z*)        (z*, Q'(z*) detached)

Its derivative is exactly the implicit-function derivative dz = (dX − ∂_aQ·da)/Q'(z), so gradients flow
to nodes and levels without differentiating through the iteration or through complex eigvals
(torch.linalg.eigvals of a companion matrix would need monomial coefficients of Q, which are badly
conditioned for large n, costs O(n⁴) for n companions, and its backward is a generic eigen-gradient). If
Aberth does not reach the tolerance, the forward raises instead of silently using wrong points (wrong
points would make M not an evaluation matrix and break exact causality).

Precision: the shared factors are built in complex128 and cast to complex64 for fp32/bf16/fp16 inputs
(complex128 for fp64 inputs); autocast is disabled inside and the output is cast back to the input dtype.

Bidirectional variant
---------------------
Circular wrap-around is multiplication modulo P(z) = ∏_j (z − z_j) = ∏_{j0} (Q(z) − X_{j0}). Placing the
reverse filter at the top coefficients, k̃[N'−1−j] = k_rev[j] (as the FFT does), gives exactly the
M2-BERT split "causal taps + strictly anti-causal taps" iff b_{N'+r} ≡ const·b_r mod P, i.e. iff
P(z) = Q(z)^n − ρ^n, i.e. iff the levels are X_j = ρ·e^{2πi·j/n} for one common ρ. Then a product term
b_{N'−1−j}·b_i (rev tap j, input i) lives on b_m with N'−1−j ≤ m ≤ N'−1−j+i; the part with m ≥ N' wraps
to ρ^n·b_{m−N'}, i.e. to positions ≤ i−j−1 < i, and the part with m < N' stays at positions ≥ N'−L ≥ L,
outside the output. So `bidirectional=True` keeps the nodes free (n learnable) and learns a single
common level offset θ (ρ = e^θ); at init it equals `long_conv(v, k_fwd, k_rev)`. With n independent
levels the wrap-around reduces modulo a general P and the reverse filter would also reach past and
present inputs — still a valid linear map, but no longer the causal/anti-causal split of M2-BERT — so we
do not offer it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .filter import ImplicitFilter


def grid_size(max_len: int) -> int:
    """n = the smallest integer with n² ≥ 2·max_len (N' = n² is the evaluation size)."""
    n = math.isqrt(2 * max_len)
    return n if n * n >= 2 * max_len else n + 1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _as_complex(pairs: torch.Tensor) -> torch.Tensor:
    """(…, 2) real pairs -> complex128."""
    pairs = pairs.to(torch.float64)
    return torch.complex(pairs[..., 0], pairs[..., 1])


def level_logs(level_log_offsets: torch.Tensor, n: int) -> torch.Tensor:
    """log X_j = 2πi·j/n + θ_j (complex128, (n,)); a single offset is shared by all levels."""
    j = torch.arange(n, dtype=torch.float64, device=level_log_offsets.device)
    base = torch.complex(torch.zeros_like(j), 2 * math.pi * j / n)
    return base + _as_complex(level_log_offsets)


class RootFindingError(RuntimeError):
    pass


def _cold_start(nodes: torch.Tensor, log_levels: torch.Tensor) -> torch.Tensor:
    """The exact roots of (z − ā)^n = X_j (ā = mean node): exact at the DFT setting, close near it."""
    n = nodes.shape[0]
    j1 = torch.arange(n, dtype=torch.float64, device=nodes.device)
    unit = torch.complex(torch.zeros_like(j1), 2 * math.pi * j1 / n)
    return nodes.mean() + torch.exp(log_levels[:, None] / n + unit[None, :])          # (j0, j1)


@torch.no_grad()
def _aberth(z: torch.Tensor, nodes: torch.Tensor, X: torch.Tensor, tol: float, max_iter: int):
    """Aberth–Ehrlich sweeps for the roots of Q(z) − X_j (row j of z holds the n roots of level j).

    Loops over chunks of the n nodes / n−1 root shifts with (n, n, c) temporaries (~2^18 elements)
    instead of forming (n, n, n) ones: same O(n³) arithmetic per sweep, cache-resident, and few enough
    kernel launches that intra-op threading does not stall on tiny ops.
    Returns (z, converged)."""
    n = nodes.shape[0]
    c = max(1, (1 << 18) // (n * n))                # chunk of nodes / shifts: (n, n, c) temporaries
    shifts = torch.arange(1, n, device=z.device)
    cols = torch.arange(n, device=z.device)
    for _ in range(max_iter):
        Q = torch.ones_like(z)
        S = torch.zeros_like(z)                     # Q'(z)/Q(z) = Σ_s 1/(z − a_s)
        for s0 in range(0, n, c):
            d = z[..., None] - nodes[s0:s0 + c]
            Q.mul_(d.prod(-1))
            S.add_(d.reciprocal_().sum(-1))
        newton = (Q - X[:, None]) / (Q * S)         # (Q − X)/Q'
        repulse = torch.zeros_like(z)               # Σ_{other roots w of the same level} 1/(z − w)
        for r0 in range(0, n - 1, c):
            idx = (cols[:, None] - shifts[r0:r0 + c]) % n                    # (n, c): root j1 − r
            repulse.add_((z[..., None] - z[:, idx]).reciprocal_().sum(-1))
        step = newton / (1 - newton * repulse)
        if not torch.isfinite(step).all():
            return z, False
        z = z - step
        if (step.abs() <= tol * (1 + z.abs())).all():
            return z, True
    return z, False


@torch.no_grad()
def solve_points(nodes: torch.Tensor, log_levels: torch.Tensor, tol: float = 1e-14,
                 max_iter: int = 200, warm_start: torch.Tensor | None = None) -> torch.Tensor:
    """Roots z[j0, j1] of Q(z) = X_{j0}, Q(z) = ∏_s (z − a_s), complex128. nodes (n,), log_levels (n,).

    Aberth–Ehrlich iteration from `warm_start` (e.g. the previous forward's points: after one optimizer
    step they are within round-off-to-small distance, 1-3 sweeps) if given, else, or if that fails, from
    the exact roots of (z − ā)^n = X_j. Raises RootFindingError if neither converges."""
    X = torch.exp(log_levels)
    if warm_start is not None and warm_start.shape == (nodes.shape[0],) * 2:
        z, ok = _aberth(warm_start.to(nodes.dtype), nodes, X, tol, min(max_iter, 30))
        if ok:
            return z
    z, ok = _aberth(_cold_start(nodes, log_levels), nodes, X, tol, max_iter)
    if ok:
        return z
    raise RootFindingError(
        "causal Monarch: Aberth iteration for the roots of Q(z) = X_j did not converge; the nodes/levels "
        "have left the well-conditioned region (coincident levels or roots)")


@dataclass
class MonarchFactors:
    """The shared factors of M and M⁻¹ (complex), all O(n³) in size:
    V (j0, i1), V_inv (i1, j0), B (j0, j1, i0), B_inv (j0, i0, j1), and the points z (j0, j1)."""
    V: torch.Tensor
    V_inv: torch.Tensor
    B: torch.Tensor
    B_inv: torch.Tensor
    z: torch.Tensor

    def to(self, dtype: torch.dtype) -> "MonarchFactors":
        return MonarchFactors(self.V.to(dtype), self.V_inv.to(dtype), self.B.to(dtype), self.B_inv.to(dtype),
                              self.z)


def monarch_factors(node_offsets: torch.Tensor, level_log_offsets: torch.Tensor, normalize: bool = True,
                    tol: float = 1e-14, max_iter: int = 200,
                    warm_start: torch.Tensor | None = None) -> MonarchFactors:
    """Build V, V⁻¹, the blocks and their closed-form inverses (complex128, differentiable w.r.t. nodes
    and levels; see the module docstring)."""
    a = _as_complex(node_offsets)                                                  # (n,)
    n = a.shape[0]
    logX = level_logs(level_log_offsets, n)                                        # (n,)
    X = torch.exp(logX)
    z_star = solve_points(a.detach(), logX.detach(), tol, max_iter, warm_start)
    # One Newton step with detached start and derivative: value z*, derivative = implicit derivative.
    d_star = z_star[..., None] - a
    q_prime_star = (d_star.detach().prod(-1) * d_star.detach().reciprocal().sum(-1))
    z = z_star - (d_star.prod(-1) - X[:, None]) / q_prime_star                      # (j0, j1)

    d = z[..., None] - a                                                            # (j0, j1, s)
    ones = torch.ones_like(d[..., :1])
    prefix = torch.cat([ones, torch.cumprod(d[..., :-1], dim=-1)], dim=-1)         # q_{i0}(z), i0 < n
    suffix = torch.cat([torch.cumprod(d[..., 1:].flip(-1), dim=-1).flip(-1), ones], dim=-1)  # h_{i0}(z)
    q_prime = (prefix * suffix).sum(-1)                                             # Q'(z) (j0, j1)
    B = prefix                                                                      # (j0, j1, i0)
    B_inv = (suffix / q_prime[..., None]).transpose(1, 2)                           # (j0, i0, j1)
    i1 = torch.arange(n, dtype=torch.float64, device=a.device)
    V = torch.exp(logX[:, None] * i1[None, :])                                      # (j0, i1)
    if normalize:
        # |w|² as re² + im² (complex abs goes through hypot: several times slower on n³ elements)
        alpha = torch.view_as_real(V).square().sum(-1).mean(0).rsqrt()             # (i1,)
        beta = torch.view_as_real(B).square().sum(-1).mean((0, 1)).rsqrt()         # (i0,)
        V = V * alpha
        B = B * beta
    V_inv = torch.linalg.inv(V)                                                     # (i1, j0)
    if normalize:
        B_inv = B_inv / beta[:, None]
    return MonarchFactors(V, V_inv, B, B_inv, z)


def monarch_eval(F: MonarchFactors, x: torch.Tensor) -> torch.Tensor:
    """E = M·x̃ for x (m·n ≥ L rows used, R columns): x (L, R) real or complex, L ≤ n², zero rows implied
    beyond L. Returns the evaluations (j0, j1, R), complex."""
    n = F.V.shape[0]
    L, R = x.shape
    m = -(-L // n)                                                                  # rows i1 that are nonzero
    if L < m * n:
        x = torch.cat([x, x.new_zeros(m * n - L, R)])
    U = x.reshape(m, n * R)                                                         # (i1, i0·R)
    V = F.V[:, :m]
    if x.is_complex():
        G = V @ U
    else:   # real input: one real GEMM with [Re V; Im V] instead of a complex GEMM on a cast copy
        VV = torch.cat([V.real, V.imag]) @ U                                        # (2n, i0·R)
        G = torch.complex(VV[:n], VV[n:])
    G = G.view(n, n, R)                                                             # (j0, i0, R)
    return torch.bmm(F.B, G)                                                        # (j0, j1, R)


def monarch_solve(F: MonarchFactors, E: torch.Tensor, rows: int) -> torch.Tensor:
    """Coefficients M⁻¹·E, first `rows` only: E (j0, j1, R) -> (rows, R) complex."""
    n = F.V.shape[0]
    R = E.shape[-1]
    G = torch.bmm(F.B_inv, E).view(n, n * R)                                        # (j0, i0·R)
    m = -(-rows // n)
    U = (F.V_inv[:m] @ G).view(m * n, R)                                            # (i1·n + i0, R)
    return U[:rows]


def dense_evaluation_matrix(node_offsets: torch.Tensor, level_log_offsets: torch.Tensor,
                            normalize: bool = True) -> torch.Tensor:
    """M[j, i] = b_i(z_j) (N'×N', complex128), b_i(z) = c_i·∏_{s<i}(z − a_{s mod n}) multiplied out
    directly (no use of Q or the levels beyond finding the points); row j = j0·n + j1. Tests only."""
    F = monarch_factors(node_offsets, level_log_offsets, normalize)
    a = _as_complex(node_offsets)
    n = a.shape[0]
    z = F.z.reshape(-1)                                                              # (N',)
    d = z[:, None] - a.repeat(n)[None, :]                                           # (N', N') factors z − a_s
    M = torch.cat([torch.ones_like(d[:, :1]), torch.cumprod(d[:, :-1], dim=-1)], dim=-1)
    if normalize:   # the same constants c_{i1,i0} = α_{i1}·β_{i0} as the factorised form
        logX = level_logs(level_log_offsets, n)
        i1 = torch.arange(n, dtype=torch.float64, device=z.device)
        alpha = torch.exp(2 * logX.real[:, None] * i1[None, :]).mean(0).rsqrt()
        beta = (M[:, :n].abs().square().mean(0)).rsqrt()
        M = M * (alpha[:, None] * beta[None, :]).reshape(-1)
    return M


class CausalMonarchConv(nn.Module):
    """The learned causal Monarch convolution: forward(x (B, H, L), k (H, L)[, k_rev]) -> (B, H, L).

    One set of nodes/levels per module, shared by all channels (per-channel bases would cost H·N'^{3/2}
    memory for the blocks). The module's n is fixed by max_len; shorter inputs are zero-padded to the same
    N', and by causality the output at length L equals the first L outputs at max_len."""

    def __init__(self, channels: int, max_len: int, *, n: int | None = None, bidirectional: bool = False,
                 normalize_basis: bool = True, root_tol: float = 1e-14, root_max_iter: int = 200):
        super().__init__()
        self.channels = channels
        self.max_len = max_len
        self.n = n if n is not None else grid_size(max_len)
        if self.n * self.n < 2 * max_len:
            raise ValueError(f"n={self.n}: n² must be ≥ 2·max_len = {2 * max_len}")
        self.bidirectional = bidirectional
        self.normalize_basis = normalize_basis
        self.root_tol = root_tol
        self.root_max_iter = root_max_iter
        self.node_offsets = nn.Parameter(torch.zeros(self.n, 2))
        # Bidirectional: one common level offset (levels ρ·e^{2πij/n}), see the module docstring.
        self.level_log_offsets = nn.Parameter(torch.zeros(1 if bidirectional else self.n, 2))
        self._points: torch.Tensor | None = None    # warm start for the root finder (see `factors`)

    def reset_parameters(self) -> None:
        """Back to the DFT setting (nodes 0, levels = roots of unity), where the operator is the FFT conv."""
        with torch.no_grad():
            self.node_offsets.zero_()
            self.level_log_offsets.zero_()
        self._points = None

    def factors(self) -> MonarchFactors:
        """The shared factors for the current nodes/levels. The points of the previous call seed the root
        finder (a plain attribute, not state: it only speeds up convergence, the converged points do not
        depend on it beyond round-off and their order, which the operator ignores)."""
        F = monarch_factors(self.node_offsets, self.level_log_offsets, self.normalize_basis,
                            self.root_tol, self.root_max_iter, warm_start=self._points)
        self._points = F.z.detach()
        return F

    def forward(self, x: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, L), k (H, L) [, k_rev (H, L) when bidirectional] -> (B, H, L) in x's dtype."""
        if (k_rev is not None) != self.bidirectional:
            raise ValueError("k_rev must be given exactly when the module is bidirectional")
        return causal_monarch_conv(x, k, self.factors(), k_rev)


def causal_monarch_conv(x: torch.Tensor, k: torch.Tensor, factors: MonarchFactors,
                        k_rev: torch.Tensor | None = None) -> torch.Tensor:
    """Re(M⁻¹((M·k̃) ⊙ (M·ũ)))[:L] for x (B, H, L), k (H, L); factors from `monarch_factors` (complex128;
    cast here to complex64 unless x is fp64). Autocast is off inside; the result has x's dtype."""
    B, H, L = x.shape
    n = factors.V.shape[0]
    if L > n * n // 2:
        raise ValueError(f"sequence length {L} exceeds N'/2 = {n * n // 2} of this causal Monarch conv")
    with torch.autocast(device_type=x.device.type, enabled=False):
        cdtype = compute_dtype(x.dtype)
        rdtype = torch.float64 if cdtype == torch.complex128 else torch.float32
        F = factors.to(cdtype)
        # M·k̃ once per forward, shared by the batch.
        kk = k.to(rdtype).t()                                                       # (L, H)
        if k_rev is not None:   # k_rev[j] at coefficient N'−1−j (the FFT's circular layout)
            gap = kk.new_zeros(n * n - 2 * L, H)
            kk = torch.cat([kk, gap, k_rev.to(rdtype).flip(-1).t()])
        Ek = monarch_eval(F, kk)                                                    # (j0, j1, H)
        u = x.to(rdtype).permute(2, 0, 1).reshape(L, B * H)                         # (L, B·H)
        Eu = monarch_eval(F, u).view(n, n, B, H)
        E = (Eu * Ek[:, :, None, :]).view(n, n, B * H)
        y = monarch_solve(F, E, L).real                                             # (L, B·H)
        y = y.reshape(L, B, H).permute(1, 2, 0)
    return y.to(x.dtype)


class CausalMonarchLongConv(nn.Module):
    """Drop-in for `m2train.models.mixer.LongConv`: y = monarch_conv(x, k) + D ⊙ x, same constructor and
    forward; the filter path (ImplicitFilter, parameter names filter.*) and the D skip (`skip`) are
    unchanged. Extra parameters: monarch.node_offsets (n, 2), monarch.level_log_offsets (n or 1, 2)."""

    def __init__(self, channels: int, max_len: int, order: int, emb_dim: int, sin_freq: float,
                 bidirectional: bool, **monarch_kwargs):
        super().__init__()
        self.filter = ImplicitFilter(channels, max_len, order=order, emb_dim=emb_dim,
                                     sin_freq=sin_freq, bidirectional=bidirectional)
        self.skip = nn.Parameter(torch.randn(channels))   # reference init N(0, 1)
        self.monarch = CausalMonarchConv(channels, max_len, bidirectional=bidirectional, **monarch_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, L) -> (B, H, L)."""
        k_fwd, k_rev = self.filter(x.shape[-1])
        return self.monarch(x, k_fwd, k_rev) + x * self.skip.to(x.dtype)[:, None]
