"""Chain kernels with overlapping / padded max pooling and with a residual add before the neuron.

Max pooling of binary spikes is the OR of the window, but its backward must route each output's
gradient to the position PyTorch's ``max_pool2d`` picks (the first maximum in row-major window
order over the in-bounds part, ties included) and, with overlapping windows, add the gradients
in PyTorch's order: the fused kernel is compared with the same modules run one after another.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from snncompile import neuron, surrogate
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.fused_chain import FusedChain, chain_blocker

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _lif(detach_reset: bool = True) -> nn.Module:
    return neuron.LIFNode(
        tau=1.7, step_mode="m", surrogate_function=surrogate.ATan(), detach_reset=detach_reset,
        backend="cpu",
    )  # fmt: skip


def _bn(C: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


WINDOWS = [(3, 2, 1), (3, 1, 1), (2, 1, 0), (3, 3, 0), (3, 2, 0), (5, 2, 2), (2, 2, 1)]
POOL_GRID = list(itertools.product(WINDOWS, (7, 8), (True, False), (True, False)))


@pytest.mark.parametrize("window,size,use_bn,train", POOL_GRID)
def test_overlapping_maxpool_matches_unfused(window, size, use_bn, train):
    """Spikes bit-equal; the input gradient within 1e-6 relative (the routed spike gradient is
    exactly PyTorch's, ties and overlaps included); the membrane within a few ulp."""
    torch.manual_seed(POOL_GRID.index((window, size, use_bn, train)))
    k, s, p = window
    T, N, C = 3, 2, 3
    pool = nn.MaxPool2d(k, s, padding=p)
    chain = FusedChain(_lif(), _bn(C) if use_bn else None, pool).train(train)
    ref = copy.deepcopy(chain)
    x = (torch.randn(T, N, C, size, size) * 1.5 + 0.7).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = chain(x), ref.unfused(x_ref)
    assert y.shape == y_ref.shape
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(chain.neuron.v, ref.neuron.v, rtol=1e-6, atol=4e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert _rel(x.grad, x_ref.grad) < 1e-6


def test_maxpool_gradient_routing_on_ties_is_pytorchs():
    """Without a neuron in the way: the kernel's spike gradient equals max_pool2d's backward on
    random binary planes (many ties, all-zero windows), bit for bit. The neuron is an IF node
    with threshold 0.5 on inputs 0 / 1 and ``detach_reset``, so spikes = inputs and the
    surrogate gradient is the same at every spike value; compare with eager on the same spikes."""
    torch.manual_seed(0)
    for k, s, p in WINDOWS:
        nrn = neuron.IFNode(
            v_threshold=0.5, v_reset=None, step_mode="m", detach_reset=True, backend="cpu",
            surrogate_function=surrogate.ATan(),
        )  # fmt: skip
        chain = FusedChain(nrn, None, nn.MaxPool2d(k, s, padding=p))
        ref = copy.deepcopy(chain)
        x = (torch.rand(1, 2, 2, 9, 9) < 0.3).float().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = chain(x), ref.unfused(x_ref)
        assert torch.equal(y, y_ref)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        assert torch.equal(x.grad, x_ref.grad), (k, s, p)


RES_GRID = list(itertools.product(("max", None), (True, False), (True, False)))


@pytest.mark.parametrize("pool,train,detach_reset", RES_GRID)
def test_residual_before_neuron_matches_unfused(pool, train, detach_reset):
    """``neuron(bn(x) + r)``: spikes bit-equal, gradients of ``x`` and ``r`` within 1e-6."""
    torch.manual_seed(RES_GRID.index((pool, train, detach_reset)))
    T, N, C, H, W = 3, 2, 4, 6, 6
    pool_m = nn.MaxPool2d(3, 2, padding=1) if pool else None
    chain = FusedChain(_lif(detach_reset), _bn(C), pool_m, residual=True).train(train)
    ref = copy.deepcopy(chain)
    x = (torch.randn(T, N, C, H, W) * 1.5).requires_grad_()
    r = (torch.rand(T, N, C, H, W) < 0.4).float().requires_grad_()
    xr, rr = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    y, y_ref = chain(x, r), ref.unfused(xr, rr)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert _rel(x.grad, xr.grad) < 1e-6
    assert _rel(r.grad, rr.grad) < 1e-6
    for p, q in zip(chain.bn.parameters(), ref.bn.parameters(), strict=True):
        assert _rel(p.grad, q.grad) < 1e-5


def test_residual_call_errors_name_the_chain():
    chain = FusedChain(_lif(), _bn(2), None, residual=True)
    with pytest.raises(ValueError, match="residual=True"):
        chain(torch.randn(2, 1, 2, 4, 4))


def test_blocker_names_unsupported_pools():
    assert chain_blocker(_lif(), None, nn.MaxPool2d(3, 2, padding=1)) is None
    why = chain_blocker(_lif(), None, nn.AvgPool2d(3, 2, padding=1))
    assert why is not None and "avg: kernel == stride" in why
    assert chain_blocker(_lif(), None, nn.MaxPool2d(3, 2, dilation=2)) is not None
    assert chain_blocker(_lif(), None, nn.MaxPool2d(2, ceil_mode=True)) is not None
