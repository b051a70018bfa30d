"""ONNX export (issue 9): exported models under onnxruntime vs the compiled PyTorch module.

Every check compares against ``snncompile.optimize(model, mode='inference')`` run on the same
inputs: spikes identical at T=32 (sequence mode run at a T other than the export example's, and
step mode with states carried in Python), mean firing rates within 1e-3 at T=256.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.api import optimize
from snncompile.codegen import onnx_renderer
from snncompile.dynamics.expr import Op as ExprOp
from snncompile.export.onnx import (
    OnnxExportError,
    export_onnx,
    onnx_initial_states,
    ort_limits,
    pick_versions,
)
from snncompile.ir.ops import Op
from snncompile.onnx_runtime import StepRunner, make_session, run_sequence_model, run_step_model
from snncompile.runtime.compiled import CompiledModule

EXAMPLE_T = 4  # export examples use this T; runs use 32 / 256


# -- models (small versions of the IR issue's models) ---------------------------------------------
def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics (folding must matter) and weights strong enough to spike."""
    g = torch.Generator().manual_seed(1)
    _gain(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def _gain(model: nn.Module, gain: float = 3.0) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(gain)
    return model


def mlp() -> nn.Module:
    return _gain(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(16, 32),
            neuron.LIFNode(),
            nn.Dropout(0.3),
            nn.Linear(32, 10),
            neuron.LIFNode(tau=3.0, v_reset=None),
        ),
        5.0,
    )


def vgg() -> nn.Module:
    """VGG-style: conv-BN-IF-pool blocks with dropout, a linear head."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        neuron.IFNode(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        neuron.LIFNode(),
        nn.AvgPool2d(2),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
        neuron.LIFNode(v_reset=None),
    )
    model = _randomize_bn(model)
    with torch.no_grad():
        model[10].weight.mul_(3.0)  # pooled sparse spikes need a strong head to fire
        model[10].bias.add_(1.0)
    return model


class SEWBlock(nn.Module):
    """SEW-ResNet-style multi-step block: conv-BN-LIF twice, residual ADD of spikes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = layer.SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.sn1 = neuron.LIFNode(step_mode="m")
        self.conv2 = layer.SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.sn2 = neuron.LIFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn2(self.conv2(self.sn1(self.conv1(x)))) + x


class SEW(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = layer.SeqToANNContainer(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.sn0 = neuron.IFNode(step_mode="m")
        self.block = SEWBlock(4)
        self.head = layer.SeqToANNContainer(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6))
        self.sn_out = neuron.LIFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn_out(self.head(self.block(self.sn0(self.stem(x)))))


def sew() -> nn.Module:
    return _randomize_bn(SEW())


def plif_net() -> nn.Module:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 24),
        neuron.ParametricLIFNode(init_tau=3.0),
        nn.Linear(24, 8),
        neuron.ParametricLIFNode(decay_input=False, v_reset=None, v_threshold=0.7),
    )
    with torch.no_grad():
        model[2].w.fill_(-0.37)  # a trained-looking w, not the init value
    return _gain(model)


MODELS = {"mlp": mlp, "vgg": vgg, "sew": sew, "plif": plif_net}


def _input(T: int, N: int, model_name: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (T, N, 1, 8, 8) if model_name in ("vgg", "sew") else (T, N, 4, 4)
    return torch.rand(shape, generator=g) * 1.5


def _reference(model: nn.Module, x_example: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Spikes of the compiled module (``model`` may already be one) on ``x``, from reset."""
    compiled = model
    if not isinstance(model, CompiledModule):
        compiled = optimize(model, x_example, mode="inference", backend="torch")
    functional.reset_net(compiled)
    with torch.no_grad():
        return compiled(x).numpy()


def _first_divergence(a: np.ndarray, b: np.ndarray) -> int | None:
    diff = (a != b).reshape(a.shape[0], -1).any(axis=1)
    idx = np.flatnonzero(diff)
    return int(idx[0]) if idx.size else None


def _check_exact(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    step = _first_divergence(got, ref)
    assert step is None, (
        f"{what}: {int((got != ref).sum())} of {ref.size} spikes differ, first at step {step}"
    )


def _check_rates(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    rate_got, rate_ref = float(got.mean()), float(ref.mean())
    step = _first_divergence(got, ref)
    assert abs(rate_got - rate_ref) <= 1e-3, (
        f"{what}: firing rate {rate_got:.5f} vs {rate_ref:.5f}, first divergence at step {step}"
    )


def _node_count(model: onnx.ModelProto) -> int:
    def count(g: onnx.GraphProto) -> int:
        return len(g.node) + sum(
            count(a.g) for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
        )

    return count(model.graph)


# -- the IR issue's models, both modes ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_match_compiled_module(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    example = _input(EXAMPLE_T, 2, name, seed=0)
    seq_path, step_path = tmp_path / "seq.onnx", tmp_path / "step.onnx"
    seq = export_onnx(model, example, seq_path, mode="sequence")
    export_onnx(model, example, step_path, mode="step")
    types = {n.op_type for n in seq.graph.node} | {
        n.op_type for node in seq.graph.node for a in node.attribute if a.g for n in a.g.node
    }
    assert "BatchNormalization" not in types and "Dropout" not in types, types
    assert "Scan" in {n.op_type for n in seq.graph.node}

    compiled = optimize(model, example, mode="inference", backend="torch")
    x = _input(32, 3, name, seed=1)  # other T and batch than the example
    ref = _reference(compiled, example, x)
    assert 0.0 < ref.mean() < 1.0, f"{name}: degenerate test input (rate {ref.mean()})"
    _check_exact(run_sequence_model(seq_path, x), ref, f"{name} sequence T=32")
    _check_exact(run_step_model(step_path, x), ref, f"{name} step T=32")

    x_long = _input(256, 2, name, seed=2)
    ref_long = _reference(compiled, example, x_long)
    _check_rates(run_sequence_model(seq_path, x_long), ref_long, f"{name} sequence T=256")


def test_default_backend_and_eager_agree(tmp_path) -> None:
    """The compiled module with the default backend, and the eager model, give the same spikes."""
    model = vgg().eval()
    example = _input(EXAMPLE_T, 2, "vgg", seed=0)
    path = tmp_path / "vgg.onnx"
    export_onnx(model, example, path)
    x = _input(32, 2, "vgg", seed=5)
    got = run_sequence_model(path, x)
    compiled = optimize(model, example)  # mode from model.eval(), backend='auto'
    with torch.no_grad():
        _check_exact(got, compiled(x).numpy(), "vgg vs compiled(backend='auto')")
    # exporting the compiled module itself (fused neuron nodes) gives the same model
    assert compiled.graph.find(Op.FUSED_NEURON), "expected the fusion stage to fuse neurons"
    export_onnx(compiled, example, tmp_path / "fused.onnx", mode="step")
    _check_exact(run_step_model(tmp_path / "fused.onnx", x), got, "export of a fused module")
    with torch.no_grad():
        functional.reset_net(model)
        eager = torch.stack([model(x[t]) for t in range(x.shape[0])]).numpy()
    _check_exact(got, eager, "vgg vs eager model")


# -- every neuron configuration --------------------------------------------------------------------
NEURON_CONFIGS = [
    ("if", None, 0.0),
    ("if", None, None),
    ("lif", True, -0.1),
    ("lif", True, None),
    ("lif", False, -0.1),
    ("lif", False, None),
    ("plif", True, -0.1),
    ("plif", True, None),
    ("plif", False, -0.1),
    ("plif", False, None),
]


def _neuron(kind: str, decay_input: bool | None, v_reset: float | None, k: int) -> nn.Module:
    common = dict(v_threshold=0.8, v_reset=v_reset, detach_reset=bool(k % 2))
    if kind == "if":
        return neuron.IFNode(**common, surrogate_function=surrogate.ATan())
    if kind == "lif":
        return neuron.LIFNode(tau=1.7 + k, decay_input=decay_input, **common)
    node = neuron.ParametricLIFNode(init_tau=2.5, decay_input=decay_input, **common)
    with torch.no_grad():
        node.w.fill_(0.3 - 0.4 * k)
    return node


@pytest.mark.parametrize(("kind", "decay_input", "v_reset"), NEURON_CONFIGS)
def test_neuron_configurations(kind: str, decay_input: bool, v_reset: float | None, tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(12, 20),
        _neuron(kind, decay_input, v_reset, 0),
        nn.Linear(20, 10),
        _neuron(kind, decay_input, v_reset, 1),
    ).eval()
    _gain(model, 4.0)
    with torch.no_grad():
        model[2].bias.add_(0.5)
    example = torch.rand(EXAMPLE_T, 2, 12)
    seq_path, step_path = tmp_path / "seq.onnx", tmp_path / "step.onnx"
    export_onnx(model, example, seq_path, mode="sequence")
    export_onnx(model, example, step_path, mode="step")
    init = onnx_initial_states(step_path, 3)
    expected = 0.0 if v_reset is None else v_reset
    assert len(init) == 2 and all(np.all(v == np.float32(expected)) for v in init.values())

    what = f"{kind} decay_input={decay_input} v_reset={v_reset}"
    compiled = optimize(model, example, mode="inference", backend="torch")
    x = torch.rand(32, 3, 12) * 1.2
    ref = _reference(compiled, example, x)
    assert 0.0 < ref.mean() < 1.0
    _check_exact(run_sequence_model(seq_path, x), ref, what + " sequence T=32")
    _check_exact(run_step_model(step_path, x), ref, what + " step T=32")
    x_long = torch.rand(256, 2, 12) * 1.2
    ref_long = _reference(compiled, example, x_long)
    _check_rates(run_sequence_model(seq_path, x_long), ref_long, what + " sequence T=256")
    _check_rates(run_step_model(step_path, x_long), ref_long, what + " step T=256")


# -- structure, metadata, versions -----------------------------------------------------------------
def test_sequence_node_count_does_not_depend_on_T() -> None:
    model = vgg().eval()
    counts = {
        T: _node_count(export_onnx(model, _input(T, 1, "vgg", 0), mode="sequence"))
        for T in (2, 16, 64)
    }
    assert len(set(counts.values())) == 1, counts


def test_step_contract_and_metadata(tmp_path) -> None:
    model = vgg().eval()
    path = tmp_path / "step.onnx"
    m = export_onnx(model, _input(EXAMPLE_T, 2, "vgg", 0), path, mode="step")
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["snncompile.format"] == "1" and meta["snncompile.mode"] == "step"
    states = json.loads(meta["snncompile.states"])
    inputs = [i.name for i in m.graph.input]
    outputs = [o.name for o in m.graph.output]
    # inputs: data then one per neuron state; outputs: model output then next states, same order
    assert inputs[1:] == [s["input"] for s in states]
    assert outputs[1:] == [s["output"] for s in states]
    assert len(states) == 3 and [s["init"] for s in states] == [0.0, 0.0, 0.0]
    assert states[0]["shape"] == [-1, 4, 8, 8] and states[2]["shape"] == [-1, 10]
    # state names come from the IR's neuron nodes
    compiled = optimize(model, _input(EXAMPLE_T, 2, "vgg", 0), mode="inference", backend="torch")
    neuron_nodes = [n.name for n in compiled.graph if n.op.group.name == "NEURON"]
    assert [s["node"] for s in states] == neuron_nodes
    init = onnx_initial_states(path, 5)
    assert init[states[1]["input"]].shape == (5, 8, 4, 4)
    export_onnx(model, _input(EXAMPLE_T, 2, "vgg", 0), tmp_path / "s.onnx")
    with pytest.raises(ValueError, match="sequence-mode"):
        onnx_initial_states(tmp_path / "s.onnx", 1)


def test_streaming_runner_resets(tmp_path) -> None:
    model = mlp().eval()
    path = tmp_path / "step.onnx"
    export_onnx(model, torch.rand(EXAMPLE_T, 1, 4, 4), path, mode="step")
    runner = StepRunner(path, threads=1)
    x = torch.rand(10, 1, 4, 4) * 1.5
    first = np.stack([runner.step(x[t]) for t in range(10)])
    runner.reset()
    again = np.stack([runner.step(x[t]) for t in range(10)])
    np.testing.assert_array_equal(first, again)


def test_sessions_do_not_spin(tmp_path) -> None:
    m = export_onnx(mlp().eval(), torch.rand(2, 1, 4, 4), mode="step")
    opts = make_session(m, threads=1).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 1
    spin = make_session(m, threads=2, spinning=True).get_session_options()
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert spin.intra_op_num_threads == 2


def test_versions_are_what_onnxruntime_loads(tmp_path) -> None:
    import onnxruntime

    max_ir, max_opset = ort_limits()
    m = export_onnx(mlp().eval(), torch.rand(2, 1, 4, 4), tmp_path / "m.onnx")
    assert m.ir_version <= max_ir
    assert m.opset_import[0].version <= max_opset
    onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")), full_check=True)
    # the table drives the choice: an older runtime gets an older opset and IR version
    assert pick_versions(None, "1.10.2") == (15, 8)
    assert pick_versions(None, "1.31.1") == (17, 8)
    assert pick_versions(21, "1.31.1") == (21, 10)
    with pytest.raises(OnnxExportError, match="opset 21"):
        pick_versions(21, "1.14.0")
    # an explicit newer opset still loads here
    newest = export_onnx(mlp().eval(), torch.rand(2, 1, 4, 4), tmp_path / "n.onnx", opset=max_opset)
    make_session(newest)
    assert newest.ir_version <= max_ir


# -- modes and errors ---------------------------------------------------------------------------
def test_training_mode_model_is_exported_for_inference(tmp_path) -> None:
    model = vgg().train()
    example = _input(EXAMPLE_T, 2, "vgg", 0)
    with pytest.warns(UserWarning, match="training mode"):
        m = export_onnx(model, example, tmp_path / "t.onnx")
    assert model.training, "the user's model must not be switched to eval"
    body = next(n for n in m.graph.node if n.op_type == "Scan").attribute[0].g
    assert not {"BatchNormalization", "Dropout"} & {n.op_type for n in body.node}
    x = _input(16, 2, "vgg", 4)
    _check_exact(
        run_sequence_model(tmp_path / "t.onnx", x),
        _reference(model.eval(), example, x),
        "training-mode export",
    )


def test_training_compiled_module_warns(tmp_path) -> None:
    model = vgg().train()
    example = _input(EXAMPLE_T, 2, "vgg", 0)
    compiled = optimize(model, example, mode="train", backend="torch")
    with pytest.warns(UserWarning, match="built for training"):
        export_onnx(compiled, example, tmp_path / "c.onnx")
    x = _input(16, 2, "vgg", 4)
    _check_exact(
        run_sequence_model(tmp_path / "c.onnx", x),
        _reference(model.eval(), example, x),
        "training-compiled export",
    )


class _Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.sn = neuron.IFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(torch.cumsum(self.fc(x), dim=1))


def test_unsupported_op_names_node_and_op() -> None:
    with pytest.raises(OnnxExportError, match=r"%cumsum.*FUNCTION.*no ONNX rendering"):
        export_onnx(_Cumsum().eval(), torch.rand(3, 2, 4))


def test_missing_expression_rendering_names_op(monkeypatch) -> None:
    monkeypatch.delitem(onnx_renderer.ONNX_OPS, ExprOp.HEAVISIDE)
    with pytest.raises(OnnxExportError, match=r"%_2 \(op NEURON.*HEAVISIDE"):
        export_onnx(mlp().eval(), torch.rand(3, 2, 4, 4))


class _TimeMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = layer.Linear(4, 4, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.sn(self.fc(x)), x], dim=0)


def test_time_mixing_op_is_refused() -> None:
    with pytest.raises(OnnxExportError, match="time dimension"):
        export_onnx(_TimeMean().eval(), torch.rand(3, 2, 4))


def test_bad_arguments() -> None:
    with pytest.raises(OnnxExportError, match="mode must be"):
        export_onnx(mlp().eval(), torch.rand(3, 2, 4, 4), mode="loop")
    with pytest.raises(OnnxExportError, match=r"\[T, N, \.\.\.\]"):
        export_onnx(mlp().eval(), torch.rand(16))
    with pytest.raises(OnnxExportError, match="opset 9"):
        export_onnx(mlp().eval(), torch.rand(3, 2, 4, 4), opset=9)


def test_public_api() -> None:
    import snncompile.export.onnx as onnx_export

    assert snncompile.export_onnx is export_onnx
    assert snncompile.onnx_initial_states is onnx_initial_states
    # The one command line is `snncompile export` (tests/test_deploy.py); nothing unpickles.
    assert not hasattr(onnx_export, "main_export")


def test_spikingjelly_models(sj, tmp_path) -> None:
    """SpikingJelly 2.0.0's own neurons (single- and multi-step) export and match it exactly."""
    torch.manual_seed(0)
    single = nn.Sequential(
        nn.Linear(12, 20),
        sj.neuron.LIFNode(tau=2.5, decay_input=False, v_reset=-0.1),
        nn.Linear(20, 16),
        sj.neuron.ParametricLIFNode(
            init_tau=3.0, v_reset=None, surrogate_function=sj.surrogate.ATan()
        ),
        nn.Linear(16, 8),
        sj.neuron.IFNode(v_reset=None, detach_reset=True),
    ).eval()
    multi = nn.Sequential(
        sj.layer.Linear(12, 20, step_mode="m"),
        sj.neuron.LIFNode(step_mode="m"),
        sj.layer.Linear(20, 8, step_mode="m"),
        sj.neuron.IFNode(step_mode="m"),
    ).eval()
    _gain(single, 4.0)
    _gain(multi, 4.0)
    with torch.no_grad():
        single[3].w.fill_(-0.2)
        for m in (*single, *multi):
            if isinstance(m, nn.Linear):
                m.bias.add_(0.3)
    example = torch.rand(EXAMPLE_T, 2, 12)
    x = torch.rand(32, 3, 12)
    for name, model in (("single-step", single), ("multi-step", multi)):
        seq_path, step_path = tmp_path / f"{name}.onnx", tmp_path / f"{name}_step.onnx"
        export_onnx(model, example, seq_path)
        export_onnx(model, example, step_path, mode="step")
        sj.functional.reset_net(model)
        with torch.no_grad():
            if name == "multi-step":
                ref = model(x).numpy()
            else:
                ref = torch.stack([model(x[t]) for t in range(x.shape[0])]).numpy()
        assert 0.0 < ref.mean() < 1.0
        _check_exact(run_sequence_model(seq_path, x), ref, f"SpikingJelly {name} sequence")
        _check_exact(run_step_model(step_path, x), ref, f"SpikingJelly {name} step")


class _OpMix(nn.Module):
    """Conv1d('same') + AvgPool1d, views on x.size(0)/x.shape[0], Conv2d with stride,
    AdaptiveAvgPool2d, F.relu, scalar add/mul/sub, flatten method and function, cat, LeakyReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding="same")
        self.p1 = nn.AvgPool1d(2)
        self.sn1 = neuron.LIFNode()
        self.c2 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.ap = nn.AdaptiveAvgPool2d(2)
        self.sn2 = neuron.IFNode()
        self.fc = nn.Linear(16 + 12, 6)
        self.act = nn.LeakyReLU(0.1)
        self.sn3 = neuron.LIFNode(v_reset=None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.sn1(self.p1(self.c1(x.view(x.size(0), 2, 8))) * 2.0)
        b = self.sn2(torch.relu(self.ap(self.c2(x.reshape(x.shape[0], 1, 4, 4)))) + 0.1)
        z = torch.cat([a.flatten(1), torch.flatten(b, 1)], dim=1)
        s = self.sn3(self.act(self.fc(z)) - 0.05)
        return s, s  # the same value twice: two distinct graph outputs


def test_synapse_op_mix_and_tuple_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    model = _gain(_OpMix().eval(), 3.0)
    example = torch.rand(EXAMPLE_T, 2, 16)
    seq_path, step_path = tmp_path / "seq.onnx", tmp_path / "step.onnx"
    export_onnx(model, example, seq_path)
    m = export_onnx(model, example, step_path, mode="step")
    assert [o.name for o in m.graph.output][:2] == ["output_0", "output_1"]
    compiled = optimize(model, example, mode="inference", backend="torch")
    x = torch.rand(32, 3, 16) * 2
    functional.reset_net(compiled)
    with torch.no_grad():
        ref = compiled(x)[0].numpy()
    assert 0.0 < ref.mean() < 1.0
    for got in (run_sequence_model(seq_path, x), run_step_model(step_path, x)):
        assert len(got) == 2
        _check_exact(got[0], ref, "op mix output 0")
        _check_exact(got[1], ref, "op mix output 1")


class _UnregisteredSurrogate(surrogate.Sigmoid):
    """A surrogate class with no expression form: its forward is still the Heaviside step."""


@pytest.mark.parametrize("sg", ["Sigmoid", "ATan", "PiecewiseQuadratic", "Erf", "custom"])
def test_surrogate_forms(sg: str, tmp_path) -> None:
    """Non-spiking neurons emit the surrogate's primitive; an unknown surrogate still exports."""
    torch.manual_seed(0)
    fn = _UnregisteredSurrogate() if sg == "custom" else getattr(surrogate, sg)(spiking=False)
    model = nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(surrogate_function=fn)).eval()
    _gain(model, 3.0)
    example = torch.rand(EXAMPLE_T, 2, 6)
    path = tmp_path / "m.onnx"
    export_onnx(model, example, path)
    x = torch.rand(16, 3, 6) * 2
    ref = _reference(model, example, x)
    got = run_sequence_model(path, x)
    if sg == "custom":
        _check_exact(got, ref, "unregistered surrogate")
    else:  # smooth outputs: ORT's transcendental functions may differ in the last bits
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        assert 0.0 < ref.min() and ref.max() < 1.0 or sg == "PiecewiseQuadratic"


class _RateReadout(nn.Module):
    """The usual classifier ending: firing rate over time, then a linear readout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = layer.Linear(4, 6, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.sn(self.fc(x))
        return self.fc2(y.mean(0)) * 2.0, y.sum(dim=0), y


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: attribute < 18 <= input
def test_time_reductions_after_the_loop(opset: int, tmp_path) -> None:
    torch.manual_seed(0)
    model = _gain(_RateReadout().eval(), 4.0)
    example = torch.rand(EXAMPLE_T, 2, 4)
    path = tmp_path / "m.onnx"
    m = export_onnx(model, example, path, opset=opset)
    assert [n.op_type for n in m.graph.node].count("Scan") == 1
    compiled = optimize(model, example, mode="inference", backend="torch")
    x = torch.rand(30, 3, 4)
    functional.reset_net(compiled)
    with torch.no_grad():
        readout, counts, spikes = (t.numpy() for t in compiled(x))
    got = run_sequence_model(path, x)
    assert 0.0 < spikes.mean() < 1.0
    _check_exact(got[2], spikes, "per-step spikes next to reductions")
    np.testing.assert_array_equal(got[1], counts)
    np.testing.assert_allclose(got[0], readout, rtol=1e-6, atol=1e-6)
    # Step mode: the reductions are running ones (their sums are states); the last step of the
    # stream gives the sequence outputs, each earlier step the readout of the steps so far.
    step_ro, step_counts, step_spikes = run_step_model(export_onnx(model, example, mode="step"), x)
    _check_exact(step_spikes, spikes, "per-step spikes of the step export")
    np.testing.assert_array_equal(step_counts[-1], counts)
    np.testing.assert_array_equal(step_counts[9], spikes[:10].sum(0))
    np.testing.assert_allclose(step_ro[-1], readout, rtol=1e-6, atol=1e-6)
