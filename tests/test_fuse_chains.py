"""The fuse_chains pass: batchnorm -> neuron -> pooling in one generated kernel."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.ir.ops import Op
from snncompile.ir.verify import verify
from snncompile.passes.fuse_chains import CHAIN_ATTR, fuse_chains, unfuse_chains
from snncompile.passes.pipeline import build_pipeline
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.fused_chain import FusedChain

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


def _without(mode: str) -> list[str]:
    # The default pipeline without fuse_chains; listing pack_spikes would turn packing on.
    return [n for n, _ in build_pipeline(mode) if n not in ("fuse_chains", "pack_spikes")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _neuron(kind: str, detach_reset: bool, v_reset: float | None) -> nn.Module:
    common = dict(
        step_mode="m", surrogate_function=surrogate.ATan(), detach_reset=detach_reset,
        v_reset=v_reset, backend="cpu",
    )  # fmt: skip
    if kind == "if":
        return neuron.IFNode(**common)
    if kind == "lif":
        return neuron.LIFNode(tau=1.7, **common)
    return neuron.ParametricLIFNode(init_tau=2.5, **common)


def _bn(C: int, affine: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(C, affine=affine)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


GRID = list(
    itertools.product(
        ("if", "lif", "plif"), ("max", "avg", None), (True, False), (0.0, None), (True, False)
    )
)


def _plif_terms(chain: FusedChain, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The PLIF weight gradient's terms, one per neuron (summed over steps), in float64: the
    same chain run unfused in float64 with ``w`` expanded to one copy per neuron."""
    ref = copy.deepcopy(chain).double()
    ref.neuron.backend = "torch"
    ref.neuron.w = nn.Parameter(ref.neuron.w.detach().expand(x.shape[1:]).clone())
    (ref.unfused(x.detach().double()) * g.double()).sum().backward()
    return ref.neuron.w.grad


@pytest.mark.parametrize("kind,pool,train,v_reset,detach_reset", GRID)
def test_chain_module_matches_unfused(kind, pool, train, v_reset, detach_reset):
    """Fused chain vs the same modules run one after the other: spikes bit-equal, state equal,
    input gradient within 1e-6 relative, BN affine gradients within 1e-5, the PLIF weight
    gradient within float32 rounding of its float64 value, running stats to 1 ulp."""
    torch.manual_seed(GRID.index((kind, pool, train, v_reset, detach_reset)))
    T, N, C, H, W = 3, 2, 4, 6, 6
    pool_m = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), None: None}[pool]
    chain = FusedChain(_neuron(kind, detach_reset, v_reset), _bn(C), pool_m).train(train)
    ref = copy.deepcopy(chain)
    ref64 = copy.deepcopy(chain)
    x = (torch.randn(T, N, C, H, W) * 1.5 + 0.7).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = chain(x), ref.unfused(x_ref)
    assert torch.equal(y, y_ref)
    # The normalised input may differ by ~1 ulp from PyTorch's batchnorm (fused_chain's doc).
    torch.testing.assert_close(chain.neuron.v, ref.neuron.v, rtol=1e-6, atol=4e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert _rel(x.grad, x_ref.grad) < 1e-6
    # BN affine gradients: sums over T*N*H*W terms, float64 in the kernel, float32 in PyTorch
    # (measured up to 1.5e-6 relative over 288 random cases).
    for p, q in zip(chain.bn.parameters(), ref.bn.parameters(), strict=True):
        assert _rel(p.grad, q.grad) < 1e-5
    if kind == "plif":
        # The scalar PLIF weight gradient is a sum of terms of both signs (|sum| down to 1/190
        # of sum |term| here), so both float32 computations, fused and unfused, are only
        # accurate relative to sum |term|: the bound is 2 float32 ulps of it (measured up to
        # 0.7 ulp fused, similar unfused; relative to the sum itself up to 6e-5 unfused).
        terms = _plif_terms(ref64, x, g)
        bound = 2 * torch.finfo(torch.float32).eps * terms.abs().sum()
        assert (chain.neuron.w.grad.double() - terms.sum()).abs() <= bound
        assert (ref.neuron.w.grad.double() - terms.sum()).abs() <= bound
    torch.testing.assert_close(chain.bn.running_mean, ref.bn.running_mean, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(chain.bn.running_var, ref.bn.running_var, rtol=2e-7, atol=1e-7)


def test_chain_without_bn_and_without_affine():
    """Neuron + pooling only (no prologue), and a batchnorm without affine parameters."""
    torch.manual_seed(5)
    x = torch.randn(4, 2, 3, 4, 4) * 2
    for bn in (None, _bn(3, affine=False)):
        chain = FusedChain(_neuron("lif", True, 0.0), bn, nn.MaxPool2d(2))
        ref = copy.deepcopy(chain)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = chain(xa), ref.unfused(xb)
        assert torch.equal(y, y_ref)
        y.sum().backward()
        y_ref.sum().backward()
        assert _rel(xa.grad, xb.grad) < 1e-6


def test_chain_state_carries_over_calls():
    """A second call without reset starts from the first call's membrane, as unfused does."""
    chain = FusedChain(_neuron("lif", False, 0.0), _bn(3), nn.AvgPool2d(2)).eval()
    ref = copy.deepcopy(chain)
    for seed in (1, 2):
        torch.manual_seed(seed)
        x = torch.randn(3, 2, 3, 4, 4) * 2
        with torch.no_grad():
            assert torch.equal(chain(x), ref.unfused(x))
    torch.testing.assert_close(chain.neuron.v, ref.neuron.v, rtol=1e-6, atol=4e-6)


def _csnn(pool: type = layer.MaxPool2d) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
        neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True), pool(2),
        layer.Conv2d(4, 6, 3, padding=1, bias=False), layer.BatchNorm2d(6),
        neuron.IFNode(surrogate_function=surrogate.ATan()), pool(2),
        layer.Flatten(), layer.Linear(6 * 4, 5), neuron.LIFNode(),
    )  # fmt: skip
    functional.set_step_mode(m, "m")
    return m


def _step(
    run: nn.Module, x: torch.Tensor, model: nn.Module | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward/backward of ``run``; the gradients of ``model``'s parameters (shared)."""
    model = run if model is None else model
    functional.reset_net(run)
    model.zero_grad(set_to_none=True)
    out = run(x)
    (out.mean(0) * torch.arange(out.shape[-1])).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("pool", [layer.MaxPool2d, layer.AvgPool2d])
def test_pass_five_steps_train(pool):
    """Pattern before, modified, structure after, verify, outputs and gradients match (train)."""
    model = _csnn(pool)
    x = (torch.rand(4, 3, 2, 8, 8) > 0.6).float()
    mu, mf = copy.deepcopy(model), copy.deepcopy(model)
    unfused = snncompile.optimize(mu, x, backend="cpu", passes=_without("train"))
    g = unfused.graph
    assert len(g.find(Op.BATCHNORM)) == 2 and len(g.find(Op.MAXPOOL, Op.AVGPOOL)) == 2
    fused = snncompile.optimize(mf, x, backend="cpu")
    rec = next(r for r in fused.records if r.name == "fuse_chains")
    assert rec.modified and "fused 2 chain(s)" in rec.notes[0]
    fg = fused.graph
    assert not fg.find(Op.BATCHNORM) and not fg.find(Op.MAXPOOL, Op.AVGPOOL)
    chains = [n for n in fg.find(Op.FUSED_NEURON) if CHAIN_ATTR in n.attrs]
    assert len(chains) == 2 and all(n.attrs["chain"] == ("bn", "neuron", "pool") for n in chains)
    assert chains[0].shape == (4, 3, 4, 4, 4)
    verify(fg)
    out_u, grads_u = _step(unfused, x, mu)
    out_f, grads_f = _step(fused, x, mf)
    out_e, grads_e = _step(model, x)
    assert torch.equal(out_f, out_u) and torch.equal(out_f, out_e)
    for a, b, c in zip(grads_f, grads_u, grads_e, strict=True):
        assert _rel(a, b) < 1e-5 and _rel(a, c) < 1e-5
    # Running statistics were updated once per step, as eagerly.
    bn_f = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_e = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for a, b in zip(bn_f, bn_e, strict=True):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=2e-7, atol=1e-7)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


@pytest.mark.parametrize("pool", [layer.MaxPool2d, layer.AvgPool2d])
def test_pack_spikes_after_chain(pool):
    """With pack_spikes on, a max-pooled chain output (binary) is saved packed by the next conv
    and an average-pooled one (counts / K^2, not binary) is not; gradients match eager."""
    model = _csnn(pool)
    x = (torch.rand(4, 3, 2, 8, 8) > 0.6).float()
    mf = copy.deepcopy(model)
    fused = snncompile.optimize(mf, x, backend="cpu", pack_spikes=True)
    conv = fused.graph.find(Op.CONV2D)[1]  # reads the first chain's pooled spikes
    assert bool(conv.attrs.get("packed_input")) is (pool is layer.MaxPool2d)
    out_f, grads_f = _step(fused, x, mf)
    out_e, grads_e = _step(model, x)
    assert torch.equal(out_f, out_e)
    for a, b in zip(grads_f, grads_e, strict=True):
        assert _rel(a, b) < 1e-5


def test_pass_eval_and_inference_compile():
    """Eval-mode batchnorm (train compile switched to eval) and the inference compile with
    batchnorm folding off (batchnorms then not merged): spikes bit-equal to unfused and eager."""
    model = _csnn()
    x = (torch.rand(3, 2, 2, 8, 8) > 0.6).float()
    fused = snncompile.optimize(copy.deepcopy(model), x, backend="cpu").eval()
    unfused = snncompile.optimize(
        copy.deepcopy(model), x, backend="cpu", passes=_without("train")
    ).eval()
    model.eval()
    with torch.no_grad():
        outs = []
        for m in (fused, unfused, model):
            functional.reset_net(m)
            outs.append(m(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # fold_batchnorm=False asks for eval outputs bit-exact with eager: the batchnorms stay
    # PyTorch's own ops, only the poolings are merged.
    inf = snncompile.optimize(copy.deepcopy(model), x, backend="cpu", fold_batchnorm=False)
    chains = [n for n in inf.graph.find(Op.FUSED_NEURON) if CHAIN_ATTR in n.attrs]
    assert [n.attrs["chain"] for n in chains] == [("neuron", "pool")] * 2
    assert len(inf.graph.find(Op.BATCHNORM)) == 2
    notes = next(r for r in inf.records if r.name == "fuse_chains").notes
    assert sum("fold_batchnorm=False keeps PyTorch's batchnorm" in n for n in notes) == 2
    functional.reset_net(inf)
    with torch.no_grad():
        assert torch.equal(inf(x), outs[2])


def test_pass_leaves_unsupported_chains_with_reasons():
    """Overlapping average pooling is not merged; the notes say why."""
    torch.manual_seed(0)
    m = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.IFNode(),
        layer.AvgPool2d(3, 2, 1),
    )  # fmt: skip
    functional.set_step_mode(m, "m")
    x = torch.rand(3, 2, 2, 8, 8)
    c = snncompile.optimize(copy.deepcopy(m), x, backend="cpu")
    rec = next(r for r in c.records if r.name == "fuse_chains")
    assert any("avg: kernel == stride" in n for n in rec.notes)
    node = next(n for n in c.graph.find(Op.FUSED_NEURON))
    assert node.attrs["chain"] == ("bn", "neuron")  # the batchnorm was still merged
    assert len(c.graph.find(Op.AVGPOOL)) == 1
    functional.reset_net(c)
    functional.reset_net(m)
    with torch.no_grad():
        assert torch.equal(c(x), m(x))


def test_unfuse_chains_restores_graph():
    model = _csnn()
    x = (torch.rand(3, 2, 2, 8, 8) > 0.6).float()
    fused = snncompile.optimize(copy.deepcopy(model), x, backend="cpu")
    g = fused.graph.copy()
    res = unfuse_chains(g)
    assert res.modified
    assert len(g.find(Op.BATCHNORM)) == 2 and len(g.find(Op.MAXPOOL)) == 2
    verify(g)
    assert fuse_chains(g).modified  # and it fuses again


@pytest.mark.parametrize("pool_name", ["MaxPool2d", "AvgPool2d"])
def test_matches_eager_spikingjelly(sj, pool_name):
    """A SpikingJelly-built CSNN: compiled with the pass vs SpikingJelly eager, train step."""
    L, Nn, sg, fn = sj.layer, sj.neuron, sj.surrogate, sj.functional
    torch.manual_seed(2)
    m = nn.Sequential(
        L.Conv2d(3, 4, 3, padding=1, bias=False), L.BatchNorm2d(4),
        Nn.LIFNode(surrogate_function=sg.ATan(), detach_reset=True), getattr(L, pool_name)(2),
        L.Conv2d(4, 4, 3, padding=1, bias=False), L.BatchNorm2d(4),
        Nn.ParametricLIFNode(surrogate_function=sg.Sigmoid()), getattr(L, pool_name)(2),
        L.Flatten(), L.Linear(4 * 4, 3), Nn.IFNode(),
    )  # fmt: skip
    fn.set_step_mode(m, "m")
    x = (torch.rand(4, 2, 3, 8, 8) > 0.5).float()
    mc = copy.deepcopy(m)
    compiled = snncompile.optimize(mc, x, backend="cpu")
    assert len([n for n in compiled.graph.find(Op.FUSED_NEURON) if CHAIN_ATTR in n.attrs]) == 2
    out_c, grads_c = _step(compiled, x, mc)
    fn.reset_net(m)
    m.zero_grad(set_to_none=True)
    out_e = m(x)
    (out_e.mean(0) * torch.arange(out_e.shape[-1])).sum().backward()
    assert torch.equal(out_c, out_e.detach())
    for a, p in zip(grads_c, m.parameters(), strict=True):
        assert _rel(a, p.grad) < 1e-5
