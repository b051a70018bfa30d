"""Chain kernels for neurons with states beside the membrane (Izhikevich ``w``, ALIF ``a``,
CUBA-LIF ``c``, and a test neuron with a learnable decay): the chain carries every state.

* :class:`FusedChain` itself, for each neuron and each chain (batchnorm + max pooling, an
  overlapping max pooling alone, batchnorm alone, batchnorm + a residual added before the neuron,
  batchnorm + SEW's add after it), from fresh states and from given state tensors, two calls in a
  row without a reset and one backward through both (so the last states' gradients of the first
  call come back in, and the initial states' gradients go out): the chain kernel runs, outputs
  are bit-equal to the same modules run one after the other, every state agrees (bit-equal
  without a batchnorm; a batchnorm's ``x * a + b`` may round 1 ulp off PyTorch's), gradients of
  the inputs, the residuals, the batchnorm's parameters and the initial states within 1e-5
  relative.
* ``snncompile.optimize`` of small networks with these chains (train mode): the pass fuses them
  (report and graph), and two calls without a reset give outputs bit-equal to the eager model and
  to the compile without the pass, with parameter gradients within 1e-5 relative.
* SpikingJelly 2.0.0's own IzhikevichNode and CUBALIFNode in a compiled network vs SpikingJelly.
* The chain kernels built for the baseline ISA (``SNNCOMPILE_MARCH=x86-64``, SSE2) give the
  same bits as the ``native`` build: outputs, every state, every gradient.
* A state whose name the chain kernels use for their own variables is refused with the reason.
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from chain_helpers import random_bn
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.dynamics.expr import param, sigmoid, var
from snncompile.dynamics.neuron import NeuronDynamics, State
from snncompile.dynamics.surrogates import SurrogateExpr
from snncompile.ir.ops import Op
from snncompile.passes.fuse_chains import CHAIN_ATTR
from snncompile.passes.pipeline import build_pipeline
from snncompile.runtime import fused_chain
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.fused_chain import FusedChain, chain_blocker

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


class DecayCubaNode(neuron.BaseNode):
    """A test neuron with an extra state and a learnable parameter: a current ``c <- 0.6 c + x``
    charging the membrane with a learnable decay, ``h = v * sigmoid(w) + c_next``. The state's
    name is an argument, so a name the chain kernels use can be tried."""

    def __init__(self, state: str = "c", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.state = state
        self.register_memory(state, 0.0)
        self.w = nn.Parameter(torch.tensor(0.4))

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        c_next = var(self.state) * 0.6 + var("x")
        return NeuronDynamics(
            "decaycuba",
            var("v") * sigmoid(param("w")) + c_next,
            self.v_threshold,
            self.v_reset,
            surrogate,
            self.detach_reset,
            states=(State(self.state, 0.0, c_next),),
        )


#: The multi-state neurons, configured so that every extra state changes the spikes.
NEURONS = {
    "IzhikevichNode": dict(a=0.3, b=0.2, tau_w=3.0, w_rest=0.1),
    "ALIFNode": dict(tau_a=5.0, beta=0.8),
    "CUBALIFNode": dict(),
    "DecayCubaNode": dict(),
}
CHAINS = ["bn_pool", "pool", "bn", "residual", "added"]


def _neuron(cls: str, **kw: object) -> nn.Module:
    make = DecayCubaNode if cls == "DecayCubaNode" else getattr(neuron, cls)
    return make(surrogate_function=surrogate.ATan(), **NEURONS[cls], **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _chain(cls: str, kind: str, C: int) -> FusedChain:
    n = _neuron(cls, step_mode="m", backend="cpu")
    bn = None if kind == "pool" else random_bn(C)
    pool = {"bn_pool": nn.MaxPool2d(2), "pool": nn.MaxPool2d(3, 2, 1)}.get(kind)
    return FusedChain(n, bn, pool, residual=kind == "residual", added=kind == "added")


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the chain kernel's autograd function (the fused path)."""
    calls: list[int] = []
    apply = fused_chain._ChainFunction.apply

    def counted(*args: object) -> object:
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(fused_chain._ChainFunction, "apply", counted)
    return calls


CASES = [(k, s, True) for k in CHAINS for s in ("fresh", "tensors")] + [("bn_pool", "fresh", False)]


@pytest.mark.parametrize("cls", list(NEURONS))
@pytest.mark.parametrize("kind,start,train", CASES)
def test_chain_module_carries_every_state(cls, kind, start, train, kernel_calls):
    """Two calls without a reset and one backward through both, fused vs the same modules run
    one after the other (module docstring)."""
    torch.manual_seed(list(NEURONS).index(cls) * 100 + CASES.index((kind, start, train)))
    T, N, C, H, W = 3, 2, 3, 6, 6
    chain = _chain(cls, kind, C).train(train)
    ref = copy.deepcopy(chain)
    names = chain.neuron.neuron_dynamics().state_names
    assert len(names) == 2
    leaves: list[tuple[torch.Tensor, torch.Tensor]] = []
    if start == "tensors":  # given initial states: read by the kernel, gradients flow to them
        for name in names:
            s0 = (torch.rand(N, C, H, W) * 0.8 - 0.2).requires_grad_()
            s0_ref = s0.detach().clone().requires_grad_()
            setattr(chain.neuron, name, s0)
            setattr(ref.neuron, name, s0_ref)
            leaves.append((s0, s0_ref))
    inputs, inputs_ref = [], []
    loss = loss_ref = 0.0
    for _ in range(2):  # the second call starts from the first call's states
        n_in = 1 + int(kind in ("residual", "added"))
        xs = [(torch.randn(T, N, C, H, W) * 1.5 + 0.6).requires_grad_() for _ in range(n_in)]
        xs_ref = [t.detach().clone().requires_grad_() for t in xs]
        y, y_ref = chain(*xs), ref.unfused(*xs_ref)
        assert torch.equal(y, y_ref)
        for name in names:
            a, b = getattr(chain.neuron, name), getattr(ref.neuron, name)
            if chain.bn is None:
                assert torch.equal(a, b), name
            else:  # the normalised input may differ by ~1 ulp from PyTorch's batchnorm
                torch.testing.assert_close(a, b, rtol=1e-6, atol=4e-6)
        g = torch.randn_like(y)
        loss = loss + (y * g).sum()
        loss_ref = loss_ref + (y_ref * g).sum()
        inputs += xs
        inputs_ref += xs_ref
    assert len(kernel_calls) == 2
    assert all(getattr(chain.neuron, n).dtype == torch.float32 for n in names)
    loss.backward()
    loss_ref.backward()
    for a, b in zip(inputs, inputs_ref, strict=True):
        assert _rel(a.grad, b.grad) < 1e-5
    for (s0, s0_ref), name in zip(leaves, names, strict=False):
        assert _rel(s0.grad, s0_ref.grad) < 1e-5, name
    params = list(chain.parameters())
    assert len(params) == 2 * (chain.bn is not None) + (cls == "DecayCubaNode")
    for (name, p), q in zip(chain.named_parameters(), ref.parameters(), strict=True):
        assert _rel(p.grad, q.grad) < 1e-5, name


def test_fresh_states_are_filled_in_the_kernel():
    """A fresh neuron (float states) runs without materialising them: the kernel fills each
    state with the neuron's own value (here ``w_rest``, not 0), as the unfused neuron starts."""
    torch.manual_seed(7)
    chain = FusedChain(
        neuron.IzhikevichNode(surrogate_function=surrogate.ATan(), a=0.3, b=0.4, w_rest=0.25,
                              step_mode="m", backend="cpu"),
        None, nn.AvgPool2d(2),
    )  # fmt: skip
    ref = copy.deepcopy(chain)
    inits, fills = fused_chain._initial_states(chain.neuron, ("v", "w"), torch.zeros(2, 3, 4, 4))
    assert inits == [None, None] and fills == (0.0, 0.25)
    assert isinstance(chain.neuron.w, float)
    x = torch.randn(4, 2, 3, 4, 4) * 2 + 0.5
    assert torch.equal(chain(x), ref.unfused(x))
    assert torch.equal(chain.neuron.w, ref.neuron.w)
    assert chain.neuron.w.shape == (2, 3, 4, 4)


def _run_bits(chain: FusedChain, seed: int) -> list[torch.Tensor]:
    """Outputs, states and gradients (inputs, initial states, parameters) of two calls of
    ``chain`` from given initial states, one backward through both."""
    torch.manual_seed(seed)
    n_in = 1 + int(chain.residual or chain.added)
    names = chain.neuron.neuron_dynamics().state_names
    leaves = [(torch.rand(2, 3, 6, 6) * 0.8 - 0.2).requires_grad_() for _ in names]
    for name, s0 in zip(names, leaves, strict=True):
        setattr(chain.neuron, name, s0)
    got, loss, xs = [], 0.0, []
    for _ in range(2):
        xs += [(torch.randn(3, 2, 3, 6, 6) * 1.5 + 0.6).requires_grad_() for _ in range(n_in)]
        y = chain(*xs[-n_in:])
        loss = loss + (y * torch.randn_like(y)).sum()
        got += [y.detach(), *(getattr(chain.neuron, n).detach() for n in names)]
    loss.backward()
    return got + [t.grad for t in xs + leaves] + [p.grad for p in chain.parameters()]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 ISA names")
@pytest.mark.parametrize("cls", list(NEURONS))
def test_baseline_isa_chain_kernels_give_the_same_bits(cls, monkeypatch):
    """The same chains built with -march=native and -march=x86-64: identical bits."""
    for kind in ("bn_pool", "residual", "added"):
        torch.manual_seed(1)
        chain = _chain(cls, kind, 3)
        results = []
        for arch in ("native", "x86-64"):
            monkeypatch.setenv("SNNCOMPILE_MARCH", arch)
            results.append(_run_bits(copy.deepcopy(chain), 21))
        for i, (a, b) in enumerate(zip(*results, strict=True)):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (kind, i)


def _net(cls: str, kind: str) -> nn.Module:
    """A conv -> chain -> linear network (``kind``: a key of ``CHAINS`` but 'added')."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = layer.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = layer.BatchNorm2d(4)
            self.sn = _neuron(cls)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sn(self.bn(self.conv(x)) + x)

    bn = kind in ("bn_pool", "bn", "residual")
    # A conv bias before a training batchnorm has a gradient of ~0 (the mean is removed): none.
    mods: list[nn.Module] = [layer.Conv2d(2, 4, 3, padding=1, bias=not bn)]
    if kind == "residual":
        mods += [layer.BatchNorm2d(4), neuron.IFNode(surrogate_function=surrogate.ATan())]
        mods.append(Residual())
    else:
        if bn:
            mods.append(layer.BatchNorm2d(4))
        mods.append(_neuron(cls))
    pooled = kind in ("bn_pool", "pool")
    if pooled:
        mods.append(layer.MaxPool2d(2))
    mods += [layer.Flatten(), layer.Linear(4 * (16 if pooled else 64), 3)]
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


def _without_chains() -> list[str]:
    return [n for n, _ in build_pipeline("train") if n not in ("fuse_chains", "pack_spikes")]


def _train_two_calls(model: nn.Module, xs: list[torch.Tensor]) -> tuple[list, list]:
    """Outputs of two calls without a reset and the parameter gradients of one backward."""
    functional.reset_net(model)
    model.zero_grad(set_to_none=True)
    outs, loss = [], 0.0
    for i, x in enumerate(xs):
        y = model(x)
        outs.append(y.detach())
        loss = loss + (y * torch.linspace(-1, 1, y.numel()).view_as(y) * (i + 1)).sum()
    loss.backward()
    return outs, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", ["IzhikevichNode", "ALIFNode", "CUBALIFNode"])
@pytest.mark.parametrize("kind", ["bn_pool", "pool", "bn", "residual"])
def test_compiled_network_fuses_the_chain_and_trains_as_eager(cls, kind, kernel_calls):
    """The compile fuses the multi-state neuron's chain and trains (two calls, state carried)
    as the eager model and the compile without the pass do."""
    torch.manual_seed(3 + ["bn_pool", "pool", "bn", "residual"].index(kind))
    net = _net(cls, kind)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    eager, plain_model = copy.deepcopy(net), copy.deepcopy(net)
    xs = [torch.rand(3, 2, 2, 8, 8) * 2 for _ in range(2)]
    compiled = snncompile.optimize(net, xs[0])
    plain = snncompile.optimize(plain_model, xs[0], passes=_without_chains())
    want = {"bn_pool": ("bn", "neuron", "pool"), "pool": ("neuron", "pool"),
            "bn": ("bn", "neuron"), "residual": ("bn", "add", "neuron")}[kind]  # fmt: skip
    chains = [n for n in compiled.graph.find(Op.FUSED_NEURON) if CHAIN_ATTR in n.attrs]
    multi = [n for n in chains if n.attrs.get("states", ("v",)) != ("v",)]
    assert [n.attrs["chain"] for n in multi] == [want], compiled.report()
    assert isinstance(multi[0].module, FusedChain)
    assert "carries states" not in compiled.report()
    out_c, grads_c = _train_two_calls(compiled, xs)
    assert len(kernel_calls) == 2 * len(chains)
    out_e, grads_e = _train_two_calls(eager, xs)
    out_p, grads_p = _train_two_calls(plain, xs)
    for a, b, c in zip(out_c, out_e, out_p, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    pnames = [n for n, _ in compiled.named_parameters()]
    for name, a, b, c in zip(pnames, grads_c, grads_e, grads_p, strict=True):
        assert _rel(a, b) < 1e-5 and _rel(a, c) < 1e-5, name


@pytest.mark.parametrize("name", ["IzhikevichNode", "CUBALIFNode"])
def test_matches_eager_spikingjelly(sj, name):
    """SpikingJelly's own multi-state neurons after a batchnorm and before a pooling: the
    compiled network fuses the chain and a training step matches SpikingJelly's."""
    L, fn = sj.layer, sj.functional
    kw = {"IzhikevichNode": dict(a=0.3, b=0.2, tau_w=3.0), "CUBALIFNode": {}}[name]
    torch.manual_seed(11)
    m = nn.Sequential(
        L.Conv2d(2, 4, 3, padding=1, bias=False), L.BatchNorm2d(4),
        getattr(sj.neuron, name)(surrogate_function=sj.surrogate.ATan(), **kw), L.MaxPool2d(2),
        L.Flatten(), L.Linear(4 * 16, 3),
    )  # fmt: skip
    fn.set_step_mode(m, "m")
    with torch.no_grad():
        m[0].weight.mul_(3.0)
    x = torch.rand(4, 2, 2, 8, 8) * 2
    mc = copy.deepcopy(m)
    compiled = snncompile.optimize(mc, x, backend="cpu")
    chains = [n for n in compiled.graph.find(Op.FUSED_NEURON) if CHAIN_ATTR in n.attrs]
    assert [n.attrs["chain"] for n in chains] == [("bn", "neuron", "pool")]
    out_c, grads_c = _train_two_calls(compiled, [x])
    out_e, grads_e = _train_two_calls(m, [x])
    assert torch.equal(out_c[0], out_e[0])
    for a, b in zip(grads_c, grads_e, strict=True):
        assert _rel(a, b) < 1e-5


def test_state_named_like_a_chain_variable_is_refused_with_the_reason():
    """A state named ``xin`` (the chain kernels' input variable) keeps the neuron out of the
    chain, with the reason in the report, and the compiled network still trains as eager."""
    sn = DecayCubaNode(state="xin", surrogate_function=surrogate.ATan())
    why = chain_blocker(sn, None, nn.MaxPool2d(2))
    assert why is not None and "'xin'" in why and "variable of the chain kernels" in why
    with pytest.raises(ValueError, match="keep the ops separate"):
        FusedChain(sn, None, nn.MaxPool2d(2))
    assert chain_blocker(DecayCubaNode(surrogate_function=surrogate.ATan()), None, None) is None
    torch.manual_seed(5)
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1), sn, layer.MaxPool2d(2), layer.Flatten(),
        layer.Linear(64, 3),
    )  # fmt: skip
    functional.set_step_mode(net, "m")
    eager = copy.deepcopy(net)
    x = torch.rand(3, 2, 2, 8, 8) * 2
    compiled = snncompile.optimize(net, x, backend="cpu")
    assert "variable of the chain kernels" in compiled.report(), compiled.report()
    assert not [n for n in compiled.graph.find(Op.FUSED_NEURON) if CHAIN_ATTR in n.attrs]
    out_c, grads_c = _train_two_calls(compiled, [x, x])
    out_e, grads_e = _train_two_calls(eager, [x, x])
    for a, b in zip(out_c, out_e, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(grads_c, grads_e, strict=True):
        assert _rel(a, b) < 1e-5
