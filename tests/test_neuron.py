"""Tests of snncompile.neuron: differential against SpikingJelly 2.0.0, state handling, errors.

The differential grid is IF/LIF/PLIF x decay_input {True, False} (LIF/PLIF) x v_reset
{0.0, None, -0.3} x detach_reset {True, False} x the 7 main surrogates x step mode
{'s', 'm', 'm' with store_v_seq} = 5 * 3 * 2 * 7 * 3 = 630 cases.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import zlib

import pytest
import torch

from snncompile import neuron, surrogate
from snncompile.neuron import NeuronSpec

KINDS = [("IF", None), ("LIF", True), ("LIF", False), ("PLIF", True), ("PLIF", False)]
V_RESETS = [0.0, None, -0.3]
DETACH = [True, False]
SURROGATES = [
    "Sigmoid",
    "ATan",
    "PiecewiseQuadratic",
    "PiecewiseExp",
    "SoftSign",
    "SuperSpike",
    "Erf",
]
MODES = ["s", "m", "m+v_seq"]
T, SHAPE = 6, (3, 7)

GRID = [
    (kind, decay, v_reset, detach, sg, mode)
    for kind, decay in KINDS
    for v_reset in V_RESETS
    for detach in DETACH
    for sg in SURROGATES
    for mode in MODES
]


def _grid_id(case: tuple) -> str:
    kind, decay, v_reset, detach, sg, mode = case
    decay_s = "" if decay is None else f"-decay{int(decay)}"
    return f"{kind}{decay_s}-vr{v_reset}-det{int(detach)}-{sg}-{mode}"


def _make(lib_neuron, lib_surrogate, kind, decay, v_reset, detach, sg, mode, **extra):
    kwargs = dict(
        v_reset=v_reset,
        surrogate_function=getattr(lib_surrogate, sg)(),
        detach_reset=detach,
        step_mode="s" if mode == "s" else "m",
        store_v_seq=mode == "m+v_seq",
    )
    if kind == "IF":
        return lib_neuron.IFNode(**kwargs)
    if kind == "LIF":
        return lib_neuron.LIFNode(tau=extra.get("tau", 2.0), decay_input=decay, **kwargs)
    return lib_neuron.ParametricLIFNode(
        init_tau=extra.get("init_tau", 2.0), decay_input=decay, **kwargs
    )


def _inputs(kind: str, decay: bool | None, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Inputs where some neurons fire and some do not, with exact threshold ties.

    Half the entries are multiples of 1/8: with tau = 2 (or sigmoid(w) = 1/2) every charge is
    then exact in float32, so ``H == v_threshold`` happens often (SpikingJelly fires on ties).
    """
    scale, bias = (1.2, 0.5) if (kind != "IF" and decay) else (0.7, 0.25)
    x = torch.randn(T, *SHAPE, generator=gen) * scale + bias
    dyadic = torch.round(x * 8) / 8
    mask = torch.rand(T, *SHAPE, generator=gen) < 0.5
    x = torch.where(mask, dyadic, x)
    v0 = torch.round(torch.randn(*SHAPE, generator=gen) * 0.4 * 8) / 8
    w_s = torch.randn(T, *SHAPE, generator=gen)
    w_v = torch.randn(T, *SHAPE, generator=gen)
    return x, v0, w_s, w_v


def _run(node, x, v0, w_s, w_v, mode):
    """Run ``node`` on ``x`` from initial state ``v0``; return outputs, loss and grads."""
    x = x.clone().requires_grad_()
    v_init = v0.clone().requires_grad_()
    node.v = v_init
    if mode == "s":
        spikes, vs = [], []
        for x_t in x.unbind(0):
            spikes.append(node(x_t))
            vs.append(node.v)
        spikes, v_seq = torch.stack(spikes), torch.stack(vs)
        loss = (spikes * w_s).sum() + (v_seq * w_v).sum()
    else:
        spikes = node(x)
        v_seq = node.v_seq
        loss = (spikes * w_s).sum() + (node.v * w_v[-1]).sum()
        if mode == "m+v_seq":
            loss = loss + (v_seq * w_v).sum()
        else:
            assert v_seq is None
    params = [x, v_init] + ([node.w] if hasattr(node, "w") else [])
    grads = torch.autograd.grad(loss, params)
    return spikes, node.v, v_seq, grads


def _assert_grads_close(ours, ref, what, atol=1e-9):
    for name, a, b in zip(("x", "v_init", "w"), ours, ref, strict=False):
        torch.testing.assert_close(
            a, b, rtol=1e-6, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


class _TieCounter:
    """Counts exact zeros of ``H - v_threshold`` reaching the surrogate (threshold ties)."""

    def __init__(self) -> None:
        self.ties = 0

    def __call__(self, module, args) -> None:
        self.ties += int((args[0] == 0).sum())


@pytest.mark.parametrize("case", GRID, ids=[_grid_id(c) for c in GRID])
def test_matches_spikingjelly(sj, case) -> None:
    kind, decay, v_reset, detach, sg, mode = case
    gen = torch.Generator().manual_seed(zlib.crc32(_grid_id(case).encode()))
    x, v0, w_s, w_v = _inputs(kind, decay, gen)
    ours = _make(neuron, surrogate, *case)
    ref = _make(sj.neuron, sj.surrogate, *case)
    s_a, v_a, vs_a, g_a = _run(ours, x, v0, w_s, w_v, mode)
    s_b, v_b, vs_b, g_b = _run(ref, x, v0, w_s, w_v, mode)
    assert torch.equal(s_a, s_b), "spikes differ"
    assert torch.equal(v_a, v_b), "final membrane differs"
    if vs_b is not None:
        assert torch.equal(vs_a, vs_b), "v_seq differs"
    assert 0 < s_a.mean() < 1, "test inputs should make some neurons fire and some not"
    _assert_grads_close(g_a, g_b, _grid_id(case))


@pytest.mark.parametrize(("kind", "decay"), KINDS)
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_grid_inputs_exercise_threshold_ties(kind, decay, v_reset) -> None:
    """The grid's inputs really hit ``H == v_threshold`` exactly, so the tie rule is tested."""
    ties = 0
    for case in GRID:
        if case[:3] != (kind, decay, v_reset) or case[5] != "m":
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(_grid_id(case).encode()))
        x, v0, w_s, w_v = _inputs(kind, decay, gen)
        node = _make(neuron, surrogate, *case)
        counter = _TieCounter()
        node.surrogate_function.register_forward_pre_hook(counter)
        _run(node, x, v0, w_s, w_v, "m")
        ties += counter.ties
    assert ties > 0


@pytest.mark.parametrize("mode", ["s", "m"])
@pytest.mark.parametrize(
    ("kind", "extra"), [("LIF", {"tau": 3.7}), ("PLIF", {"init_tau": 5.0}), ("LIF", {"tau": 100.0})]
)
def test_other_time_constants_match_spikingjelly(sj, kind, extra, mode) -> None:
    gen = torch.Generator().manual_seed(3)
    x, v0, w_s, w_v = _inputs(kind, True, gen)
    x = x * 3
    args = (kind, True, 0.0, False, "Erf", mode)
    ours = _make(neuron, surrogate, *args, **extra)
    ref = _make(sj.neuron, sj.surrogate, *args, **extra)
    s_a, v_a, _, g_a = _run(ours, x, v0, w_s, w_v, mode)
    s_b, v_b, _, g_b = _run(ref, x, v0, w_s, w_v, mode)
    assert torch.equal(s_a, s_b) and torch.equal(v_a, v_b)
    _assert_grads_close(g_a, g_b, f"{kind}{extra}")


def test_threshold_tie_fires(sj) -> None:
    """``H == v_threshold`` fires (SpikingJelly's rule; snnTorch/Norse use ``>``)."""
    for ours, ref, x in [
        (neuron.IFNode(), sj.neuron.IFNode(), 1.0),
        (neuron.LIFNode(), sj.neuron.LIFNode(), 2.0),
        (neuron.ParametricLIFNode(), sj.neuron.ParametricLIFNode(), 2.0),
        (neuron.IFNode(v_threshold=0.5, v_reset=None), sj.neuron.IFNode(0.5, None), 0.5),
    ]:
        tie = torch.tensor(x)
        inp = torch.stack([tie, torch.nextafter(tie, torch.tensor(0.0))]).unsqueeze(0)
        out = ours(inp)
        assert out.tolist() == [[1.0, 0.0]]
        assert torch.equal(out, ref(inp)) and torch.equal(ours.v, ref.v)


# -- our own semantics ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["IF", "LIF", "PLIF"])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_single_step_equals_multi_step(kind, v_reset) -> None:
    x = torch.randn(T, *SHAPE) * 1.5
    grads = []
    outs = []
    for mode in ("s", "m"):
        node = _make(neuron, surrogate, kind, True, v_reset, False, "ATan", mode)
        xr = x.clone().requires_grad_()
        if mode == "s":
            spikes = torch.stack([node(x_t) for x_t in xr.unbind(0)])
        else:
            spikes = node(xr)
        (spikes.sum() + node.v.sum()).backward()
        outs.append((spikes, node.v))
        grads.append(xr.grad)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_state_broadcast_and_reset() -> None:
    node = neuron.LIFNode(v_reset=-0.25)
    assert node.v == -0.25 and isinstance(node.v, float)
    x = torch.zeros(2, 3, dtype=torch.float64)
    node(x)
    assert node.v.shape == (2, 3) and node.v.dtype == torch.float64
    assert torch.equal(node.v, torch.full((2, 3), -0.25, dtype=torch.float64))
    node.reset()
    assert node.v == -0.25 and isinstance(node.v, float)
    soft = neuron.IFNode(v_reset=None)
    assert soft.v == 0.0
    soft(torch.full((4,), 0.25))
    assert torch.equal(soft.v, torch.full((4,), 0.25))


def test_state_follows_input_dtype_half() -> None:
    node = neuron.IFNode(step_mode="m")
    x = torch.rand(3, 5, dtype=torch.bfloat16)
    out = node(x)
    assert out.dtype == torch.bfloat16 and node.v.dtype == torch.bfloat16


def test_given_tensor_state_is_used() -> None:
    node = neuron.IFNode()
    node.v = torch.full((2,), 0.75)
    assert node(torch.tensor([0.25, 0.0])).tolist() == [1.0, 0.0]
    assert node.v.tolist() == [0.0, 0.75]


def test_store_v_seq() -> None:
    node = neuron.LIFNode(step_mode="m", store_v_seq=True)
    x = torch.rand(5, 2, 3) * 3
    node(x)
    assert node.v_seq.shape == (5, 2, 3)
    assert torch.equal(node.v_seq[-1], node.v)
    node.reset()
    assert node.v_seq is None
    node.step_mode = "s"
    for x_t in x.unbind(0):
        node(x_t)
    assert node.v_seq.shape == (5, 2, 3)
    plain = neuron.LIFNode(step_mode="m")
    plain(x)
    assert plain.v_seq is None
    node.store_v_seq = False
    assert node.v_seq is None


def test_detach_cuts_graph() -> None:
    node = neuron.LIFNode(step_mode="m")
    x1 = torch.rand(3, 4, requires_grad=True)
    node(x1.unsqueeze(0).expand(2, 3, 4))
    assert node.v.requires_grad
    node.detach()
    assert not node.v.requires_grad
    x2 = torch.rand(2, 3, 4, requires_grad=True)
    (node(x2).sum() + node.v.sum()).backward()
    assert x1.grad is None and x2.grad is not None


def test_plif_parameter() -> None:
    node = neuron.ParametricLIFNode(init_tau=3.0)
    assert isinstance(node.w, torch.nn.Parameter) and node.w.shape == ()
    assert math.isclose(node.w.item(), -math.log(2.0), rel_tol=1e-6)
    assert math.isclose(1 / node.w.sigmoid().item(), 3.0, rel_tol=1e-6)
    assert [name for name, _ in node.named_parameters()] == ["w"]
    assert "tau=3.0" in repr(node)


def test_default_surrogate_is_per_node() -> None:
    a, b = neuron.IFNode(), neuron.LIFNode()
    assert isinstance(a.surrogate_function, surrogate.Sigmoid)
    assert a.surrogate_function is not b.surrogate_function
    assert a.surrogate_function.alpha == 4.0


def test_dynamics_spec() -> None:
    sg = surrogate.ATan(alpha=3.0)
    spec = neuron.LIFNode(3.0, False, 0.5, None, sg, True).dynamics_spec()
    assert spec == NeuronSpec("lif", 0.5, None, 3.0, False, True, sg)
    assert spec.surrogate is sg
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tau = 4.0  # type: ignore[misc]
    if_spec = neuron.IFNode(v_reset=-0.3).dynamics_spec()
    assert (if_spec.kind, if_spec.v_reset, if_spec.tau, if_spec.decay_input) == (
        "if",
        -0.3,
        None,
        False,
    )
    plif = neuron.ParametricLIFNode(init_tau=4.0, decay_input=False)
    plif_spec = plif.dynamics_spec()
    assert (plif_spec.kind, plif_spec.tau, plif_spec.decay_input) == ("plif", None, False)
    assert plif_spec.w is plif.w


def test_constructor_matches_spikingjelly_signature(sj) -> None:
    pairs = [
        (neuron.IFNode, sj.neuron.IFNode),
        (neuron.LIFNode, sj.neuron.LIFNode),
        (neuron.ParametricLIFNode, sj.neuron.ParametricLIFNode),
        (neuron.BaseNode, sj.neuron.BaseNode),
    ]
    for ours, ref in pairs:
        p_ours = inspect.signature(ours.__init__).parameters
        p_ref = inspect.signature(ref.__init__).parameters
        names = [n for n, p in p_ours.items() if p.kind != p.KEYWORD_ONLY]
        assert names == list(p_ref), ours.__name__
        assert p_ours["backend"].kind == inspect.Parameter.KEYWORD_ONLY
        assert p_ours["backend"].default == "torch"
        for name, p in p_ref.items():
            if name in ("self", "surrogate_function"):
                continue
            assert p_ours[name].default == p.default, (ours.__name__, name)
        assert type(p_ours["surrogate_function"].default).__name__ == "Sigmoid"


def test_positional_spikingjelly_call() -> None:
    node = neuron.LIFNode(3.0, False, 0.5, None, surrogate.Erf(), True, "m", True)
    assert (node.tau, node.decay_input, node.v_threshold, node.v_reset) == (3.0, False, 0.5, None)
    assert node.detach_reset and node.step_mode == "m" and node.store_v_seq
    assert node.backend == "torch"


def test_extra_repr() -> None:
    text = repr(neuron.LIFNode(tau=4.0, v_reset=None, step_mode="m"))
    for part in ["v_threshold=1.0", "v_reset=None", "step_mode=m", "backend=torch", "tau=4.0"]:
        assert part in text


# -- errors ------------------------------------------------------------------------------------


def test_error_unknown_step_mode() -> None:
    with pytest.raises(ValueError, match=r"IFNode: step_mode must be 's'.*or 'm'"):
        neuron.IFNode(step_mode="x")
    node = neuron.LIFNode()
    with pytest.raises(ValueError, match="LIFNode: step_mode"):
        node.step_mode = "multi"


def test_error_unknown_backend() -> None:
    # 'cpu', 'cuda' and 'auto' are the fused backends (snncompile.runtime.fused_backends).
    with pytest.raises(ValueError, match=r"LIFNode: unknown backend 'tpu'.*\('torch', 'cpu'"):
        neuron.LIFNode(backend="tpu")
    node = neuron.IFNode()
    with pytest.raises(ValueError, match="supported backends"):
        node.backend = "triton"
    with pytest.raises(TypeError, match="backend is keyword-only"):
        neuron.IFNode(1.0, 0.0, surrogate.Sigmoid(), False, "m", "torch")


@pytest.mark.parametrize("tau", [1.0, 0.5, -2.0])
def test_error_tau_not_above_one(tau) -> None:
    with pytest.raises(ValueError, match=r"LIFNode: tau must be > 1"):
        neuron.LIFNode(tau=tau)
    with pytest.raises(ValueError, match=r"ParametricLIFNode: init_tau must be > 1"):
        neuron.ParametricLIFNode(init_tau=tau)


def test_error_bad_argument_types() -> None:
    with pytest.raises(TypeError, match="IFNode: v_threshold must be a real number"):
        neuron.IFNode(v_threshold="1")
    with pytest.raises(TypeError, match="v_reset must be a real number or None"):
        neuron.IFNode(v_reset="hard")
    with pytest.raises(TypeError, match="surrogate_function must be a callable"):
        neuron.IFNode(surrogate_function=4.0)
    with pytest.raises(ValueError, match="LIFNode: tau must be finite"):
        neuron.LIFNode(tau=math.inf)


def test_error_multi_step_without_time_dim() -> None:
    node = neuron.LIFNode(step_mode="m")
    with pytest.raises(ValueError, match=r"LIFNode is in multi-step mode.*\[T, N, \*\]"):
        node(torch.rand(5))
    with pytest.raises(ValueError, match="LIFNode: the input sequence has no time steps"):
        node(torch.rand(0, 5))


@pytest.mark.parametrize("mode", ["s", "m"])
def test_error_state_shape_changed(mode) -> None:
    node = neuron.IFNode(step_mode=mode)
    shape = (4, 3) if mode == "s" else (2, 4, 3)
    node(torch.rand(shape))
    smaller = (2, 3) if mode == "s" else (2, 2, 3)
    with pytest.raises(
        RuntimeError, match=r"IFNode: the stored membrane v has shape \(4, 3\).*reset_net"
    ):
        node(torch.rand(smaller))
    node.reset()
    node(torch.rand(smaller))  # fine after a reset


@pytest.mark.parametrize("mode", ["s", "m"])
@pytest.mark.parametrize("kind", ["IF", "LIF", "PLIF"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_match_spikingjelly(sj, kind, mode, dtype) -> None:
    """State arithmetic follows SpikingJelly's: v in the input's dtype (PLIF promotes)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(T, *SHAPE, generator=gen) * 1.2 + 0.5).to(dtype)
    args = (kind, True, None, False, "Sigmoid", mode)
    results = []
    for lib_neuron, lib_surrogate in ((neuron, surrogate), (sj.neuron, sj.surrogate)):
        node = _make(lib_neuron, lib_surrogate, *args)
        xr = x.clone().requires_grad_()
        if mode == "s":
            spikes = torch.stack([node(x_t) for x_t in xr.unbind(0)])
        else:
            spikes = node(xr)
        (spikes.sum() + node.v.float().sum()).backward()
        results.append((spikes, node.v, xr.grad))
    (s_a, v_a, g_a), (s_b, v_b, g_b) = results
    assert s_a.dtype == s_b.dtype and v_a.dtype == v_b.dtype
    assert torch.equal(s_a, s_b) and torch.equal(v_a, v_b)
    torch.testing.assert_close(g_a, g_b)


def test_register_backend_dispatch() -> None:
    class CountingLIF(neuron.LIFNode):
        pass

    calls = []

    def impl(node, x_seq):
        calls.append(tuple(x_seq.shape))
        return node._multi_step_torch(x_seq)

    CountingLIF.register_backend("counting", impl)
    # The parent has torch plus the fused backends ('cpu', 'cuda', 'auto'); it stays untouched.
    assert CountingLIF.supported_backends == (*neuron.LIFNode.supported_backends, "counting")
    assert "counting" not in neuron.LIFNode.supported_backends
    with pytest.raises(ValueError, match="unknown backend 'counting'"):
        neuron.LIFNode(backend="counting")
    x = torch.rand(4, 2, 3) * 2
    node = CountingLIF(step_mode="m", backend="counting", store_v_seq=True)
    ref = neuron.LIFNode(step_mode="m", store_v_seq=True)
    assert torch.equal(node(x), ref(x)) and torch.equal(node.v_seq, ref.v_seq)
    assert calls == [(4, 2, 3)]
    node.step_mode = "s"
    node(x[0])  # single step never dispatches
    assert len(calls) == 1
    with pytest.raises(ValueError, match="built in"):
        CountingLIF.register_backend("torch", impl)

    class Listed(neuron.IFNode):
        supported_backends = ("torch", "ghost")

    with pytest.raises(NotImplementedError, match=r"'ghost'.*register_backend"):
        Listed(step_mode="m", backend="ghost")(x)


def test_detach_leaves_callers_initial_state_alone() -> None:
    node = neuron.IFNode()
    v0 = torch.zeros(3, requires_grad=True)
    node.v = v0
    node.detach()
    assert v0.requires_grad and not node.v.requires_grad


def _graph_ops(root: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [root.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def test_multi_step_uses_unbind_not_indexing() -> None:
    """``x_seq[t]`` would make backward O(T^2); the loop must slice with ``unbind``."""
    x = torch.rand(5, 2, 3, requires_grad=True)
    ops = _graph_ops(neuron.LIFNode(step_mode="m")(x).sum())
    assert "UnbindBackward0" in ops and "SelectBackward0" not in ops


def test_deepcopy_and_state_dict() -> None:
    import copy

    node = neuron.ParametricLIFNode(init_tau=3.0, step_mode="m")
    node(torch.rand(2, 4))
    node.detach()  # torch cannot deepcopy non-leaf tensors (the state depends on w)
    clone = copy.deepcopy(node)
    assert torch.equal(clone.v, node.v) and clone.v is not node.v
    assert list(node.state_dict()) == ["w"]
    clone.reset()
    assert clone.v == 0.0 and isinstance(node.v, torch.Tensor)


@pytest.mark.parametrize(
    "sg", ["PiecewiseLeakyReLU", "QPseudoSpike", "LeakyKReLU", "S2NN", "NonzeroSignLogAbs", "Rect"]
)
@pytest.mark.parametrize("kind", ["IF", "PLIF"])
def test_extra_surrogates_in_neurons_match_spikingjelly(sj, kind, sg) -> None:
    """Surrogates without a SpikingJelly fused kernel go through its autograd reference path."""
    case = (kind, True, None, False, sg, "m")
    gen = torch.Generator().manual_seed(zlib.crc32(_grid_id(case).encode()))
    x, v0, w_s, w_v = _inputs(kind, True, gen)
    s_a, v_a, _, g_a = _run(_make(neuron, surrogate, *case), x, v0, w_s, w_v, "m")
    s_b, v_b, _, g_b = _run(_make(sj.neuron, sj.surrogate, *case), x, v0, w_s, w_v, "m")
    assert torch.equal(s_a, s_b) and torch.equal(v_a, v_b)
    # SpikingJelly divides by some gradients where we multiply by ``derivative``: last-bit
    # differences, which BPTT can turn into small absolute differences near zero.
    _assert_grads_close(g_a, g_b, _grid_id(case), atol=1e-6)
