"""SpikingJelly 2.0.0's model zoo and ``activation_based.layer`` classes, compiled.

Every zoo family (``spikingjelly.activation_based.model``) at a small size, in the step modes it
supports: it compiles; in training mode outputs are equal to eager SpikingJelly bit for bit and
the parameter gradients agree to 1e-5 relative (the norm of the difference over the norm of the
gradient, all parameters together: per-parameter ratios are meaningless for gradients that are
mathematically zero, such as a conv bias before a BatchNorm, whose float noise is ~1e-8); the
expected number of neurons is fused; in eval mode with BatchNorm left unfolded outputs are equal.
Each layer class of ``activation_based.layer`` that is constructible with simple arguments is run
compiled and eager. The zoo imports torchvision only for pretrained weights: tests/conftest.py
gives it a stand-in that refuses to download.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo_models import build_small, zoo_modules

import snncompile
from snncompile.frontend import FrontendError
from snncompile.ir.ops import Op
from snncompile.runtime.compiled import CompiledModule

UNFOLDED = ["remove_dead_ops", "fuse_neurons", "fuse_elementwise"]  # inference, BN not folded


@pytest.fixture(scope="module")
def zoo(sj):
    return zoo_modules()


# (family, step mode, neurons expected fused). Families whose constructors fix
# step_mode='m' run only in 'm'. OTTT neurons have no fused kernel: they run as written.
ZOO = [
    ("spiking_resnet18", "s", "all"),
    ("spiking_resnet18", "m", "all"),
    ("sew_resnet18", "s", "all"),
    ("sew_resnet18", "m", "all"),
    ("spiking_vgg_bn", "s", "all"),
    ("spiking_vgg_bn", "m", "all"),
    ("MNISTNet", "s", "all"),
    ("MNISTNet", "m", "all"),
    ("CIFAR10Net", "s", "all"),
    ("CIFAR10Net", "m", "all"),
    ("DVSGestureNet", "s", "all"),
    ("DVSGestureNet", "m", "all"),
    ("MSResNet", "m", "all"),
    ("MaxResNet", "m", "all"),
    ("MASNN", "m", "all"),
    ("AttMSResNet", "m", "all"),
    ("SpikeDrivenTransformer", "m", "all"),
    ("QKFormer", "m", "all"),
    ("MaxFormer", "m", "all"),
    ("Spikformer", "m", "all"),
    ("OTTTSpikingVGG", "s", 0),
]


def fused_neurons(compiled: nn.Module) -> int:
    """FUSED_NEURON nodes in ``compiled`` and in its compiled parts (partial compilation)."""
    return sum(
        len(m.graph.find(Op.FUSED_NEURON))
        for m in compiled.modules()
        if isinstance(m, CompiledModule)
    )


def assert_model_parameter_order(compiled: nn.Module, net: nn.Module) -> None:
    """``compiled.parameters()`` and ``buffers()`` are the model's tensors in the model's order
    (chains register their neuron before their batchnorm, fx registers modules in call order:
    without the reordering, ``zip(compiled.parameters(), net.parameters())`` pairs different
    tensors)."""
    for tensors in (lambda m: m.parameters(), lambda m: m.buffers()):
        got = [id(t) for t in tensors(compiled)]
        mine = set(got)
        assert got == [id(t) for t in tensors(net) if id(t) in mine]
        assert len(mine) == len(got) and mine <= {id(t) for t in tensors(net)}


def _eager(sj, net: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    sj.functional.reset_net(net)
    return net(x) if mode == "m" else torch.stack([net(xt) for xt in x])


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.rand(2, 2, *shape) * 4.0  # large enough that neurons spike
    return (x > 2.0).float() if shape[0] == 2 else x  # DVS-style inputs are events


@pytest.mark.parametrize(("name", "mode", "expect_fused"), ZOO)
def test_zoo_family_compiles_and_matches(sj, zoo, name, mode, expect_fused) -> None:
    torch.manual_seed(0)
    net, shape = build_small(name, sj, zoo)
    sj.functional.set_step_mode(net, mode)
    modes_before = {n: m.step_mode for n, m in net.named_modules() if hasattr(m, "step_mode")}
    x = _input(shape)
    neurons = sum(isinstance(m, sj.neuron.BaseNode) for m in net.modules())

    compiled = snncompile.optimize(net, x)
    assert_model_parameter_order(compiled, net)
    modes_after = {n: m.step_mode for n, m in net.named_modules() if hasattr(m, "step_mode")}
    assert modes_after == modes_before  # the user's step modes are never switched
    fused = fused_neurons(compiled)
    report = compiled.report()
    assert fused == (neurons if expect_fused == "all" else expect_fused), report
    if name != "OTTTSpikingVGG":  # OTTTSequential runs as written (no fused OTTT kernel)
        assert "ran as written" not in report, report

    # Training mode: same outputs (bit-exact) and gradients as eager SpikingJelly.
    torch.manual_seed(1)
    y = compiled(x)
    torch.manual_seed(1)
    ref = _eager(sj, net, x, mode)
    assert torch.equal(y, ref)
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.randn_like(ref)
    got = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(got, want, strict=True) if b is not None]
    assert pairs and all(a is not None for a, _ in pairs)
    diff = torch.cat([(a - b).flatten() for a, b in pairs]).norm()
    assert diff <= 1e-5 * torch.cat([b.flatten() for _, b in pairs]).norm()

    # Eval mode, BatchNorm left unfolded: equal outputs.
    net.eval()
    compiled_eval = snncompile.optimize(net, x, passes=UNFOLDED)
    assert_model_parameter_order(compiled_eval, net)
    assert torch.equal(compiled_eval(x), _eager(sj, net, x, mode))


# Shape-specialised traces: the transformers' attention reads sizes (T, N, C, L = x.shape) and
# checks them in Python; another batch size or T must re-trace, never reuse a reshape traced
# for the first shape.
@pytest.mark.parametrize("name", ["SpikeDrivenTransformer", "QKFormer", "Spikformer", "MASNN"])
def test_zoo_transformer_at_other_batch_and_T(sj, zoo, name: str) -> None:
    torch.manual_seed(0)
    net, shape = build_small(name, sj, zoo)
    sj.functional.set_step_mode(net, "m")
    net.eval()
    compiled = snncompile.optimize(net, _input(shape), passes=UNFOLDED)
    # MASNN's temporal attention is built for T=2 (it raises on another T, eager as compiled).
    for t, n in ((2, 3), (2, 1), (2, 2)) if name == "MASNN" else ((2, 3), (3, 1), (2, 2)):
        x = (torch.rand(t, n, *shape) * 4.0 > 2.0).float() if shape[0] == 2 else torch.rand(
            t, n, *shape
        ) * 4.0
        sj.functional.reset_net(compiled)
        got = compiled(x)
        assert torch.equal(got, _eager(sj, net, x, "m")), (t, n)
    sigs = compiled.shape_guard.signatures
    assert len(sigs) == 3


def test_spiking_neurons_spike_in_zoo_inputs(sj, zoo) -> None:
    """The zoo test inputs make neurons fire (so the equalities above are not about zeros)."""
    net, shape = build_small("spiking_resnet18", sj, zoo)
    sj.functional.set_step_mode(net, "m")
    rates = []
    net.sn1.register_forward_hook(lambda m, i, o: rates.append(o.mean().item()))
    net(_input(shape))
    assert rates and rates[0] > 0.0


# -- layer classes -------------------------------------------------------------------------------
def _layer_cases(sj) -> list[tuple[str, object, tuple[int, ...], str]]:
    """(class name, factory, per-step input shape, step modes to test)."""
    L, N = sj.layer, sj.neuron
    return [
        ("AdaptiveAvgPool1d", lambda: L.AdaptiveAvgPool1d(3), (4, 7), "sm"),
        ("AdaptiveAvgPool2d", lambda: L.AdaptiveAvgPool2d((3, 3)), (4, 7, 7), "sm"),
        ("AdaptiveAvgPool3d", lambda: L.AdaptiveAvgPool3d(2), (2, 4, 5, 5), "sm"),
        ("AvgPool1d", lambda: L.AvgPool1d(2), (4, 8), "sm"),
        ("AvgPool2d", lambda: L.AvgPool2d(2), (4, 8, 8), "sm"),
        ("AvgPool3d", lambda: L.AvgPool3d(2), (2, 4, 4, 4), "sm"),
        ("MaxPool1d", lambda: L.MaxPool1d(2), (4, 8), "sm"),
        ("MaxPool2d", lambda: L.MaxPool2d(2), (4, 8, 8), "sm"),
        ("MaxPool3d", lambda: L.MaxPool3d(2), (2, 4, 4, 4), "sm"),
        ("BatchNorm1d", lambda: L.BatchNorm1d(4), (4, 6), "sm"),
        ("BatchNorm2d", lambda: L.BatchNorm2d(4), (4, 5, 5), "sm"),
        ("BatchNorm3d", lambda: L.BatchNorm3d(2), (2, 3, 3, 3), "sm"),
        ("Conv1d", lambda: L.Conv1d(4, 3, 3), (4, 8), "sm"),
        ("Conv2d", lambda: L.Conv2d(4, 3, 3), (4, 6, 6), "sm"),
        ("Conv3d", lambda: L.Conv3d(2, 3, 2), (2, 4, 4, 4), "sm"),
        ("ConvTranspose1d", lambda: L.ConvTranspose1d(4, 3, 3), (4, 5), "sm"),
        ("ConvTranspose2d", lambda: L.ConvTranspose2d(4, 3, 3), (4, 5, 5), "sm"),
        ("ConvTranspose3d", lambda: L.ConvTranspose3d(2, 3, 2), (2, 3, 3, 3), "sm"),
        ("WSConv2d", lambda: L.WSConv2d(4, 3, 3), (4, 6, 6), "sm"),
        ("Linear", lambda: L.Linear(6, 5), (6,), "sm"),
        ("WSLinear", lambda: L.WSLinear(6, 5), (6,), "sm"),
        ("Flatten", lambda: L.Flatten(), (2, 3, 3), "sm"),
        ("GroupNorm", lambda: L.GroupNorm(2, 4), (4, 5, 5), "sm"),
        ("Upsample", lambda: L.Upsample(scale_factor=2), (2, 3, 3), "sm"),
        ("Dropout", lambda: L.Dropout(0.5), (6,), "sm"),
        ("Dropout2d", lambda: L.Dropout2d(0.5), (4, 3, 3), "sm"),
        ("VotingLayer", lambda: L.VotingLayer(2), (10,), "sm"),
        ("Delay", lambda: L.Delay(1), (6,), "sm"),
        ("SynapseFilter", lambda: L.SynapseFilter(tau=2.0, learnable=True), (6,), "sm"),
        ("NeuNorm", lambda: L.NeuNorm(4, 3, 3), (4, 3, 3), "sm"),
        ("PrintShapeModule", lambda: L.PrintShapeModule(), (6,), "sm"),
        ("SeqToANNContainer", lambda: L.SeqToANNContainer(nn.Linear(6, 5)), (6,), "m"),
        # TLast containers take time last ([N, *, T]): here N=3, * = 2 and T=6.
        ("TLastSeqToANNContainer", lambda: L.TLastSeqToANNContainer(nn.Linear(2, 5)), (6,), "m"),
        (
            "MultiStepContainer",
            lambda: L.MultiStepContainer(nn.Linear(6, 5), N.IFNode()),
            (6,),
            "m",
        ),
        (
            "TLastMultiStepContainer",
            lambda: L.TLastMultiStepContainer(nn.Linear(2, 5), N.IFNode()),
            (6,),
            "m",
        ),
        (
            "StepModeContainer",
            lambda: L.StepModeContainer(True, "s", nn.Linear(6, 5), N.IFNode()),
            (6,),
            "sm",
        ),
        (
            "ElementWiseRecurrentContainer",
            lambda: L.ElementWiseRecurrentContainer(N.IFNode(), lambda a, b: a + b),
            (6,),
            "sm",
        ),
        (
            "LinearRecurrentContainer",
            lambda: L.LinearRecurrentContainer(N.IFNode(), 6, 6),
            (6,),
            "sm",
        ),
        (
            "TemporalEffectiveBatchNorm2d",
            lambda: L.TemporalEffectiveBatchNorm2d(3, 4),
            (4, 3, 3),
            "m",
        ),
        ("BatchNormThroughTime2d", lambda: L.BatchNormThroughTime2d(3, 4), (4, 3, 3), "m"),
        (
            "ThresholdDependentBatchNorm2d",
            lambda: L.ThresholdDependentBatchNorm2d(1.0, 1.0, 4),
            (4, 3, 3),
            "m",
        ),
        ("TemporalWiseAttention", lambda: L.TemporalWiseAttention(3, 1), (4, 3, 3), "m"),
        (
            "MultiDimensionalAttention",
            lambda: L.MultiDimensionalAttention(3, 4, reduction_t=1, reduction_c=2),
            (4, 3, 3),
            "m",
        ),
        (
            "OTTTSequential",
            lambda: L.OTTTSequential(nn.Linear(6, 5), N.OTTTLIFNode(), nn.Linear(5, 4)),
            (6,),
            "s",
        ),
    ]


LAYER_NAMES = [c[0] for c in _layer_cases(type("L", (), {"layer": None, "neuron": None}))]


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_layer_class_compiles_or_runs_as_written(sj, name: str, capsys) -> None:
    _name, factory, shape, modes = next(c for c in _layer_cases(sj) if c[0] == name)
    for mode in modes:
        torch.manual_seed(0)
        net = nn.Sequential(factory(), sj.neuron.IFNode())
        sj.functional.set_step_mode(net, mode)
        x = torch.rand(3, 2, *shape) * 2
        compiled = snncompile.optimize(net, x)
        torch.manual_seed(1)
        got = compiled(x)
        torch.manual_seed(1)
        want = _eager(sj, net, x, mode)
        assert torch.equal(got, want), f"{name} step_mode={mode!r}\n{compiled.report()}"


# -- Python-side state, step modes, T = 0 ----------------------------------------------------------
class _Counter(nn.Module):
    """Adds its call count to the input: state kept in a Python attribute."""

    def __init__(self, sj) -> None:
        super().__init__()
        self.fc = sj.layer.Linear(4, 4)
        self.sn = sj.neuron.LIFNode(surrogate_function=sj.surrogate.ATan())
        self.t = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.t += 1
        return self.sn(self.fc(x) + 0.1 * self.t)


def test_python_attribute_state_runs_as_written(sj) -> None:
    net = _Counter(sj)
    x = torch.rand(4, 2, 4)
    compiled = snncompile.optimize(net, x)
    assert net.t == 0  # tracing did not run the user's forward
    report = compiled.report()
    assert "ran as written" in report and "'t'" in report, report
    assert fused_neurons(compiled) == 1  # the neuron inside still fused
    ref = copy.deepcopy(net)
    want = torch.stack([ref(xt) for xt in x])
    assert torch.equal(compiled(x), want)
    assert ref.t == 4
    with pytest.raises(FrontendError, match=r"Python attribute.*'t'"):
        snncompile.optimize(net, x, strict=True)


def test_zero_time_steps_are_clear_errors(sj) -> None:
    net = nn.Sequential(sj.layer.Linear(4, 3), sj.neuron.IFNode())
    with pytest.raises(FrontendError, match="T=0 time steps"):
        snncompile.optimize(net, torch.rand(0, 2, 4))
    with pytest.raises(FrontendError, match="N=0"):
        snncompile.optimize(net, torch.rand(3, 0, 4))
    compiled = snncompile.optimize(net, torch.rand(3, 2, 4))
    with pytest.raises(ValueError, match="T=0 time steps"):
        compiled(torch.rand(0, 2, 4))


def test_torchvision_stand_in_never_downloads(sj, zoo) -> None:
    import torchvision

    if not getattr(torchvision, "__snncompile_stand_in__", False):
        pytest.skip("a real torchvision is installed")
    with pytest.raises(RuntimeError, match="refuses to download"):
        zoo["spiking_resnet"].spiking_resnet18(pretrained=True, spiking_neuron=sj.neuron.IFNode)
