"""``snncompile.profile``: counts checked by hand, against SpikingJelly's op_counter, and eager
against compiled.

The oracle is SpikingJelly 2.0.0's ``activation_based.op_counter``: ``SynOpCounter`` (spike-driven
accumulates of conv / linear layers) and ``MACCounter`` (MACs of layers with non-binary input),
run under ``DispatchCounterMode`` on the very same model and input; per-layer records are keyed
by the module scope (``Sequential.3`` is our row ``3``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron
from snncompile.profiling import E_AC, E_MAC


def _sj_model(sj: dict, step_mode: str, padding_mode: str) -> nn.Module:
    L, Nn = sj["layer"], sj["neuron"]
    net = nn.Sequential(
        L.Conv2d(2, 6, 3, padding=1, padding_mode=padding_mode),
        Nn.LIFNode(tau=1.5),
        L.MaxPool2d(2),
        L.Conv2d(6, 8, 3, padding=1, stride=2, groups=2),
        Nn.IFNode(v_threshold=0.5),
        L.Flatten(),
        L.Linear(8 * 2 * 2, 5),
        Nn.LIFNode(tau=1.5, v_threshold=0.3),
    )
    sj["functional"].set_step_mode(net, step_mode)
    return net


@pytest.fixture(scope="module")
def sj() -> dict:
    base = pytest.importorskip("spikingjelly.activation_based", reason="SpikingJelly 2.0.0 oracle")
    from spikingjelly.activation_based import functional as sf
    from spikingjelly.activation_based import layer as sl
    from spikingjelly.activation_based import neuron as sn
    from spikingjelly.activation_based import op_counter

    return {"base": base, "layer": sl, "neuron": sn, "functional": sf, "oc": op_counter}


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_counts_match_spikingjelly_op_counter(sj, step_mode, padding_mode) -> None:
    torch.manual_seed(0)
    net = _sj_model(sj, step_mode, padding_mode)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0)  # enough spikes in every layer
    x = torch.rand(5, 3, 2, 8, 8) * 2
    oc = sj["oc"]
    syn, mac = oc.SynOpCounter(), oc.MACCounter()
    with torch.no_grad(), oc.DispatchCounterMode([syn, mac]):
        if step_mode == "m":
            net(x)
        else:
            for x_t in x.unbind(0):
                net(x_t)
    sj["functional"].reset_net(net)

    p = snncompile.profile(net, x)
    totals = p.totals()
    assert totals["sops"] == syn.get_total() > 0
    assert totals["macs"] == mac.get_total() > 0
    syn_by, mac_by = syn.get_counts(), mac.get_counts()
    for name in ("0", "3", "6"):
        row = p[name]
        assert row.sops == sum(syn_by.get(f"Sequential.{name}", {}).values()), name
        assert row.macs == sum(mac_by.get(f"Sequential.{name}", {}).values()), name
    assert p["0"].input_binary is False and p["3"].input_binary and p["6"].input_binary
    assert all(p[n].spikes > 0 for n in p.names("neuron"))
    # The dense MACs of a layer with spike input are what MACCounter gives on a real input.
    dense_mac = oc.MACCounter()
    plain = nn.Conv2d(6, 8, 3, padding=1, stride=2, groups=2)
    with torch.no_grad(), oc.DispatchCounterMode([dense_mac]):
        plain(torch.rand(x.shape[0] * x.shape[1], 6, 4, 4))
    assert p["3"].dense_macs == dense_mac.get_total() > 0


def test_compiled_counts_equal_eager() -> None:
    torch.manual_seed(1)
    from examples.models import spiking_cnn

    net = spiking_cnn().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4.0)
    x = torch.rand(6, 4, 1, 8, 8)
    eager = snncompile.profile(net, x, record=True)
    compiled = snncompile.optimize(net, x, mode="inference")
    comp = snncompile.profile(compiled, x, record=True)
    te, tc = eager.totals(), comp.totals()
    for key in ("spikes", "sops", "macs", "dense_macs"):
        assert te[key] == tc[key], key
    assert te["spikes"] > 0 and te["sops"] > 0
    rates_e = [r.firing_rate for r in eager.neuron_layers]
    rates_c = [r.firing_rate for r in comp.neuron_layers]
    assert rates_e == rates_c and len(rates_e) == 3
    for re_, rc in zip(eager.neuron_layers, comp.neuron_layers, strict=True):
        assert torch.equal(eager.spikes(re_.name), comp.spikes(rc.name))
    # The model's own output matches the profile run (profiling changes no state).
    functional.reset_net(net)
    assert torch.equal(net(x), compiled(x))


def test_hand_counts_linear_and_energy() -> None:
    fc = layer.Linear(6, 4, bias=False, step_mode="m")
    net = nn.Sequential(fc, neuron.IFNode(step_mode="m"))
    x = torch.zeros(2, 1, 6)
    x[0, 0, :3] = 1.0  # 3 input spikes at t=0, 1 at t=1
    x[1, 0, 5] = 1.0
    p = snncompile.profile(net, x)
    row = p["0"]
    assert row.input_binary and row.input_spikes == 4
    assert row.sops == 4 * 4 and row.fan_out == 4.0 and row.macs == 0
    assert row.dense_macs == 6 * 4 * 2
    t = p.totals()
    assert t["energy_snn_pj"] == pytest.approx(E_AC * 16)
    assert t["energy_ann_pj"] == pytest.approx(E_MAC * 6 * 4)  # one ANN pass of the batch
    d = p.as_dict()
    assert d["constants"]["E_AC_pj"] == 0.9 and d["constants"]["E_MAC_pj"] == 4.6
    assert d["layers"]["1"]["neurons"] == 4 and d["layers"]["0"]["sops"] == 16
    text = str(p)
    assert "E_AC=0.9 pJ" in text and "E_MAC=4.6 pJ" in text and "SOPs" in text


def test_conv_border_fan_out_is_exact() -> None:
    """A spike in a corner of a padded 3x3 conv reaches 4 outputs per channel, not 9."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    x = torch.zeros(1, 1, 1, 5, 5)
    x[0, 0, 0, 0, 0] = 1.0
    x[0, 0, 0, 2, 2] = 1.0
    p = snncompile.profile(nn.Sequential(conv), x)
    assert p["0"].sops == (4 + 9) * 2


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_record_spikes_and_membrane(step_mode) -> None:
    torch.manual_seed(2)
    net = nn.Sequential(layer.Linear(3, 4), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(net, step_mode)
    x = torch.rand(7, 2, 3) * 3
    p = snncompile.profile(net, x, record=True)
    s, v = p.spikes("1"), p.membrane("1")
    assert s.shape == v.shape == (7, 2, 4)
    functional.reset_net(net)
    net[1].store_v_seq = step_mode == "m"
    ref = functional.multi_step_forward(x, net) if step_mode == "s" else net(x)
    assert torch.equal(s, ref)
    with pytest.raises(ValueError, match="record=True"):
        snncompile.profile(net, x).spikes("1")


def test_profile_errors() -> None:
    net = nn.Sequential(layer.Linear(3, 4), neuron.IFNode())
    with pytest.raises(TypeError, match="nn.Module"):
        snncompile.profile("net", torch.rand(2, 1, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[T, N, \.\.\.\]"):
        snncompile.profile(net, torch.rand(3))
    p = snncompile.profile(net, torch.rand(2, 1, 3))
    with pytest.raises(KeyError, match="layers: 0, 1"):
        p["nope"]


def test_plots_draw_the_recorded_data(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from snncompile import plot

    torch.manual_seed(3)
    net = nn.Sequential(layer.Linear(3, 6), neuron.LIFNode(tau=2.0), layer.Linear(6, 2),
                        neuron.LIFNode(tau=2.0))
    functional.set_step_mode(net, "m")
    x = torch.rand(9, 2, 3) * 3
    p = snncompile.profile(net, x, record=True)
    ax = plot.spike_raster(p, "1", sample=1)
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == int(p.spikes("1")[:, 1].sum())  # one dot per spike
    ax.figure.savefig(tmp_path / "raster.png")
    ax = plot.firing_rates(p)
    heights = [b.get_height() for b in ax.patches]
    assert heights == pytest.approx([p["1"].firing_rate, p["3"].firing_rate])
    ax = plot.membrane_traces(p, "1", neurons=(0, 5), threshold=1.0)
    assert ax.lines[0].get_ydata().tolist() == pytest.approx(p.membrane("1")[:, 0, 0].tolist())
    ax.figure.savefig(tmp_path / "membrane.png")
    assert (tmp_path / "membrane.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(IndexError, match="out of range"):
        plot.membrane_traces(p, "1", neurons=(6,))


@pytest.mark.slow
def test_profile_example_writes_the_plots(tmp_path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "profile_digits.py"
    main = runpy.run_path(str(script))["main"]
    out = main(["--epochs", "1", "--images", "8", "--T", "4", "--out", str(tmp_path)])
    assert len(out["files"]) == 3 and all(Path(f).stat().st_size > 1000 for f in out["files"])
    assert out["eager"]["totals"]["sops"] == out["compiled"]["totals"]["sops"]
