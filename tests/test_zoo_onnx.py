"""ONNX export of SpikingJelly 2.0.0 model-zoo networks, in both step modes and both exports.

For every zoo family (small configurations; weights scaled so that spikes reach the output) the
model is exported with ``mode='step'`` (one time step, explicit states) and
``mode='sequence'`` (one ``Scan``) and run under onnxruntime at a ``T`` and batch size other
than the export example's. Both must match the compiled PyTorch module that the export is
built from (``optimize(model, mode='inference')``, BatchNorm folded): spikes and outputs
identical. The step export (states carried in Python) and the sequence export agree with each
other. The repeat-inside-forward tutorial model, VotingLayer, and AdaptiveAvgPool with output
sizes that do not divide the input are covered too.

Multi-step (``'m'``) zoo models compile only with the frontend support for SpikingJelly's zoo
forwards; where compiling still fails with a :class:`FrontendError`, the case is skipped and
says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from zoo_models import build_small, zoo_modules

from snncompile import functional as our_functional
from snncompile.api import optimize
from snncompile.export.onnx import (
    OnnxExportError,
    adaptive_pool_matrix,
    export_onnx,
    read_states,
)
from snncompile.frontend.trace import FrontendError
from snncompile.ir.ops import Op
from snncompile.onnx_runtime import StreamingSession, run_sequence_model, run_step_model
from snncompile.zoo_compat import install_torchvision_stand_in

EXAMPLE = (2, 2)  # (T, N) of the export example
RUN = (5, 3)  # (T, N) of the onnxruntime runs
TOL = 0.0  # dyadic weights (see _scale): onnxruntime and PyTorch agree exactly


@pytest.fixture(scope="module")
def zoo(sj):  # noqa: ANN001, ANN201  (the sj fixture is SpikingJelly's activation_based)
    return {"sj": sj, **zoo_modules()}


QUANTUM = 2.0**-6  # weights are multiples of this (see _scale)


def _dyadic(t: torch.Tensor, quantum: float = QUANTUM) -> torch.Tensor:
    return torch.round(t / quantum) * quantum


def _scale(model: nn.Module, gain: float) -> None:
    """Scale conv/linear weights so that spikes reach the output, then make them dyadic.

    Weights and biases become multiples of 2**-6 (BN below folds into them with power-of-two
    factors), so every sum of spikes times weights is exact in float32 whatever order a
    backend adds in: onnxruntime's and PyTorch's convolutions then agree bit for bit, and a
    disagreement in the tests is a real export error, not rounding that flips a spike whose
    membrane sits at the threshold (arbitrary float weights do flip some in ResNet-18).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(_dyadic(m.weight * gain))
                if m.bias is not None:
                    m.bias.copy_(_dyadic(m.bias))


def _bn_stats(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters whose folding is exact (see _scale).

    ``gamma / sqrt(var + eps)`` is a power of two (``eps = 0``, ``var`` in {1/4, 1, 4}) and
    the mean, ``gamma`` and ``beta`` are dyadic, so the folded weights are dyadic too.
    """
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.eps = 0.0
            m.running_mean.copy_(_dyadic(torch.randn(c, generator=g) * 0.1, 2.0**-4))
            m.running_var.copy_(4.0 ** torch.randint(-1, 2, (c,), generator=g).float())
            m.weight.data.copy_(torch.randint(2, 6, (c,), generator=g).float() / 4)
            m.bias.data.copy_(_dyadic(torch.randn(c, generator=g) * 0.1 + 0.1, 2.0**-4))


def _small_vgg(z: dict, neuron_kw: dict) -> nn.Module:
    """spiking_vgg11_bn with a narrow classifier (the zoo's 25088x4096 layers need ~0.5 GB)."""
    sj = z["sj"]
    model = z["spiking_vgg"].spiking_vgg11_bn(**neuron_kw, num_classes=10)
    model.classifier[0] = sj.layer.Linear(512 * 7 * 7, 32)
    model.classifier[3] = sj.layer.Linear(32, 32)
    model.classifier[6] = sj.layer.Linear(32, 10)
    return model


# name -> (factory(zoo), per-sample input shape, weight gain)
def _cases() -> dict[str, tuple[Callable[[dict], nn.Module], tuple[int, ...], float]]:
    def kw(z: dict, lif: bool = False) -> dict:
        sj = z["sj"]
        node = sj.neuron.LIFNode if lif else sj.neuron.IFNode
        return {
            "spiking_neuron": node,
            "surrogate_function": sj.surrogate.ATan(),
            "detach_reset": True,
        }

    def plif(cls: str, channels: int = 4) -> Callable[[dict], nn.Module]:
        def make(z: dict) -> nn.Module:
            sj = z["sj"]
            return getattr(z["plif"], cls)(
                channels=channels,
                spiking_neuron=sj.neuron.ParametricLIFNode,
                surrogate_function=sj.surrogate.ATan(),
                detach_reset=True,
            )

        return make

    return {
        "spiking_resnet18": (
            lambda z: z["spiking_resnet"].spiking_resnet18(**kw(z), num_classes=10),
            (3, 32, 32),
            1.5,
        ),
        "sew_resnet18": (
            lambda z: z["sew_resnet"].sew_resnet18(**kw(z), cnf="ADD", num_classes=10),
            (3, 32, 32),
            1.5,
        ),
        "spiking_vgg11_bn": (lambda z: _small_vgg(z, kw(z, lif=True)), (3, 32, 32), 3.0),
        "MNISTNet": (plif("MNISTNet"), (1, 28, 28), 16.0),
        "FashionMNISTNet": (plif("FashionMNISTNet"), (1, 28, 28), 16.0),
        "CIFAR10Net": (plif("CIFAR10Net"), (3, 32, 32), 16.0),
        "NMNISTNet": (plif("NMNISTNet"), (2, 34, 34), 16.0),
        "DVSGestureNet": (plif("DVSGestureNet", channels=2), (2, 128, 128), 16.0),
    }


CASES = _cases()


def _compile_or_skip(model: nn.Module, example: torch.Tensor, step_mode: str) -> nn.Module:
    try:
        return optimize(model, example, mode="inference", backend="torch")
    except (FrontendError, TypeError) as exc:
        if step_mode == "m":
            pytest.skip(
                "this multi-step zoo model does not compile on this branch yet (SpikingJelly "
                f"zoo forwards need the frontend's zoo support): {type(exc).__name__}: "
                f"{str(exc)[:160]}"
            )
        raise


def _spikes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) > 0.5).float()


def _check_exports(
    model: nn.Module,
    example: torch.Tensor,
    x: torch.Tensor,
    what: str,
    tol: float = TOL,
    repeats: int | None = None,
) -> dict:
    """Export in both modes, run both under onnxruntime and compare with the compiled model."""
    compiled = _compile_or_skip(model, example, getattr(model, "_zoo_step_mode", "s"))
    our_functional.reset_net(compiled)
    with torch.no_grad():
        ref = compiled(x).numpy()
    assert np.abs(ref).sum() > 0, f"{what}: the compiled output is all zero (scale the weights)"
    got = {}
    for mode in ("step", "sequence"):
        onnx_model = export_onnx(model, example, mode=mode)
        if mode == "sequence":
            got[mode] = np.asarray(run_sequence_model(onnx_model, x))
        else:  # a model that repeats its [N, ...] input over T is fed x at each of T steps
            steps = x if repeats is None else x.unsqueeze(0).repeat(repeats, *[1] * x.dim())
            got[mode] = np.asarray(run_step_model(onnx_model, steps))
        assert got[mode].shape == ref.shape, f"{what} {mode}: shape {got[mode].shape}"
        diff = float(np.abs(got[mode] - ref).max())
        assert diff <= tol, f"{what} {mode}: max |onnxruntime - compiled| = {diff}"
    agree = float(np.abs(got["step"] - got["sequence"]).max())
    assert agree <= tol, f"{what}: step and sequence exports differ by {agree}"
    return got


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_exports_in_both_modes(zoo: dict, name: str, step_mode: str) -> None:
    factory, sample, gain = CASES[name]
    torch.manual_seed(0)
    model = factory(zoo)
    _scale(model, gain)
    _bn_stats(model)
    model.eval()
    zoo["sj"].functional.set_step_mode(model, step_mode)
    model._zoo_step_mode = step_mode
    example = _spikes((*EXAMPLE, *sample), 1)
    x = _spikes((*RUN, *sample), 2)
    _check_exports(model, example, x, f"{name} ({step_mode})")


# -- spiking transformers (multi-step only): attention as transpose/permute/matmul/chunk ----------
def _transformers() -> dict[str, tuple[Callable[[dict], nn.Module], tuple[int, ...], bool]]:
    """name -> (factory, per-sample input shape, whether the output is averaged over time)."""

    def make(name: str) -> Callable[[dict], nn.Module]:
        return lambda z: build_small(name, z["sj"], z)[0]

    return {
        "SpikeDrivenTransformer": (make("SpikeDrivenTransformer"), (3, 32, 32), True),
        "QKFormer": (make("QKFormer"), (3, 32, 32), True),
        "MaxFormer": (make("MaxFormer"), (3, 32, 32), True),
        "Spikformer": (make("Spikformer"), (3, 32, 32), False),
    }


TRANSFORMERS = _transformers()
# matmul and ReduceMean add in another order than PyTorch (~1e-6 on the logits); spikes equal.
TRANSFORMER_TOL = 1e-5


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_zoo_transformer_exports(zoo: dict, name: str) -> None:
    factory, sample, time_mean = TRANSFORMERS[name]
    torch.manual_seed(0)
    model = factory(zoo)
    _scale(model, 16.0)
    _bn_stats(model)
    model.eval()
    zoo["sj"].functional.set_step_mode(model, "m")
    example, x = _spikes((*EXAMPLE, *sample), 1), _spikes((*RUN, *sample), 2)
    if not time_mean:
        _check_exports(model, example, x, name, tol=TRANSFORMER_TOL)
        return
    compiled = optimize(model, example, mode="inference", backend="torch")
    assert "ran as written" not in compiled.report()
    with torch.no_grad():
        ref = compiled(x).numpy()
    assert np.abs(ref).sum() > 0
    seq = np.asarray(run_sequence_model(export_onnx(model, example, mode="sequence"), x))
    assert float(np.abs(seq - ref).max()) <= TRANSFORMER_TOL
    # The firing-rate head (mean over T) streams as a running time mean in the step export:
    # its last step equals the sequence's mean.
    step_model = export_onnx(model, example, mode="step")
    steps = np.asarray(run_step_model(step_model, x))
    assert float(np.abs(steps[-1] - ref).max()) <= TRANSFORMER_TOL


# -- attention that mixes time steps (MASNN, AttMSResNet): sequence mode only -------------------
def _masnn(z: dict, name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A small MASNN / AttMSResNet (T=2) and its per-sample input shape."""
    return build_small(name, z["sj"], z)


# Sigmoid/ReduceMean/ReduceMax in the attention round like PyTorch's to ~1 ulp; spikes equal.
ATTENTION_TOL = 1e-5


@pytest.mark.parametrize("name", ["MASNN", "AttMSResNet"])
def test_masnn_family_sequence_export_matches(zoo: dict, name: str) -> None:
    """Sequence export of the models with MultiDimensionalAttention / TemporalWiseAttention.

    The attention runs between ``Scan``s on the whole sequence; onnxruntime matches the
    compiled inference module (and eager SpikingJelly) at another batch size. MASNN's temporal
    attention is built for its own ``T``, so it runs at ``T=2``; AttMSResNet at ``T=5``.
    """
    torch.manual_seed(0)
    model, sample = _masnn(zoo, name)
    _scale(model, 1.5 if name == "AttMSResNet" else 3.0)
    _bn_stats(model)
    model.eval()
    t_run = 2 if name == "MASNN" else RUN[0]
    example, x = _spikes((*EXAMPLE, *sample), 1), _spikes((t_run, RUN[1], *sample), 2)
    compiled = optimize(model, example, mode="inference", backend="torch")
    with torch.no_grad():
        our_functional.reset_net(compiled)
        ref = compiled(x).numpy()
        zoo["sj"].functional.reset_net(model)
        eager = model(x).numpy()
    assert np.abs(ref).sum() > 0, compiled.report()
    onnx_model = export_onnx(model, example, mode="sequence")
    scans = [n for n in onnx_model.graph.node if n.op_type == "Scan"]
    attention = sum(
        isinstance(m, zoo["sj"].layer.MultiDimensionalAttention) for m in model.modules()
    ) + sum(isinstance(m, zoo["sj"].layer.TemporalWiseAttention) for m in model.modules())
    assert len(scans) == attention + 1  # one time loop between each two attention layers
    got = np.asarray(run_sequence_model(onnx_model, x))
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    print(f"{name}: max |onnxruntime - compiled| = {diff:.3g}")
    assert diff <= ATTENTION_TOL, f"{name}: max |onnxruntime - compiled| = {diff}"
    np.testing.assert_allclose(ref, eager, rtol=0, atol=ATTENTION_TOL)
    # MASNN's temporal MLP fixes T: the export declares it, so onnxruntime names the input
    # and the expected length instead of failing inside the attention; AttMSResNet runs any T.
    t_dim = onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    if name == "MASNN":
        assert t_dim.dim_value == 2
        with pytest.raises(Exception, match=r"(?s)invalid dimensions for input: x.*0 Got: 3"):
            run_sequence_model(onnx_model, _spikes((3, RUN[1], *sample), 3))
    else:
        assert t_dim.dim_param == "T"


def test_time_steps_of_mixing_layers_must_agree() -> None:
    """Two layers built for different T: no input length runs both, an error names them."""
    from types import SimpleNamespace

    from snncompile.export.onnx_attention import SequenceModule
    from snncompile.export.onnx_scan import _fixed_steps

    entry = SequenceModule(lambda *a: "", lambda m: "", lambda m: m.T)
    graph = {"a": SimpleNamespace(module=SimpleNamespace(T=2)),
             "b": SimpleNamespace(module=SimpleNamespace(T=3))}  # fmt: skip
    assert _fixed_steps(graph, {"a": entry}) == 2
    with pytest.raises(OnnxExportError, match=r"different numbers of time steps \(%a: T=2, %b"):
        _fixed_steps(graph, {"a": entry, "b": entry})


@pytest.mark.parametrize("name", ["MASNN", "AttMSResNet"])
def test_temporal_attention_step_export_is_refused(zoo: dict, name: str) -> None:
    """The attention pools over T (output at step t needs later steps): step mode names the
    node and its type, says why and what to do."""
    model, sample = _masnn(zoo, name)
    model.eval()
    example = _spikes((*EXAMPLE, *sample), 1)
    with pytest.raises(
        OnnxExportError,
        match=r"IR node %\w*(attn|attention) \(op OPAQUE_MODULE.*MultiDimensionalAttention.*"
        r"step t needs the steps after t.*mode='sequence'",
    ):
        export_onnx(model, example, mode="step")


class _AttentionNet(nn.Module):
    """Conv -> MultiDimensionalAttention -> IF -> Linear -> TemporalWiseAttention -> IF."""

    def __init__(self, sj, T: int, attention: str, **attn_kw: bool) -> None:  # noqa: ANN001
        super().__init__()
        c = 4
        self.conv = sj.layer.Conv2d(2, c, 3, padding=1)
        self.mda = (
            sj.layer.MultiDimensionalAttention(T, c, reduction_t=1, reduction_c=2, **attn_kw)
            if attention in ("mda", "both")
            else nn.Identity()
        )
        self.sn1 = sj.neuron.IFNode(v_threshold=0.25)
        self.flat = sj.layer.Flatten()
        self.fc = sj.layer.Linear(c * 6 * 6, 8)
        self.twa = (
            sj.layer.TemporalWiseAttention(T, reduction=1, dimension=2)
            if attention in ("twa", "both")
            else nn.Identity()
        )
        self.sn2 = sj.neuron.IFNode(v_threshold=0.25)
        sj.functional.set_step_mode(self, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sn1(self.mda(self.conv(x)))
        return self.sn2(self.twa(self.fc(self.flat(y))))


@pytest.mark.parametrize(
    "attention, attn_kw",
    [
        ("twa", {}),
        ("both", {}),
        ("mda", {"use_temporal": False}),
        ("mda", {"use_temporal": False, "use_spatial": False}),
        ("mda", {"use_temporal": False, "use_channel": False}),
    ],
)
def test_attention_layers_export_in_sequence_mode(sj, attention: str, attn_kw: dict) -> None:  # noqa: ANN001
    """TemporalWiseAttention and MultiDimensionalAttention variants in a small model: sequence
    export equals the compiled module and eager SpikingJelly; step export is refused (every
    variant pools over T: channel attention over (T, H, W), spatial attention over T*C)."""
    torch.manual_seed(0)
    T = 3
    model = _AttentionNet(sj, T, attention, **attn_kw)
    for m in (model.conv, model.fc):  # the attention's own convolutions keep their init
        _scale(m, 8.0)
    model.eval()
    example, x = _spikes((T, 2, 2, 6, 6), 1), _spikes((T, 3, 2, 6, 6), 2)
    compiled = optimize(model, example, mode="inference", backend="torch")
    with torch.no_grad():
        ref = compiled(x).numpy()
        sj.functional.reset_net(model)
        eager = model(x).numpy()
    assert ref.sum() > 0
    np.testing.assert_array_equal(ref, eager)
    got = np.asarray(run_sequence_model(export_onnx(model, example, mode="sequence"), x))
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(OnnxExportError, match=r"step t needs the steps after t"):
        export_onnx(model, example, mode="step")


def test_attention_subclass_is_not_rendered(sj) -> None:  # noqa: ANN001
    """A subclass may change the forward: it is refused, not exported with the parent's math."""

    class _Custom(sj.layer.TemporalWiseAttention):
        def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
            return super().forward(x_seq) * 2.0

    model = nn.Sequential(sj.layer.Linear(4, 4), _Custom(2, 1, 2), sj.neuron.IFNode())
    sj.functional.set_step_mode(model, "m")
    with pytest.raises(OnnxExportError, match=r"_Custom.*no ONNX rendering"):
        export_onnx(model.eval(), torch.rand(2, 2, 4), mode="sequence")


class _RepeatInside(nn.Module):
    """The Fashion-MNIST tutorial pattern: ``[N, C, H, W]`` repeated over T in ``forward``."""

    def __init__(self, sj: object, T: int = 4, readout: bool = True) -> None:
        super().__init__()
        self.T = T
        self.readout = readout
        c = 4
        self.conv_fc = nn.Sequential(
            sj.layer.Conv2d(1, c, 3, padding=1, bias=False),
            sj.layer.BatchNorm2d(c),
            sj.neuron.IFNode(surrogate_function=sj.surrogate.ATan()),
            sj.layer.MaxPool2d(2, 2),
            sj.layer.Conv2d(c, c, 3, padding=1, bias=False),
            sj.layer.BatchNorm2d(c),
            sj.neuron.IFNode(surrogate_function=sj.surrogate.ATan()),
            sj.layer.MaxPool2d(2, 2),
            sj.layer.Flatten(),
            sj.layer.Linear(c * 3 * 3, 10, bias=False),
            sj.neuron.IFNode(surrogate_function=sj.surrogate.ATan()),
        )
        sj.functional.set_step_mode(self, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        y = self.conv_fc(x_seq)
        return y.mean(0) if self.readout else y


def test_repeat_inside_forward_exports(sj) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    per_step = _RepeatInside(sj, readout=False)
    _scale(per_step, 3.0)
    _bn_stats(per_step)
    per_step.eval()
    example, x = torch.rand(2, 1, 12, 12), torch.rand(3, 1, 12, 12)
    got = _check_exports(per_step, example, x, "repeat-inside, per-step output", repeats=4)
    assert got["sequence"].shape == (4, 3, 10)
    # With the firing-rate readout (mean over T) the sequence export equals the per-step
    # outputs averaged over the T calls, and the readout's step export (the running mean a
    # state) ends with the same value.
    readout = _RepeatInside(sj, readout=True)
    readout.load_state_dict(per_step.state_dict())
    readout.eval()
    onnx_model = export_onnx(readout, example, mode="sequence")
    rates = np.asarray(run_sequence_model(onnx_model, x))
    our_functional.reset_net(compiled := optimize(readout, example, mode="inference"))
    with torch.no_grad():
        np.testing.assert_allclose(rates, compiled(x).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(rates, got["step"].mean(0), rtol=0, atol=1e-6)
    running = run_step_model(export_onnx(readout, example, mode="step"), x.repeat(4, 1, 1, 1, 1))
    np.testing.assert_allclose(np.asarray(running)[-1], rates, rtol=0, atol=1e-6)


def test_adaptive_pool_matrix_matches_torch() -> None:
    for size_in, size_out in ((5, 3), (1, 7), (7, 3), (6, 4), (3, 5)):
        x = torch.randn(2, 3, size_in)
        ref = nn.functional.adaptive_avg_pool1d(x, size_out)
        got = x @ torch.from_numpy(adaptive_pool_matrix(size_in, size_out)).T
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_size", [(7, 7), (3, 3), (2, 5), (None, 3)])
def test_adaptive_avgpool_sizes_that_do_not_divide(out_size: tuple) -> None:
    from snncompile import layer, neuron

    torch.manual_seed(0)
    model = nn.Sequential(
        layer.Conv2d(2, 3, 3),
        neuron.IFNode(),
        layer.AdaptiveAvgPool2d(out_size),
        layer.Flatten(),
    ).eval()
    hw = 7 if out_size != (7, 7) else 3  # 5x5 -> 7x7 upsamples, 5x5 -> 3x3 overlaps windows
    example = _spikes((2, 2, 2, hw, hw), 1)
    x = _spikes((5, 3, 2, hw, hw), 2)
    _scale(model, 3.0)
    # Windows of 3 or 6 pixels average with non-dyadic weights: rounding differs by ~1 ulp.
    _check_exports(model, example, x, f"AdaptiveAvgPool2d{out_size}", tol=1e-6)


def test_voting_layer_exports(sj) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = nn.Sequential(
        sj.layer.Linear(8, 25),
        sj.neuron.IFNode(),
        sj.layer.VotingLayer(10),  # 25 features: 2 groups of 10, the last 5 dropped
    ).eval()
    _scale(model, 3.0)
    example, x = _spikes((2, 2, 8), 1), _spikes((6, 3, 8), 2)
    got = _check_exports(model, example, x, "VotingLayer", tol=1e-6)
    assert got["step"].shape == (6, 3, 2)


# -- models whose output is a reduction over time (MSResNet, MaxResNet) -------------------------
def _ms_family(sj, name: str) -> nn.Module:  # noqa: ANN001
    install_torchvision_stand_in()
    from spikingjelly.activation_based.model import ms_resnet

    sg = {"surrogate_function": sj.surrogate.ATan(), "detach_reset": True}
    if name == "MSResNet":
        return ms_resnet.MSResNet(T=2, num_classes=10, base_channels=8, layers=(1, 1, 1, 1), **sg)
    return ms_resnet.max_resnet18(T=2, num_classes=10, **sg)


@pytest.mark.parametrize("name", ["MSResNet", "MaxResNet"])
def test_time_mean_models_stream_a_running_mean(sj, name: str) -> None:  # noqa: ANN001
    """Step export of a model that returns ``head(x).mean(0)``: the running mean is a state.

    Step ``t`` of the stream returns the mean over the first ``t`` steps; the last step equals
    the sequence export and the compiled module, and an earlier step equals the compiled module
    run on the first steps only.
    """
    torch.manual_seed(0)
    model = _ms_family(sj, name)
    _scale(model, 1.5)
    _bn_stats(model)
    model.eval()
    example, x = _spikes((*EXAMPLE, 3, 16, 16), 1), _spikes((*RUN, 3, 16, 16), 2)
    compiled = optimize(model, example, mode="inference", backend="torch")
    with torch.no_grad():
        our_functional.reset_net(compiled)
        ref = compiled(x).numpy()
        our_functional.reset_net(compiled)
        ref_first = compiled(x[:2]).numpy()
    assert np.abs(ref).sum() > 0
    step = export_onnx(model, example, mode="step")
    running = [s for s in read_states(step) if s["node"] == "mean"]
    assert [(s["state"], s["init"]) for s in running] == [("acc", 0.0), ("steps", 0.0)]
    assert running[0]["shape"] == [-1, 10] and running[1]["shape"] == [-1, 1]
    got_step = np.asarray(run_step_model(step, x))  # [T, N, classes]: the running means
    got_seq = np.asarray(run_sequence_model(export_onnx(model, example, mode="sequence"), x))
    assert got_step.shape == (RUN[0], *ref.shape) and got_seq.shape == ref.shape
    np.testing.assert_allclose(got_seq, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_step[-1], got_seq, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_step[1], ref_first, rtol=0, atol=1e-6)
    session = StreamingSession(step)
    for t in range(RUN[0]):
        y_t = session.step(x[t].numpy())
    np.testing.assert_allclose(y_t, got_seq, rtol=0, atol=1e-6)


class _MixesReduced(nn.Module):
    """Reads a per-step value after a reduction over time: not expressible in one step."""

    def __init__(self, sj) -> None:  # noqa: ANN001
        super().__init__()
        self.fc = sj.layer.Linear(4, 4)
        self.sn = sj.neuron.IFNode()
        sj.functional.set_step_mode(self, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sn(self.fc(x))
        return y.sum(0) * y


def test_running_sum_refuses_mixing_with_per_step_values(sj) -> None:  # noqa: ANN001
    from snncompile.export.onnx import OnnxExportError

    model = _MixesReduced(sj).eval()
    with pytest.raises(OnnxExportError, match=r"mixes the per-step value .* reduced over time"):
        export_onnx(model, torch.rand(2, 2, 4), mode="step")


# -- OTTT networks (SpikingJelly's spiking_vggws_ottt): their eval form -----------------------
def _ottt_vgg(sj, seed: int = 0) -> nn.Module:  # noqa: ANN001
    install_torchvision_stand_in()
    from spikingjelly.activation_based.model import spiking_vggws_ottt

    torch.manual_seed(seed)
    net = spiking_vggws_ottt.OTTTSpikingVGG(
        [8, "M", 16, "M", 512], num_classes=10, spiking_neuron=sj.neuron.OTTTLIFNode
    )
    with torch.no_grad():  # the zoo's N(0, 0.01) classifier would make every logit ~0
        net.classifier[2].weight.normal_(0.0, 0.5)
    return net.eval()


def test_ottt_vgg_exports_and_matches_eager_spikingjelly(sj) -> None:  # noqa: ANN001
    """OTTTSpikingVGG in eval: OTTT neurons are LIF steps, OTTTSequential a Sequential.

    Both exports under onnxruntime, the compiled inference module and eager SpikingJelly (the
    model stepped as written, in eval mode) agree; every neuron of the compiled module is a
    plain (fused) neuron, not an opaque module.
    """
    net = _ottt_vgg(sj)
    example, x = torch.rand(2, 2, 3, 16, 16), torch.rand(5, 3, 3, 16, 16)
    sj.functional.reset_net(net)
    with torch.no_grad():
        want = torch.stack([net(x_t) for x_t in x]).numpy()
    assert np.abs(want).sum() > 0
    compiled = optimize(net, example, mode="inference")
    neurons = sum(isinstance(m, sj.neuron.OTTTLIFNode) for m in net.modules())
    assert len(compiled.graph.find(Op.FUSED_NEURON)) == neurons == 3, compiled.report()
    assert not compiled.graph.find(Op.OPAQUE_MODULE), compiled.graph
    with torch.no_grad():
        got = compiled(x).numpy()
    np.testing.assert_array_equal(got, want)  # the eval form is exact
    seq = np.asarray(run_sequence_model(export_onnx(net, example, mode="sequence"), x))
    step = np.asarray(run_step_model(export_onnx(net, example, mode="step"), x))
    np.testing.assert_allclose(seq, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(step, seq, rtol=0, atol=1e-6)
    assert isinstance(net.features, sj.layer.OTTTSequential)  # the user's model is unchanged


def test_ottt_training_compile_keeps_the_containers_as_written(sj) -> None:  # noqa: ANN001
    """Training semantics ([spike, trace] pairs) are never rewritten: the containers run as
    written, and the online form's rewrite refuses a training-mode module by name."""
    from snncompile.frontend.online_eval import online_eval_equivalent

    net = _ottt_vgg(sj).train()
    compiled = optimize(net, torch.rand(2, 2, 3, 16, 16), mode="train")
    assert compiled.graph.find(Op.OPAQUE_MODULE)
    with pytest.raises(ValueError, match=r"features \(OTTTSequential\) is in training mode"):
        online_eval_equivalent(net)


def test_weight_standardised_layers_export_their_standardised_weight(sj) -> None:  # noqa: ANN001
    """WSConv2d/WSLinear compute with ``get_weight()``, not ``.weight``: the export (and BN
    folding, which must then leave a WSConv2d's batchnorm unfolded) use that weight too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        sj.layer.WSConv2d(2, 4, 3),
        sj.layer.BatchNorm2d(4),
        sj.neuron.IFNode(),
        sj.layer.Flatten(),
        sj.layer.WSLinear(4 * 5 * 5, 6),
        sj.neuron.IFNode(),
    )
    _bn_stats(model)
    model.eval()
    example, x = torch.rand(2, 2, 2, 7, 7) * 2, torch.rand(5, 3, 2, 7, 7) * 2
    sj.functional.reset_net(model)
    with torch.no_grad():
        want = torch.stack([model(x_t) for x_t in x]).numpy()
    assert want.sum() > 0
    compiled = optimize(model, example, mode="inference")
    with torch.no_grad():
        np.testing.assert_array_equal(compiled(x).numpy(), want)
    for mode, run in (("sequence", run_sequence_model), ("step", run_step_model)):
        got = np.asarray(run(export_onnx(model, example, mode=mode), x))
        assert np.mean(got != want) < 0.01, f"{mode}: spikes differ in {np.mean(got != want):.1%}"
