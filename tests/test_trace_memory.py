"""The tracer's concrete values (frontend.shape_values) must not keep every activation of the
example alive: compiling peaks like one no-grad forward of the model, not like a training step
that saves every intermediate."""

from __future__ import annotations

import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.runtime.memory import LiveBytes


def _deep_cnn() -> nn.Module:
    blocks: list[nn.Module] = []
    for _ in range(6):  # six same-size blocks: holding them all costs 6x one block
        blocks += [
            layer.Conv2d(8, 8, 3, padding=1, bias=False),
            layer.BatchNorm2d(8),
            neuron.LIFNode(surrogate_function=surrogate.ATan()),
        ]
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1), *blocks, layer.Flatten(), layer.Linear(8 * 16 * 16, 4)
    )
    functional.set_step_mode(net, "m")
    return net


def test_compile_peaks_like_one_inference_forward() -> None:
    torch.manual_seed(0)
    net = _deep_cnn()
    x = torch.rand(8, 4, 2, 16, 16)
    forward = LiveBytes()
    with forward, torch.no_grad():
        net(x)
    functional.reset_net(net)
    compile_ = LiveBytes()
    with compile_:
        snncompile.optimize(net, x)
    ratio = compile_.peak / forward.peak
    print(f"optimize peak {compile_.peak / 1e6:.2f} MB, forward {forward.peak / 1e6:.2f} MB")
    assert ratio < 2.0, f"compiling peaked at {ratio:.1f}x one no-grad forward"


class _AttributeShapeCheck(nn.Module):
    """Reads a tensor attribute (``y.mT``) and branches on its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = layer.Linear(6, 6)
        self.sn = neuron.LIFNode(surrogate_function=surrogate.ATan())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        z = y.mT  # fx's Attribute proxy: its node's value must outlive the proxy fx drops
        if z.ndim == 3 and z.shape[-1] == x.shape[1]:
            y = y + 0.5
        return self.sn(y)


def test_attribute_values_survive_freeing() -> None:
    torch.manual_seed(0)
    net = _AttributeShapeCheck()
    functional.set_step_mode(net, "m")
    x = torch.rand(3, 4, 6)
    compiled = snncompile.optimize(net, x, strict=True)  # strict: the forward must trace
    functional.reset_net(net)
    assert torch.equal(compiled(x), net(x))
