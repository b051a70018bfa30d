"""A user's ``neuronal_charge`` override captured with torch.fx into the expression form and fused.

Each captured neuron is checked against its own eager run (the same class with
``backend='torch'``): spikes and membrane bit-identical for ``+ - * /`` charges (float rounding
for transcendental ones, whose C libm result can differ in the last ulp), gradients within 1e-5.
What cannot be captured runs as written, and the reason is in the warning and in ``optimize``'s
report.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, neuron
from snncompile.codegen import build
from snncompile.ir.ops import Op
from snncompile.runtime.fused_backends import REASONS, dynamics_for

needs_cc = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler installed")


class LeakyGain(neuron.LIFNode):
    """Rational charge: captured and fused bit-exactly."""

    def neuronal_charge(self, x: torch.Tensor) -> None:
        self.v = self.v * (1.0 - 1.0 / self.tau) + x * 0.8 - 0.05


class SoftClip(neuron.ParametricLIFNode):
    """Reads the learnable parameter and uses torch functions and methods."""

    def neuronal_charge(self, x: torch.Tensor) -> None:
        k = self.w.sigmoid()
        self.v = self.v + (torch.clamp(x, -2.0, 2.0) - self.v) * k + 0.05 * torch.tanh(self.v)


class Adaptive(neuron.IzhikevichNode):
    """A multi-state neuron whose charge (reading the extra state w) is overridden."""

    def neuronal_charge(self, x: torch.Tensor) -> None:
        self.v = self.v + (x - self.v - self.w) / self.tau


class Branchy(neuron.LIFNode):
    """Control flow on tensor values: cannot be captured, runs as written."""

    def neuronal_charge(self, x: torch.Tensor) -> None:
        if (self.v > 0.5).any():
            self.v = self.v + 0.5 * x
        else:
            self.v = self.v + x


def _run(node: nn.Module, x: torch.Tensor):
    xs = x.clone().requires_grad_()
    s = node(xs)
    (g,) = torch.autograd.grad(s.sum() * 0.3 + node.v.sum(), xs)
    return s, node.v.detach(), g


@needs_cc
@pytest.mark.parametrize("cls", [LeakyGain, SoftClip, Adaptive])
def test_captured_charge_is_fused_and_matches_its_eager_run(cls: type):
    kw = {"a": 0.2, "b": 0.3} if cls is Adaptive else {}
    fused, eager = cls(step_mode="m", backend="cpu", **kw), cls(step_mode="m", **kw)
    if cls is SoftClip:
        eager.w = fused.w
    d = dynamics_for(fused)
    assert d is not None, REASONS.get(cls)
    assert d.name.endswith(cls.__name__.lower())
    x = torch.randn(16, 3, 50) * 1.5
    s1, v1, g1 = _run(fused, x)
    s2, v2, g2 = _run(eager, x)
    assert torch.equal(s1, s2) and 0.0 < s1.mean().item() < 1.0
    if cls is SoftClip:  # tanhf (libm) vs torch.tanh: last-ulp differences
        assert torch.allclose(v1, v2, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(v1, v2)
    assert ((g1 - g2).abs().max() / g2.abs().max()).item() < 1e-5


@needs_cc
def test_optimize_fuses_a_captured_subclass():
    model = nn.Sequential(nn.Linear(6, 20), LeakyGain(step_mode="m"))
    x = torch.randn(10, 2, 6)
    compiled = snncompile.optimize(model, x, backend="cpu")
    assert compiled.graph.find(Op.FUSED_NEURON)
    functional.reset_net(model)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


def test_uncapturable_charge_runs_as_written_with_the_reason():
    node = Branchy(step_mode="m", backend="cpu")
    assert dynamics_for(node) is None
    assert "control flow" in REASONS[Branchy]
    ref = Branchy(step_mode="m")
    x = torch.randn(8, 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = node(x)
    assert torch.equal(out, ref(x))
    assert any("control flow" in str(w.message) for w in caught)
    model = nn.Sequential(nn.Linear(4, 8), Branchy(step_mode="m"))
    compiled = snncompile.optimize(model, torch.randn(5, 2, 4), backend="cpu")
    notes = [n for r in compiled.records if r.name == "fuse_neurons" for n in r.notes]
    assert any("control flow" in n for n in notes), notes


def test_capture_refuses_writes_to_other_attributes():
    class Writer(neuron.LIFNode):
        def neuronal_charge(self, x: torch.Tensor) -> None:
            self.last_x = x
            self.v = self.v + x

    assert dynamics_for(Writer(step_mode="m")) is None
    assert "assigns self.last_x" in REASONS[Writer]


@needs_cc
def test_registered_neuron_type_with_its_own_charge_is_fused_and_exported(tmp_path):
    from snncompile.export.onnx import export_onnx
    from snncompile.frontend import register_neuron_type
    from snncompile.onnx_runtime import run_step_model

    class Leaky(neuron.BaseNode):
        def neuronal_charge(self, x: torch.Tensor) -> None:
            self.v = self.v * 0.9 + x

    register_neuron_type(Leaky)
    model = nn.Sequential(nn.Linear(4, 16), Leaky(step_mode="m")).eval()
    x = torch.randn(6, 2, 4) * 2.0
    compiled = snncompile.optimize(model, x, backend="cpu")
    assert compiled.graph.find(Op.FUSED_NEURON)
    functional.reset_net(model)
    with torch.no_grad():
        expect = model(x)
        assert torch.equal(compiled(x), expect)
    export_onnx(model, x, tmp_path / "leaky.onnx", mode="step")
    assert (run_step_model(tmp_path / "leaky.onnx", x.numpy()) == expect.numpy()).all()
