"""Neurons with states beside the membrane (Izhikevich, ALIF, CUBA-LIF) next to a batchnorm or
a pooling: the chain kernels carry ``v`` only, so such chains are left unfused, with the reason
in the report, and the compiled model (its neurons in their own fused kernels) trains as the
eager one does. A chain kernel generated for them used to fail to compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.runtime.fused import compiler_available

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")

MULTI_STATE = ["IzhikevichNode", "ALIFNode", "CUBALIFNode"]


def _net(cls: str, bn: bool, pool: bool) -> nn.Module:
    # A conv bias before a training batchnorm has a gradient of ~0 (the mean is removed): none.
    mods: list[nn.Module] = [layer.Conv2d(2, 4, 3, padding=1, bias=not bn)]
    if bn:
        mods.append(layer.BatchNorm2d(4))
    mods.append(getattr(neuron, cls)(surrogate_function=surrogate.ATan()))
    if pool:
        mods.append(layer.MaxPool2d(2))
    mods += [layer.Flatten(), layer.Linear(4 * (16 if pool else 64), 3)]
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


@pytest.mark.parametrize("cls", MULTI_STATE)
@pytest.mark.parametrize("bn,pool", [(True, True), (False, True), (True, False)])
def test_multi_state_neuron_chain_is_left_unfused_and_trains_as_eager(cls, bn, pool):
    torch.manual_seed(MULTI_STATE.index(cls))
    net = _net(cls, bn, pool)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    eager = copy.deepcopy(net)
    x = torch.rand(3, 2, 2, 8, 8) * 2
    compiled = snncompile.optimize(net, x)
    report = compiled.report()
    assert f"{cls} carries states beside v" in report, report
    y = compiled(x)
    functional.reset_net(eager)
    y_ref = eager(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for (name, p), p_ref in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        err = ((p.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, (name, err)
