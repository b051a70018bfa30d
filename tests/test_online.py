"""Tests for snncompile.online: OTTT/SLTT neurons, spike/trace plumbing and the online loops.

Differential tests run the same model (same initial weights, same data) through our
implementation and SpikingJelly 2.0.0's and compare losses, outputs and every parameter after
every optimizer step (rtol 1e-6).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snncompile import neuron as our_neuron
from snncompile import online
from snncompile.online import (
    GradwithTrace,
    OTTTLIFNode,
    OTTTSequential,
    ReplaceforGrad,
    SLTTLIFNode,
    SpikeTraceOp,
    fptt_online_training,
    fptt_online_training_init_w_ra,
    ottt_online_training,
)

RTOL = 1e-6
ATOL = 1e-7


def _sj_parts(sj):
    from spikingjelly.activation_based import layer, neuron
    from spikingjelly.activation_based.functional import reset_net
    from spikingjelly.activation_based.learning import online_learning

    return neuron, layer, online_learning, reset_net


def _our_reset(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, online.MemoryModule):
            m.reset()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


class _StepRecorder:
    """Record a snapshot of every parameter after each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.snapshots: list[list[torch.Tensor]] = []
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.snapshots.append(
            [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        )


def _recording_loss(log: list[torch.Tensor], fn: Callable = F.mse_loss) -> Callable:
    def f(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = fn(y, target)
        log.append(loss.detach().clone())
        return loss

    return f


def _assert_runs_equal(ours: dict, theirs: dict) -> None:
    assert len(ours["steps"]) == len(theirs["steps"]) > 0
    for step_a, step_b in zip(ours["steps"], theirs["steps"], strict=True):
        for pa, pb in zip(step_a, step_b, strict=True):
            _close(pa, pb)
    assert len(ours["losses"]) == len(theirs["losses"]) > 0
    for la, lb in zip(ours["losses"], theirs["losses"], strict=True):
        _close(la, lb)


# =================================================================================================
# Neurons
# =================================================================================================
NEURON_CONFIGS = [
    dict(),
    dict(decay_input=True),
    dict(v_reset=0.0),
    dict(v_reset=-0.3, decay_input=True, tau=3.0),
    dict(detach_reset=False, v_threshold=0.8),
]


@pytest.mark.parametrize("kind", ["OTTTLIFNode", "SLTTLIFNode"])
@pytest.mark.parametrize("cfg", NEURON_CONFIGS, ids=[str(c) for c in NEURON_CONFIGS])
@pytest.mark.parametrize("training", [True, False])
def test_neuron_matches_spikingjelly(sj, kind: str, cfg: dict, training: bool) -> None:
    sj_neuron = _sj_parts(sj)[0]
    ours = getattr(our_neuron, kind)(**cfg).train(training)
    theirs = getattr(sj_neuron, kind)(**cfg).train(training)
    xs = (torch.randn(6, 5, 7) * 1.5 + 0.6).unbind(0)
    for x in xs:
        xa = x.clone().requires_grad_(training)
        xb = x.clone().requires_grad_(training)
        out_a, out_b = ours(xa), theirs(xb)
        if kind == "OTTTLIFNode" and training:
            assert isinstance(out_a, list) and isinstance(out_b, list)
            assert torch.equal(out_a[0], out_b[0])
            _close(out_a[1], out_b[1])
            assert not out_a[1].requires_grad
            spike_a, spike_b = out_a[0], out_b[0]
        else:
            assert isinstance(out_a, torch.Tensor)
            spike_a, spike_b = out_a, out_b
            assert torch.equal(spike_a, spike_b)
        _close(ours.v, theirs.v)
        if training:
            # The membrane is detached every step: the gradient of x is purely spatial.
            w = torch.randn_like(x)
            (spike_a * w).sum().backward()
            (spike_b * w).sum().backward()
            _close(xa.grad, xb.grad)
    assert 0 < torch.stack(xs).gt(0.5).float().mean() < 1  # some fire, some do not


def test_neuron_defaults_match_seed() -> None:
    o, s = OTTTLIFNode(), SLTTLIFNode()
    assert (o.tau, o.decay_input, o.v_reset, o.detach_reset) == (2.0, False, None, True)
    assert (s.tau, s.decay_input, s.v_reset, s.detach_reset) == (2.0, True, 0.0, True)
    assert o.step_mode == s.step_mode == "s"
    assert o.surrogate_function is not s.surrogate_function  # no shared default instance


def test_ottt_trace_formula_and_reset() -> None:
    node = OTTTLIFNode(tau=4.0)
    xs = torch.rand(5, 3, 4) * 3
    trace = torch.zeros(3, 4)
    for x in xs:
        spike, tr = node(x)
        trace = trace * (1 - 1 / 4.0) + spike
        torch.testing.assert_close(tr, trace)
    assert trace.abs().sum() > 0
    node.reset()
    assert node.trace is None and node.v == 0.0
    node.eval()
    out = node(xs[0])
    assert isinstance(out, torch.Tensor) and node.trace is None


def test_online_neuron_membrane_is_detached_each_step() -> None:
    node = SLTTLIFNode()
    x = (torch.rand(2, 3) * 2).requires_grad_()
    node(x)
    assert node.v.grad_fn is not None  # this step's graph exists ...
    node(x)
    # ... but the second step's v depends on x only through this step, not the first one.
    grads = torch.autograd.grad(node.v.sum(), x)
    ref = SLTTLIFNode()
    with torch.no_grad():
        ref(x)
    x2 = x.detach().clone().requires_grad_()
    ref(x2)
    torch.testing.assert_close(grads[0], torch.autograd.grad(ref.v.sum(), x2)[0])


@pytest.mark.parametrize("cls", [OTTTLIFNode, SLTTLIFNode])
def test_online_neurons_reject_multi_step(cls) -> None:
    with pytest.raises(ValueError, match="only supports step_mode='s'"):
        cls(step_mode="m")
    node = cls()
    with pytest.raises(ValueError, match="step_mode"):
        node.step_mode = "m"


# =================================================================================================
# Spike / trace plumbing
# =================================================================================================
def test_replace_for_grad_value_and_gradients() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    x_r = torch.randn(3, 4, requires_grad=True)
    y = ReplaceforGrad.apply(x, x_r)
    assert torch.equal(y, x_r)
    g = torch.randn(3, 4)
    y.backward(g)
    assert torch.equal(x.grad, g) and torch.equal(x_r.grad, g)


def test_grad_with_trace_weight_gradient_is_delta_t_trace() -> None:
    lin = nn.Linear(6, 4)
    spike = (torch.rand(5, 6) > 0.5).float().requires_grad_()
    trace = torch.rand(5, 6) * 2
    out = GradwithTrace(lin)([spike, trace])
    torch.testing.assert_close(out, F.linear(spike, lin.weight, lin.bias))
    delta = torch.randn(5, 4)
    (out * delta).sum().backward()
    torch.testing.assert_close(lin.weight.grad, delta.t() @ trace)
    torch.testing.assert_close(lin.bias.grad, delta.sum(0))
    torch.testing.assert_close(spike.grad, delta @ lin.weight.detach())
    # And it is not the spike-based gradient (the test can tell the two apart).
    assert not torch.allclose(lin.weight.grad, delta.t() @ spike.detach())


def test_grad_with_trace_conv_weight_gradient_uses_trace() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    spike = (torch.rand(2, 2, 5, 5) > 0.5).float()
    trace = torch.rand(2, 2, 5, 5)
    out = GradwithTrace(conv)([spike, trace])
    torch.testing.assert_close(out, conv(spike))
    out.sum().backward()
    ref = copy.deepcopy(conv)
    ref.zero_grad()
    ref(trace).sum().backward()
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad)


def test_spike_trace_op() -> None:
    spike = torch.rand(2, 1, 4, 4, requires_grad=True)
    trace = torch.rand(2, 1, 4, 4)
    s, t = SpikeTraceOp(nn.AvgPool2d(2))([spike, trace])
    torch.testing.assert_close(s, F.avg_pool2d(spike, 2))
    torch.testing.assert_close(t, F.avg_pool2d(trace, 2))
    assert s.requires_grad and not t.requires_grad


def test_pair_consumers_reject_plain_tensor() -> None:
    with pytest.raises(TypeError, match=r"GradwithTrace\(Linear\).*\[spike, trace\] pair"):
        GradwithTrace(nn.Linear(2, 2))(torch.rand(2, 2))
    with pytest.raises(TypeError, match="SpikeTraceOp"):
        SpikeTraceOp(nn.Flatten())(torch.rand(3, 2))


def _mlp(neuron, seq_cls, lif_cls_name: str = "OTTTLIFNode", last_lif: bool = True) -> nn.Module:
    torch.manual_seed(1)
    mods = [
        nn.Flatten(),
        nn.Linear(12, 10),
        getattr(neuron, lif_cls_name)(),
        nn.Linear(10, 8),
        getattr(neuron, lif_cls_name)(),
        nn.Linear(8, 3),
    ]
    if last_lif:
        mods.append(neuron.LIFNode())
    return seq_cls(*mods)


def _cnn(neuron, seq_cls) -> nn.Module:
    torch.manual_seed(2)
    return seq_cls(
        nn.Conv2d(1, 4, 3, padding=1),
        neuron.OTTTLIFNode(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        neuron.OTTTLIFNode(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )


def test_ottt_sequential_eval_is_plain_sequential() -> None:
    net = _mlp(our_neuron, OTTTSequential).eval()
    plain = nn.Sequential(*net)
    x = torch.rand(4, 3, 4) * 2
    y = net(x)
    _our_reset(net)
    torch.testing.assert_close(y, plain(x))


def test_ottt_sequential_explicit_wrappers_equal_automatic_routing() -> None:
    auto = _cnn(our_neuron, OTTTSequential)
    explicit = OTTTSequential(
        auto[0],
        auto[1],
        SpikeTraceOp(auto[2]),
        GradwithTrace(auto[3]),
        auto[4],
        SpikeTraceOp(auto[5]),
        GradwithTrace(auto[6]),
    )
    x = torch.rand(2, 1, 4, 4) * 3
    y_auto = auto(x)
    y_auto.sum().backward()
    grads = [p.grad.clone() for p in auto.parameters()]
    _our_reset(auto)
    auto.zero_grad()
    y_exp = explicit(x)
    y_exp.sum().backward()
    torch.testing.assert_close(y_auto, y_exp)
    for g, p in zip(grads, auto.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    # Eval mode: neurons emit plain spikes and the explicit wrappers pass them through.
    for net in (auto, explicit):
        _our_reset(net)
        net.eval()
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), auto(x), rtol=0, atol=0)


# =================================================================================================
# OTTT / SLTT training loop vs SpikingJelly
# =================================================================================================
def _run_ottt(net, loop, reset, data, online_flag: bool, epochs: int = 2) -> dict:
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    rec = _StepRecorder(opt)
    losses: list[torch.Tensor] = []
    outs = []
    for _ in range(epochs):
        for x, y in data:
            batch_loss, y_all = loop(net, opt, x, y, _recording_loss(losses), online_flag)
            losses.append(batch_loss)
            outs.append(y_all)
            reset(net)
    return {"steps": rec.snapshots, "losses": losses, "outs": outs}


def _seq_data(n_batches: int, shape: tuple[int, ...], out: int, t: int = 5):
    g = torch.Generator().manual_seed(3)
    return [
        (torch.rand(4, t, *shape, generator=g) * 2, torch.rand(4, t, out, generator=g))
        for _ in range(n_batches)
    ]


@pytest.mark.parametrize("online_flag", [True, False])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "sltt"])
def test_ottt_online_training_matches_spikingjelly(sj, online_flag: bool, arch: str) -> None:
    neuron, layer, ol, sj_reset = _sj_parts(sj)
    if arch == "mlp":
        ours, theirs = _mlp(our_neuron, OTTTSequential), _mlp(neuron, layer.OTTTSequential)
        data = _seq_data(2, (3, 4), 3)
    elif arch == "cnn":
        ours, theirs = _cnn(our_neuron, OTTTSequential), _cnn(neuron, layer.OTTTSequential)
        data = _seq_data(2, (1, 4, 4), 3)
    else:
        ours = _mlp(our_neuron, nn.Sequential, "SLTTLIFNode", last_lif=False)
        theirs = _mlp(neuron, nn.Sequential, "SLTTLIFNode", last_lif=False)
        data = _seq_data(2, (3, 4), 3)
    theirs.load_state_dict(ours.state_dict())
    a = _run_ottt(ours, ottt_online_training, _our_reset, data, online_flag)
    b = _run_ottt(theirs, ol.ottt_online_training, sj_reset, data, online_flag)
    _assert_runs_equal(a, b)
    for oa, ob in zip(a["outs"], b["outs"], strict=True):
        assert oa.shape == (4, 5, 3)
        _close(oa, ob)
    # The run really trained: parameters moved.
    assert not torch.allclose(a["steps"][0][0], a["steps"][-1][0])


def test_ottt_online_training_step_count_and_shapes() -> None:
    net = _mlp(our_neuron, OTTTSequential)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = _StepRecorder(opt)
    x, y = _seq_data(1, (3, 4), 3, t=6)[0]
    loss, y_all = ottt_online_training(net, opt, x, y, F.mse_loss, online=True)
    assert len(rec.snapshots) == 6 and loss.dim() == 0 and y_all.shape == (4, 6, 3)
    assert not y_all.requires_grad
    _our_reset(net)
    ottt_online_training(net, opt, x, y, F.mse_loss, online=False)
    assert len(rec.snapshots) == 7
    # After the loop, no state holds a graph (memory cannot accumulate across steps).
    for m in net.modules():
        if isinstance(m, OTTTLIFNode):
            assert m.v.grad_fn is None


def test_short_target_raises_index_error_before_any_update() -> None:
    net = _mlp(our_neuron, OTTTSequential)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(IndexError, match="target_seq has 3 time steps but x_seq has 5"):
        x, y = torch.rand(2, 5, 3, 4), torch.rand(2, 3, 3)
        ottt_online_training(net, opt, x, y, F.mse_loss, True)
    fnet = nn.Sequential(nn.Linear(3, 2), online.SLTTLIFNode())
    fopt = torch.optim.SGD(fnet.parameters(), lr=0.1)
    with pytest.raises(IndexError, match="target_seq has 2 time steps but x_seq has 4"):
        fptt_online_training(
            fnet,
            fopt,
            torch.rand(4, 2, 3),
            torch.rand(2, 2, 2),
            F.mse_loss,
            0.1,
            fptt_online_training_init_w_ra(fopt),
        )
    for p, q in zip(before, net.parameters(), strict=True):
        assert torch.equal(p, q)


# =================================================================================================
# FPTT vs SpikingJelly
# =================================================================================================
def _fptt_net(neuron, kind: str) -> nn.Module:
    torch.manual_seed(4)
    node = getattr(neuron, kind)
    return nn.Sequential(nn.Linear(6, 8), node(), nn.Linear(8, 3), node())


def _run_fptt(net, loop, init, reset, data, alpha: float, w_ra_fn=None, epochs: int = 2) -> dict:
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    rec = _StepRecorder(opt)
    losses: list[torch.Tensor] = []
    w_ra = init(opt) if w_ra_fn is None else w_ra_fn(opt)
    w_hist = []
    for _ in range(epochs):
        for x, y in data:
            loop(net, opt, x, y, _recording_loss(losses), alpha, w_ra)
            w_hist.append([w.clone() for w in w_ra])
            reset(net)
    return {"steps": rec.snapshots, "losses": losses, "w_ra": w_hist}


def _fptt_data(t: int = 5):
    g = torch.Generator().manual_seed(5)
    return [(torch.rand(t, 4, 6, generator=g) * 2, torch.rand(t, 4, 3, generator=g)) for _ in "ab"]


@pytest.mark.parametrize("kind", ["LIFNode", "IFNode"])
def test_fptt_online_training_matches_spikingjelly(sj, kind: str) -> None:
    neuron, _, ol, sj_reset = _sj_parts(sj)
    ours, theirs = _fptt_net(our_neuron, kind), _fptt_net(neuron, kind)
    theirs.load_state_dict(ours.state_dict())
    data = _fptt_data()
    a = _run_fptt(ours, fptt_online_training, fptt_online_training_init_w_ra, _our_reset, data, 0.3)
    b = _run_fptt(
        theirs, ol.fptt_online_training, ol.fptt_online_training_init_w_ra, sj_reset, data, 0.3
    )
    _assert_runs_equal(a, b)
    assert len(a["steps"]) == 2 * 2 * 5
    for wa, wb in zip(a["w_ra"], b["w_ra"], strict=True):
        for ta, tb in zip(wa, wb, strict=True):
            _close(ta, tb)
    assert not torch.allclose(a["steps"][0][0], a["steps"][-1][0])


def test_fptt_extra_pass_does_not_advance_state() -> None:
    """The gradient pass for w_ra restores the state: the dynamics see each input once."""
    net = _fptt_net(our_neuron, "LIFNode")
    x, y = _fptt_data(t=4)[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: weights fixed, only state evolves
    fptt_online_training(net, opt, x, y, F.mse_loss, 0.5, fptt_online_training_init_w_ra(opt))
    v_after = [m.v.clone() for m in net.modules() if isinstance(m, our_neuron.LIFNode)]
    _our_reset(net)
    with torch.no_grad():
        for x_t in x:
            net(x_t)
    nodes = [m for m in net.modules() if isinstance(m, our_neuron.LIFNode)]
    for v, m in zip(v_after, nodes, strict=True):
        torch.testing.assert_close(v, m.v)


def test_fptt_w_ra_are_independent_copies() -> None:
    net = nn.Sequential(nn.Linear(3, 2), SLTTLIFNode())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w_ra = fptt_online_training_init_w_ra(opt)
    params = list(net.parameters())
    assert len(w_ra) == len(params)
    for w, p in zip(w_ra, params, strict=True):
        assert torch.equal(w, p) and not w.requires_grad
        assert w.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    with torch.no_grad():
        params[0].add_(1.0)
    assert not torch.equal(w_ra[0], params[0])


def test_fptt_w_ra_copy_vs_alias_changes_training(sj) -> None:
    """What the copy choice changes: aliases follow the first optimizer step, copies do not.

    With aliases (``[p.data ...]``, what SpikingJelly's docs describe), the running average of the
    first step is ``(w_new + w_new)/2 - g/(2 alpha)`` instead of ``(w_old + w_new)/2 - g/(2
    alpha)``, and with T = 1 the list is never rebound, so the regulariser stays identically zero.
    Both implementations agree when given the same kind of list.
    """
    neuron, _, ol, sj_reset = _sj_parts(sj)
    data = _fptt_data()
    alias = lambda opt: [p.data for g in opt.param_groups for p in g["params"]]  # noqa: E731
    runs = {}
    for name, fn in [("copy", None), ("alias", alias)]:
        ours, theirs = _fptt_net(our_neuron, "LIFNode"), _fptt_net(neuron, "LIFNode")
        theirs.load_state_dict(ours.state_dict())
        init = fptt_online_training_init_w_ra
        a = _run_fptt(ours, fptt_online_training, init, _our_reset, data, 0.3, fn)
        b = _run_fptt(theirs, ol.fptt_online_training, init, sj_reset, data, 0.3, fn)
        _assert_runs_equal(a, b)  # same kind of list: identical to SpikingJelly
        runs[name] = a
    diff = max(
        (pa - pb).abs().max().item()
        for pa, pb in zip(runs["copy"]["steps"][-1], runs["alias"]["steps"][-1], strict=True)
    )
    assert diff > 1e-4

    # T = 1: aliased running averages never leave the weights, so the regulariser is zero and
    # FPTT degenerates to plain per-step SGD; the copies keep the previous weights.
    net = nn.Sequential(nn.Linear(6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    w_alias = alias(opt)
    x, y = torch.rand(1, 4, 6), torch.rand(1, 4, 3)
    fptt_online_training(net, opt, x, y, F.mse_loss, 0.3, w_alias)
    assert all(torch.equal(w, p) for w, p in zip(w_alias, net.parameters(), strict=True))
    net2 = nn.Sequential(nn.Linear(6, 3))
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.5)
    w_copy = fptt_online_training_init_w_ra(opt2)
    fptt_online_training(net2, opt2, x, y, F.mse_loss, 0.3, w_copy)
    assert not torch.equal(w_copy[0], net2[0].weight)


def test_fptt_w_ra_length_mismatch_is_a_clear_error() -> None:
    net = nn.Sequential(nn.Linear(3, 2), SLTTLIFNode())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fptt_online_training_init_w_ra"):
        x, y = torch.rand(2, 1, 3), torch.rand(2, 1, 2)
        fptt_online_training(net, opt, x, y, F.mse_loss, 0.1, [])


# =================================================================================================
# Compiled models (compile_online)
# =================================================================================================
def _online_net(kind: str) -> nn.Module:
    torch.manual_seed(6)
    if kind == "ottt_mlp":
        return _mlp(our_neuron, OTTTSequential)
    if kind == "ottt_cnn":
        return _cnn(our_neuron, OTTTSequential)
    if kind == "sltt":
        return _mlp(our_neuron, nn.Sequential, "SLTTLIFNode", last_lif=False)
    return _fptt_net(our_neuron, "LIFNode")


def _train_online(net: nn.Module, kind: str, epochs: int = 2) -> dict:
    if kind == "fptt":
        data = _fptt_data()
        init = fptt_online_training_init_w_ra
        return _run_fptt(net, fptt_online_training, init, _our_reset, data, 0.3, epochs=epochs)
    shape = (1, 4, 4) if kind == "ottt_cnn" else (3, 4)
    return _run_ottt(net, ottt_online_training, _our_reset, _seq_data(2, shape, 3), True, epochs)


def _example_step(kind: str) -> torch.Tensor:
    shapes = {"ottt_cnn": (4, 1, 4, 4), "fptt": (4, 6)}
    return torch.rand(shapes.get(kind, (4, 3, 4)))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["ottt_mlp", "ottt_cnn", "sltt", "fptt"])
def test_compiled_online_equals_eager(kind: str, backend: str) -> None:
    eager = _train_online(_online_net(kind), kind)
    model = _online_net(kind)
    compiled = online.compile_online(model, _example_step(kind), backend=backend)
    assert compiled.kind == ("ottt" if kind.startswith("ottt") else "graph")
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in model.parameters()}
    got = _train_online(compiled, kind)
    if backend == "torch":  # same code path: identical
        for sa, sb in zip(eager["steps"], got["steps"], strict=True):
            for pa, pb in zip(sa, sb, strict=True):
                assert torch.equal(pa, pb)
        _assert_runs_equal(eager, got)
    else:  # fused kernels: same spikes, gradients equal to float rounding
        assert len(eager["steps"]) == len(got["steps"])
        for sa, sb in zip(eager["steps"], got["steps"], strict=True):
            for pa, pb in zip(sa, sb, strict=True):
                torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_compiled_online_has_its_own_state_and_eval_mode() -> None:
    model = _online_net("ottt_mlp")
    compiled = online.compile_online(model, torch.rand(4, 3, 4), backend="torch")
    x = torch.rand(4, 3, 4) * 2
    compiled(x)
    assert all(m.v == 0.0 for m in model.modules() if isinstance(m, OTTTLIFNode))
    nodes = [m for m in compiled.modules() if isinstance(m, OTTTLIFNode)]
    assert nodes and all(isinstance(m.v, torch.Tensor) for m in nodes)
    _our_reset(compiled)
    model.eval()
    compiled.eval()
    xs = torch.rand(3, 4, 3, 4) * 2
    for x_t in xs:
        torch.testing.assert_close(compiled(x_t), model(x_t), rtol=0, atol=0)
    assert "grad_with_trace" in compiled.compiled.code  # routing resolved at compile time


def test_compiled_online_matches_spikingjelly(sj) -> None:
    neuron, layer, ol, sj_reset = _sj_parts(sj)
    ours = _mlp(our_neuron, OTTTSequential)
    theirs = _mlp(neuron, layer.OTTTSequential)
    theirs.load_state_dict(ours.state_dict())
    compiled = online.compile_online(ours, torch.rand(4, 3, 4), backend="auto")
    data = _seq_data(2, (3, 4), 3)
    _assert_runs_equal(
        _run_ottt(compiled, ottt_online_training, _our_reset, data, False),
        _run_ottt(theirs, ol.ottt_online_training, sj_reset, data, False),
    )


def test_compile_online_errors() -> None:
    model = _online_net("ottt_mlp")
    with pytest.raises(ValueError, match="backend must be"):
        online.compile_online(model, torch.rand(4, 3, 4), backend="gpu")
    compiled = online.compile_online(model, torch.rand(4, 3, 4))
    with pytest.raises(ValueError, match="runs ONE time step"):
        compiled(torch.rand(5, 4, 3, 4))
    nested = nn.Sequential(OTTTSequential(nn.Linear(3, 2), OTTTLIFNode()))
    with pytest.raises(NotImplementedError, match="OTTTSequential"):
        online.compile_online(nested, torch.rand(4, 3))
    inner = OTTTSequential(nn.Linear(3, 2), nn.Sequential(nn.Linear(2, 2), OTTTLIFNode()))
    with pytest.raises(NotImplementedError, match=r"OTTTSequential\[1\].*below the top level"):
        online.compile_online(inner, torch.rand(4, 3))
    misplaced = OTTTSequential(GradwithTrace(nn.Linear(3, 2)), OTTTLIFNode())
    with pytest.raises(TypeError, match="no OTTTLIFNode comes before it"):
        online.compile_online(misplaced, torch.rand(4, 3))


def test_public_names_where_spikingjelly_users_look() -> None:
    from snncompile import functional, layer

    assert our_neuron.OTTTLIFNode is OTTTLIFNode and our_neuron.SLTTLIFNode is SLTTLIFNode
    for name in ("OTTTSequential", "GradwithTrace", "SpikeTraceOp", "ReplaceforGrad"):
        assert getattr(layer, name) is getattr(online, name) and name in layer.__all__
    for name in (
        "fptt_online_training_init_w_ra",
        "fptt_online_training",
        "ottt_online_training",
    ):
        assert getattr(functional, name) is getattr(online, name) and name in functional.__all__
    assert {"OTTTLIFNode", "SLTTLIFNode"} <= set(our_neuron.__all__)


def test_our_loops_drive_spikingjelly_models(sj) -> None:
    """State handling is duck-typed: our loops train SpikingJelly-built networks identically."""
    neuron, layer, ol, sj_reset = _sj_parts(sj)
    a, b = _mlp(neuron, layer.OTTTSequential), _mlp(neuron, layer.OTTTSequential)
    b.load_state_dict(a.state_dict())
    data = _seq_data(2, (3, 4), 3)
    _assert_runs_equal(
        _run_ottt(a, ottt_online_training, sj_reset, data, True),
        _run_ottt(b, ol.ottt_online_training, sj_reset, data, True),
    )
    fa, fb = _fptt_net(neuron, "LIFNode"), _fptt_net(neuron, "LIFNode")
    fb.load_state_dict(fa.state_dict())
    init = fptt_online_training_init_w_ra
    _assert_runs_equal(
        _run_fptt(fa, fptt_online_training, init, sj_reset, _fptt_data(), 0.3),
        _run_fptt(fb, ol.fptt_online_training, init, sj_reset, _fptt_data(), 0.3),
    )
