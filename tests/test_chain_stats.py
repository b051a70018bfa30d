"""The chain kernel's training batchnorm statistics in C: running statistics and counters
exactly as ``nn.BatchNorm2d`` updates them, and the fresh-state (filled in the kernel) path."""

from __future__ import annotations

import copy

import pytest
import torch
from chain_helpers import fused_and_unfused
from torch import nn

from snncompile import neuron, surrogate
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.fused_chain import FusedChain

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


def _chain(bn: nn.BatchNorm2d, pool: nn.Module | None = None) -> FusedChain:
    lif = neuron.LIFNode(tau=2.0, step_mode="m", surrogate_function=surrogate.ATan(), backend="cpu")
    return FusedChain(lif, bn, pool).train()


@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
def test_running_stats_over_calls_match_batchnorm(momentum):
    """Three training calls: running mean / var within 1 ulp of PyTorch's (float64 sums vs
    PyTorch's float32 reduction), ``num_batches_tracked`` equal, the cumulative average when
    ``momentum`` is None, and spikes bit-equal to the unfused modules."""
    torch.manual_seed(0)
    chain = _chain(nn.BatchNorm2d(5, momentum=momentum), nn.MaxPool2d(2))
    ref = copy.deepcopy(chain)
    for _ in range(3):
        chain.neuron.reset()
        ref.neuron.reset()
        x = torch.randn(3, 2, 5, 4, 6) * 2.0 + 0.3
        assert torch.equal(chain(x), ref.unfused(x))
        assert int(chain.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked)
        torch.testing.assert_close(chain.bn.running_mean, ref.bn.running_mean, rtol=2e-7,
                                   atol=1e-7)  # fmt: skip
        torch.testing.assert_close(chain.bn.running_var, ref.bn.running_var, rtol=2e-7,
                                   atol=1e-7)  # fmt: skip
    assert int(chain.bn.num_batches_tracked) == 3


def test_untracked_batchnorm_keeps_no_statistics():
    """``track_running_stats=False``: batch statistics in training and in eval, nothing
    stored; outputs and input gradients as the unfused modules'."""
    torch.manual_seed(1)
    chain = _chain(nn.BatchNorm2d(3, track_running_stats=False))
    for train in (True, False):
        chain.train(train)
        chain.neuron.reset()
        y, yr, gx, gxr = fused_and_unfused(chain, torch.randn(2, 3, 3, 5, 5) + 0.5)
        assert torch.equal(y, yr)
        assert ((gx - gxr).norm() / gxr.norm()).item() < 1e-6
    assert chain.bn.running_mean is None


def test_fresh_and_tensor_state_give_the_same_call():
    """A chain whose neuron state is the reset float (filled inside the kernel) and one whose
    state is that float as a tensor that needs a gradient give equal outputs and input
    gradients; the tensor state gets the membrane gradient."""
    torch.manual_seed(2)
    a = _chain(nn.BatchNorm2d(4))
    b = copy.deepcopy(a)
    x = torch.randn(3, 2, 4, 6, 6).requires_grad_()
    xb = x.detach().clone().requires_grad_()
    v = torch.zeros(2, 4, 6, 6, requires_grad=True)
    b.neuron.v = v
    ya, yb = a(x), b(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(x.grad, xb.grad)
    assert v.grad is not None and v.grad.abs().sum() > 0
