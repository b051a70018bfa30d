"""Binary spikes saved 1 bit per spike for backward: same gradients, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snncompile
from snncompile import functional, neuron, surrogate
from snncompile.ir.ops import Op
from snncompile.passes.pipeline import build_pipeline
from snncompile.runtime.packed_ops import (
    _PackedConv,
    _PackedLinear,
    _PackedMaxPool2d,
    pack_bits,
    unpack_bits,
)


def _binary(*shape: int, p: float = 0.6) -> torch.Tensor:
    return (torch.rand(shape) > p).float()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_roundtrip(n: int) -> None:
    x = _binary(n)
    p = pack_bits(x)
    assert p.bits.dtype is torch.uint8 and p.bits.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(p), x)
    h = _binary(3, n).half()
    assert torch.equal(unpack_bits(pack_bits(h)), h) and unpack_bits(pack_bits(h)).dtype is h.dtype


@pytest.mark.parametrize("stride,padding,groups,bias", [(1, 1, 1, True), (2, 0, 2, False)])
def test_packed_conv_bit_equal(stride: int, padding: int, groups: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, bias=bias)
    x = _binary(5, 4, 9, 9)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = conv(xa)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa, *conv.parameters()], g)
    yb = _PackedConv.apply(
        xb, conv.weight, conv.bias, [stride] * 2, [padding] * 2, [1, 1], groups
    )
    gb = torch.autograd.grad(yb, [xb, *conv.parameters()], g)
    assert torch.equal(ya, yb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))


@pytest.mark.parametrize("n,i,o", [(8, 512, 10), (33, 77, 5), (256, 300, 100)])
def test_packed_linear_bit_equal(n: int, i: int, o: int) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(i, o)
    x = _binary(n, i)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = lin(xa)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa, *lin.parameters()], g)
    yb = _PackedLinear.apply(xb, lin.weight, lin.bias)
    gb = torch.autograd.grad(yb, [xb, *lin.parameters()], g)
    assert torch.equal(ya, yb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))


@pytest.mark.parametrize(
    "shape,kernel,stride,padding",
    [
        ((4, 3, 8, 8), 2, 2, 0),  # tiled fast path
        ((2, 3, 9, 7), 2, 2, 0),  # tiled, odd sizes (floor)
        ((5, 6, 6), 3, 3, 0),  # 3-D input
        ((2, 2, 8, 8), 3, 2, 1),  # overlapping windows: indices recomputed
    ],
)
def test_packed_maxpool_bit_equal(shape: tuple, kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(2)
    x = _binary(*shape)
    x[0] = 0  # all-zero windows: the gradient goes to each window's first element
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = F.max_pool2d(xa, kernel, stride, padding)
    g = torch.randn_like(ya)
    (ga,) = torch.autograd.grad(ya, xa, g)
    yb = _PackedMaxPool2d.apply(xb, [kernel] * 2, [stride] * 2, [padding] * 2, [1, 1], False)
    (gb,) = torch.autograd.grad(yb, xb, g)
    assert torch.equal(ya, yb) and torch.equal(ga, gb)


def _cnn(kind: str, pool: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    make = {
        "lif": lambda: neuron.LIFNode(
            surrogate_function=surrogate.ATan(), v_threshold=0.3, step_mode="m"
        ),
        "if": lambda: neuron.IFNode(
            surrogate_function=surrogate.Sigmoid(), v_threshold=0.5, step_mode="m"
        ),
    }[kind]
    from snncompile import layer

    layers: list[nn.Module] = [layer.Conv2d(2, 4, 3, padding=1), layer.BatchNorm2d(4), make()]
    if pool:
        layers.append(layer.MaxPool2d(2))
    layers += [layer.Conv2d(4, 4, 3, stride=2, padding=1), make()]
    layers += [layer.Flatten(), layer.Linear(4 * (2 if pool else 4) ** 2, 5), make()]
    net = nn.Sequential(*layers)
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4.0)
    return net


def _step(compiled: nn.Module, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    functional.reset_net(compiled)
    y = compiled(x)
    w = torch.linspace(-1, 1, y.shape[-1])
    grads = torch.autograd.grad((y * w).sum(), list(model.parameters()))
    return [y, *grads]


def _unpacked(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return snncompile.optimize(model, x, pack_spikes=False)


def test_packing_is_off_by_default_and_on_under_a_budget() -> None:
    model, x = _cnn("lif", True, 0), torch.rand(4, 3, 2, 8, 8)
    assert not any(n.attrs.get("packed_input") for n in snncompile.optimize(model, x).graph)
    names = [name for name, _ in build_pipeline("train")]
    listed = snncompile.optimize(model, x, passes=names)  # listing the pass asks for it
    assert any(n.attrs.get("packed_input") for n in listed.graph)
    budgeted = snncompile.optimize(model, x, memory_budget="1GB")
    assert any(n.attrs.get("packed_input") for n in budgeted.graph)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind,pool", [("lif", True), ("if", False)])
def test_compiled_grads_bit_equal(seed: int, kind: str, pool: bool) -> None:
    model = _cnn(kind, pool, seed)
    x = torch.rand(4, 3, 2, 8, 8) * 4.0
    packed = snncompile.optimize(model, x, pack_spikes=True)
    rec = {r.name: r for r in packed.records}["pack_spikes"]
    assert rec.modified and "save their input packed" in rec.notes[0]
    assert any(n.attrs.get("packed_input") for n in packed.graph)
    plain = _unpacked(model, x)
    assert not any(n.attrs.get("packed_input") for n in plain.graph)
    a, b = _step(packed, model, x), _step(plain, model, x)
    assert a[0].abs().sum() > 0  # spikes reach the output
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_non_spiking_surrogate_is_not_binary() -> None:
    net = nn.Sequential(
        nn.Linear(6, 6),
        neuron.LIFNode(surrogate_function=surrogate.ATan(spiking=False), step_mode="m"),
        nn.Linear(6, 3),
    )
    x = torch.rand(3, 2, 6)
    compiled = snncompile.optimize(net, x, pack_spikes=True)
    assert not any(n.attrs.get("packed_input") for n in compiled.graph)


def test_inference_packs_nothing() -> None:
    net = _cnn("lif", True, 0).eval()
    compiled = snncompile.optimize(net, torch.rand(2, 1, 2, 8, 8), pack_spikes=True)
    assert not any(n.attrs.get("packed_input") for n in compiled.graph)


def test_spikingjelly_cnn_bit_equal(sj) -> None:
    ly, nr, sg = sj.layer, sj.neuron, sj.surrogate
    torch.manual_seed(3)
    net = nn.Sequential(
        ly.Conv2d(3, 8, 3, padding=1, bias=False),
        ly.BatchNorm2d(8),
        nr.LIFNode(surrogate_function=sg.ATan()),
        ly.MaxPool2d(2),
        ly.Conv2d(8, 8, 3, padding=1, bias=False),
        ly.BatchNorm2d(8),
        nr.LIFNode(surrogate_function=sg.ATan()),
        ly.MaxPool2d(2),
        ly.Flatten(),
        ly.Linear(8 * 4 * 4, 10),
        nr.LIFNode(surrogate_function=sg.ATan()),
    )
    sj.functional.set_step_mode(net, "m")
    x = torch.rand(4, 2, 3, 16, 16) * 3
    packed = snncompile.optimize(net, x, pack_spikes=True)
    # Every conv/linear/max-pool node but the first conv reads spikes: 4 of them, or 2 when
    # fuse_chains merged the max poolings into the neurons' kernels (binary pooled spikes).
    readers = len(packed.graph.find(Op.CONV2D, Op.LINEAR, Op.MAXPOOL)) - 1
    assert readers == (4 if packed.graph.find(Op.MAXPOOL) else 2)
    assert sum(bool(n.attrs.get("packed_input")) for n in packed.graph) == readers
    a, b = _step(packed, net, x), _step(_unpacked(net, x), net, x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    # ... and the same as SpikingJelly itself, to float rounding.
    sj.functional.reset_net(net)
    y = net(x)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, 10)).sum(), list(net.parameters()))
    assert torch.equal(y, a[0])
    for g, mine in zip(grads, a[1:], strict=True):
        torch.testing.assert_close(g, mine, rtol=1e-4, atol=1e-5)
