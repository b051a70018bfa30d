"""End-to-end tests of snncompile.optimize: compiled == eager (outputs, gradients, state).

Each model family (MLP, VGG-style CNN with BN, SEW-ResNet-style residual net, PLIF net) is built
from snncompile's modules and from SpikingJelly 2.0.0's, in single-step and multi-step form.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import snncompile.functional as sc_functional
from snncompile import layer as sc_layer
from snncompile import neuron as sc_neuron
from snncompile.api import optimize
from snncompile.base import MemoryModule
from snncompile.ir import Layout, Op

T, N = 4, 3


def lib_ours() -> SimpleNamespace:
    return SimpleNamespace(layer=sc_layer, neuron=sc_neuron, functional=sc_functional)


class SEWBlock(nn.Module):
    """conv-BN-IF twice, then ADD the block input (SEW 'ADD' connection)."""

    def __init__(self, L: SimpleNamespace, ch: int) -> None:
        super().__init__()
        self.conv1 = L.layer.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = L.layer.BatchNorm2d(ch)
        self.sn1 = L.neuron.IFNode()
        self.conv2 = L.layer.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = L.layer.BatchNorm2d(ch)
        self.sn2 = L.neuron.IFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sn1(self.bn1(self.conv1(x)))
        out = self.sn2(self.bn2(self.conv2(out)))
        return out + x


def build(kind: str, L: SimpleNamespace, step_mode: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A small model of ``kind`` from library ``L`` in ``step_mode``, and its per-step shape."""
    ly, nr = L.layer, L.neuron
    if kind == "mlp":
        net = nn.Sequential(
            ly.Flatten(),
            ly.Linear(64, 32),
            nr.LIFNode(tau=2.0),
            ly.Linear(32, 10),
            nr.LIFNode(tau=2.0, v_reset=None),
        )
        shape = (1, 8, 8)
    elif kind == "vgg":
        net = nn.Sequential(
            ly.Conv2d(1, 8, 3, padding=1, bias=False),
            ly.BatchNorm2d(8),
            nr.IFNode(),
            ly.MaxPool2d(2),
            ly.Conv2d(8, 8, 3, padding=1),
            ly.BatchNorm2d(8),
            nr.LIFNode(),
            ly.AvgPool2d(2),
            ly.Flatten(),
            ly.Linear(8 * 2 * 2, 16),
            ly.BatchNorm1d(16),
            nr.LIFNode(),
            ly.Linear(16, 5),
        )
        shape = (1, 8, 8)
    elif kind == "sew":
        net = nn.Sequential(
            ly.Conv2d(2, 8, 3, padding=1, bias=False),
            ly.BatchNorm2d(8),
            nr.IFNode(),
            SEWBlock(L, 8),
            ly.AdaptiveAvgPool2d((2, 2)),
            ly.Flatten(),
            ly.Linear(32, 5),
        )
        shape = (2, 6, 6)
    elif kind == "plif":
        net = nn.Sequential(
            ly.Conv2d(1, 6, 3, padding=1),
            ly.BatchNorm2d(6),
            nr.ParametricLIFNode(init_tau=2.0),
            ly.MaxPool2d(2),
            ly.Flatten(),
            ly.Linear(6 * 4 * 4, 10),
            nr.ParametricLIFNode(init_tau=3.0, detach_reset=True),
        )
        shape = (1, 8, 8)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4.0)  # enough drive that neurons fire
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    L.functional.set_step_mode(net, step_mode)
    return net, shape


def eager(model: nn.Module, x: torch.Tensor, step_mode: str) -> torch.Tensor:
    if step_mode == "m":
        return model(x)
    return torch.stack([model(xt) for xt in x.unbind(0)])


def _compare(y_ref: torch.Tensor, y: torch.Tensor, spikes: bool) -> None:
    assert y.shape == y_ref.shape
    if spikes:
        assert torch.equal(y, y_ref)
    else:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


MODELS = ["mlp", "vgg", "sew", "plif"]
SPIKE_OUT = {"mlp": True, "vgg": False, "sew": False, "plif": True}


def _check_train(L: SimpleNamespace, kind: str, step_mode: str) -> None:
    model, shape = build(kind, L, step_mode)
    ref = copy.deepcopy(model)
    x0 = torch.rand(T, N, *shape) * 3
    compiled = optimize(model, x0)
    assert compiled.mode == "train"
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in model.parameters()}
    for _trial in range(3):
        x = torch.rand(T, N, *shape) * 3
        x_ref = x.clone().requires_grad_(True)
        x_c = x.clone().requires_grad_(True)
        L.functional.reset_net(ref)
        sc_functional.reset_net(compiled)
        y_ref = eager(ref, x_ref, step_mode)
        y = compiled(x_c)
        _compare(y_ref, y, SPIKE_OUT[kind])
        assert y.abs().sum() > 0, "degenerate test: the output is all zero"
        w = torch.randn_like(y)
        (y_ref * w).sum().backward()
        (y * w).sum().backward()
        torch.testing.assert_close(x_c.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        for (name, p_ref), p in zip(ref.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)
            p.grad = None
            p_ref.grad = None
        for b_ref, b in zip(ref.buffers(), model.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref)


def _check_inference(L: SimpleNamespace, kind: str, step_mode: str) -> None:
    model, shape = build(kind, L, step_mode)
    model.eval()
    ref = copy.deepcopy(model)
    compiled = optimize(model, torch.rand(T, N, *shape))
    assert compiled.mode == "inference"
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(compiled.graph.find(Op.BATCHNORM)) == 0 < n_bn or n_bn == 0
    with torch.no_grad():
        for _ in range(2):
            x = torch.rand(T, N, *shape) * 3
            L.functional.reset_net(ref)
            sc_functional.reset_net(compiled)
            _compare(eager(ref, x, step_mode), compiled(x), SPIKE_OUT[kind])


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("kind", MODELS)
def test_train_ours(kind: str, step_mode: str) -> None:
    _check_train(lib_ours(), kind, step_mode)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("kind", MODELS)
def test_inference_ours(kind: str, step_mode: str) -> None:
    _check_inference(lib_ours(), kind, step_mode)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("kind", MODELS)
def test_train_spikingjelly(sj, kind: str, step_mode: str) -> None:
    _check_train(sj, kind, step_mode)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("kind", MODELS)
def test_inference_spikingjelly(sj, kind: str, step_mode: str) -> None:
    _check_inference(sj, kind, step_mode)


def test_single_step_graph_is_lowered() -> None:
    model, shape = build("vgg", lib_ours(), "s")
    compiled = optimize(model, torch.rand(T, N, *shape))
    g = compiled.graph
    assert all(n.layout is not Layout.STEP for n in g)
    neurons = g.find(Op.NEURON, Op.FUSED_NEURON)
    assert neurons and all(n.layout is Layout.SEQ and n.module.step_mode == "m" for n in neurons)
    convs = g.find(Op.CONV2D)
    assert convs and all(n.layout is Layout.FLAT for n in convs)
    # Training-mode BN keeps per-step statistics: it runs in a per-step loop.
    assert all(n.attrs.get("per_step") for n in g.find(Op.BATCHNORM))


def test_optimizer_on_either_trains_both_and_state_is_separate() -> None:
    model, shape = build("plif", lib_ours(), "s")
    x = torch.rand(T, N, *shape) * 3
    compiled = optimize(model, x)
    plif = model[2]
    # Optimizer over the compiled module's parameters updates the user's model.
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    w_before = plif.w.detach().clone()
    compiled(x).sum().backward()
    opt.step()
    assert not torch.equal(plif.w.detach(), w_before)
    # State: the compiled neurons are copies; running the compiled module leaves the model's v.
    sc_functional.reset_net(model)
    assert plif.v == 0.0
    compiled(x)
    assert plif.v == 0.0
    compiled_neurons = compiled.graph.find(Op.NEURON, Op.FUSED_NEURON)
    assert isinstance(compiled_neurons[0].module.v, torch.Tensor)
    sc_functional.reset_net(compiled)
    assert all(n.module.v == 0.0 for n in compiled_neurons)
    # detach_net cuts the graph of the compiled state.
    compiled(x)
    sc_functional.detach_net(compiled)
    assert all(not n.module.v.requires_grad for n in compiled_neurons)


def test_state_carries_across_calls_like_eager() -> None:
    model, shape = build("mlp", lib_ours(), "s")
    ref = copy.deepcopy(model)
    compiled = optimize(model, torch.rand(T, N, *shape))
    x1, x2 = torch.rand(2, T, N, *shape) * 3
    y = torch.cat([compiled(x1), compiled(x2)])  # no reset in between
    y_ref = torch.cat([eager(ref, x1, "s"), eager(ref, x2, "s")])
    assert torch.equal(y, y_ref)


def test_inference_mode_of_a_training_model_leaves_it_training() -> None:
    model, shape = build("vgg", lib_ours(), "s")
    assert model.training
    compiled = optimize(model, torch.rand(T, N, *shape), mode="inference")
    assert model.training and all(m.training for m in model.modules())
    assert not compiled.training
    ref = copy.deepcopy(model).eval()
    x = torch.rand(T, N, *shape) * 3
    with torch.no_grad():
        _compare(eager(ref, x, "s"), compiled(x), spikes=False)


def test_argument_validation_and_run_time_shape_error() -> None:
    model, shape = build("mlp", lib_ours(), "s")
    x = torch.rand(T, N, *shape)
    with pytest.raises(ValueError, match="mode must be one of"):
        optimize(model, x, mode="eval")
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize(model, x, backend="tpu")
    compiled = optimize(model, x, backend="cpu")
    assert compiled.backend == "cpu" and compiled.graph.options.backend == "cpu"
    with pytest.raises(ValueError, match=r"expected input of shape \[T, N, \.\.\.\]"):
        compiled(x[0])


def test_report_lists_passes() -> None:
    model, shape = build("vgg", lib_ours(), "s")
    compiled = optimize(model.eval(), torch.rand(T, N, *shape))
    text = compiled.report()
    for name in ("remove_dead_ops", "lower_step_mode", "simplify_time_layout", "fold_batchnorm"):
        assert name in text
    assert "folded %_1 into %_0" in text
    assert all(r.seconds >= 0 for r in compiled.records)


def test_module_that_cannot_run_opaquely_is_an_error() -> None:
    class DictNeuron(MemoryModule):
        """Stateful, unknown to every rule, and returns a dict per step."""

        def __init__(self) -> None:
            super().__init__()
            self.register_memory("v", 0.0)

        def single_step_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            self.v = self.v + x
            return {"spike": (self.v >= 1.0).float()}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.odd = DictNeuron()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.odd(self.fc(x))["spike"]

    with pytest.raises(ValueError, match=r"module 'odd' \(DictNeuron\) must run once per time"):
        optimize(Net(), torch.rand(T, N, 3))
