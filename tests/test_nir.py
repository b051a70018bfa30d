"""NIR interop: round trips through NIR files, snnTorch 1.0 and SpikingJelly 2.0.0 graphs.

Spike comparisons use continuous random inputs, so exact threshold ties (where our ``>=`` and
NIR's ``>`` differ) have probability zero; every comparison below is exact equality.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import snncompile as sc
from snncompile import functional, layer, neuron

nir = pytest.importorskip("nir")

from snncompile.export.nir import NIRExportError, NIRImportError  # noqa: E402
from snncompile.nir_modules import NIRCubaNeuron, NIRNeuron, RecurrentBlock  # noqa: E402

T = 50


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(model)
    with torch.no_grad():
        out = model(x)
    functional.reset_net(model)
    return out


def _neuron(kind: str, decay_input: bool, v_reset: float | None) -> nn.Module:
    if kind == "if":
        return neuron.IFNode(v_reset=v_reset, step_mode="m")
    if kind == "lif":
        return neuron.LIFNode(tau=2.5, decay_input=decay_input, v_reset=v_reset, step_mode="m")
    m = neuron.ParametricLIFNode(init_tau=3.0, decay_input=decay_input, v_reset=v_reset,
                                 step_mode="m")
    with torch.no_grad():
        m.w.add_(0.137)  # a trained-looking value, not the init
    return m


def _mlp(kind: str, decay_input: bool, v_reset: float | None) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        layer.Linear(8, 16, step_mode="m"),
        _neuron(kind, decay_input, v_reset),
        layer.Linear(16, 6, step_mode="m"),
        _neuron(kind, decay_input, v_reset),
    )
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.mul_(4.0)
            lin.bias.add_(0.5)
    return net.eval()


def _roundtrip(net: nn.Module, x: torch.Tensor, tmp_path, dt: float = 1e-3) -> nn.Module:
    path = tmp_path / "model.nir"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the soft-reset metadata warning
        sc.export_nir(net, x[:2], dt=dt, path=path)
    return sc.import_nir(nir.read(str(path)))


CONFIGS = [("if", False, v) for v in (0.0, -0.3, None)] + [
    (k, d, v) for k in ("lif", "plif") for d in (True, False) for v in (0.0, -0.3, None)
]


@pytest.mark.parametrize(("kind", "decay_input", "v_reset"), CONFIGS)
def test_roundtrip_mlp_identical_spikes(kind, decay_input, v_reset, tmp_path):
    net = _mlp(kind, decay_input, v_reset)
    x = torch.rand(T, 4, 8) * 2
    ref = _run(net, x)
    assert ref.sum() > 20, "the test needs spiking activity"
    back = _roundtrip(net, x, tmp_path)
    got = _run(back, x)
    assert torch.equal(got, ref)
    cls = {"if": neuron.IFNode, "lif": neuron.LIFNode, "plif": neuron.ParametricLIFNode}[kind]
    cells = [m for m in back.modules() if isinstance(m, neuron.BaseNode)]
    assert [type(m) for m in cells] == [cls, cls]
    assert all(m.v_reset == v_reset for m in cells)  # soft stays soft, -0.3 stays -0.3


def _conv_net(sum_pool: bool) -> nn.Module:
    torch.manual_seed(2)
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
        neuron.LIFNode(tau=2.0, v_reset=None, step_mode="m"),
        layer.AvgPool2d(2, divisor_override=1 if sum_pool else None, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(4 * 4 * 4, 10, step_mode="m"),
        neuron.IFNode(v_reset=-0.3, step_mode="m"),
    )
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[4].weight.mul_(3.0)
    return net.eval()


@pytest.mark.parametrize("sum_pool", [False, True])
def test_roundtrip_conv_net_and_compile(sum_pool, tmp_path):
    net = _conv_net(sum_pool)
    x = torch.rand(T, 2, 2, 8, 8) * 3
    ref = _run(net, x)
    assert ref.sum() > 20
    back = _roundtrip(net, x, tmp_path)
    g = nir.read(str(tmp_path / "model.nir"))
    kinds = {type(n).__name__ for n in g.nodes.values()}
    assert ("SumPool2d" if sum_pool else "AvgPool2d") in kinds
    assert torch.equal(_run(back, x), ref)
    compiled = sc.optimize(back, x[:4])
    assert torch.equal(_run(compiled, x), ref)


@pytest.mark.parametrize("channel_wise", [False, True])
def test_converted_ann_roundtrip_keeps_scales_and_half_threshold_start(channel_wise, tmp_path):
    from snncompile import ann2snn

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    snn = ann2snn.convert(ann, torch.rand(32, 1, 8, 8), channel_wise=channel_wise,
                          progress=False)
    x = torch.rand(T, 3, 1, 8, 8)
    ref = _run(snn, x)
    with pytest.warns(UserWarning, match="snncompile.v_init"):
        sc.export_nir(snn, x[:2], dt=1e-3, path=tmp_path / "model.nir")
    g = nir.read(str(tmp_path / "model.nir"))
    assert sum(isinstance(n, nir.Scale) for n in g.nodes.values()) == 4
    ifs = [n for n in g.nodes.values() if isinstance(n, nir.IF)]
    assert len(ifs) == 2 and all(n.metadata["snncompile.v_init"] == 0.5 for n in ifs)
    back = sc.import_nir(g)
    assert sum(isinstance(m, ann2snn.HalfThresholdIFNode) for m in back.modules()) == 2
    assert torch.equal(_run(back, x), ref)
    compiled = sc.optimize(back, x[:4])
    assert torch.equal(_run(compiled, x), ref)
    bad = nir.IF(r=np.full(3, 1e3), v_threshold=np.ones(3), v_reset=np.zeros(3),
                 metadata={"snncompile.v_init": 0.3, "snncompile.reset": "subtract"})
    with pytest.raises(NIRImportError, match="v_init=0.3 is only understood"):
        sc.import_nir(_graph(nir.Input(np.array([3])), bad, nir.Output(np.array([3]))), dt=1e-3)


def test_export_compiled_module_and_metadata(tmp_path):
    net = _mlp("lif", True, None)
    x = torch.rand(T, 4, 8) * 1.5
    compiled = sc.optimize(net, x, mode="inference", backend="torch")
    with pytest.warns(UserWarning, match="snncompile.reset"):
        g = sc.export_nir(compiled, x, dt=2e-3)
    lif = next(n for n in g.nodes.values() if isinstance(n, nir.LIF))
    assert lif.metadata["snncompile.reset"] == "subtract"
    np.testing.assert_allclose(lif.tau, 2.5 * 2e-3)
    assert np.all(lif.r == 1.0) and np.all(lif.v_reset == 0.0)
    assert g.metadata["snncompile.dt"] == 2e-3
    back = sc.import_nir(g)  # dt comes from the graph metadata
    assert torch.equal(_run(back, x), _run(net, x))
    with pytest.raises(NIRExportError, match="soft reset"):
        sc.export_nir(net, x, soft_reset="error")


def test_lif_dt_mapping():
    """decay_input=False exports r = tau/dt; IF exports r = 1/dt (SpikingJelly's convention)."""
    x = torch.rand(3, 2, 4)
    net = nn.Sequential(layer.Linear(4, 3, step_mode="m"),
                        neuron.LIFNode(tau=4.0, decay_input=False, step_mode="m"),
                        layer.Linear(3, 3, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"))
    g = sc.export_nir(net.eval(), x, dt=1e-4)
    kinds = {k: type(v).__name__ for k, v in g.nodes.items()}
    assert sorted(kinds.values()) == ["Affine", "IF", "Input", "LIF", "Linear", "Output"]
    lif = next(n for n in g.nodes.values() if isinstance(n, nir.LIF))
    iff = next(n for n in g.nodes.values() if isinstance(n, nir.IF))
    np.testing.assert_allclose(lif.tau, 4e-4)
    np.testing.assert_allclose(lif.r, 4.0)
    np.testing.assert_allclose(iff.r, 1e4)


# -- foreign graphs -------------------------------------------------------------------------------
def _graph(*nodes, edges=None):
    if edges is None:
        return nir.NIRGraph.from_list(*nodes)
    names = {f"n{i}": n for i, n in enumerate(nodes)}
    return nir.NIRGraph(nodes=names, edges=edges)


def _affine(n_in, n_out, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_out, n_in)).astype(np.float32)
    if not bias:
        return nir.Linear(weight=w)
    return nir.Affine(weight=w, bias=rng.normal(size=n_out).astype(np.float32) * 0.1)


def test_foreign_lif_without_metadata_is_hard_reset():
    lif = nir.LIF(tau=np.full(3, 5e-4), r=np.ones(3), v_leak=np.zeros(3),
                  v_threshold=np.ones(3), v_reset=np.zeros(3))
    g = _graph(nir.Input(np.array([4])), _affine(4, 3), lif, nir.Output(np.array([3])))
    m = sc.import_nir(g)
    cell = next(c for c in m.modules() if isinstance(c, neuron.LIFNode))
    assert cell.v_reset == 0.0 and cell.tau == 5.0 and cell.decay_input


def test_heterogeneous_lif_li_integrators_scale_threshold():
    """Node types without a SpikingJelly module, checked against the documented Euler step."""
    n, dt = 5, 1e-3
    rng = np.random.default_rng(3)
    tau = rng.uniform(2e-3, 8e-3, n)
    r = rng.uniform(0.5, 2.0, n)
    leak = rng.uniform(-0.2, 0.2, n)
    nodes = [nir.Input(np.array([4])), _affine(4, n), nir.Scale(scale=np.full(n, 1.5)),
             nir.LIF(tau=tau, r=r, v_leak=leak, v_threshold=np.full(n, 0.8), v_reset=np.zeros(n)),
             _affine(n, n, seed=4), nir.LI(tau=tau, r=r, v_leak=leak),
             nir.Threshold(threshold=np.full(n, 0.1)), _affine(n, n, seed=5),
             nir.I(r=np.full(n, 2.0)), nir.Output(np.array([n]))]
    m = sc.import_nir(_graph(*nodes), dt=dt)
    assert sum(isinstance(c, NIRNeuron) for c in m.modules()) == 3
    x = torch.randn(T, 3, 4)
    got = _run(m, x)

    def aff(node, v):
        y = v @ torch.tensor(node.weight).T
        return y + torch.tensor(node.bias) if hasattr(node, "bias") else y

    f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    beta, gain = f32(1 - dt / tau), f32(r * dt / tau)
    v1 = torch.zeros(3, n)
    v2 = torch.zeros(3, n)
    v3 = torch.zeros(3, n)
    outs = []
    for t in range(T):
        drive = aff(nodes[1], x[t]) * f32(np.full(n, 1.5))
        h = beta * (v1 - f32(leak)) + f32(leak) + gain * drive
        s = (h >= 0.8).float()
        v1 = s * 0.0 + (1 - s) * h
        v2 = beta * (v2 - f32(leak)) + f32(leak) + gain * aff(nodes[4], s)
        z = (v2 - 0.1 >= 0).float()
        v3 = 1.0 * (v3 - 0.0) + 0.0 + f32(np.full(n, 2e-3)) * aff(nodes[7], z)
        outs.append(v3)
    assert torch.equal(got, torch.stack(outs))


def test_integrator_convention():
    iff = nir.IF(r=np.ones(3), v_threshold=np.ones(3), v_reset=np.zeros(3))
    g = _graph(nir.Input(np.array([3])), iff, nir.Output(np.array([3])))
    x = torch.rand(20, 2, 3)
    unit = sc.import_nir(g, integrator="unit")
    assert isinstance(next(iter(unit.children())), neuron.IFNode)
    assert torch.equal(_run(unit, x), _run(neuron.IFNode(step_mode="m"), x))
    euler = sc.import_nir(g, dt=0.5)  # gain r * dt = 0.5
    assert isinstance(next(iter(euler.children())), NIRNeuron)
    assert torch.equal(_run(euler, x), _run(neuron.IFNode(step_mode="m"), x * 0.5))


def test_recurrent_graph_one_step_delay():
    n, tau, dt = 6, 4e-3, 1e-3
    w_in, w_rec = _affine(3, n, seed=7), _affine(n, n, seed=8)
    lif = nir.LIF(tau=np.full(n, tau), r=np.full(n, tau / dt), v_leak=np.zeros(n),
                  v_threshold=np.ones(n), v_reset=np.zeros(n))
    g = nir.NIRGraph(
        nodes={"input": nir.Input(np.array([3])), "w_in": w_in, "lif": lif, "w_rec": w_rec,
               "output": nir.Output(np.array([n]))},
        edges=[("input", "w_in"), ("w_in", "lif"), ("lif", "w_rec"), ("w_rec", "lif"),
               ("lif", "output")],
    )
    m = sc.import_nir(g, dt=dt)
    assert any(isinstance(c, RecurrentBlock) for c in m.modules())
    x = torch.randn(T, 2, 3) * 2
    got = _run(m, x)
    w1, b1 = torch.tensor(w_in.weight), torch.tensor(w_in.bias)
    w2, b2 = torch.tensor(w_rec.weight), torch.tensor(w_rec.bias)
    v, s, outs = torch.zeros(2, n), torch.zeros(2, n), []
    for t in range(T):
        i_t = (s @ w2.T + b2) + (x[t] @ w1.T + b1)  # feedback: the spikes of step t-1
        h = v - (v - 0.0) / 4.0 + i_t  # LIFNode(tau=4, decay_input=False)
        s = (h >= 1.0).float()
        v = s * 0.0 + (1 - s) * h
        outs.append(s)
    ref = torch.stack(outs)
    assert ref.sum() > 20
    assert torch.equal(got, ref)
    compiled = sc.optimize(m, x[:3])
    assert torch.equal(_run(compiled, x), ref)


def test_algebraic_loop_refused():
    a, b = _affine(3, 3, seed=1), _affine(3, 3, seed=2)
    g = nir.NIRGraph(
        nodes={"input": nir.Input(np.array([3])), "a": a, "b": b,
               "output": nir.Output(np.array([3]))},
        edges=[("input", "a"), ("a", "b"), ("b", "a"), ("b", "output")],
    )
    with pytest.raises(NIRImportError, match="algebraic loop"):
        sc.import_nir(g)


def test_errors_name_node():
    net = nn.Sequential(layer.Conv2d(1, 2, 3, step_mode="m"), neuron.IFNode(step_mode="m"),
                        layer.MaxPool2d(2, step_mode="m"))
    with pytest.raises(NIRExportError, match=r"%_2 .*MAXPOOL.*no NIR equivalent"):
        sc.export_nir(net.eval(), torch.rand(2, 1, 1, 6, 6))
    g = _graph(nir.Input(np.array([3])), nir.Delay(delay=np.ones(3)), nir.Output(np.array([3])))
    with pytest.raises(NIRImportError, match=r"'delay' \(Delay\).*no snncompile equivalent"):
        sc.import_nir(g)
    lif = nir.LIF(tau=np.full(3, 5e-4), r=np.ones(3), v_leak=np.zeros(3), v_threshold=np.ones(3),
                  v_reset=np.zeros(3), metadata={"snncompile.reset": "weird"})
    with pytest.raises(NIRImportError, match="'lif'.*weird"):
        sc.import_nir(_graph(nir.Input(np.array([3])), lif, nir.Output(np.array([3]))))
    with pytest.raises(ValueError, match="dt must be a positive"):
        sc.import_nir(_graph(nir.Input(np.array([3])), lif, nir.Output(np.array([3]))), dt=0)


def test_import_snncompile_without_nir(monkeypatch):
    """``import snncompile`` never imports nir; the NIR functions say how to install it."""
    import ast
    import importlib.util

    for mod in ("snncompile", "snncompile.export.nir", "snncompile.nir_modules"):
        tree = ast.parse(open(importlib.util.find_spec(mod).origin).read())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert "nir" not in names, mod
    monkeypatch.setitem(sys.modules, "nir", None)  # makes `import nir` fail
    with pytest.raises(ImportError, match=r"pip install snncompile\[nir\]"):
        sc.import_nir("missing.nir")
    with pytest.raises(ImportError, match=r"pip install snncompile\[nir\]"):
        sc.export_nir(nn.Identity(), torch.zeros(1, 1))


# -- snnTorch 1.0 ---------------------------------------------------------------------------------
TP = 100


def _snntorch():
    snn = pytest.importorskip("snntorch")
    import snntorch.export_nir  # noqa: F401
    import snntorch.utils  # noqa: F401

    return snn


def _run_snntorch(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import snntorch.utils

    snntorch.utils.reset(net)
    with torch.no_grad():
        return torch.stack([net(x[t]) for t in range(x.shape[0])])


def _snntorch_mlp(snn, mechanism: str, heterogeneous: bool) -> nn.Module:
    torch.manual_seed(5)
    beta1 = torch.rand(16) * 0.5 + 0.45 if heterogeneous else torch.full((16,), 0.9)
    return nn.Sequential(
        nn.Linear(10, 16),
        snn.Leaky(beta=beta1, threshold=torch.ones(16), init_hidden=True,
                  reset_mechanism=mechanism),
        nn.Linear(16, 4),
        snn.Leaky(beta=torch.full((4,), 0.8), threshold=torch.full((4,), 0.5), init_hidden=True,
                  reset_mechanism=mechanism),
    )


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_snntorch_leaky_zero_reset_identical(heterogeneous, tmp_path):
    snn = _snntorch()
    net = _snntorch_mlp(snn, "zero", heterogeneous)
    g = snn.export_nir.export_to_nir(net, torch.randn(2, 10), ignore_dims=[0])
    nir.write(str(tmp_path / "snntorch.nir"), g)
    m = sc.import_nir(tmp_path / "snntorch.nir")
    # Uniform beta becomes a LIFNode (decay_input=False), per-neuron beta a NIRNeuron.
    first = [c for c in m.children() if not isinstance(c, nn.Linear)][0]
    assert isinstance(first, NIRNeuron if heterogeneous else neuron.LIFNode)
    x = torch.randn(TP, 8, 10) * 2
    ref = _run_snntorch(net, x)
    assert ref.sum() > 50
    assert torch.equal(_run(m, x), ref)
    compiled = sc.optimize(m, x[:4])
    assert torch.equal(_run(compiled, x), ref)


def test_snntorch_subtract_reset_is_read_as_written():
    """snnTorch writes every Leaky with v_reset=0 and no reset metadata, so a 'subtract' Leaky
    arrives as a hard reset to 0 (what the file says). We import exactly that: the result equals
    the same network with reset_mechanism='zero', and differs from snnTorch's own run."""
    snn = _snntorch()
    net = _snntorch_mlp(snn, "subtract", False)
    g = snn.export_nir.export_to_nir(net, torch.randn(2, 10), ignore_dims=[0])
    m = sc.import_nir(g)
    x = torch.randn(TP, 8, 10) * 2
    zero = _snntorch_mlp(snn, "zero", False)
    zero.load_state_dict(net.state_dict())
    ours = _run(m, x)
    assert torch.equal(ours, _run_snntorch(zero, x))
    assert not torch.equal(ours, _run_snntorch(net, x))


def test_snntorch_synaptic_until_first_reset():
    """Synaptic exports as CubaLIF; we import the NIR dynamics (checked exactly against the
    Euler step). snnTorch's own 'zero' reset also zeroes the input of the step after a spike
    (``mem = base - base * reset``), which NIR's CubaLIF does not: the spike trains are identical
    up to and including every neuron's first spike and differ afterwards."""
    snn = _snntorch()
    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Linear(10, 12),
        snn.Synaptic(alpha=torch.full((12,), 0.7), beta=torch.full((12,), 0.85),
                     threshold=torch.ones(12), init_hidden=True, reset_mechanism="zero"),
    )
    g = snn.export_nir.export_to_nir(net, torch.randn(2, 10), ignore_dims=[0])
    m = sc.import_nir(g)
    assert any(isinstance(c, NIRCubaNeuron) for c in m.modules())
    x = torch.randn(TP, 8, 10)
    got = _run(m, x)
    with torch.no_grad():
        cur = net[0](x)
    syn, v, outs = torch.zeros(8, 12), torch.zeros(8, 12), []
    for t in range(TP):
        syn = 0.7 * syn + cur[t]
        h = 0.85 * (v - 0.0) + 0.0 + syn
        s = (h - 1.0 >= 0).float()
        v = s * 0.0 + (1 - s) * h
        outs.append(s)
    assert torch.equal(got, torch.stack(outs))
    ref = _run_snntorch(net, x)
    assert ref.sum() > 50
    first = lambda s: torch.where(s.any(0), s.argmax(0), s.shape[0])  # noqa: E731
    assert torch.equal(first(got), first(ref))


def test_snntorch_rleaky_structure():
    """RLeaky exports as LIF <-> Linear; we import a RecurrentBlock with the documented delay.

    snnTorch's own RLeaky run is *not* the NIR LIF it writes: with reset_mechanism='zero' it
    zeroes the whole new membrane (input of the step after a spike included), so the spikes
    agree through the first step at which a neuron fires and differ afterwards.
    """
    snn = _snntorch()
    torch.manual_seed(7)
    net = nn.Sequential(
        nn.Linear(5, 6),
        snn.RLeaky(beta=torch.full((6,), 0.85), threshold=torch.ones(6), linear_features=6,
                   init_hidden=True, reset_mechanism="zero"),
    )
    g = snn.export_nir.export_to_nir(net, torch.randn(2, 5), ignore_dims=[0])
    m = sc.import_nir(g)
    block = next(c for c in m.modules() if isinstance(c, RecurrentBlock))
    assert block.order == ["1.w_rec", "1.lif"]
    assert block.sources["1.w_rec"] == [("1.lif", True)]
    x = torch.randn(TP, 4, 5) * 2
    got, ref = _run(m, x), _run_snntorch(net, x)
    assert got.shape == (TP, 4, 6) and ref.sum() > 50
    for n in range(4):  # identical through the first step at which any neuron of sample n fires
        t0 = int(ref[:, n].any(1).float().argmax())
        assert torch.equal(got[: t0 + 1, n], ref[: t0 + 1, n])
    assert not torch.equal(got, ref)


# -- SpikingJelly 2.0.0 ---------------------------------------------------------------------------
def _sj_neuron(sj, kind: str):
    if kind == "if":
        return sj.neuron.IFNode(v_reset=0.0, step_mode="m")
    if kind == "lif":
        return sj.neuron.LIFNode(tau=2.0, decay_input=True, v_reset=0.0, step_mode="m")
    if kind == "lif_nodecay":
        return sj.neuron.LIFNode(tau=3.0, decay_input=False, v_reset=-0.3, step_mode="m")
    return sj.neuron.ParametricLIFNode(init_tau=2.5, step_mode="m")


@pytest.mark.parametrize("kind", ["if", "lif", "lif_nodecay", "plif"])
def test_spikingjelly_export_imports_identical(sj, kind):
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    torch.manual_seed(8)
    net = nn.Sequential(
        sj.layer.Conv2d(1, 3, 3, padding=1, step_mode="m"), _sj_neuron(sj, kind),
        sj.layer.AvgPool2d(2, step_mode="m"), sj.layer.Flatten(step_mode="m"),
        sj.layer.Linear(3 * 4 * 4, 5, step_mode="m"), _sj_neuron(sj, kind),
    )
    with torch.no_grad():
        for lin in (net[0], net[4]):
            lin.weight.mul_(4.0)
            lin.bias.add_(0.5)
    x = torch.rand(TP, 4, 1, 8, 8) * 2
    g = export_to_nir(net, x[:1], dt=1e-4)
    m = sc.import_nir(g)  # dt defaults to 1e-4, SpikingJelly's too
    sj.functional.reset_net(net)
    with torch.no_grad():
        ref = net(x)
    assert ref.sum() > 20
    assert torch.equal(_run(m, x), ref)


def test_spikingjelly_imports_our_export(sj):
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    net = _mlp("lif", False, -0.3)
    x = torch.rand(TP, 4, 8) * 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no soft reset, no warning
        g = sc.export_nir(net, x, dt=1e-4)
    theirs = import_from_nir(g, dt=1e-4, step_mode="m")
    with torch.no_grad():
        out, _ = theirs(x)
    assert torch.equal(out, _run(net, x))


def test_two_recurrent_blocks_in_series_run_in_edge_order():
    """Cycles become blocks ordered by the edges, whatever order the file lists its nodes in."""
    n, tau, dt = 5, 4e-3, 1e-3

    def lif():
        return nir.LIF(tau=np.full(n, tau), r=np.full(n, tau / dt), v_leak=np.zeros(n),
                       v_threshold=np.ones(n), v_reset=np.zeros(n))

    w = {k: _affine(3 if k == "in1" else n, n, seed=s)
         for k, s in (("in1", 11), ("rec1", 12), ("in2", 13), ("rec2", 14))}
    nodes = {"output": nir.Output(np.array([n])), "rec2": w["rec2"], "lif2": lif(),
             "in2": w["in2"], "rec1": w["rec1"], "lif1": lif(), "in1": w["in1"],
             "input": nir.Input(np.array([3]))}
    edges = [("input", "in1"), ("in1", "lif1"), ("lif1", "rec1"), ("rec1", "lif1"),
             ("lif1", "in2"), ("in2", "lif2"), ("lif2", "rec2"), ("rec2", "lif2"),
             ("lif2", "output")]
    m = sc.import_nir(nir.NIRGraph(nodes=nodes, edges=edges), dt=dt)
    assert sum(isinstance(c, RecurrentBlock) for c in m.modules()) == 2

    def layer(x_seq, w_in, w_rec):
        wi, bi = torch.tensor(w_in.weight), torch.tensor(w_in.bias)
        wr, br = torch.tensor(w_rec.weight), torch.tensor(w_rec.bias)
        v = s = torch.zeros(x_seq.shape[1], n)
        outs = []
        for t in range(x_seq.shape[0]):
            h = v - v / 4.0 + (s @ wr.T + br) + (x_seq[t] @ wi.T + bi)
            s = (h >= 1.0).float()
            v = (1 - s) * h
            outs.append(s)
        return torch.stack(outs)

    x = torch.randn(T, 2, 3) * 2
    ref = layer(layer(x, w["in1"], w["rec1"]), w["in2"], w["rec2"])
    assert ref.sum() > 5
    assert torch.equal(_run(m, x), ref)
