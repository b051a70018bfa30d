"""Pass tests, each with the five steps: the pattern is there before, ``modified`` is reported,
the structure after is as expected, ``verify`` passes, and outputs match eager execution."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snncompile
from snncompile import functional, layer, neuron
from snncompile.ir import Graph, Layout, Op, verify
from snncompile.passes import (
    PIPELINE,
    STAGES,
    CompileOptions,
    PassResult,
    PassVerificationError,
    Stage,
    build_pipeline,
    fold_batchnorm,
    lower_step_mode,
    options_of,
    register_pass,
    registered_passes,
    remove_dead_ops,
    simplify_time_layout,
    unregister_pass,
)
from snncompile.runtime.compiled import lower_to_fx

T, N = 3, 4


def _run(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """Execute a graph (lowering it to sequence form first if needed)."""
    graph = lower_step_mode(graph).graph
    graph = simplify_time_layout(graph).graph
    verify(graph)
    return lower_to_fx(graph)(x)


def _eager(model: nn.Module, x: torch.Tensor, step_mode: str = "s") -> torch.Tensor:
    functional.reset_net(model)
    if step_mode == "m":
        return model(x)
    return torch.stack([model(xt) for xt in x.unbind(0)])


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)


# -- BN folding -----------------------------------------------------------------------------------
CASES = {
    "conv2d_nobias": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)),
        (2, 6, 6),
    ),
    "conv2d_bias": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), (2, 6, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)), (2, 7)),
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), (5,)),
    "nonaffine": (
        lambda: nn.Sequential(layer.Conv2d(2, 3, 3), layer.BatchNorm2d(3, affine=False)),
        (2, 5, 5),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_batchnorm(case: str) -> None:
    build, shape = CASES[case]
    model = nn.Sequential(*build(), neuron.IFNode())
    _randomize_bn(model)
    model.eval()
    x = torch.randn(T, N, *shape) * 2
    g = snncompile.trace(model, x)
    g.options = CompileOptions(mode="inference")
    # 1. the pattern is there before
    bn = g.find(Op.BATCHNORM)[0]
    layer_node = g[bn.inputs[0]]
    assert layer_node.op in (Op.CONV1D, Op.CONV2D, Op.LINEAR)
    # 2. modified is reported
    res = fold_batchnorm(g)
    assert res.modified and res.notes == [f"folded %{bn.name} into %{layer_node.name}"]
    # 3. structure after
    g = res.graph
    assert not g.find(Op.BATCHNORM)
    assert g[layer_node.name].attrs["folded_bn"] == bn.attrs["path"]
    assert g[layer_node.name].module is not model[0]  # the user's layer is not modified
    # 4. verify
    verify(g)
    # 5. outputs match eager
    y = _run(g, x)
    ref = _eager(copy.deepcopy(model), x)
    pre = torch.stack([model[1](model[0](xt)) for xt in x])
    post = torch.stack([g[layer_node.name].module(xt) for xt in x])
    torch.testing.assert_close(post, pre, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, ref)


def test_fold_batchnorm_skips_train_mode_and_shared_layers() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), neuron.IFNode())
    x = torch.rand(T, N, 1, 5, 5)
    g = snncompile.trace(model, x)
    g.options = CompileOptions(mode="train")
    assert not fold_batchnorm(g).modified

    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    g = snncompile.trace(TwoUsers().eval(), x)
    g.options = CompileOptions(mode="inference")
    assert not fold_batchnorm(g).modified
    assert len(g.find(Op.BATCHNORM)) == 1


def test_fold_batchnorm_multi_step_after_layout_cleanup() -> None:
    model = nn.Sequential(
        layer.Conv2d(1, 3, 3, step_mode="m"),
        layer.BatchNorm2d(3, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
    )
    _randomize_bn(model)
    model.eval()
    x = torch.rand(T, N, 1, 6, 6) * 3
    g = snncompile.trace(model, x)
    g.options = CompileOptions(mode="inference")
    assert not fold_batchnorm(g).modified  # split/merge between conv and BN hide the pattern
    assert simplify_time_layout(g).modified
    assert fold_batchnorm(g).modified
    verify(g)
    assert torch.equal(_run(g, x), _eager(copy.deepcopy(model), x, "m"))


# -- dead op removal -------------------------------------------------------------------------------
class WithDead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3)
        self.idn = nn.Identity()
        self.sdrop = layer.Dropout(0.4)
        self.sn = neuron.LIFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.idn(self.drop(self.fc(x)))
        y = F.dropout(y, 0.2, training=self.training)
        return self.sn(self.sdrop(y))


def test_remove_dead_ops() -> None:
    model = WithDead().eval()
    x = torch.rand(T, N, 6) * 3
    g = snncompile.trace(model, x)
    before = [n.op for n in g]
    assert before.count(Op.DROPOUT) == 3 and Op.IDENTITY in before
    res = remove_dead_ops(g)
    assert res.modified and len(res.notes) == 1
    assert not g.find(Op.DROPOUT, Op.IDENTITY)
    assert g["sn"].inputs == ("fc",)
    verify(g)
    assert torch.equal(_run(g, x), _eager(copy.deepcopy(model), x))


def test_remove_dead_ops_keeps_training_dropout() -> None:
    g = snncompile.trace(WithDead().train(), torch.rand(T, N, 6))
    res = remove_dead_ops(g)
    assert res.modified  # only the Identity goes
    assert len(g.find(Op.DROPOUT)) == 3 and not g.find(Op.IDENTITY)


# -- step-mode lowering ----------------------------------------------------------------------------
def test_lower_step_mode() -> None:
    model = nn.Sequential(
        layer.Conv2d(1, 2, 3, padding=1),
        layer.BatchNorm2d(2),
        neuron.LIFNode(),
        layer.Flatten(),
        layer.Linear(2 * 5 * 5, 3),
        neuron.IFNode(),
    )
    x = torch.rand(T, N, 1, 5, 5) * 3
    g = snncompile.trace(model, x)
    g.options = CompileOptions(mode="train")
    assert all(n.layout is Layout.STEP for n in g if n.op not in (Op.OUTPUT, Op.CONSTANT))
    res = lower_step_mode(g)
    assert res.modified and "2 neuron" in res.notes[0]
    assert g.input_nodes[0].layout is Layout.SEQ and g.input_nodes[0].shape == (T, N, 1, 5, 5)
    assert g["_0"].layout is Layout.FLAT and g["_0"].shape == (T * N, 2, 5, 5)
    assert g["_1"].layout is Layout.SEQ and g["_1"].attrs["per_step"]  # train-mode BN
    assert g["_2"].layout is Layout.SEQ and g["_2"].module.step_mode == "m"
    assert g["_2"].module is not model[2]  # the compiled neuron is a copy
    assert model[2].step_mode == "s"
    assert g[g.output_node.inputs[0]].layout is Layout.SEQ
    verify(g)
    assert not lower_step_mode(g).modified  # idempotent
    ref = copy.deepcopy(model)
    y = lower_to_fx(simplify_time_layout(g).graph)(x)
    assert torch.equal(y, _eager(ref, x))
    for b_ref, b in zip(ref.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref)  # T running-stat updates, like eager


def test_lower_refuses_shared_stateful_module() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sn = neuron.IFNode()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sn(self.sn(x) + x)

    with pytest.raises(ValueError, match="'?sn'? .*called more than once per time step"):
        snncompile.optimize(Twice(), torch.rand(T, N, 3))


# -- time-layout simplification --------------------------------------------------------------------
def test_simplify_time_layout() -> None:
    model = nn.Sequential(
        layer.Conv2d(1, 2, 3, step_mode="m"),
        layer.MaxPool2d(2, step_mode="m"),
        layer.Flatten(step_mode="m"),
        neuron.IFNode(step_mode="m"),
    )
    x = torch.rand(T, N, 1, 6, 6) * 3
    g = snncompile.trace(model, x)
    assert len(g.find(Op.MERGE_TIME)) == 3 and len(g.find(Op.SPLIT_TIME)) == 3
    res = simplify_time_layout(g)
    assert res.modified
    assert len(g.find(Op.MERGE_TIME)) == 1 and len(g.find(Op.SPLIT_TIME)) == 1
    assert [n.op for n in g][1:5] == [Op.MERGE_TIME, Op.CONV2D, Op.MAXPOOL, Op.FLATTEN]
    verify(g)
    assert not simplify_time_layout(g).modified
    assert torch.equal(_run(g, x), _eager(copy.deepcopy(model), x, "m"))


# -- pipeline, hook, manager -----------------------------------------------------------------------
def test_pipeline_modes_and_stages() -> None:
    staged = {e.name for stage in STAGES for e in registered_passes(stage)}
    train = [name for name, _ in build_pipeline("train") if name not in staged]
    inference = [name for name, _ in build_pipeline("inference") if name not in staged]
    assert train == ["lower_step_mode", "simplify_time_layout"]
    assert inference == [
        "remove_dead_ops",
        "lower_step_mode",
        "simplify_time_layout",
        "fold_batchnorm",
    ]
    assert [s.name for s in PIPELINE if isinstance(s, Stage)] == ["fusion", "chunking"]
    with pytest.raises(ValueError, match="unknown stage"):
        register_pass("nope", lambda g: PassResult(g, False))


def test_fusion_hook_runs_registered_pass() -> None:
    seen: list[str] = []

    def mark_neurons(graph: Graph) -> PassResult:
        """Tag every neuron (a stand-in for the kernel-fusion pass)."""
        for node in graph.find(Op.NEURON, Op.FUSED_NEURON):
            node.attrs["fused_backend"] = options_of(graph).backend
            seen.append(node.name)
        return PassResult(graph, bool(seen), [f"marked {len(seen)}"])

    register_pass("fusion", mark_neurons, modes=("inference",))
    try:
        assert [e.name for e in registered_passes("fusion")][-1] == "mark_neurons"
        model = nn.Sequential(nn.Linear(3, 3), neuron.LIFNode()).eval()
        compiled = snncompile.optimize(model, torch.rand(T, N, 3), backend="cpu")
        assert seen == ["_1"]
        assert compiled.graph["_1"].attrs["fused_backend"] == "cpu"
        assert "mark_neurons" in compiled.report() and "marked 1" in compiled.report()
        seen.clear()
        snncompile.optimize(model.train(), torch.rand(T, N, 3))
        assert seen == []  # inference-only
    finally:
        unregister_pass("fusion", "mark_neurons")
    assert "mark_neurons" not in [e.name for e in registered_passes("fusion")]


def test_pass_that_breaks_verify_is_named() -> None:
    def break_layouts(graph: Graph) -> PassResult:
        """Puts a neuron on a flat value (invalid)."""
        graph.find(Op.NEURON)[0].layout = Layout.FLAT
        return PassResult(graph, True)

    model = nn.Sequential(nn.Linear(3, 3), neuron.LIFNode())
    with pytest.raises(PassVerificationError) as info:
        snncompile.optimize(model, torch.rand(T, N, 3), passes=[break_layouts])
    msg = str(info.value)
    assert "pass 'break_layouts' broke the IR" in msg
    assert "passes run before it: lower_step_mode, simplify_time_layout" in msg
    assert "%_1" in msg


def test_passes_argument_and_report() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), neuron.IFNode())
    _randomize_bn(model)
    model.eval()
    x = torch.rand(T, N, 1, 5, 5)
    plain = snncompile.optimize(model, x, passes=[])
    assert len(plain.graph.find(Op.BATCHNORM)) == 1
    folded = snncompile.optimize(model, x, passes=["fold_batchnorm"])
    assert not folded.graph.find(Op.BATCHNORM)
    report = folded.report()
    assert "lower_step_mode" in report and "fold_batchnorm" in report and "folded %_1" in report
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        snncompile.optimize(model, x, passes=["nope"])
    torch.testing.assert_close(plain(x), folded(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
    ids=["default", "cumulative", "nonaffine", "untracked"],
)
@pytest.mark.parametrize("dims", [1, 2])
def test_training_batchnorm_keeps_per_step_statistics(kwargs: dict, dims: int) -> None:
    bn = nn.BatchNorm1d(3, **kwargs) if dims == 1 else nn.BatchNorm2d(3, **kwargs)
    shape = (2, 5) if dims == 1 else (2, 4, 4)
    conv = nn.Conv1d(2, 3, 1) if dims == 1 else nn.Conv2d(2, 3, 1)
    model = nn.Sequential(conv, bn, neuron.LIFNode())
    ref = copy.deepcopy(model)
    compiled = snncompile.optimize(model, torch.rand(T, N, *shape))
    assert compiled.graph.find(Op.BATCHNORM)[0].attrs["per_step"]
    for _ in range(2):
        x = torch.randn(T, N, *shape) * 2
        xr = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        functional.reset_net(compiled)
        y, y_ref = compiled(xc), _eager(ref, xr)
        assert torch.equal(y, y_ref)
        w = torch.randn_like(y)
        (y * w).sum().backward()
        (y_ref * w).sum().backward()
        torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-5)
        for b, b_ref in zip(model.buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref)
