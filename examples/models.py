"""Small example model factories for the command line, the tests and the docs.

Each factory returns a freshly initialised multi-step SNN (``step_mode='m'``, input
``[T, N, ...]``) built from :mod:`snncompile.layer` and :mod:`snncompile.neuron`, the way a
SpikingJelly user writes it. Use them with the command line, for example::

    snncompile inspect examples/models.py:spiking_cnn --input-shape 4,2,1,8,8
    snncompile export examples.models:spiking_mlp --input-shape 4,2,64 --format onnx -o mlp.onnx
"""

from __future__ import annotations

from torch import nn

from snncompile import functional, layer, neuron


def spiking_mlp(in_features: int = 64, hidden: int = 32, classes: int = 10) -> nn.Module:
    """Return a two-layer LIF MLP for ``[T, N, in_features]`` inputs (default 8x8 digits)."""
    net = nn.Sequential(
        layer.Linear(in_features, hidden),
        neuron.LIFNode(tau=2.0),
        layer.Linear(hidden, classes),
        neuron.LIFNode(tau=2.0),
    )
    functional.set_step_mode(net, "m")
    return net


def spiking_cnn(channels: int = 8, classes: int = 10) -> nn.Module:
    """Return a small conv-BN-LIF CNN for ``[T, N, 1, 8, 8]`` inputs (the digits images)."""
    c = channels
    net = nn.Sequential(
        layer.Conv2d(1, c, 3, padding=1, bias=False),
        layer.BatchNorm2d(c),
        neuron.LIFNode(tau=2.0),
        layer.MaxPool2d(2),
        layer.Conv2d(c, 2 * c, 3, padding=1, bias=False),
        layer.BatchNorm2d(2 * c),
        neuron.LIFNode(tau=2.0),
        layer.MaxPool2d(2),
        layer.Flatten(),
        layer.Linear(2 * c * 2 * 2, classes),
        neuron.LIFNode(tau=2.0),
    )
    functional.set_step_mode(net, "m")
    return net
