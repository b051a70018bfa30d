"""The per-call fast paths of fused neurons and chains give what the full paths give.

A fused call skips autograd when nothing needs a gradient, keeps an eval batchnorm's
coefficients while its tensors are unchanged, and keeps each neuron class's method analysis
while its methods are the same objects. Each test checks that the shortcut is taken where it
is meant to be and that a change it must notice (an in-place update of the running statistics,
a replaced buffer, ``eps``, a patched class, a gradient to the affine parameters) is noticed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from chain_helpers import random_bn
from torch import nn

from snncompile import neuron, surrogate
from snncompile.runtime import fused, fused_backends, fused_chain
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.fused_chain import FusedChain

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


def _if() -> nn.Module:
    return neuron.IFNode(
        step_mode="m", surrogate_function=surrogate.ATan(), detach_reset=True, backend="cpu"
    )


def _eval_chain(C: int = 3) -> FusedChain:
    return FusedChain(_if(), random_bn(C), None, residual=True).eval()


def _run(chain: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    chain.neuron.reset()
    return chain(*inputs)


def _unfused(chain: FusedChain, *inputs: torch.Tensor) -> torch.Tensor:
    chain.neuron.reset()
    return chain.unfused(*inputs)


def test_eval_coefficients_follow_the_running_statistics() -> None:
    torch.manual_seed(0)
    chain = _eval_chain()
    x, r = torch.randn(4, 2, 3, 5, 5) * 2, torch.randn(4, 2, 3, 5, 5)
    with torch.no_grad():
        first = _run(chain, x, r)
        assert torch.equal(first, _unfused(chain, x, r))
        kept = chain._affine_cache[0]
        _run(chain, x, r)
        assert chain._affine_cache[0] is kept  # unchanged tensors: the same coefficients

        chain.bn.running_mean.add_(0.7)  # in place: a new version
        moved = _run(chain, x, r)
        assert chain._affine_cache[0] is not kept
        assert torch.equal(moved, _unfused(chain, x, r))
        assert not torch.equal(moved, first)

        chain.bn.running_var = chain.bn.running_var * 4.0  # a replaced buffer
        assert torch.equal(_run(chain, x, r), _unfused(chain, x, r))
        chain.bn.eps = 0.5
        assert torch.equal(_run(chain, x, r), _unfused(chain, x, r))
        state = copy.deepcopy(chain.bn.state_dict())
        state["weight"].mul_(-1.0)
        chain.bn.load_state_dict(state)  # copies in place
        assert torch.equal(_run(chain, x, r), _unfused(chain, x, r))


def test_eval_affine_parameters_still_get_gradients() -> None:
    """An eval batchnorm with trainable affine parameters (fine-tuning with frozen statistics):
    the coefficients carry the gradient, so they are not taken from the cache."""
    torch.manual_seed(1)
    chain = _eval_chain()
    ref = copy.deepcopy(chain)
    x = (torch.randn(4, 2, 3, 5, 5) * 2).requires_grad_()
    r = torch.randn(4, 2, 3, 5, 5)
    for _ in range(2):  # the second call would hit a cache filled by the first
        chain.zero_grad()
        ref.zero_grad()
        x.grad = None
        _run(chain, x, r).sum().backward()
        gx = x.grad.clone()
        x.grad = None
        _unfused(ref, x, r).sum().backward()
        torch.testing.assert_close(gx, x.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(chain.bn.weight.grad, ref.bn.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chain.bn.bias.grad, ref.bn.bias.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_no_grad_calls_skip_autograd_with_the_same_results(
    train: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(2)
    chain = FusedChain(_if(), random_bn(3), nn.MaxPool2d(2)).train(train)
    twin = copy.deepcopy(chain)
    x = torch.randn(4, 2, 3, 6, 6) * 2 + 0.3
    with torch.enable_grad():
        want = _run(twin, x.clone().requires_grad_()).detach()
        want_v = twin.neuron.v.detach()

    applied: list[int] = []
    real = fused_chain._ChainFunction.apply
    monkeypatch.setattr(
        fused_chain._ChainFunction, "apply", lambda *a: applied.append(1) or real(*a)
    )
    with torch.no_grad():
        got = _run(chain, x)
    assert not applied  # no autograd Function for a call without gradients
    assert torch.equal(got, want) and torch.equal(chain.neuron.v, want_v)
    if train:  # the training batchnorm updated its running statistics the same way
        assert torch.equal(chain.bn.running_mean, twin.bn.running_mean)
        assert torch.equal(chain.bn.running_var, twin.bn.running_var)
    _run(chain, x.clone().requires_grad_())
    assert applied  # with a gradient to take, the Function runs


def test_neuron_no_grad_call_skips_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    sn, twin = _if(), _if()
    x = torch.randn(5, 2, 7) * 2
    want = twin(x.clone().requires_grad_()).detach()
    applied: list[int] = []
    real = fused.FusedNeuronFunction.apply
    monkeypatch.setattr(
        fused.FusedNeuronFunction, "apply", lambda *a: applied.append(1) or real(*a)
    )
    with torch.no_grad():
        got = sn(x)
    assert not applied
    assert torch.equal(got, want) and torch.equal(sn.v, twin.v.detach())
    sn.reset()
    sn(x.clone().requires_grad_()).sum().backward()
    assert applied


def test_a_patched_neuron_class_is_analysed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    class MyIF(neuron.IFNode):
        pass

    node = MyIF(step_mode="m", backend="cpu")
    assert fused_backends.dynamics_for(node) is not None
    assert fused_backends.overridden_step_methods(MyIF) == []

    def charge(self: nn.Module, x: torch.Tensor) -> None:
        self.v = self.v + 2.0 * x  # elementwise torch code: captured into expressions

    monkeypatch.setattr(MyIF, "neuronal_charge", charge, raising=False)
    assert fused_backends.overridden_step_methods(MyIF) == ["neuronal_charge"]
    x = torch.rand(3, 2, 4)
    node.reset()
    fused_out = node(x)
    eager = MyIF(step_mode="m", backend="torch")
    assert torch.equal(fused_out, eager(x))  # the patched charge, not IF's own

    def fire(self: nn.Module) -> torch.Tensor:
        return (self.v > 0.5).float()

    monkeypatch.setattr(MyIF, "neuronal_fire", fire, raising=False)
    assert fused_backends.dynamics_for(node) is None  # not capturable: runs as written
