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
from chain_helpers import fused_and_unfused, random_bn
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.ir.ops import Op
from snncompile.ir.verify import verify
from snncompile.passes.fuse_chains import unfuse_chains
from snncompile.passes.pipeline import build_pipeline
from snncompile.runtime import fused_chain
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


# (kernel, stride, padding); (3, 3, 0) and (2, 2, 0) tile the plane, whose gradient routing is
# the straight-line SIMD code of chain_kernels.tiled_max_backward (7 x 7 planes leave a row
# and a column uncovered).
WINDOWS = [(3, 2, 1), (3, 1, 1), (2, 1, 0), (3, 3, 0), (3, 2, 0), (5, 2, 2), (2, 2, 1), (2, 2, 0)]
POOL_GRID = list(itertools.product(WINDOWS, (7, 8), (True, False), (True, False)))


@pytest.mark.parametrize("window,size,use_bn,train", POOL_GRID)
def test_overlapping_maxpool_matches_unfused(window, size, use_bn, train):
    """Spikes bit-equal; the input gradient within 1e-6 relative (the routed spike gradient is
    exactly PyTorch's, ties and overlaps included); the membrane within a few ulp."""
    torch.manual_seed(POOL_GRID.index((window, size, use_bn, train)))
    k, s, p = window
    T, N, C = 3, 2, 3
    pool = nn.MaxPool2d(k, s, padding=p)
    chain = FusedChain(_lif(), random_bn(C) if use_bn else None, pool).train(train)
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
        x = (torch.rand(1, 2, 2, 9, 9) < 0.3).float()
        y, y_ref, gx, gx_ref = fused_and_unfused(chain, x)
        assert torch.equal(y, y_ref)
        assert torch.equal(gx, gx_ref), (k, s, p)


RES_GRID = list(itertools.product(("max", None), (True, False), (True, False)))


@pytest.mark.parametrize("pool,train,detach_reset", RES_GRID)
def test_residual_before_neuron_matches_unfused(pool, train, detach_reset):
    """``neuron(bn(x) + r)``: spikes bit-equal, gradients of ``x`` and ``r`` within 1e-6."""
    torch.manual_seed(RES_GRID.index((pool, train, detach_reset)))
    T, N, C, H, W = 3, 2, 4, 6, 6
    pool_m = nn.MaxPool2d(3, 2, padding=1) if pool else None
    chain = FusedChain(_lif(detach_reset), random_bn(C), pool_m, residual=True).train(train)
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
    chain = FusedChain(_lif(), random_bn(2), None, residual=True)
    with pytest.raises(ValueError, match="residual=True"):
        chain(torch.randn(2, 1, 2, 4, 4))


def test_blocker_names_unsupported_pools():
    assert chain_blocker(_lif(), None, nn.MaxPool2d(3, 2, padding=1)) is None
    why = chain_blocker(_lif(), None, nn.AvgPool2d(3, 2, padding=1))
    assert why is not None and "avg: kernel == stride" in why
    assert chain_blocker(_lif(), None, nn.MaxPool2d(3, 2, dilation=2)) is not None
    assert chain_blocker(_lif(), None, nn.MaxPool2d(2, ceil_mode=True)) is not None


class _Block(nn.Module):
    """A spiking-ResNet basic block: ``sn2(bn2(conv2(sn1(bn1(conv1(x))))) + x)``, multi-step."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = layer.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = layer.BatchNorm2d(c)
        self.sn1 = neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True)
        self.conv2 = layer.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = layer.BatchNorm2d(c)
        self.sn2 = neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x)))))
        return self.sn2(out + x)


def _resnet() -> nn.Module:
    m = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
        neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True),
        layer.MaxPool2d(3, 2, 1), _Block(4), _Block(4), layer.Flatten(), layer.Linear(64, 3),
    )  # fmt: skip
    functional.set_step_mode(m, "m")
    return m


def _without() -> list[str]:
    return [n for n, _ in build_pipeline("train") if n not in ("fuse_chains", "pack_spikes")]


def test_pass_fuses_residual_and_stem_pool():
    """The stem's ``bn -> sn -> maxpool(3, 2, 1)`` and each block's ``bn2 -> + x -> sn2`` become
    chains; a training step and eval agree with the compile without the pass (spikes and
    outputs bit-equal, gradients within 1e-5 relative: batchnorm sums over deep paths);
    unfuse_chains restores the adds and the pooling."""
    torch.manual_seed(3)
    model = _resnet()
    x = (torch.rand(3, 2, 2, 8, 8) < 0.5).float()
    fused = snncompile.optimize(copy.deepcopy(model), x, backend="cpu")
    plain = snncompile.optimize(copy.deepcopy(model), x, backend="cpu", passes=_without())
    chains = {n.name: n.attrs["chain"] for n in fused.graph.find(Op.FUSED_NEURON)
              if "chain" in n.attrs}  # fmt: skip
    assert sorted(chains.values()).count(("bn", "add", "neuron")) == 2
    assert ("bn", "neuron", "pool") in chains.values()
    assert not fused.graph.find(Op.ADD) and not fused.graph.find(Op.MAXPOOL)
    verify(fused.graph)
    rec = next(r for r in fused.records if r.name == "fuse_chains")
    assert any("(+ %" in n for n in rec.notes)
    for step in range(2):
        functional.reset_net(fused)
        functional.reset_net(plain)
        ya, yb = fused(x), plain(x)
        assert torch.equal(ya, yb), step
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        for (n, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
            assert _rel(p.grad, q.grad) < 1e-5, n
            p.grad = q.grad = None
    fused.eval()
    plain.eval()
    functional.reset_net(fused)
    functional.reset_net(plain)
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
    g = fused.graph.copy()
    assert unfuse_chains(g).modified
    assert len(g.find(Op.ADD)) == 2 and len(g.find(Op.MAXPOOL)) == 1
    verify(g)


def test_residual_without_batchnorm_when_exact():
    """With fold_batchnorm=False no batchnorm is merged, but the adds are (without a prologue),
    and the eval output stays bit-exact with the eager model."""
    model = _resnet()
    x = (torch.rand(2, 2, 2, 8, 8) < 0.5).float()
    c = snncompile.optimize(copy.deepcopy(model).eval(), x, backend="cpu", mode="inference",
                            fold_batchnorm=False)  # fmt: skip
    assert len(c.graph.find(Op.BATCHNORM)) == 5 and not c.graph.find(Op.ADD)
    with torch.no_grad():
        functional.reset_net(model)
        assert torch.equal(c(x), model.eval()(x))


class _SewBlock(_Block):
    """A SEW-ResNet ADD block: ``sn2(bn2(conv2(sn1(bn1(conv1(x)))))) + x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sn2(self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_pass_fuses_sew_add_after_neuron(mode):
    """SEW's ``x + sn2(...)`` is merged into sn2's chain (``'added'``); training and inference
    agree with the compile without the pass (outputs bit-equal, gradients within 1e-5)."""
    torch.manual_seed(4)
    model = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
        neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True),
        _SewBlock(4), _SewBlock(4), layer.Flatten(), layer.Linear(256, 3),
    )  # fmt: skip
    functional.set_step_mode(model, "m")
    if mode == "inference":
        model.eval()
    x = (torch.rand(3, 2, 2, 8, 8) < 0.5).float()
    passes = [n for n, _ in build_pipeline(mode) if n not in ("fuse_chains", "pack_spikes")]
    fused = snncompile.optimize(copy.deepcopy(model), x, backend="cpu", mode=mode)
    plain = snncompile.optimize(copy.deepcopy(model), x, backend="cpu", mode=mode, passes=passes)
    chains = [n.attrs.get("chain") for n in fused.graph.find(Op.FUSED_NEURON)]
    assert sum(1 for c in chains if c and "added" in c) == 2
    assert not fused.graph.find(Op.ADD)
    verify(fused.graph)
    ya, yb = fused(x), plain(x)
    assert torch.equal(ya, yb)
    if mode == "train":
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        for (n, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
            assert _rel(p.grad, q.grad) < 1e-5, n
    g2 = fused.graph.copy()
    assert unfuse_chains(g2).modified
    assert len(g2.find(Op.ADD)) == 2
    verify(g2)


def test_added_residual_module_matches_unfused():
    """FusedChain(added=True): ``e + neuron(bn(x))``, gradients of ``x`` and ``e``."""
    torch.manual_seed(6)
    chain = FusedChain(_lif(), random_bn(3), None, added=True)
    ref = copy.deepcopy(chain)
    x = torch.randn(3, 2, 3, 5, 5).requires_grad_()
    e = torch.randn(3, 2, 3, 5, 5).requires_grad_()
    xr, er = x.detach().clone().requires_grad_(), e.detach().clone().requires_grad_()
    y, y_ref = chain(x, e), ref.unfused(xr, er)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert _rel(x.grad, xr.grad) < 1e-6
    assert torch.equal(e.grad, er.grad)
    with pytest.raises(ValueError, match="needs no pooling"):
        FusedChain(_lif(), None, nn.MaxPool2d(2), added=True)


def test_auto_fuses_small_planes():
    """backend='auto' (the default) fuses the 4x4 residual blocks too (small planes are
    grouped per work item), and the outputs match the compile without the pass."""
    model = _resnet()
    x = (torch.rand(2, 2, 2, 8, 8) < 0.5).float()
    c = snncompile.optimize(copy.deepcopy(model), x)
    notes = next(r for r in c.records if r.name == "fuse_chains").notes
    assert not any("planes of" in n for n in notes)
    assert not c.graph.find(Op.ADD)
    plain = snncompile.optimize(copy.deepcopy(model), x, passes=_without())
    with torch.no_grad():
        functional.reset_net(c)
        functional.reset_net(plain)
        assert torch.equal(c(x), plain(x))


def test_auto_leaves_small_planes_with_reason(monkeypatch):
    """With a plane bound (AUTO_MIN_PLANE raised to 32) backend='auto' leaves the chains on
    smaller planes, with the reason in the pass notes."""
    monkeypatch.setattr(fused_chain, "AUTO_MIN_PLANE", 32)
    model = _resnet()
    x = (torch.rand(2, 2, 2, 8, 8) < 0.5).float()
    c = snncompile.optimize(copy.deepcopy(model), x)
    notes = next(r for r in c.records if r.name == "fuse_chains").notes
    assert any("planes of 16 < 32 neurons" in n for n in notes)  # the 4x4 blocks
    chains = [n.attrs.get("chain") for n in c.graph.find(Op.FUSED_NEURON)]
    assert ("bn", "neuron", "pool") in chains  # the 8x8 stem
    assert len(c.graph.find(Op.ADD)) == 2


def test_pass_fuses_per_channel_voltage_scales():
    """ann2snn with channel-wise scales: ``VoltageScale([C, 1, 1]) -> IF -> VoltageScale`` is
    one chain; outputs bit-equal to the converted model run eagerly and to the compile without
    the pass, at two steps counts and after a second call without reset; unfuse restores them."""
    from snncompile.ann2snn import convert
    from snncompile.ann2snn.modules import VoltageScale

    torch.manual_seed(7)
    ann = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 64, 3),
    ).eval()  # fmt: skip
    snn = convert(ann, torch.rand(30, 2, 8, 8).split(10), channel_wise=True, progress=False)
    assert any(isinstance(m, VoltageScale) and m.scale.numel() == 4 for m in snn.modules())
    x = torch.rand(6, 2, 2, 8, 8)
    passes = [n for n, _ in build_pipeline("inference") if n not in ("fuse_chains", "pack_spikes")]
    fused = snncompile.optimize(copy.deepcopy(snn), x, mode="inference", backend="cpu")
    plain = snncompile.optimize(copy.deepcopy(snn), x, mode="inference", backend="cpu",
                                passes=passes)  # fmt: skip
    chains = [n.attrs.get("chain") for n in fused.graph.find(Op.FUSED_NEURON)]
    assert chains.count(("scale_in", "neuron", "scale_out")) == 2
    assert not fused.graph.find(Op.ELEMENTWISE)
    with torch.no_grad():
        for m in (fused, plain, snn):
            functional.reset_net(m)
        for _ in range(2):  # the second call continues from the first call's membranes
            y = fused(x)
            assert torch.equal(y, plain(x))
            assert torch.equal(y, snn(x))
    g = fused.graph.copy()
    assert unfuse_chains(g).modified
    assert len(g.find(Op.ELEMENTWISE)) == 4
    verify(g)


def test_per_channel_scale_module_gradients():
    """FusedChain with scale_in / scale_out: spikes and the input gradient as unfused."""
    from snncompile.ann2snn.modules import VoltageScale

    torch.manual_seed(8)
    s_in, s_out = VoltageScale(torch.rand(3, 1, 1) + 0.5), VoltageScale(torch.rand(3, 1, 1) + 0.5)
    chain = FusedChain(_lif(False), None, None, scale_in=s_in, scale_out=s_out)
    ref = copy.deepcopy(chain)
    x = (torch.randn(3, 2, 3, 6, 6) * 2).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, y_ref = chain(x), ref.unfused(xr)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert _rel(x.grad, xr.grad) < 1e-6
    with pytest.raises(ValueError, match="batchnorm and an input scale"):
        FusedChain(_lif(), random_bn(3), None, scale_in=s_in)
