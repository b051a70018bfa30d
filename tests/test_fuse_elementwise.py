"""The fuse_elementwise pass: scalar VoltageScale neighbours merged into fused neuron kernels."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional
from snncompile.ann2snn import HalfThresholdIFNode, VoltageScale, convert
from snncompile.codegen.cuda import nvcc_command
from snncompile.codegen.kernels import generate
from snncompile.codegen.torch_backend import torch_multi_step
from snncompile.dynamics import if_dynamics, lif_dynamics, plif_dynamics
from snncompile.ir.ops import Op
from snncompile.ir.verify import verify
from snncompile.onnx_runtime import run_sequence_model
from snncompile.passes.base import PassManager
from snncompile.passes.fuse_elementwise import fuse_elementwise
from snncompile.passes.options import CompileOptions
from snncompile.passes.pipeline import build_pipeline, registered_passes
from snncompile.runtime.fused import compiler_available, fused_multi_step
from snncompile.runtime.scaled_neuron import ScaledNeuron, scaled_dynamics

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")

WITHOUT = [n for n, _ in build_pipeline("inference") if n != "fuse_elementwise"]


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    ann = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                        nn.Linear(12, 4)).eval()
    return convert(ann, torch.randn(64, 6), progress=False)


def _cnn(channel_wise: bool = False) -> nn.Module:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    return convert(ann, torch.rand(64, 1, 8, 8), channel_wise=channel_wise, progress=False)


def _input(kind: str, T: int = 8, N: int = 4) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(T, N, 6) * 2 if kind == "mlp" else torch.rand(T, N, 1, 8, 8) * 2


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(model)
    with torch.no_grad():
        return model(x)


def _run(compiled: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(compiled)
    with torch.no_grad():
        return compiled(x)


def _scales(graph) -> list:
    return [n for n in graph.find(Op.ELEMENTWISE) if n.attrs.get("fn") == "VoltageScale"]


def test_registered_after_fuse_neurons():
    names = [e.name for e in registered_passes("fusion")]
    assert names.index("fuse_neurons") < names.index("fuse_elementwise")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_pass_steps_and_bit_identical_outputs(kind):
    snn = _mlp() if kind == "mlp" else _cnn()
    x = _input(kind)
    ref = _eager(snn, x)
    # Before: the pipeline without the pass leaves scale -> FUSED_NEURON -> scale.
    graph = snncompile.trace(snn, x)
    graph.options = CompileOptions(mode="inference", backend="cpu")
    graph = PassManager(build_pipeline("inference", WITHOUT)).run(graph)
    neurons = graph.find(Op.FUSED_NEURON)
    assert len(neurons) == 2 and len(_scales(graph)) == 4
    result = fuse_elementwise(graph)
    assert result.modified and "merged scales into 2 fused neuron(s)" in result.notes[0]
    verify(result.graph)
    assert not _scales(result.graph)
    fused = result.graph.find(Op.FUSED_NEURON)
    assert len(fused) == 2 and all(isinstance(n.module, ScaledNeuron) for n in fused)
    assert all(n.attrs["merged"] == ("in", "out") for n in fused)
    assert fuse_elementwise(result.graph).modified is False  # idempotent

    for backend in ("cpu", "auto", "torch"):
        compiled = snncompile.optimize(snn, x, backend=backend)
        rec = next(r for r in compiled.records if r.name == "fuse_elementwise")
        assert rec.modified is (backend != "torch")  # torch: no FUSED_NEURON, nothing to do
        if backend != "torch":
            assert any("merged %" in note for note in rec.notes)
            assert "fuse_elementwise" in compiled.report()
        verify(compiled.graph)
        for _ in range(2):  # reset_net restores the half-threshold start
            assert torch.equal(_run(compiled, x), ref)
        x2 = _input(kind, T=13, N=3)
        assert torch.equal(_run(compiled, x2), _eager(snn, x2))
    small = _input(kind, T=1, N=1)  # 'auto' below its threshold: the unfused chain runs
    assert torch.equal(_run(snncompile.optimize(snn, x, backend="auto"), small), _eager(snn, small))
    for kwargs in ({"chunk_size": 3}, {"memory_budget": "64MB"}):
        chunked = snncompile.optimize(snn, x, backend="cpu", **kwargs)
        assert not _scales(chunked.graph)
        assert torch.equal(_run(chunked, x), ref)


@pytest.mark.filterwarnings("ignore:.*float64")
def test_float64_and_float16_run_the_unfused_chain():
    snn = _mlp()
    x = _input("mlp")
    compiled = snncompile.optimize(snn, x, backend="cpu")
    wrapper = compiled.graph.find(Op.FUSED_NEURON)[0].module
    assert wrapper.fused_dynamics(torch.zeros(8, 4, 16)) is not None
    assert wrapper.fused_dynamics(torch.zeros(8, 4, 16, dtype=torch.float16)) is None
    assert wrapper.fused_dynamics(torch.zeros(8, 4, 16, dtype=torch.float64)) is None
    snn64, c64 = _mlp().double(), snncompile.optimize(_mlp().double(), x.double(), backend="cpu")
    assert torch.equal(_run(c64, x.double()), _eager(snn64, x.double()))


def test_training_gradients_match_eager():
    snn = _mlp().train()
    x = _input("mlp")
    compiled = snncompile.optimize(snn, x, mode="train", backend="cpu")
    assert not _scales(compiled.graph)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    functional.reset_net(snn)
    functional.reset_net(compiled)
    ye, yc = snn(xe), compiled(xc)
    assert torch.equal(ye, yc)
    g = torch.randn_like(ye)
    (ye * g).sum().backward()
    (yc * g).sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)


class _TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.s_in = VoltageScale(0.5)
        self.sn = HalfThresholdIFNode(step_mode="m")
        self.s_out = VoltageScale(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.s_in(self.fc(x))
        return self.s_out(self.sn(y)) + y


@pytest.mark.parametrize("case", ["per_channel", "two_users", "other_elementwise"])
def test_not_applied(case):
    if case == "per_channel":
        model, x = _cnn(channel_wise=True), _input("cnn")
    elif case == "two_users":
        torch.manual_seed(0)
        model, x = _TwoUsers().eval(), _input("mlp")
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Sigmoid(), HalfThresholdIFNode(step_mode="m"),
                              nn.Tanh()).eval()
        x = _input("mlp")
    compiled = snncompile.optimize(model, x, backend="cpu")
    rec = next(r for r in compiled.records if r.name == "fuse_elementwise")
    fused = compiled.graph.find(Op.FUSED_NEURON)
    if case == "two_users":  # the input scale has a second user; the output scale is merged
        assert rec.modified and fused[0].attrs["merged"] == ("out",)
        assert len(_scales(compiled.graph)) == 1
    else:
        assert not rec.modified and not any("merged" in n.attrs for n in fused)
    assert torch.equal(_run(compiled, x), _eager(model, x))


@pytest.mark.parametrize("make", [lambda: if_dynamics(v_reset=None), lambda: lif_dynamics(2.0),
                                  lambda: plif_dynamics(detach_reset=True)])
@pytest.mark.parametrize("gains", [(True, True), (True, False), (False, True)])
def test_kernel_with_gains_equals_the_chain(make, gains):
    base = make()
    d = scaled_dynamics(base, *gains)
    torch.manual_seed(0)
    x = torch.randn(16, 300) * 2
    a, b, w = torch.tensor(0.7311), torch.tensor(1.37), torch.tensor(0.3)
    base_params = {"w": w} if base.param_names else None
    params = dict(base_params or {})
    params.update({k: t for k, t, on in (("in_gain", a, gains[0]), ("out_gain", b, gains[1]))
                   if on})
    x1, v1 = x.clone().requires_grad_(), torch.full((300,), 0.5, requires_grad=True)
    x2, v2 = x.clone().requires_grad_(), torch.full((300,), 0.5, requires_grad=True)
    s1, vl1, _ = fused_multi_step(d, x1, v1, params)
    s2, vl2, _ = torch_multi_step(base, x2 * a if gains[0] else x2, v2, base_params)
    s2 = s2 * b if gains[1] else s2
    assert torch.equal(s1, s2) and torch.equal(vl1, vl2)
    s3, vl3, _ = torch_multi_step(d, x, torch.full((300,), 0.5), params)  # torch renderer
    assert torch.equal(s3, s2) and torch.equal(vl3, vl2)
    g = torch.randn_like(s1)
    (s1 * g).sum().backward()
    (s2 * g).sum().backward()
    for got, want in ((x1.grad, x2.grad), (v1.grad, v2.grad)):
        assert ((got - want).norm() / want.norm()).item() < 1e-6
    c, cu = generate(d, "c"), generate(d, "cuda")
    assert c.forward_body == cu.forward_body and c.backward_body == cu.backward_body
    assert ("out_gain" in d.describe()) is gains[1] and d.key() != base.key()


def test_scaled_cuda_source_compiles_with_nvcc(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH: CUDA sources are not compiled in this environment")
    src = tmp_path / "scaled.cu"
    src.write_text(generate(scaled_dynamics(lif_dynamics(2.0), True, True), "cuda").source)
    out = subprocess.run(nvcc_command(str(src), str(tmp_path / "scaled.ptx")),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_onnx_export_of_a_compiled_model_restores_the_scales(tmp_path):
    snn = _cnn()
    x = _input("cnn")
    compiled = snncompile.optimize(snn, x, backend="cpu")
    path = tmp_path / "c.onnx"
    snncompile.export_onnx(compiled, x, path, mode="sequence")
    assert not _scales(compiled.graph)  # the compiled graph itself is untouched
    xs = _input("cnn", T=11, N=2)
    got = run_sequence_model(path, xs, threads=1)
    np.testing.assert_allclose(got, _eager(snn, xs).numpy(), rtol=0, atol=1e-5)


def test_learner_cannot_attach_to_a_neuron_with_merged_scales():
    from snncompile.learning import STDPLearner
    from snncompile.runtime.learning_hooks import AttachError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), HalfThresholdIFNode(step_mode="m"), VoltageScale(2.0))
    x = _input("mlp")
    compiled = snncompile.optimize(model, x, mode="train", backend="cpu")
    learner = STDPLearner("m", model[0], model[1], tau_pre=2.0, tau_post=2.0)
    with pytest.raises(AttachError, match="fuse_elementwise"):
        compiled.attach(learner, synapse="0", neuron="1", model=model)
    plain = snncompile.optimize(model, x, mode="train", backend="cpu",
                                passes=["fuse_neurons", "chunk_forward"])
    assert len(plain.graph.find(Op.ELEMENTWISE)) == 1
    plain.attach(learner, synapse="0", neuron="1", model=model).remove()
