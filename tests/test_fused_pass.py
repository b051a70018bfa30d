"""The fuse_neurons pass: NEURON -> FUSED_NEURON in the optimize pipeline's 'fusion' stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snncompile import functional, layer, neuron, surrogate
from snncompile.api import optimize
from snncompile.ir import Op
from snncompile.ir.verify import verify
from snncompile.passes.fuse_neurons import fuse_neurons
from snncompile.passes.pipeline import registered_passes
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.lower_fusion import apply_fusion_decisions

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


def _net() -> nn.Module:
    return nn.Sequential(
        layer.Linear(12, 32),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
        layer.Linear(32, 32),
        neuron.ParametricLIFNode(v_reset=None, detach_reset=True),
        layer.Linear(32, 16),
        neuron.IFNode(surrogate_function=surrogate.Rect()),  # no expression form: stays torch
        layer.Linear(16, 4),
        neuron.LIFNode(decay_input=False, v_reset=-0.2),
    )


def _inputs(T: int = 6, N: int = 5) -> torch.Tensor:
    return torch.rand(T, N, 12) * 1.5


def test_pass_is_registered_in_the_fusion_stage():
    assert "fuse_neurons" in [e.name for e in registered_passes("fusion")]


def test_fuse_neurons_rewrites_supported_neurons():
    torch.manual_seed(0)
    model = _net()
    functional.set_step_mode(model, "m")
    x = _inputs()
    compiled = optimize(model, x, backend="torch")
    graph = compiled.graph
    before = graph.find(Op.NEURON)
    assert len(before) == 4 and not graph.find(Op.FUSED_NEURON)
    assert fuse_neurons(graph).modified is False  # backend='torch': nothing to do

    graph.meta["backend"] = "cpu"
    result = fuse_neurons(graph)
    assert result.modified
    verify(result.graph)
    fused = result.graph.find(Op.FUSED_NEURON)
    left = result.graph.find(Op.NEURON)
    assert len(fused) == 3 and len(left) == 1
    assert left[0].attrs["surrogate"] == "Rect"
    # IR -> IR: the decision is recorded; lowering applies it to the modules.
    assert all(n.attrs["fused_backend"] == "cpu" and n.attrs["kernel"] for n in fused)
    assert all(n.module.backend == "torch" for n in fused)
    assert apply_fusion_decisions(result.graph) == 3
    assert all(n.module.backend == "cpu" for n in fused)
    assert any("Rect" in note or "expression form" in note for note in result.notes)


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_optimize_with_fused_neurons_matches_eager(mode):
    torch.manual_seed(0)
    model = _net()
    functional.set_step_mode(model, "m")
    if mode == "inference":
        model.eval()
    x = _inputs()
    compiled = optimize(model, x, mode=mode, backend="cpu")
    assert len(compiled.graph.find(Op.FUSED_NEURON)) == 3
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    for _ in range(2):  # state is reset between samples
        functional.reset_net(model)
        functional.reset_net(compiled)
        ye = model(xe)
        yc = compiled(xc)
        assert torch.equal(ye, yc)
    if mode == "train":
        ye.sum().backward()
        yc.sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
