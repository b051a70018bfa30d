"""Small planes: the chain kernels take several ``(n, c)`` planes per work item. Grouped and
one-plane-per-item kernels must give bit-identical outputs, states and gradients (the
per-neuron arithmetic and every sum's order are the same), and both match the unfused ops."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from chain_helpers import random_bn
from torch import nn

from snncompile import neuron, surrogate
from snncompile.ann2snn.modules import VoltageScale
from snncompile.runtime import fused_chain
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.fused_chain import FusedChain, group_planes

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _chain(kind: str, C: int) -> tuple[FusedChain, int]:
    """A chain of ``kind`` on ``C`` channels and its number of extra inputs."""
    lif = neuron.ParametricLIFNode(
        init_tau=2.5, step_mode="m", surrogate_function=surrogate.ATan(), backend="cpu"
    )
    if kind == "max":
        return FusedChain(lif, random_bn(C), nn.MaxPool2d(2)), 0
    if kind == "residual":
        return FusedChain(lif, random_bn(C), None, residual=True), 1
    if kind == "added":
        return FusedChain(lif, random_bn(C), None, added=True), 1
    scale = VoltageScale(torch.rand(C, 1, 1) + 0.5)
    return FusedChain(lif, None, None, scale_in=scale, scale_out=copy.deepcopy(scale)), 0


def _run(chain: FusedChain, xs: list[torch.Tensor], unfused: bool = False) -> dict:
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = chain.unfused(*xs) if unfused else chain(*xs)
    torch.manual_seed(99)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in chain.named_parameters()}
    return {"y": y.detach(), "v": chain.neuron.v.detach(), "gx": [x.grad for x in xs], **grads}


CASES = list(itertools.product(("max", "residual", "added", "scale"), (True, False)))


@pytest.mark.parametrize("kind,train", CASES)
def test_grouped_planes_are_bit_identical_and_match_unfused(kind, train, monkeypatch):
    """33 planes of 4x4 (groups of 4, the last one short): grouped == one plane per item,
    bit for bit; vs the unfused ops spikes equal, input gradients within 1e-6 relative."""
    torch.manual_seed(CASES.index((kind, train)))
    T, N, C, H, W = 3, 3, 11, 4, 4
    assert group_planes(N * C, H * W) == 4
    chain, extra = _chain(kind, C)
    chain.train(train)
    xs = [torch.randn(T, N, C, H, W) * 1.5 + 0.5 for _ in range(1 + extra)]
    runs = []
    for groups in (True, False):
        c = copy.deepcopy(chain)
        if not groups:
            monkeypatch.setattr(fused_chain, "group_planes", lambda planes, plane: 1)
        runs.append(_run(c, xs))
        monkeypatch.undo()
    grouped, single = runs
    for k in grouped:
        if k == "gx":
            assert all(torch.equal(a, b) for a, b in zip(grouped[k], single[k], strict=True))
        else:
            assert torch.equal(grouped[k], single[k]), k
    ref = _run(copy.deepcopy(chain), xs, unfused=True)
    assert torch.equal(grouped["y"], ref["y"])
    for a, b in zip(grouped["gx"], ref["gx"], strict=True):
        assert _rel(a, b) < 1e-6


def test_group_sizes():
    """Planes of >= 256 neurons are one item each; small planes are grouped to ~256 neurons
    while keeping at least 8 items when there are that many planes."""
    assert group_planes(4096, 1024) == 1
    assert group_planes(4096, 16) == 16
    assert group_planes(4096, 1) == 256
    assert group_planes(16, 1) == 2
    assert group_planes(5, 4) == 1
