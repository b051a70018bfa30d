"""STDP learners attached to compiled models (``CompiledModule.attach``) learn exactly as in eager.

Each equivalence test builds one model, an eager twin (``copy.deepcopy``, so the same initial
weights), the same learner configuration on both, and runs 20 updates: a batch of random spikes
through the eager model (a user loop over ``T`` for single-step models) and through the compiled
model, ``learner.step(on_grad=True)`` and an SGD step, comparing ``delta_w`` (``-weight.grad``),
the spikes and the weights after every update.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron
from snncompile.learning import MSTDPETLearner, MSTDPLearner, STDPLearner
from snncompile.runtime.learning_hooks import AttachError, LearnerHandle

STEPS = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models are tiny: one intra-op thread is faster, and far faster on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spikes(*shape: int, p: float = 0.4) -> torch.Tensor:
    return (torch.rand(*shape) < p).float()


class MLP(nn.Module):
    """Single-step: Linear -> IF -> Linear -> LIF."""

    def __init__(self, n_in: int = 12, n_hidden: int = 8, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = layer.Linear(n_in, n_hidden, bias=False)
        self.sn1 = neuron.IFNode()
        self.fc2 = layer.Linear(n_hidden, n_out, bias=False)
        self.sn2 = neuron.LIFNode(tau=2.0)
        with torch.no_grad():
            self.fc1.weight.uniform_(0.0, 0.6)
            self.fc2.weight.uniform_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn2(self.fc2(self.sn1(self.fc1(x))))


class ConvBN(nn.Module):
    """Single-step: Conv2d -> BatchNorm2d -> IF (BN sits between the synapse and the neuron)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = layer.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn = layer.BatchNorm2d(4)
        self.sn = neuron.IFNode(v_threshold=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.bn(self.conv(x)))


def conv_net_multi_step() -> nn.Sequential:
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False),
        neuron.LIFNode(tau=2.0),
        layer.Flatten(),
        layer.Linear(4 * 6 * 6, 3, bias=False),
        neuron.IFNode(),
    )
    with torch.no_grad():
        net[0].weight.uniform_(0.0, 0.5)
        net[3].weight.uniform_(0.0, 0.1)
    functional.set_step_mode(net, "m")
    return net


def run_eager(model: nn.Module, x: torch.Tensor, single_step: bool) -> torch.Tensor:
    if single_step:
        return torch.stack([model(x_t) for x_t in x.unbind(0)])
    return model(x)


def compare_training(
    model: nn.Module,
    single_step: bool,
    make_learner: Callable[[nn.Module, nn.Module | None], object],
    attach: Callable[[snncompile.runtime.compiled.CompiledModule, object, nn.Module], object],
    synapse_of: Callable[[nn.Module], nn.Module],
    sn_of: Callable[[nn.Module], nn.Module],
    input_shape: tuple[int, ...],
    backend: str,
    reward: bool = False,
    lr: float = 0.01,
    eager_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> int:
    """Train eager twin and compiled model side by side; return the number of spikes seen."""
    twin = copy.deepcopy(model)
    compiled = snncompile.optimize(model, spikes(*input_shape), backend=backend)
    eager_learner = make_learner(synapse_of(twin), sn_of(twin))
    compiled_learner = make_learner(synapse_of(model), None)
    handle = attach(compiled, compiled_learner, model)
    assert isinstance(handle, LearnerHandle) and handle.attached
    opt_e = torch.optim.SGD(twin.parameters(), lr=lr)
    opt_c = torch.optim.SGD(model.parameters(), lr=lr)
    w_e, w_c = synapse_of(twin).weight, synapse_of(model).weight
    fired = 0
    nonzero = 0
    for step in range(STEPS):
        x = spikes(*input_shape)
        y_e = run_eager(twin, eager_input(x), single_step)
        y_c = compiled(x)
        torch.testing.assert_close(y_c, y_e.reshape(y_c.shape), rtol=0, atol=0)
        fired += int(y_c.sum())
        opt_e.zero_grad()
        opt_c.zero_grad()
        if reward:
            r = torch.linspace(-1.0, 1.0, input_shape[1]) * (1 if step % 2 else -1)
            r = r if isinstance(eager_learner, MSTDPLearner) else float(r.sum()) + 0.5
            eager_learner.step(r, on_grad=True)
            compiled_learner.step(r, on_grad=True)
        else:
            eager_learner.step(on_grad=True)
            compiled_learner.step(on_grad=True)
        assert (w_e.grad is None) == (w_c.grad is None)
        if w_e.grad is not None:
            torch.testing.assert_close(w_c.grad, w_e.grad, rtol=1e-6, atol=1e-6)
            nonzero += int(w_e.grad.abs().sum() > 0)
        opt_e.step()
        opt_c.step()
        torch.testing.assert_close(w_c, w_e, rtol=1e-6, atol=1e-7)
    assert nonzero >= STEPS // 2, "the test network hardly learned anything"
    handle.remove()
    return fired


# ------------------------------------------------------------------------------------------------
# equivalence with eager
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_single_step_linear_stdp_by_name(backend, step_mode):
    torch.manual_seed(0)

    def make(fc, sn):
        return STDPLearner(step_mode, fc, sn, tau_pre=2.0, tau_post=3.0)

    # A step_mode='m' learner on the eager single-step model would record [N, ...] steps as if
    # they were sequences; the eager reference is always the single-step learner.
    def make_eager_aware(fc, sn):
        return make(fc, sn) if sn is None else STDPLearner("s", fc, sn, tau_pre=2.0, tau_post=3.0)

    fired = compare_training(
        MLP(),
        single_step=True,
        make_learner=make_eager_aware,
        attach=lambda c, lrn, m: c.attach(lrn, synapse="fc2", neuron="sn2"),
        synapse_of=lambda m: m.fc2,
        sn_of=lambda m: m.sn2,
        input_shape=(6, 3, 12),
        backend=backend,
    )
    assert fired > 0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_multi_step_conv_stdp_by_module_objects(backend):
    torch.manual_seed(1)

    def make(conv, sn):
        return STDPLearner("m", conv, sn, tau_pre=2.0, tau_post=2.0)

    compare_training(
        conv_net_multi_step(),
        single_step=False,
        make_learner=make,
        # The conv of a compiled multi-step model is a copy sharing the weight; the neuron is
        # the model's object, found through model=.
        attach=lambda c, lrn, m: c.attach(lrn, synapse=m[0], neuron=m[1], model=m),
        synapse_of=lambda m: m[0],
        sn_of=lambda m: m[1],
        input_shape=(5, 2, 2, 6, 6),
        backend=backend,
    )


def test_single_step_conv_through_batchnorm_default_neuron():
    torch.manual_seed(2)

    def make(conv, sn):
        return STDPLearner("s", conv, sn, tau_pre=2.0, tau_post=2.0)

    compare_training(
        ConvBN(),
        single_step=True,
        make_learner=make,
        attach=lambda c, lrn, m: c.attach(lrn),  # synapse = learner.synapse, first neuron after
        synapse_of=lambda m: m.conv,
        sn_of=lambda m: m.sn,
        input_shape=(4, 3, 2, 8, 8),
        backend="cpu",
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mstdp_with_reward_one_step_per_call(backend):
    torch.manual_seed(3)

    def make(fc, sn):
        return MSTDPLearner("s", 3, fc, sn, tau_pre=2.0, tau_post=2.0)

    # A reward learner takes one step per step(reward): the compiled model runs [1, N, ...].
    compare_training(
        MLP(),
        single_step=True,
        make_learner=make,
        attach=lambda c, lrn, m: c.attach(lrn, synapse=m.fc1, neuron="sn1"),
        synapse_of=lambda m: m.fc1,
        sn_of=lambda m: m.sn1,
        input_shape=(1, 3, 12),
        backend=backend,
        reward=True,
    )


def test_mstdpet_unbatched_eager_equals_compiled_with_batch_one():
    torch.manual_seed(4)

    def make(fc, sn):
        return MSTDPETLearner("s", fc, sn, tau_pre=2.0, tau_post=2.0, tau_trace=3.0)

    compare_training(
        MLP(),
        single_step=True,
        make_learner=make,
        attach=lambda c, lrn, m: c.attach(lrn, synapse="fc1", neuron="sn1"),
        synapse_of=lambda m: m.fc1,
        sn_of=lambda m: m.sn1,
        input_shape=(1, 1, 12),
        backend="cpu",
        reward=True,
        eager_input=lambda x: x[:, 0],  # the eager MSTDP-ET model runs on unbatched [in]
    )


def test_chunked_inference_feeds_the_same_pairs():
    torch.manual_seed(5)
    net = conv_net_multi_step().eval()
    x = spikes(8, 2, 2, 6, 6)
    deltas = []
    for chunk in (None, 3):
        compiled = snncompile.optimize(net, x, backend="cpu", chunk_size=chunk)
        learner = STDPLearner("m", net[3], None, tau_pre=2.0, tau_post=2.0)
        compiled.attach(learner, neuron="_4")
        compiled(x)
        deltas.append(learner.step(on_grad=False))
        learner.close()
    torch.testing.assert_close(deltas[1], deltas[0], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# names, errors, detaching
# ------------------------------------------------------------------------------------------------
def all_hooks(*modules: nn.Module) -> int:
    """Forward (pre-)hooks on every submodule, plus learning taps in compiled modules' code."""
    count = 0
    for root in modules:
        for m in root.modules():
            count += len(m._forward_hooks) + len(m._forward_pre_hooks)
            if isinstance(m, torch.fx.GraphModule):
                count += sum("learning_tap" in str(n.target) for n in m.graph.nodes)
                count += sum("learning_tap" in name for name, _ in m.named_children())
                count += m.code.count("learning_tap")
    return count


@pytest.fixture()
def mlp_compiled():
    torch.manual_seed(6)
    model = MLP()
    return model, snncompile.optimize(model, spikes(4, 2, 12), backend="cpu")


def test_attach_by_node_name_path_and_object_agree(mlp_compiled):
    model, compiled = mlp_compiled
    x = spikes(4, 2, 12)
    results = []
    for how in ("name", "copy", "object"):
        learner = STDPLearner("s", model.fc2, model.sn2, tau_pre=2.0, tau_post=2.0)
        if how == "name":
            compiled.attach(learner, synapse="fc2", neuron="sn2")
        elif how == "copy":
            compiled.attach(learner, neuron=compiled.gm.get_submodule("sn2"))  # compiled copy
        else:
            compiled.attach(learner, model=model)  # learner.synapse / its sn, looked up in model
        functional.reset_net(compiled)
        compiled(x)
        results.append(learner.step(on_grad=False))
        learner.close()
    for dw in results[1:]:
        torch.testing.assert_close(dw, results[0])
    assert compiled.learners == []


def test_module_paths_and_node_names():
    net = conv_net_multi_step()
    compiled = snncompile.optimize(net, spikes(3, 2, 2, 6, 6), backend="torch")
    learner = STDPLearner("m", net[3], None, tau_pre=2.0, tau_post=2.0)
    by_path = compiled.attach(learner, synapse="3", neuron="4")  # module paths in the model
    assert (by_path.synapse, by_path.neuron) == ("_3", "_4")  # IR node names
    by_path.remove()
    by_name = compiled.attach(learner, synapse="_3", neuron="_4")
    assert (by_name.synapse, by_name.neuron) == ("_3", "_4")
    by_name.remove()
    first = STDPLearner("m", net[0], None, tau_pre=2.0, tau_post=2.0)
    assert compiled.attach(first, neuron="4").neuron == "_4"  # anything may sit in between
    first.close()
    assert all_hooks(net, compiled) == 0


def test_errors_name_the_nodes(mlp_compiled):
    model, compiled = mlp_compiled
    learner = STDPLearner("s", model.fc1, None, tau_pre=2.0, tau_post=2.0)
    with pytest.raises(AttachError, match=r"'fc9'.*%fc1"):
        compiled.attach(learner, synapse="fc9", neuron="sn1")
    with pytest.raises(AttachError, match=r"'nope'"):
        compiled.attach(learner, neuron="nope")
    with pytest.raises(AttachError, match=r"%sn1.*not an nn.Linear"):
        compiled.attach(learner, synapse="sn1", neuron="sn2")
    with pytest.raises(AttachError, match=r"learner.synapse.*%fc2"):
        compiled.attach(learner, synapse="fc2", neuron="sn2")
    late = STDPLearner("s", model.fc2, None, tau_pre=2.0, tau_post=2.0)
    with pytest.raises(AttachError, match=r"%sn1.*does not consume.*%fc2.*%sn2"):
        compiled.attach(late, synapse="fc2", neuron="sn1")
    late.close()  # a failed attach leaves the learner (and its eager hook on fc2) untouched
    with pytest.raises(AttachError, match=r"model=model"):
        compiled.attach(learner, neuron=model.sn1)  # the model's neuron is not in the graph
    handle = compiled.attach(learner)  # no neuron anywhere: the only first neuron after fc1
    assert handle.neuron == "sn1"
    handle.remove()
    compiled.attach(learner)
    with pytest.raises(AttachError, match="already attached"):
        compiled.attach(learner)
    learner.close()
    assert all_hooks(model, compiled) == 0


def test_first_neurons_ambiguous_branches():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layer.Linear(4, 3, bias=False)
            self.a = neuron.IFNode()
            self.b = neuron.LIFNode()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return self.a(y) + self.b(y)

    model = Branch()
    compiled = snncompile.optimize(model, spikes(3, 2, 4), backend="torch")
    learner = STDPLearner("s", model.fc, None, tau_pre=2.0, tau_post=2.0)
    with pytest.raises(AttachError, match=r"%a.*%b"):
        compiled.attach(learner)
    compiled.attach(learner, neuron="b").remove()


def test_bn_folded_conv_in_inference_mode_is_refused():
    model = ConvBN().eval()
    compiled = snncompile.optimize(model, spikes(3, 2, 2, 8, 8), mode="inference")
    learner = STDPLearner("s", model.conv, None, tau_pre=2.0, tau_post=2.0)
    with pytest.raises(AttachError, match=r"%conv.*folded.*mode='train'"):
        compiled.attach(learner, synapse="conv", neuron="sn")
    with pytest.raises(AttachError, match=r"folded"):
        compiled.attach(learner, neuron="sn")  # by object: the folded layer is a new module


def test_detach_leaves_no_hooks_and_eager_runs_do_not_feed(mlp_compiled):
    model, compiled = mlp_compiled
    x = spikes(4, 2, 12)
    assert all_hooks(model, compiled) == 0
    learner = STDPLearner("s", model.fc1, model.sn1, tau_pre=2.0, tau_post=2.0)
    assert all_hooks(model) == 2  # the eager hooks of the SpikingJelly-style constructor
    handle = compiled.attach(learner, model=model)
    assert all_hooks(model) == 0  # the learner's eager hooks are gone; the compiled code taps
    assert compiled.gm.code.count("self.learning_tap_") == 2  # one tap per recorded value
    model(x[0])  # an eager run of the shared layer does not feed the compiled learner
    assert learner.step(on_grad=False) is None
    compiled(x)
    assert len(learner.in_spike_monitor.records) == 4  # T per-step pairs
    learner.reset()
    handle.remove()
    assert not handle.attached and all_hooks(model, compiled) == 0
    handle.remove()  # idempotent

    compiled.attach(learner, neuron="sn1")
    compiled.detach_learner(learner)
    assert all_hooks(model, compiled) == 0
    with pytest.raises(ValueError, match="not attached"):
        compiled.detach_learner(learner)

    with compiled.attach(learner, neuron="sn1"):
        compiled(x)
    assert all_hooks(model, compiled) == 0
    assert learner.step(on_grad=False) is not None

    compiled.attach(learner, neuron="sn1")
    learner.close()
    assert all_hooks(model, compiled) == 0 and compiled.learners == []
    with pytest.raises(RuntimeError, match="closed"):
        compiled.attach(learner, neuron="sn1")


def test_disabled_learner_records_nothing(mlp_compiled):
    model, compiled = mlp_compiled
    learner = STDPLearner("m", model.fc1, None, tau_pre=2.0, tau_post=2.0)
    compiled.attach(learner, neuron="sn1")
    learner.disable()
    compiled(spikes(4, 2, 12))
    assert learner.step(on_grad=False) is None
    learner.enable()
    compiled(spikes(4, 2, 12))
    assert learner.in_spike_monitor.records[0].shape == (4, 2, 12)
    assert learner.out_spike_monitor.records[0].shape == (4, 2, 8)
    learner.close()


class Gated(nn.Module):
    """Single-step: Linear -> a composite "neuron" (LIF times a fixed mask) traced through."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = layer.Linear(10, 6, bias=False)
        self.gate = GateLIF()
        with torch.no_grad():
            self.fc.weight.uniform_(0.0, 0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


class GateLIF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lif = neuron.LIFNode(tau=2.0)
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lif(x) * self.mask


def test_inlined_composite_neuron_is_recorded_by_its_output_node():
    torch.manual_seed(7)
    model = Gated()
    twin = copy.deepcopy(model)
    compiled = snncompile.optimize(model, spikes(5, 3, 10), backend="cpu")
    learner = STDPLearner("s", model.fc, None, tau_pre=2.0, tau_post=2.0)
    with pytest.raises(AttachError, match=r"'gate' has no node of its own.*%gate_lif"):
        compiled.attach(learner, neuron="gate")
    out_node = compiled.graph.output_node.inputs[0]  # the value the gated module returns
    compiled.attach(learner, neuron=out_node)
    eager = STDPLearner("s", twin.fc, twin.gate, tau_pre=2.0, tau_post=2.0)
    for _ in range(3):
        x = spikes(5, 3, 10)
        torch.testing.assert_close(compiled(x), run_eager(twin, x, single_step=True))
        torch.testing.assert_close(learner.step(on_grad=False), eager.step(on_grad=False))
    learner.close()
    eager.close()
    assert all_hooks(model, twin, compiled) == 0


def test_copies_of_a_compiled_model_do_not_feed_the_learner(mlp_compiled, tmp_path):
    model, compiled = mlp_compiled
    learner = STDPLearner("m", model.fc1, None, tau_pre=2.0, tau_post=2.0)
    compiled.attach(learner, neuron="sn1")
    twin = copy.deepcopy(compiled)
    twin(spikes(4, 2, 12))
    torch.save(compiled, tmp_path / "compiled.pt")  # the taps pickle as no-ops
    assert learner.step(on_grad=False) is None
    compiled(spikes(4, 2, 12))
    assert learner.step(on_grad=False) is not None
    learner.close()


def test_reward_learners_explain_the_compiled_layout(mlp_compiled):
    model, compiled = mlp_compiled
    mstdp = MSTDPLearner("s", 2, model.fc1, None, tau_pre=2.0, tau_post=2.0)
    compiled.attach(mstdp, neuron="sn1")
    compiled(spikes(4, 2, 12))  # T=4 steps in one call
    with pytest.raises(RuntimeError, match=r"4 spike pairs.*\[1, N, \.\.\.\]"):
        mstdp.step(1.0)
    mstdp.close()
    et = MSTDPETLearner("s", model.fc1, None, tau_pre=2.0, tau_post=2.0, tau_trace=2.0)
    compiled.attach(et, neuron="sn1")
    with pytest.raises(RuntimeError, match=r"%fc1 -> %sn1.*N=1"):
        compiled(spikes(1, 2, 12))
    et.close()
    assert all_hooks(model, compiled) == 0
