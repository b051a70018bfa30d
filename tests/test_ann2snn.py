"""ANN-to-SNN conversion (snncompile.ann2snn): structure, calibration, reference simulation,
accuracy on digits, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snncompile import functional
from snncompile.ann2snn import (
    ConstantEncoder,
    HalfThresholdIFNode,
    convert,
    fold_batchnorm,
    simulate,
)
from snncompile.neuron import IFNode


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(6, 20), nn.ReLU(), nn.Dropout(0.3), nn.Linear(20, 12), nn.ReLU(),
        nn.Linear(12, 4),
    ).eval()


def _relu_scales(
    ann: nn.Sequential, data: torch.Tensor, q: float | None
) -> dict[int, torch.Tensor]:
    """Activation scale of each ReLU, computed directly from forward hooks on the ANN."""
    acts: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, i=i: acts.__setitem__(i, out.detach()))
        for i, m in enumerate(ann) if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        ann(data)
    for h in hooks:
        h.remove()
    if q is None:
        return {i: a.max() for i, a in acts.items()}
    return {i: torch.quantile(a.flatten(), q) for i, a in acts.items()}


def _reference_rates(
    ann: nn.Sequential, scales: dict[int, torch.Tensor], x: torch.Tensor, T: int, v0: float
) -> torch.Tensor:
    """Plain step-by-step IF simulation of the ANN: each ReLU is a soft-reset IF neuron with
    threshold 1 on the input scaled by 1/s, its spikes scaled back by s; returns the mean output."""
    membranes: dict[int, torch.Tensor] = {}
    total = torch.zeros(())
    with torch.no_grad():
        for _ in range(T):
            h = x
            for i, layer in enumerate(ann):
                if isinstance(layer, nn.ReLU):
                    s = scales[i]
                    v = membranes.get(i, torch.full_like(h, v0)) + h * (1.0 / s)
                    spike = (v >= 1.0).to(h.dtype)
                    membranes[i] = v - spike
                    h = spike * s
                elif isinstance(layer, nn.Dropout):
                    continue
                else:
                    h = layer(h)
            total = total + h
    return total / T


@pytest.mark.parametrize(
    ("mode", "q", "half", "backend"),
    [
        ("max", None, True, "torch"),
        ("max", None, False, "torch"),
        ("99.9%", 0.999, True, "torch"),
        ("max", None, True, "cpu"),  # the fused C kernel
    ],
)
def test_rates_match_reference_simulation(
    mode: str, q: float | None, half: bool, backend: str
) -> None:
    ann = _mlp()
    calib = torch.randn(200, 6)
    snn = convert(
        ann, calib, mode=mode, half_threshold_init=half, progress=False, backend=backend
    )
    scales = _relu_scales(ann, calib, q)
    x, T = torch.randn(5, 6), 40
    ref = _reference_rates(ann, scales, x, T, 0.5 if half else 0.0)
    functional.reset_net(snn)
    with torch.no_grad():
        out = snn(x.unsqueeze(0).expand(T, *x.shape))
    assert out.shape == (T, 5, 4)
    torch.testing.assert_close(out.mean(0), ref, rtol=1e-5, atol=1e-5)
    # The rates approach the (clipped) ANN output; a sanity check that the test is not vacuous.
    assert (out.mean(0) - ann(x)).abs().max() < 0.25 * ann(x).abs().max()


def test_structure_and_all_relu_spellings() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.fc[0](x))
            x = F.relu(self.fc[1](x))
            x = torch.relu(self.fc[2](x))
            x = self.fc[3](x).relu()
            return self.fc[4](x)

    torch.manual_seed(0)
    ann = Net().eval()
    calib = torch.randn(64, 8)
    snn = convert(ann, calib, progress=False)
    neurons = [m for m in snn.modules() if isinstance(m, IFNode)]
    assert len(neurons) == 4
    assert all(isinstance(m, HalfThresholdIFNode) for m in neurons)
    assert all(m.step_mode == "m" and m.v_reset is None and m.v_threshold == 1.0 for m in neurons)
    assert len(snn.activation_scales) == 4
    assert not snn.training
    # The user's model is untouched.
    assert sum(isinstance(m, IFNode) for m in ann.modules()) == 0
    # Long runs converge to the ANN (inputs within the calibrated range).
    x = calib[:4]
    rate = simulate(snn, x, 512, chunk_size=128)
    torch.testing.assert_close(rate, ann(x), atol=0.05, rtol=0.05)


def test_half_threshold_init_survives_reset_net() -> None:
    snn = convert(_mlp(), torch.randn(50, 6), progress=False)
    node = next(m for m in snn.modules() if isinstance(m, HalfThresholdIFNode))
    assert node.v == 0.5 and node.v_init == 0.5
    with torch.no_grad():
        snn(torch.randn(3, 2, 6))
    assert isinstance(node.v, torch.Tensor)
    functional.reset_net(snn)
    assert node.v == 0.5
    # round(T * x) spike counts: a constant input of 0.3 for 10 steps gives 3 spikes.
    single = HalfThresholdIFNode(step_mode="m")
    assert single(torch.full((10, 1), 0.3)).sum().item() == 3.0
    plain = IFNode(v_reset=None, step_mode="m")
    assert plain(torch.full((10, 1), 0.26)).sum().item() == 2.0  # floor without it


def test_bn_folding_is_exact() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 16, 5), nn.BatchNorm1d(5),
    )
    ann.train()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for _ in range(5):
            ann(torch.randn(16, 2, 4, 4) * 3 + 1)
        ann[1].weight.uniform_(0.5, 2.0)
        ann[5].bias.uniform_(-1.0, 1.0)
    ann.eval()
    gm = torch.fx.symbolic_trace(copy.deepcopy(ann))  # folding edits the traced modules
    assert fold_batchnorm(gm) == 2
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in gm.modules())
    x = torch.randn(7, 2, 4, 4)
    torch.testing.assert_close(gm(x), ann(x), rtol=1e-5, atol=1e-5)
    snn = convert(ann, torch.randn(64, 2, 4, 4), progress=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in snn.modules())


def test_calibration_modes_and_channel_wise() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).eval()
    calib = torch.randn(100, 1, 4, 4)
    act = torch.relu(ann[0](calib)).detach()
    scales = {}
    for mode in ("max", "99%", 0.5):
        snn = convert(ann, calib, mode=mode, progress=False)
        (scales[mode],) = snn.activation_scales.values()
    torch.testing.assert_close(scales["max"], act.max())
    torch.testing.assert_close(scales["99%"], torch.quantile(act.flatten(), 0.99))
    torch.testing.assert_close(scales[0.5], 0.5 * act.max())
    snn = convert(ann, calib.split(30), mode="max", channel_wise=True, progress=False)
    (per_channel,) = snn.activation_scales.values()
    assert per_channel.shape == (3, 1, 1)
    torch.testing.assert_close(per_channel.flatten(), act.amax(dim=(0, 2, 3)))
    with torch.no_grad():
        assert snn(calib[:2].expand(4, 2, 1, 4, 4)).shape == (4, 2, 2)


def test_maxpool_is_kept() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).eval()
    snn = convert(ann, torch.rand(32, 1, 4, 4), progress=False)
    assert any(isinstance(m, nn.MaxPool2d) for m in snn.modules())
    assert simulate(snn, torch.rand(2, 1, 4, 4), 16).shape == (2, 3)


@pytest.mark.parametrize(
    ("activation", "expected"),
    [
        (lambda x, m: m.gelu(x), "GELU at fx node 'gelu'"),
        (lambda x, m: torch.sigmoid(x), "torch.sigmoid at fx node 'sigmoid'"),
        (lambda x, m: x.tanh(), "Tensor.tanh at fx node 'tanh'"),
        (lambda x, m: F.silu(x), "torch.nn.functional.silu at fx node 'silu'"),
    ],
)
def test_unsupported_activation_names_the_node(activation, expected: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gelu = nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return activation(self.fc(x), self)

    with pytest.raises(ValueError, match=f"unsupported activation {expected}"):
        convert(Net(), torch.randn(8, 4), progress=False)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown normalisation mode 'median'"):
        convert(_mlp(), torch.randn(8, 6), mode="median", progress=False)
    with pytest.raises(ValueError, match="unknown normalisation mode 1.5"):
        convert(_mlp(), torch.randn(8, 6), mode=1.5, progress=False)
    with pytest.raises(TypeError, match="calibration_data must be a tensor or an iterable"):
        convert(_mlp(), 3, progress=False)

    class NoStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4, track_running_stats=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.fc(x)))

    with pytest.raises(ValueError, match="BatchNorm at fx node 'bn' has no running statistics"):
        convert(NoStats(), torch.randn(8, 4), progress=False)


def _digits_split() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def _digits_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10),
    )


@pytest.fixture
def one_thread():
    """Tiny models train much faster on one thread, especially on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_digits_accuracy_within_one_point_at_T256(one_thread) -> None:
    x_tr, y_tr, x_te, y_te = _digits_split()
    torch.manual_seed(0)
    ann = _digits_cnn()
    opt = torch.optim.Adam(ann.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        ann.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(100):
            opt.zero_grad()
            F.cross_entropy(ann(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    ann.eval()
    with torch.no_grad():
        ann_acc = (ann(x_te).argmax(1) == y_te).float().mean().item()
    assert ann_acc > 0.9  # the ANN itself learned the task
    snn = convert(ann, x_tr, mode="99.9%", progress=False)
    rate = simulate(snn, x_te, 256, encoder=ConstantEncoder(), chunk_size=128)
    snn_acc = (rate.argmax(1) == y_te).float().mean().item()
    assert snn_acc >= ann_acc - 0.01, (ann_acc, snn_acc)


def linear_rounding_bound(linear: nn.Linear, x_abs_max: torch.Tensor) -> torch.Tensor:
    """How far two float32 evaluations of ``linear`` that sum in different orders can differ,
    for inputs bounded by ``x_abs_max``: ``2 * gamma_{K+1} * (|W| x_max + |b|)``, with
    ``gamma_n = n u / (1 - n u)`` and ``u = 2^-24`` (each order is within ``gamma`` of the exact
    sum)."""
    k = linear.in_features + 1
    u = 2.0**-24
    gamma = k * u / (1 - k * u)
    mag = linear.weight.detach().abs().double() @ x_abs_max.double()
    if linear.bias is not None:
        mag = mag + linear.bias.detach().abs().double()
    return (2 * gamma * mag).float()


def test_converted_snn_compiles_and_chunks() -> None:
    optimize = pytest.importorskip("snncompile.api").optimize
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3),
    ).eval()
    snn = convert(ann, torch.rand(32, 1, 4, 4), progress=False)
    x_seq = torch.rand(20, 2, 1, 4, 4)
    functional.reset_net(snn)
    with torch.no_grad():
        ref = snn(x_seq)
    compiled = optimize(snn, x_seq[:4], chunk_size=6)
    functional.reset_net(compiled)
    out = compiled(x_seq)
    # The same chunks run eagerly: every torch op sees the same shapes, so the result is exact.
    functional.reset_net(snn)
    with torch.no_grad():
        ref_chunked = torch.cat([snn(x_seq[t : t + 6]) for t in range(0, 20, 6)])
    assert torch.equal(out, ref_chunked)
    # Against the unchunked run only torch's own GEMM may differ: MKL picks its kernel (and its
    # summation order) by the row count T_chunk * N on some CPUs (Intel AVX-512: a last chunk
    # of T=2 differed by 7.45e-9). The spikes are the same, so the outputs differ by at most two
    # summation-order errors of the last Linear (|W| |s| + |b| with |s| <= its output scale).
    last = snn._modules["7"]
    s_max = float(snn._modules["_6_scale_out"].scale)
    bound = linear_rounding_bound(last, torch.full((last.in_features,), s_max))
    assert ((out - ref).abs() <= bound).all()
    # reset_net on the compiled copy restores the half-threshold membrane too.
    functional.reset_net(compiled)
    nodes = [m for m in compiled.modules() if isinstance(m, HalfThresholdIFNode)]
    assert len(nodes) == 2 and all(m.v == 0.5 for m in nodes)
