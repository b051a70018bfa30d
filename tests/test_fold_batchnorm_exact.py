"""BatchNorm folding: not bit-exact, said so in the report; ``fold_batchnorm=False`` is exact.

Folding computes ``W' = W * gamma / sqrt(var + eps)`` and ``b' = (b - mean) * gamma /
sqrt(var + eps) + beta`` once, in float32; the eager model normalises the conv output instead.
Both are correct to float rounding (~1e-6 relative on pre-activations), but a membrane within
that distance of the threshold fires in one and not the other. The bound checked here: at most
1% of the spikes of any layer differ, and pre-activations agree to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron

FLIP_BOUND = 0.01  # fraction of spikes that folding may flip (see the module docstring)


class ConvBNNet(nn.Module):
    """conv-BN-IF x3 then a linear readout (multi-step), with non-trivial BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        c = 8
        self.body = nn.Sequential(
            layer.Conv2d(2, c, 3, padding=1, bias=False),
            layer.BatchNorm2d(c),
            neuron.IFNode(),
            layer.Conv2d(c, c, 3, padding=1),
            layer.BatchNorm2d(c),
            neuron.IFNode(),
            layer.Conv2d(c, c, 3, padding=1),
            layer.BatchNorm2d(c),
            neuron.IFNode(),
            layer.Flatten(),
            layer.Linear(c * 8 * 8, 10),
        )
        functional.set_step_mode(self, "m")
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_(2.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _spikes_of(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output spikes of every IF layer of ``model`` (eager) on ``x``."""
    out: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
        for m in model.modules()
        if isinstance(m, neuron.IFNode)
    ]
    functional.reset_net(model)
    with torch.no_grad():
        model(x)
    functional.reset_net(model)
    for h in hooks:
        h.remove()
    return out


def test_unfolded_inference_equals_eager_exactly() -> None:
    model = ConvBNNet().eval()
    x = (torch.rand(6, 4, 2, 8, 8) > 0.5).float()
    compiled = snncompile.optimize(model, x[:, :2], mode="inference", fold_batchnorm=False)
    assert any(n.op.name == "BATCHNORM" for n in compiled.graph)
    functional.reset_net(model)
    with torch.no_grad():
        ref = model(x)
        got = compiled(x)
    assert torch.equal(got, ref)
    assert "not bit-exact" not in compiled.report()


def test_folded_inference_is_close_and_reported() -> None:
    model = ConvBNNet().eval()
    x = (torch.rand(6, 16, 2, 8, 8) > 0.5).float()
    compiled = snncompile.optimize(model, x[:, :2], mode="inference", backend="torch")
    assert not any(n.op.name == "BATCHNORM" for n in compiled.graph)
    report = compiled.report()
    assert "not bit-exact" in report and "fold_batchnorm=False" in report
    # Pre-activation of the first layer: folded conv vs conv -> BN.
    conv, bn = model.body[0], model.body[1]
    folded = next(n for n in compiled.graph if n.op.name == "CONV2D").module
    with torch.no_grad():
        pre_folded, pre_eager = folded(x.flatten(0, 1)), bn(conv(x)).flatten(0, 1)
    assert not torch.equal(pre_folded, pre_eager)  # folding rounds differently...
    torch.testing.assert_close(pre_folded, pre_eager, rtol=1e-5, atol=1e-5)  # ...by ~1 ulp
    # Spikes of every layer: at most FLIP_BOUND of them differ.
    ref = _spikes_of(model, x)
    taps = [n.name for n in compiled.graph if n.op.group.name == "NEURON"]
    assert len(taps) == len(ref) == 3
    fused = snncompile.optimize(
        model, x[:, :2], mode="inference", backend="torch", passes=["fold_batchnorm"]
    )
    outs: dict[str, torch.Tensor] = {}
    for name in taps:
        sub = fused.gm.get_submodule(name)
        sub.register_forward_hook(lambda _m, _i, o, k=name: outs.__setitem__(k, o.detach()))
    functional.reset_net(fused)
    with torch.no_grad():
        fused(x)
    for name, r in zip(taps, ref, strict=True):
        flips = float((outs[name] != r).float().mean())
        assert flips <= FLIP_BOUND, f"{name}: {flips:.4f} of the spikes flipped"
        assert r.mean() > 0.01  # the layers spike


def test_fold_batchnorm_false_conflicts_with_an_explicit_fold_pass() -> None:
    model = ConvBNNet().eval()
    x = torch.rand(2, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="fold_batchnorm=False"):
        snncompile.optimize(
            model, x, mode="inference", passes=["fold_batchnorm"], fold_batchnorm=False
        )
