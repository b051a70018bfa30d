"""import_nir on hostile or malformed input: bounded reads, validated fields, errors that name
the NIR node and the field. Each case is a small crafted graph or file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import snncompile as sc
from snncompile import functional, layer, neuron, surrogate

nir = pytest.importorskip("nir")
h5py = pytest.importorskip("h5py")

from snncompile.export.nir import NIRExportError, NIRImportError  # noqa: E402
from snncompile.nir_modules import NIRCubaNeuron, NIRNeuron  # noqa: E402

N = 3


def _lif(**kw) -> object:
    fields = dict(
        tau=np.full(N, 2e-4),
        r=np.ones(N),
        v_leak=np.zeros(N),
        v_threshold=np.ones(N),
        v_reset=np.zeros(N),
    )
    fields.update(kw)
    return nir.LIF(**fields)


def _graph(mid: object, name: str = "n", weight=None, bias=None, n: int = N) -> object:
    """input -> fc (Affine) -> name -> output."""
    fc = nir.Affine(
        weight=np.eye(n, dtype=np.float32) if weight is None else weight,
        bias=np.zeros(n, np.float32) if bias is None else bias,
    )
    return nir.NIRGraph(
        nodes={
            "input": nir.Input(np.array([n])),
            "fc": fc,
            name: mid,
            "output": nir.Output(np.array([n])),
        },
        edges=[("input", "fc"), ("fc", name), (name, "output")],
        type_check=False,
    )


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(model)
    with torch.no_grad():
        out = model(x)
    functional.reset_net(model)
    return out


def _file(tmp_path, graph=None, name: str = "g.nir"):
    path = tmp_path / name
    nir.write(str(path), _graph(_lif()) if graph is None else graph)
    return path


# -- declared sizes ------------------------------------------------------------------------------
def _bomb(tmp_path, n: int, name: str = "bomb.nir"):
    """A consistent n-feature graph whose weight is an unwritten gzip-chunked [n, n] dataset:
    a few KB on disk, ``4 n^2`` bytes once read."""
    ident = nir.Affine(weight=np.eye(2, dtype=np.float32), bias=np.zeros(2, np.float32))
    g = nir.NIRGraph(
        nodes={"input": nir.Input(np.array([n])), "fc": ident, "output": nir.Output(np.array([n]))},
        edges=[("input", "fc"), ("fc", "output")],
        type_check=False,
    )
    path = tmp_path / name
    nir.write(str(path), g)
    with h5py.File(path, "a") as f:
        for key, shape in (("weight", (n, n)), ("bias", (n,))):
            del f[f"node/nodes/fc/{key}"]
            f.create_dataset(
                f"node/nodes/fc/{key}",
                shape=shape,
                dtype="float32",
                chunks=(min(n, 1024),) * len(shape),
                compression="gzip",
                fillvalue=0.0,
            )
    return path


def test_file_declaring_gigabytes_is_refused_before_reading(tmp_path):
    path = _bomb(tmp_path, 32768)  # declares 4 GiB
    assert path.stat().st_size < 100_000
    with pytest.raises(NIRImportError, match=r"node/nodes/fc/weight.*\(32768, 32768\).*max_bytes"):
        sc.import_nir(path)


def test_max_bytes_is_a_limit_the_caller_sets(tmp_path):
    path = _bomb(tmp_path, 256)  # 256 KiB of weights
    with pytest.raises(NIRImportError, match="more than max_bytes=100000"):
        sc.import_nir(path, max_bytes=100_000)
    m = sc.import_nir(path, max_bytes=2**20)
    assert torch.equal(_run(m, torch.ones(2, 1, 256)), torch.zeros(2, 1, 256))
    assert sc.import_nir(path, max_bytes=None) is not None
    with pytest.raises(ValueError, match="max_bytes must be"):
        sc.import_nir(path, max_bytes=-1)


@pytest.mark.parametrize("kind", ["soft", "external"])
def test_links_in_the_file_are_refused(tmp_path, kind):
    other = _file(tmp_path, name="other.nir")
    path = _file(tmp_path)
    with h5py.File(path, "a") as f:
        del f["node/nodes/fc/bias"]
        if kind == "soft":
            f["node/nodes/fc/bias"] = h5py.SoftLink("/node/nodes/n/v_reset")
        else:
            f["node/nodes/fc/bias"] = h5py.ExternalLink(str(other), "/node/nodes/n/v_reset")
    with pytest.raises(NIRImportError, match=r"'node/nodes/fc/bias' is an HDF5 (Soft|External)"):
        sc.import_nir(path)


# -- validation like the modules do ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("node", "field"),
    [
        (_lif(tau=np.full(N, 5e-5)), "tau"),  # uniform: beta = 1 - dt/tau = -1
        (_lif(tau=np.array([2e-4, 1e-4, 3e-4])), "tau"),  # per neuron: beta = 0 at index 1
        (_lif(tau=np.full(N, -2e-4)), "tau"),  # beta = 2 > 1
        (nir.LI(tau=np.full(N, 5e-5), r=np.ones(N), v_leak=np.zeros(N)), "tau"),
        (
            nir.CubaLIF(
                tau_syn=np.full(N, 5e-5),
                tau_mem=np.full(N, 2e-4),
                r=np.ones(N),
                v_leak=np.zeros(N),
                v_threshold=np.ones(N),
                v_reset=np.zeros(N),
                w_in=np.ones(N),
            ),
            "tau_syn",
        ),
    ],
    ids=["lif-uniform", "lif-per-neuron", "lif-negative", "li", "cubalif"],
)
def test_time_constant_not_longer_than_dt_is_refused(node, field):
    with pytest.raises(NIRImportError, match=rf"node 'n' \(\w+\): field '{field}'.*beta"):
        sc.import_nir(_graph(node), dt=1e-4)


@pytest.mark.parametrize(
    ("node", "field"),
    [
        (_lif(v_threshold=np.array([np.nan, 1.0, 1.0])), "v_threshold"),
        (
            nir.IF(r=np.full(N, 1e4), v_threshold=np.array([1.0, np.nan, 1.0]),
                   v_reset=np.zeros(N)),
            "v_threshold",
        ),
        (nir.IF(r=np.array([np.inf, 1e4, 1e4]), v_threshold=np.ones(N), v_reset=np.zeros(N)), "r"),
        (_lif(v_reset=np.full(N, np.nan)), "v_reset"),
        (_lif(tau=np.full(N, np.inf)), "tau"),
        (nir.Scale(scale=np.array([1.0, np.nan, 1.0])), "scale"),
    ],
    ids=["lif-threshold", "if-threshold", "if-r", "lif-v_reset", "lif-tau-inf", "scale"],
)
def test_non_finite_fields_are_refused(node, field):
    with pytest.raises(NIRImportError, match=rf"node 'n' \(\w+\): field '{field}'.*non-finite"):
        sc.import_nir(_graph(node))


def test_non_finite_weight_is_refused():
    w = np.eye(N, dtype=np.float32)
    w[1, 2] = np.nan
    with pytest.raises(NIRImportError, match=r"node 'fc' \(Affine\): field 'weight'.*\(1, 2\)"):
        sc.import_nir(_graph(_lif(), weight=w))


def test_nan_surrogate_alpha_is_refused():
    md = {"snncompile.surrogate": "ATan", "snncompile.surrogate_alpha": float("nan")}
    with pytest.raises(NIRImportError, match=r"'n' \(LIF\): metadata 'snncompile.surrogate_alpha'"):
        sc.import_nir(_graph(_lif(metadata=md)))


def test_surrogate_argument_the_class_refuses_names_the_node():
    md = {"snncompile.surrogate": "PiecewiseQuadratic", "snncompile.surrogate_alpha": -1.0}
    with pytest.raises(NIRImportError, match=r"'n' \(LIF\).*surrogate_alpha.*alpha must be > 0"):
        sc.import_nir(_graph(_lif(metadata=md)))


def test_unknown_surrogate_name_is_refused():
    md = {"snncompile.surrogate": "MyOwnATan"}
    with pytest.raises(NIRImportError, match=r"'n' \(LIF\): metadata 'snncompile.surrogate'"):
        sc.import_nir(_graph(_lif(metadata=md)))


def test_missing_snncompile_tau_names_node_and_key():
    with pytest.raises(NIRImportError, match=r"'n' \(LIF\): metadata 'snncompile.tau' is missing"):
        sc.import_nir(_graph(_lif(metadata={"snncompile.neuron": "lif"})))


def test_non_numeric_metadata_names_node_and_key():
    md = {"snncompile.neuron": "lif", "snncompile.tau": "two"}
    with pytest.raises(NIRImportError, match=r"'n' \(LIF\): metadata 'snncompile.tau'='two'"):
        sc.import_nir(_graph(_lif(metadata=md)))


def test_nan_plif_w_is_refused():
    md = {"snncompile.neuron": "plif", "snncompile.tau": 2.0, "snncompile.plif_w": float("nan")}
    with pytest.raises(NIRImportError, match=r"'n' \(LIF\): metadata 'snncompile.plif_w'"):
        sc.import_nir(_graph(_lif(metadata=md)))


def test_tau_metadata_not_above_one_step_names_node():
    md = {"snncompile.neuron": "lif", "snncompile.tau": 0.5}
    with pytest.raises(NIRImportError, match=r"'n' \(LIF\): field 'tau'"):
        sc.import_nir(_graph(_lif(tau=np.full(N, 0.5e-4), metadata=md)))


def test_affine_bias_of_the_wrong_length_is_refused():
    with pytest.raises(NIRImportError, match=r"'fc' \(Affine\): field 'bias' has 5 entries"):
        sc.import_nir(_graph(_lif(), bias=np.zeros(5, np.float32)))


def test_conv_bias_of_the_wrong_length_is_refused():
    conv = nir.Conv1d(
        input_shape=8, weight=np.ones((2, 1, 3), np.float32), stride=1, padding=0, dilation=1,
        groups=1, bias=np.zeros(4, np.float32),
    )
    g = nir.NIRGraph(
        nodes={"input": nir.Input(np.array([1, 8])), "conv": conv,
               "output": nir.Output(np.array([2, 6]))},
        edges=[("input", "conv"), ("conv", "output")],
        type_check=False,
    )
    with pytest.raises(NIRImportError, match=r"'conv' \(Conv1d\): field 'bias' has 4 entries"):
        sc.import_nir(g)


@pytest.mark.parametrize("name", ["forward", "graph", "training", "code", "self"])
def test_node_named_like_a_module_attribute(name):
    x = torch.rand(6, 2, N) * 3
    ref = _run(sc.import_nir(_graph(_lif())), x)
    got = _run(sc.import_nir(_graph(_lif(), name=name)), x)
    assert ref.sum() > 0 and torch.equal(got, ref)


def _recurrent(a: str, b: str) -> object:
    rng = np.random.default_rng(3)

    def aff() -> object:
        return nir.Affine(weight=rng.normal(size=(N, N)).astype(np.float32),
                          bias=rng.normal(size=N).astype(np.float32))

    return nir.NIRGraph(
        nodes={"input": nir.Input(np.array([N])), "w": aff(),
               a: _lif(tau=np.full(N, 4e-3), r=np.full(N, 4.0)), b: aff(),
               "output": nir.Output(np.array([N]))},
        edges=[("input", "w"), ("w", a), (a, b), (b, a), (a, "output")],
        type_check=False,
    )


def test_cycle_members_whose_names_sanitise_alike_stay_distinct():
    x = torch.randn(20, 2, N) * 2
    ref = _run(sc.import_nir(_recurrent("p", "q"), dt=1e-3), x)
    got = _run(sc.import_nir(_recurrent("a.b", "a_b"), dt=1e-3), x)
    assert torch.equal(got, ref)


# -- malformed files -------------------------------------------------------------------------------
def test_unknown_node_type_in_a_file(tmp_path):
    path = _file(tmp_path)
    with h5py.File(path, "a") as f:
        del f["node/nodes/n/type"]
        f["node/nodes/n/type"] = b"Bogus"
    with pytest.raises(NIRImportError, match=r"NIR node 'n': field 'type' is 'Bogus'"):
        sc.import_nir(path)


def test_file_without_edges(tmp_path):
    path = _file(tmp_path)
    with h5py.File(path, "a") as f:
        del f["node/edges"]
    with pytest.raises(NIRImportError, match="no 'edges' entry"):
        sc.import_nir(path)


def test_node_missing_a_field_in_a_file(tmp_path):
    path = _file(tmp_path)
    with h5py.File(path, "a") as f:
        del f["node/nodes/n/v_leak"]
    with pytest.raises(NIRImportError, match=r"NIR node 'n' \(LIF\).*v_leak"):
        sc.import_nir(path)


def test_not_a_nir_file(tmp_path):
    path = tmp_path / "x.nir"
    path.write_text("hello")
    with pytest.raises(NIRImportError, match="cannot open .* as a NIR"):
        sc.import_nir(path)
    with h5py.File(tmp_path / "empty.nir", "w"):
        pass
    with pytest.raises(NIRImportError, match="no 'node' group"):
        sc.import_nir(tmp_path / "empty.nir")


def test_a_valid_file_still_reads(tmp_path):
    x = torch.rand(6, 2, N) * 3
    ref = _run(sc.import_nir(_graph(_lif())), x)
    assert torch.equal(_run(sc.import_nir(_file(tmp_path)), x), ref)


# -- surrogates across NIR ---------------------------------------------------------------------
def _net(sg: nn.Module) -> nn.Module:
    return nn.Sequential(
        layer.Linear(4, 5, step_mode="m"),
        neuron.LIFNode(tau=2.0, surrogate_function=sg, step_mode="m"),
    ).eval()


def test_surrogate_parameters_round_trip(tmp_path):
    path = tmp_path / "m.nir"
    sc.export_nir(_net(surrogate.PiecewiseLeakyReLU(w=0.5, c=0.1)), torch.rand(2, 1, 4),
                  path=path)
    sg = sc.import_nir(path).get_submodule("_1").surrogate_function
    assert type(sg) is surrogate.PiecewiseLeakyReLU and (sg.w, sg.c) == (0.5, 0.1)
    sc.export_nir(_net(surrogate.ATan(alpha=3.0)), torch.rand(2, 1, 4), path=path)
    sg = sc.import_nir(path).get_submodule("_1").surrogate_function
    assert type(sg) is surrogate.ATan and sg.alpha == 3.0


def test_export_records_only_known_surrogate_classes():
    class ATan(nn.Module):
        """A user's class named like ours (straight-through gradient)."""

        def __init__(self) -> None:
            super().__init__()
            self.alpha = 2.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = (x >= 0).to(x)
            return x + (s - x).detach()

    with pytest.warns(UserWarning, match="not snncompile's or SpikingJelly's own surrogate"):
        g = sc.export_nir(_net(ATan()), torch.rand(2, 1, 4))
    md = g.nodes["_1"].metadata
    assert "snncompile.surrogate" not in md and "snncompile.surrogate_alpha" not in md
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = sc.export_nir(_net(surrogate.ATan()), torch.rand(2, 1, 4))
    assert g.nodes["_1"].metadata["snncompile.surrogate"] == "ATan"


def test_export_refuses_a_non_spiking_surrogate():
    with pytest.raises(NIRExportError, match=r"spiking=False"):
        sc.export_nir(_net(surrogate.ATan(spiking=False)), torch.rand(2, 1, 4))


# -- the modules themselves ----------------------------------------------------------------------
def test_nir_modules_validate_their_arguments():
    with pytest.raises(ValueError, match=r"NIRNeuron: beta .* \(0, 1\]"):
        NIRNeuron(beta=np.array([0.5, 0.0]), gain=1.0)
    with pytest.raises(ValueError, match="NIRNeuron: v_threshold must be finite"):
        NIRNeuron(beta=0.5, gain=1.0, v_threshold=np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"NIRCubaNeuron: alpha .* \(0, 1\]"):
        NIRCubaNeuron(alpha=1.5, syn_gain=1.0, beta=0.5, gain=1.0)
    NIRNeuron(beta=1.0, gain=1.0)  # IF / I: no leak is fine


def test_top_level_import_nir_has_the_same_default_limit():
    import inspect

    from snncompile.export import nir as nir_export

    default = inspect.signature(sc.import_nir).parameters["max_bytes"].default
    assert default == nir_export.DEFAULT_MAX_BYTES == 2**30
