"""Block-diagonal and Monarch layers equal their dense matrices, forward and backward (fp64)."""

import math

import pytest
import torch

from m2train.models.blockdiag import BlockDiagonalLinear
from m2train.models.monarch import MonarchLinear


def _check_equals_dense(layer, in_features):
    layer = layer.double()
    x = torch.randn(3, 5, in_features, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    W = layer.dense_weight()
    y_dense = x @ W.T + (layer.bias if layer.bias is not None else 0)
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    # gradients w.r.t. input and every parameter agree with the dense computation
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(layer.parameters()), g)
    grads_dense = torch.autograd.grad(y_dense, [x] + list(layer.parameters()), g)
    for a, b in zip(grads, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inp,out,nblocks,bias", [(16, 32, 4, True), (32, 16, 4, False), (10, 7, 4, True),
                                                  (13, 30, 3, True), (8, 8, 1, True)])
def test_blockdiag_equals_dense(inp, out, nblocks, bias):
    _check_equals_dense(BlockDiagonalLinear(inp, out, nblocks, bias=bias), inp)


def test_blockdiag_reference_semantics():
    layer = BlockDiagonalLinear(12, 8, nblocks=4).double()
    assert layer.weight.shape == (4, 2, 3)
    x = torch.randn(2, 12, dtype=torch.float64)
    # contiguous chunks: chunk k of the input goes through block k into output chunk k
    expected = torch.cat([x[:, 3 * k:3 * k + 3] @ layer.weight[k].T for k in range(4)], dim=-1) + layer.bias
    torch.testing.assert_close(layer(x), expected)
    # padding: 10 inputs over 4 blocks -> blocks of 3 inputs, zero-padded; 7 outputs -> truncated
    padded = BlockDiagonalLinear(10, 7, nblocks=4)
    assert padded.weight.shape == (4, 2, 3)
    assert padded(torch.randn(5, 10)).shape == (5, 7)


def test_blockdiag_reference_init_bounds():
    layer = BlockDiagonalLinear(768, 6144, nblocks=4)
    assert layer.weight.abs().max() <= 1 / math.sqrt(192) + 1e-7
    assert layer.weight.std() > 0.5 / math.sqrt(3 * 192)        # uniform, not a degenerate init
    assert layer.bias.abs().max() <= 1 / math.sqrt(6144) + 1e-7


@pytest.mark.parametrize("inp,out,nblocks,bias", [(16, 16, 4, True), (16, 64, 4, True), (64, 16, 4, False),
                                                  (10, 22, 4, True), (36, 36, 6, True)])
def test_monarch_equals_dense(inp, out, nblocks, bias):
    _check_equals_dense(MonarchLinear(inp, out, nblocks, bias=bias), inp)


def test_monarch_is_P_L_Pt_R():
    """Square order-2 Monarch n = b·b: dense view equals P·L·Pᵀ·R built from explicit matrices."""
    b = 4
    n = b * b
    layer = MonarchLinear(n, n, nblocks=b, bias=False).double()
    R = torch.block_diag(*layer.blkdiag1.unbind(0))
    L = torch.block_diag(*layer.blkdiag2.unbind(0))
    # P: view as (b, b), transpose, flatten — as a permutation matrix acting on column vectors
    perm = torch.arange(n).view(b, b).T.reshape(-1)
    P = torch.eye(n, dtype=torch.float64)[perm]
    M = P @ L @ P.T @ R
    torch.testing.assert_close(layer.dense_weight(), M, rtol=1e-12, atol=1e-12)
    # and it is not block-diagonal: every output depends on every input
    assert (M.abs() > 0).all()


@pytest.mark.parametrize("features,order", [(16, 2), (27, 3), (16, 4), (5, 1)])
def test_order_p_monarch_equals_dense(features, order):
    from m2train.models.monarch import MonarchLinearOrderP
    _check_equals_dense(MonarchLinearOrderP(features, order), features)


def test_order_2_is_the_order_2_monarch():
    from m2train.models.monarch import MonarchLinearOrderP
    b = 4
    p2 = MonarchLinearOrderP(b * b, 2, bias=False).double()
    m = MonarchLinear(b * b, b * b, nblocks=b, bias=False).double()
    with torch.no_grad():
        m.blkdiag1.copy_(p2.factors[0])       # R: blocks on contiguous chunks
        m.blkdiag2.copy_(p2.factors[1])       # L: blocks on the transposed view
    torch.testing.assert_close(p2.dense_weight(), m.dense_weight(), rtol=1e-12, atol=1e-12)

