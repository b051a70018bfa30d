"""Frontend tests: what torch.fx capture maps to which IR ops, and that it runs like eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snncompile
from snncompile import functional, layer, neuron
from snncompile.frontend import FrontendError, model_step_mode
from snncompile.ir import Layout, Op, verify
from snncompile.passes.pipeline import build_pipeline
from snncompile.runtime.compiled import CompiledModule

T, N = 3, 2


def _eager(model: nn.Module, x: torch.Tensor, step_mode: str) -> torch.Tensor:
    functional.reset_net(model)
    if step_mode == "m":
        return model(x)
    return torch.stack([model(xt) for xt in x.unbind(0)])


def _same(model: nn.Module, x: torch.Tensor, step_mode: str, **kw: object) -> CompiledModule:
    ref = copy.deepcopy(model)
    compiled = snncompile.optimize(model, x, **kw)
    for _ in range(2):
        xi = torch.rand_like(x) * 3
        functional.reset_net(compiled)
        torch.testing.assert_close(compiled(xi), _eager(ref, xi, step_mode), rtol=1e-5, atol=1e-5)
    return compiled


class FunctionalNet(nn.Module):
    """Residual add, cat, F calls, tensor methods and a batch-size dependent view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.sn1 = neuron.LIFNode()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.sn2 = neuron.IFNode()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.sn1(self.conv(x))
        b = self.sn2(F.relu(self.conv2(a)) + a)  # residual ADD after a functional relu
        c = torch.cat([a, b], dim=1)  # CAT
        c = F.max_pool2d(c, 2)
        c = c.view(c.shape[0], -1)  # batch-size dependent view
        return self.fc(c * 0.5)


def test_functional_ops_mapped_and_run() -> None:
    model = FunctionalNet()
    x = torch.rand(T, N, 2, 8, 8) * 3
    g = snncompile.trace(model, x)
    ops = [n.op for n in g]
    for op in (Op.CONV2D, Op.NEURON, Op.ADD, Op.CAT, Op.RESHAPE, Op.ELEMENTWISE, Op.MUL):
        assert op in ops, op
    assert g.meta["step_mode"] == "s"
    assert all(n.layout in (Layout.STEP, Layout.NONE) for n in g if n.op is not Op.OUTPUT)
    compiled = _same(model, x, "s")
    cg = compiled.graph
    view = next(n for n in cg if n.op is Op.RESHAPE)
    assert view.layout is Layout.FLAT and view.shape == (T * N, 8 * 4 * 4)
    # A different batch size and T at run time: the view uses the run-time T*N.
    x2 = torch.rand(5, 3, 2, 8, 8) * 3
    functional.reset_net(compiled)
    torch.testing.assert_close(compiled(x2), _eager(copy.deepcopy(model), x2, "s"))


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2.0
        return x - 1.0


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.gate = Gate()
        self.sn = neuron.LIFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.gate(self.fc(x)))


def test_untraceable_submodule_is_opaque_and_runs() -> None:
    model = WithGate()
    x = torch.rand(T, N, 6)
    g = snncompile.trace(model, x)
    opaque = g.find(Op.OPAQUE_MODULE)
    assert [n.attrs["path"] for n in opaque] == ["gate"]
    assert "control flow" in opaque[0].attrs["reason"]
    compiled = _same(model, x, "s")
    assert compiled.graph["gate"].attrs["per_step"] is True  # its branch depends on each step
    xs = torch.cat([-torch.rand(1, N, 6) * 5, torch.rand(T - 1, N, 6) * 5])
    functional.reset_net(compiled)
    torch.testing.assert_close(compiled(xs), _eager(copy.deepcopy(model), xs, "s"))


def test_strict_names_module_and_reason() -> None:
    with pytest.raises(FrontendError, match=r"strict=True.*'gate' \(Gate\).*control flow"):
        snncompile.optimize(WithGate(), torch.rand(T, N, 6), strict=True)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.sn = neuron.IFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.mean() > 10:  # control flow in the root itself
            y = y * 0
        return self.sn(y)


def test_untraceable_root_runs_as_one_opaque_stateful_module() -> None:
    model = Untraceable()
    x = torch.rand(T, N, 4) * 3
    g = snncompile.trace(model, x)
    (node,) = g.find(Op.OPAQUE_MODULE)
    assert node.attrs["stateful"] is True
    compiled = _same(model, x, "s")
    (node,) = compiled.graph.find(Op.OPAQUE_MODULE)
    assert node.attrs["per_step"] is True
    # The compiled module owns a copy of the stateful model; the user's model is untouched.
    assert node.module is not model


def test_containers_multi_step() -> None:
    model = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)),
        neuron.LIFNode(step_mode="m"),
        layer.MultiStepContainer(nn.Flatten(), nn.Linear(4 * 6 * 6, 5), neuron.IFNode()),
    )
    x = torch.rand(T, N, 1, 6, 6) * 3
    assert model_step_mode(model) == "m"
    g = snncompile.trace(model, x)
    assert [n.op for n in g if n.op.group.value == "neuron"] == [Op.NEURON, Op.NEURON]
    assert Op.MERGE_TIME in [n.op for n in g]
    compiled = _same(model, x, "m")
    merges = compiled.graph.find(Op.MERGE_TIME)
    splits = compiled.graph.find(Op.SPLIT_TIME)
    assert len(merges) == 2 and len(splits) == 2  # conv+bn one flat run, flatten+fc another


def test_spikingjelly_containers_and_neurons(sj) -> None:
    model = nn.Sequential(
        sj.layer.SeqToANNContainer(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)),
        sj.neuron.ParametricLIFNode(step_mode="m"),
        sj.layer.Flatten(step_mode="m"),
        sj.layer.Linear(4 * 6 * 6, 5, step_mode="m"),
        sj.neuron.LIFNode(step_mode="m"),
    )
    x = torch.rand(T, N, 1, 6, 6) * 3
    g = snncompile.trace(model, x)
    neurons = g.find(Op.NEURON)
    assert [n.attrs["kind"] for n in neurons] == ["plif", "lif"]
    assert all(n.attrs["source"] == "spikingjelly" for n in neurons)
    # Rebuilt as snncompile neurons (so kernel fusion applies), with a NeuronSpec.
    assert all(isinstance(n.module, neuron.BaseNode) and "_spec" in n.attrs for n in neurons)
    compiled = _same(model, x, "m")
    # The rebuilt PLIF shares the parameter w with the user's model.
    node = compiled.graph.find(Op.NEURON, Op.FUSED_NEURON)[0]
    # A fused batchnorm -> neuron chain (fuse_chains) runs the neuron inside a FusedChain.
    assert node.attrs.get("chain") == ("bn", "neuron")
    plif = getattr(node.module, "neuron", node.module)
    assert plif.w is model[1].w


def test_spikingjelly_neuron_without_equivalent_runs_the_original(sj) -> None:
    class MySurrogate(sj.surrogate.Sigmoid):
        pass

    model = nn.Sequential(
        nn.Linear(3, 3),
        sj.neuron.LIFNode(surrogate_function=MySurrogate()),
        sj.neuron.IFNode(store_v_seq=True),
    )
    x = torch.rand(T, N, 3) * 3
    g = snncompile.trace(model, x)
    for node in g.find(Op.NEURON):
        assert type(node.module) is type(model[int(node.attrs["path"])])
        assert "_spec" not in node.attrs
    _same(model, x, "s")


def test_plain_torch_multi_step_sequence_code() -> None:
    class Readout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layer.Linear(4, 3, step_mode="m")
            self.sn = neuron.LIFNode(step_mode="m")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sn(self.fc(x)).mean(0)  # rate readout over time: raw seq code

    model = Readout()
    x = torch.rand(T, N, 4) * 3
    compiled = _same(model, x, "m")
    mean = next(n for n in compiled.graph if n.op is Op.FUNCTION)
    assert mean.layout is Layout.SEQ and mean.shape == (N, 3)


def test_batch_mixing_op_runs_per_step() -> None:
    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.sn = neuron.IFNode()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return self.sn(y - y.mean(0, keepdim=True))  # mixes the batch within a step

    model = Norm()
    x = torch.rand(T, N, 4) * 3
    compiled = _same(model, x, "s")
    mean = next(n for n in compiled.graph if n.target == "mean")
    assert mean.attrs.get("per_step") is True


def test_example_rank_error_says_expected_shape() -> None:
    model = nn.Sequential(layer.Conv2d(1, 2, 3), neuron.IFNode())
    with pytest.raises(FrontendError, match=r"module '0' \(Conv2d\).*\[T, N, \.\.\.\]"):
        snncompile.optimize(model, torch.rand(2, 1, 8, 8))  # missing the time dimension
    with pytest.raises(FrontendError, match=r"\[T, N, \.\.\.\]"):
        snncompile.optimize(model, torch.rand(8))


def test_trace_does_not_touch_model_state() -> None:
    model = nn.Sequential(nn.Linear(3, 3), neuron.LIFNode(), nn.BatchNorm1d(3))
    model[1].v = torch.full((2, 3), 0.5)
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(T, N, 3)
    rng = torch.random.get_rng_state()
    g = snncompile.trace(model, x)
    verify(g)
    assert torch.equal(model[1].v, torch.full((2, 3), 0.5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(rng, torch.random.get_rng_state())


def test_step_mode_containers_ours() -> None:
    model = nn.Sequential(
        layer.StepModeContainer(False, "m", nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),
        layer.StepModeContainer(True, "m", neuron.LIFNode()),
    )
    x = torch.rand(T, N, 1, 6, 6) * 3
    # The containers' ops as traced and laid out (fuse_chains would merge the batchnorm).
    passes = [n for n, _ in build_pipeline("train") if n not in ("fuse_chains", "pack_spikes")]
    compiled = _same(model, x, "m", passes=passes)
    ops = [n.op for n in compiled.graph]
    assert ops[:5] == [Op.INPUT, Op.MERGE_TIME, Op.CONV2D, Op.BATCHNORM, Op.SPLIT_TIME]
    assert ops[5] in (Op.NEURON, Op.FUSED_NEURON) and ops[6:] == [Op.OUTPUT]


def test_spikingjelly_multi_step_only_containers(sj) -> None:
    # SpikingJelly's MultiStepModule containers do not store a step_mode; still multi-step.
    model = nn.Sequential(
        sj.layer.MultiStepContainer(nn.Conv2d(1, 2, 3), sj.neuron.IFNode()),
        sj.layer.SeqToANNContainer(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
    )
    x = torch.rand(T, N, 1, 6, 6) * 3
    assert model_step_mode(model) == "m"
    compiled = _same(model, x, "m")
    assert len(compiled.graph.find(Op.NEURON, Op.FUSED_NEURON)) == 1
    model2 = nn.Sequential(
        sj.layer.StepModeContainer(False, "m", nn.Conv2d(1, 2, 3)),
        sj.layer.StepModeContainer(True, "m", sj.neuron.LIFNode()),
    )
    _same(model2, x, "m")


def test_stateful_dropout_runs_per_step_in_training() -> None:
    model = nn.Sequential(layer.Conv2d(1, 2, 3), layer.Dropout(0.3), neuron.IFNode())
    x = torch.rand(T, N, 1, 6, 6) * 3
    compiled = snncompile.optimize(model, x)
    (drop,) = compiled.graph.find(Op.DROPOUT)
    assert drop.attrs["per_step"] and drop.module is not model[1]
    # One mask per simulation, as in eager: the same elements are zero at every step.
    y = compiled(x)
    functional.reset_net(compiled)
    mask = drop.module
    assert mask.mask is None
    compiled(x)
    assert mask.mask is not None and y.shape == (T, N, 2, 4, 4)


def _scaled_clip(x: torch.Tensor) -> torch.Tensor:
    if x.max() > 1:  # data dependent: fx must not trace into it
        return x.clamp(max=1.0)
    return x


torch.fx.wrap("_scaled_clip")


def test_wrapped_user_function_is_opaque_function() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.sn = neuron.IFNode()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sn(_scaled_clip(self.fc(x)) * 2.0)

    model = Net()
    x = torch.rand(T, N, 3) * 3
    g = snncompile.trace(model, x)
    (node,) = g.find(Op.OPAQUE_FUNCTION)
    assert node.target is _scaled_clip
    compiled = _same(model, x, "s")
    # Unknown code may read the whole batch (here: x.max()), so it runs once per step.
    assert compiled.graph[node.name].attrs["per_step"] is True
    # Steps whose maximum differs take different branches, exactly as in eager.
    xs = torch.cat([torch.zeros(1, N, 3), torch.rand(T - 1, N, 3) * 3])
    functional.reset_net(compiled)
    torch.testing.assert_close(compiled(xs), _eager(copy.deepcopy(model), xs, "s"))


class LateralInhibition(nn.Module):
    """Resets every membrane of a sample when any neuron of it fired (writes the neuron's v)."""

    def __init__(self) -> None:
        super().__init__()
        self.lif = neuron.LIFNode(tau=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spike = self.lif(x)
        fired = spike.sum(1, keepdim=True) > 0
        self.lif.v = self.lif.v * (~fired)
        return spike


class WithInhibition(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.inh = LateralInhibition()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inh(self.fc(x))


class RootWritesState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.lif = neuron.LIFNode(tau=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spike = self.lif(self.fc(x))
        self.lif.v = self.lif.v * 0.5  # a float at trace time: fx would bake in a constant
        return spike


def test_state_read_or_written_outside_its_module_runs_as_written() -> None:
    x = torch.rand(8, N, 6) * 2
    g = snncompile.trace(WithInhibition(), x)
    (opaque,) = g.find(Op.OPAQUE_MODULE)
    assert opaque.attrs["path"] == "inh" and "inh.lif.v" in opaque.attrs["reason"]
    _same(WithInhibition(), x, "s")
    g = snncompile.trace(RootWritesState(), x)
    assert [n.attrs["path"] for n in g.find(Op.OPAQUE_MODULE)] == ["model"]
    _same(RootWritesState(), x, "s")
    with pytest.raises(FrontendError, match=r"strict=True.*'inh'.*state 'inh\.lif\.v'"):
        snncompile.optimize(WithInhibition(), x, strict=True)


def test_tracing_leaves_the_models_state_alone_and_accepts_live_state() -> None:
    model = WithGate()
    x = torch.rand(T, N, 6)
    model(x[0] * 3)  # live, non-leaf state (autograd on): deepcopy alone would refuse it
    live = [m.v for m in model.modules() if isinstance(m, neuron.BaseNode)]
    assert any(isinstance(v, torch.Tensor) and v.grad_fn is not None for v in live)
    for mode in ("train", "inference"):
        compiled = snncompile.optimize(model, x, mode=mode)
        after = [m.v for m in model.modules() if isinstance(m, neuron.BaseNode)]
        assert all(a is b for a, b in zip(after, live, strict=True))
        ref = copy.deepcopy(model, {id(v): v.detach() for v in live if isinstance(v, torch.Tensor)})
        torch.testing.assert_close(compiled(x), _eager(ref, x, "s"))  # compiled starts reset
