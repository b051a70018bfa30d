"""Converted SNNs (snncompile.ann2snn.convert) as first-class compiler input.

optimize fuses their half-threshold IF neurons, export_onnx writes them in both modes, and the
frontend records hand-written ``flatten(0, 1)`` / ``unflatten(0, (T, -1))`` sequence code as
MERGE_TIME/SPLIT_TIME."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snncompile
from snncompile import functional, neuron
from snncompile.ann2snn import HalfThresholdIFNode, convert
from snncompile.export.onnx import onnx_initial_states
from snncompile.frontend.rules import register_neuron_subclass
from snncompile.ir.ops import Layout, Op
from snncompile.ir.verify import verify
from snncompile.onnx_runtime import run_sequence_model, run_step_model


def _cnn(head: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 32), nn.ReLU(),
    ]
    if head:
        layers.append(nn.Linear(32, 10))
    return nn.Sequential(*layers).eval()


def _mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)
    ).eval()


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + F.relu(self.conv(x))
        return self.head(x)


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(model)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("kind", ["cnn", "mlp", "residual"])
def test_optimize_fuses_converted_neurons(kind: str) -> None:
    if kind == "cnn":
        ann, calib, x = _cnn(), torch.rand(64, 1, 8, 8), torch.rand(8, 4, 1, 8, 8)
    elif kind == "mlp":
        ann, calib, x = _mlp(), torch.randn(64, 6), torch.randn(8, 4, 6)
    else:
        torch.manual_seed(2)
        ann, calib, x = _Residual().eval(), torch.rand(64, 1, 8, 8), torch.rand(8, 4, 1, 8, 8)
    snn = convert(ann, calib, progress=False)
    graph = snncompile.trace(snn, x)
    verify(graph)
    neurons = graph.find(Op.NEURON)
    assert len(neurons) == len(snn.activation_scales)
    assert all(n.attrs["v_init"] == 0.5 and n.layout is Layout.SEQ for n in neurons)
    assert not graph.find(Op.OPAQUE_MODULE, Op.FUNCTION)  # no unrecognised time reshapes
    assert graph.find(Op.MERGE_TIME) and graph.find(Op.SPLIT_TIME)

    ref = _eager(snn, x)
    compiled = snncompile.optimize(snn, x)
    fuse = next(r for r in compiled.records if r.name == "fuse_neurons")
    assert fuse.modified and f"fused {len(neurons)} neuron(s)" in fuse.notes[0]
    assert len(compiled.graph.find(Op.FUSED_NEURON)) == len(neurons)
    functional.reset_net(compiled)
    assert torch.equal(compiled(x), ref)
    functional.reset_net(compiled)
    assert torch.equal(compiled(x), ref)  # reset restores the half-threshold start

    chunked = snncompile.optimize(snn, x, chunk_size=3)
    functional.reset_net(chunked)
    assert torch.equal(chunked(x), ref)


@pytest.mark.parametrize("head", [False, True])
def test_export_converted_cnn_matches_pytorch(tmp_path, head: bool) -> None:
    snn = convert(_cnn(head), torch.rand(64, 1, 8, 8), progress=False)
    x = torch.rand(8, 4, 1, 8, 8)
    seq_path, step_path = tmp_path / "seq.onnx", tmp_path / "step.onnx"
    seq_model = snncompile.export_onnx(snn, x, seq_path, mode="sequence")
    step_model = snncompile.export_onnx(snn, x, step_path, mode="step")
    for m in (seq_model, step_model):
        onnx.checker.check_model(m, full_check=True)
    states = onnx_initial_states(step_path, 2)
    assert len(states) == 2 and all(np.all(v == 0.5) for v in states.values())
    for T, N in ((32, 3), (11, 2)):  # the example's T was 8
        xs = torch.rand(T, N, 1, 8, 8)
        ref = _eager(snn, xs).numpy()
        got_seq = run_sequence_model(seq_path, xs, threads=1)
        got_step = run_step_model(step_path, xs, threads=1)
        if head:
            # The last Linear reads the scaled spikes: ORT's GEMM may round differently, but a
            # single different spike would move the output by ~scale * weight >> 1e-5.
            np.testing.assert_allclose(got_seq, ref, rtol=0, atol=1e-5)
            np.testing.assert_allclose(got_step, ref, rtol=0, atol=1e-5)
            assert np.array_equal(got_seq.mean(0).argmax(-1), ref.mean(0).argmax(-1))
        else:
            # The output is the last layer's spikes times its scale: identical.
            assert np.array_equal(got_seq, ref) and np.array_equal(got_step, ref)
            assert np.array_equal(got_seq.mean(0), ref.mean(0))


def test_export_zero_init_and_residual(tmp_path) -> None:
    snn = convert(_mlp(), torch.randn(64, 6), half_threshold_init=False, progress=False)
    x = torch.randn(8, 3, 6)
    path = tmp_path / "zero.onnx"
    snncompile.export_onnx(snn, x, path, mode="step")
    states = onnx_initial_states(path, 1)
    assert states and all(np.all(v == 0.0) for v in states.values())
    np.testing.assert_allclose(run_step_model(path, x, threads=1), _eager(snn, x), atol=1e-5)

    torch.manual_seed(2)
    res = convert(_Residual().eval(), torch.rand(64, 1, 8, 8), progress=False)
    x = torch.rand(8, 2, 1, 8, 8)
    for mode, run in (("sequence", run_sequence_model), ("step", run_step_model)):
        model = snncompile.export_onnx(res, x, tmp_path / f"res_{mode}.onnx", mode=mode)
        onnx.checker.check_model(model, full_check=True)
        xs = torch.rand(12, 2, 1, 8, 8)
        got = run(tmp_path / f"res_{mode}.onnx", xs, threads=1)
        np.testing.assert_allclose(got, _eager(res, xs), rtol=0, atol=1e-5)


class _HandWritten(nn.Module):
    """SpikingJelly-style sequence code written by hand, with a merge/split round trip."""

    def __init__(self, literal_t: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.lif = neuron.LIFNode(tau=2.0, step_mode="m")
        self.literal_t = literal_t

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        t = x_seq.shape[0] if self.literal_t is None else self.literal_t
        y = self.fc(x_seq.flatten(0, 1)).view(t, -1, 5)
        s = self.lif(y)
        return s.flatten(0, 1).unflatten(0, (s.size(0), -1)) * 2.0


def test_frontend_records_hand_written_time_reshapes() -> None:
    torch.manual_seed(0)
    model = _HandWritten()
    x = torch.randn(6, 3, 6)
    graph = snncompile.trace(model, x)
    verify(graph)
    assert len(graph.find(Op.MERGE_TIME)) == 2 and len(graph.find(Op.SPLIT_TIME)) == 2
    assert not graph.find(Op.FUNCTION, Op.RESHAPE, Op.FLATTEN)  # size/shape reads dropped
    assert graph[graph.find(Op.LINEAR)[0].name].layout is Layout.FLAT
    compiled = snncompile.optimize(model, x, backend="torch")
    simplify = next(r for r in compiled.records if r.name == "simplify_time_layout")
    assert simplify.modified  # split(merge(s)) around the multiplication cancelled
    assert len(compiled.graph.find(Op.MERGE_TIME, Op.SPLIT_TIME)) == 2
    verify(compiled.graph)
    x2 = torch.randn(9, 2, 6)  # another T and N
    functional.reset_net(compiled)
    with torch.no_grad():
        assert torch.equal(compiled(x2), _eager(model, x2))

    # A literal T is not a time split (it would fix T); the merge before it then cannot be one
    # either (its flat value would be reshaped to [T, N, *]): the model is recorded as before.
    literal = _HandWritten(literal_t=6)
    graph = snncompile.trace(literal, x)
    verify(graph)
    assert not graph.find(Op.MERGE_TIME, Op.SPLIT_TIME) and graph.find(Op.RESHAPE)
    assert all(n.layout is Layout.SEQ for n in graph.find(Op.RESHAPE, Op.NEURON))
    functional.reset_net(literal)
    with torch.no_grad():
        assert torch.equal(snncompile.optimize(literal, x)(x), _eager(literal, x))


def test_subclasses_are_neurons_with_their_own_dynamics() -> None:
    class Louder(neuron.IFNode):
        def neuronal_charge(self, x: torch.Tensor) -> None:
            self.v = self.v + 2.0 * x

    with pytest.raises(TypeError, match="overrides neuronal_charge"):
        register_neuron_subclass(Louder)
    with pytest.raises(TypeError, match="not a subclass"):
        register_neuron_subclass(nn.ReLU)

    class Unregistered(HalfThresholdIFNode):
        pass

    # Every subclass with the base time loop is a neuron: its NeuronSpec is used only when no
    # step method is overridden; an overridden charge is captured from the method itself.
    x = torch.randn(3, 2, 4)
    for cls in (Unregistered, Louder):
        model = nn.Sequential(nn.Linear(4, 4), cls(step_mode="m"))
        graph = snncompile.trace(model, x)
        (node,) = graph.find(Op.NEURON)
        assert ("_spec" in node.attrs) == (cls is Unregistered)
        compiled = snncompile.optimize(model, x, backend="cpu")
        functional.reset_net(model)
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))
    assert HalfThresholdIFNode(step_mode="m").dynamics_spec().initial_v == 0.5
    assert neuron.IFNode(v_reset=None).dynamics_spec().initial_v == 0.0
