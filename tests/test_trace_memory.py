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
