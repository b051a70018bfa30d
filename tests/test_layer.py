"""Differential tests of ``snncompile.layer`` against SpikingJelly 2.0.0's ``layer``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from snncompile import functional, layer, neuron

T, N = 3, 2

# (class name, constructor args, constructor kwargs, single-step input shape)
STATELESS_CASES = [
    ("Conv1d", (2, 3, 3), {"padding": 1}, (N, 2, 7)),
    ("Conv2d", (2, 3, 3), {"padding": 1, "bias": False}, (N, 2, 6, 6)),
    ("Conv2d", (2, 4, 3), {"stride": 2, "groups": 2}, (N, 2, 7, 7)),
    ("Conv3d", (2, 3, 2), {}, (N, 2, 4, 4, 4)),
    ("Linear", (5, 4), {}, (N, 5)),
    ("Linear", (5, 4), {"bias": False}, (N, 6, 5)),
    ("BatchNorm1d", (3,), {}, (N, 3)),
    ("BatchNorm1d", (3,), {"momentum": 0.3}, (N, 3, 5)),
    ("BatchNorm2d", (3,), {}, (N, 3, 4, 4)),
    ("BatchNorm2d", (3,), {"affine": False, "eps": 1e-3}, (N, 3, 4, 4)),
    ("MaxPool2d", (2,), {}, (N, 3, 6, 6)),
    ("MaxPool2d", (3,), {"stride": 2, "padding": 1, "ceil_mode": True}, (N, 3, 7, 7)),
    ("AvgPool2d", (2,), {}, (N, 3, 6, 6)),
    ("AvgPool2d", (3,), {"stride": 1, "padding": 1, "count_include_pad": False}, (N, 3, 5, 5)),
    ("AdaptiveAvgPool2d", ((2, 3),), {}, (N, 3, 7, 6)),
    ("AdaptiveAvgPool2d", (1,), {}, (N, 3, 5, 5)),
    ("Flatten", (), {}, (N, 3, 4, 4)),
    ("Flatten", (), {"start_dim": 2}, (N, 3, 4, 4)),
]


def _ids(cases):
    return [f"{c[0]}-{i}" for i, c in enumerate(cases)]


def _pair(sj, name, args, kwargs, step_mode):
    ours = getattr(layer, name)(*args, **kwargs, step_mode=step_mode)
    theirs = getattr(sj.layer, name)(*args, **kwargs, step_mode=step_mode)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _assert_close(a, b, exact=False):
    if exact:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", STATELESS_CASES, ids=_ids(STATELESS_CASES))
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("training", [True, False])
def test_stateless_layer_matches_spikingjelly(sj, case, step_mode, training):
    name, args, kwargs, shape = case
    ours, theirs = _pair(sj, name, args, kwargs, step_mode)
    ours.train(training)
    theirs.train(training)
    if isinstance(ours, nn.modules.batchnorm._BatchNorm) and not training:
        # Give eval a non-trivial running state.
        with torch.no_grad():
            ours.running_mean.uniform_(-1, 1)
            ours.running_var.uniform_(0.5, 2)
        theirs.load_state_dict(ours.state_dict())
    full = (T, *shape) if step_mode == "m" else shape
    x = torch.randn(full)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    assert y1.shape == y2.shape
    _assert_close(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    _assert_close(x1.grad, x2.grad)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n1 == n2
        _assert_close(p1.grad, p2.grad)
    for (n1, b1), (n2, b2) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        assert n1 == n2  # BN running stats after one step (multi-step pools over T*N).
        _assert_close(b1, b2, exact=b1.dtype == torch.long)


@pytest.mark.parametrize("case", STATELESS_CASES, ids=_ids(STATELESS_CASES))
def test_multi_step_equals_folded_single_step(case):
    """Multi-step on [T, N, *] equals the torch layer on [T*N, *] (train-mode BN included)."""
    name, args, kwargs, shape = case
    ours = getattr(layer, name)(*args, **kwargs, step_mode="m")
    ref = copy.deepcopy(ours)
    ref.step_mode = "s"
    x = torch.randn(T, *shape)
    y = ours(x)
    y_ref = ref(x.flatten(0, 1))
    _assert_close(y, y_ref.reshape(T, N, *y_ref.shape[1:]))


def test_batchnorm2d_multi_step_pools_statistics_over_time():
    bn = layer.BatchNorm2d(2, momentum=1.0, step_mode="m")
    x = torch.randn(T, N, 2, 3, 3)
    bn(x)
    expected_mean = x.transpose(0, 2).reshape(2, -1).mean(1)
    _assert_close(bn.running_mean, expected_mean)
    assert int(bn.num_batches_tracked) == 1


def test_maxpool2d_return_indices_multi_step(sj):
    ours, theirs = _pair(sj, "MaxPool2d", (2,), {"return_indices": True}, "m")
    x = torch.randn(T, N, 2, 4, 4)
    (v1, i1), (v2, i2) = ours(x), theirs(x)
    _assert_close(v1, v2, exact=True)
    _assert_close(i1, i2, exact=True)
    assert v1.shape == i1.shape == (T, N, 2, 2, 2)


@pytest.mark.parametrize(
    "name,args,bad_shape",
    [
        ("Conv2d", (2, 3, 3), (N, 2, 5, 5)),
        ("Conv1d", (2, 3, 3), (N, 2, 5)),
        ("Linear", (4, 3), (N, 4)),
        ("BatchNorm2d", (2,), (N, 2, 4, 4)),
        ("BatchNorm1d", (2,), (N, 2)),
        ("MaxPool2d", (2,), (N, 2, 4, 4)),
        ("AvgPool2d", (2,), (N, 2, 4, 4)),
        ("AdaptiveAvgPool2d", (1,), (N, 2, 4, 4)),
        ("Flatten", (), (4,)),
    ],
)
def test_multi_step_without_time_dim_raises(name, args, bad_shape):
    module = getattr(layer, name)(*args, step_mode="m")
    with pytest.raises(ValueError, match=rf"{name} is in multi-step mode.*\[T, N"):
        module(torch.randn(bad_shape))


def test_multi_step_wrong_rank_raises_with_layout():
    conv = layer.Conv2d(2, 3, 3, step_mode="m")
    with pytest.raises(ValueError, match=r"Conv2d.*\[T, N, C, H, W\].*\(1, 2, 3, 2, 5, 5\)"):
        conv(torch.randn(1, 2, 3, 2, 5, 5))


def test_invalid_step_mode_raises():
    with pytest.raises(ValueError, match="Conv2d.*step_mode"):
        layer.Conv2d(1, 1, 1, step_mode="x")
    lin = layer.Linear(2, 2)
    with pytest.raises(ValueError, match="Linear"):
        lin.step_mode = "multi"


@pytest.mark.parametrize(
    "module",
    [
        layer.Conv2d(1, 2, 3, step_mode="m"),
        layer.Linear(3, 2, step_mode="m"),
        layer.BatchNorm2d(2, step_mode="m"),
        layer.MaxPool2d(2, step_mode="m"),
        layer.AvgPool2d(2, step_mode="m"),
        layer.AdaptiveAvgPool2d(1, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Dropout(0.3, step_mode="m"),
        layer.SeqToANNContainer(nn.ReLU()),
        layer.MultiStepContainer(nn.ReLU()),
        layer.StepModeContainer(False, "m", nn.ReLU()),
    ],
    ids=lambda m: type(m).__name__,
)
def test_extra_repr_shows_step_mode(module):
    assert "step_mode=m" in repr(module)


def test_isinstance_of_torch_layers():
    assert isinstance(layer.Conv2d(1, 1, 1), nn.Conv2d)
    assert isinstance(layer.BatchNorm2d(1), nn.BatchNorm2d)
    assert isinstance(layer.Linear(1, 1), nn.Linear)


# -- Dropout ----------------------------------------------------------------
@pytest.mark.parametrize("cls", ["Dropout", "Dropout2d"])
def test_dropout_multi_step_matches_spikingjelly(sj, cls):
    ours = getattr(layer, cls)(0.4, step_mode="m")
    theirs = getattr(sj.layer, cls)(0.4, step_mode="m")
    x = torch.rand(T, 4, 3, 5, 5) + 0.5
    torch.manual_seed(7)
    y1 = ours(x)
    torch.manual_seed(7)
    y2 = theirs(x)
    _assert_close(y1, y2, exact=True)
    _assert_close(ours.mask, theirs.mask, exact=True)


def test_dropout_mask_shared_across_time_and_scaled():
    p = 0.5
    drop = layer.Dropout(p, step_mode="m")
    x = torch.ones(4, 8, 16)
    y = drop(x)
    for t in range(1, 4):
        torch.testing.assert_close(y[t], y[0], rtol=0, atol=0)
    values = set(torch.unique(y).tolist())
    assert values <= {0.0, 1.0 / (1.0 - p)} and len(values) == 2
    assert drop.mask.shape == (8, 16)


def test_dropout_single_step_keeps_mask_until_reset(sj):
    ours = layer.Dropout(0.5)
    theirs = sj.layer.Dropout(0.5)
    xs = torch.rand(4, 6, 10) + 0.1
    torch.manual_seed(3)
    ys1 = [ours(x) for x in xs]
    torch.manual_seed(3)
    ys2 = [theirs(x) for x in xs]
    for a, b in zip(ys1, ys2, strict=True):
        _assert_close(a, b, exact=True)
    first_mask = ours.mask.clone()
    for x, y in zip(xs, ys1, strict=True):
        _assert_close(y, x * first_mask, exact=True)
    functional.reset_net(ours)
    assert ours.mask is None
    ours(xs[0])
    assert not torch.equal(ours.mask, first_mask)


def test_dropout_eval_is_identity_and_draws_no_mask():
    drop = layer.Dropout(0.5, step_mode="m").eval()
    x = torch.randn(T, N, 5)
    assert drop(x) is x
    assert drop.mask is None


def test_dropout_mask_shape_change_without_reset_raises():
    drop = layer.Dropout(0.5, step_mode="m")
    drop(torch.rand(T, 4, 5))
    with pytest.raises(ValueError, match=r"Dropout: the dropout mask.*\(4, 5\).*reset_net"):
        drop(torch.rand(T, 3, 5))
    functional.reset_net(drop)
    assert drop(torch.rand(T, 3, 5)).shape == (T, 3, 5)


def test_dropout_bad_p_raises():
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\)"):
        layer.Dropout(1.0)


def test_dropout_multi_step_without_time_raises():
    with pytest.raises(ValueError, match="Dropout is in multi-step mode"):
        layer.Dropout(0.5, step_mode="m")(torch.randn(5))


# -- containers ----------------------------------------------------------------
def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def test_seq_to_ann_container_matches_spikingjelly(sj):
    ours = layer.SeqToANNContainer(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    theirs = sj.layer.SeqToANNContainer(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    _copy_params(theirs, ours)
    x = torch.randn(T, N, 2, 5, 5)
    _assert_close(ours(x), theirs(x))
    _assert_close(ours[1].running_var, theirs[1].running_var)


def test_multi_step_container_matches_spikingjelly(sj):
    ours = layer.MultiStepContainer(nn.Linear(4, 3), neuron.LIFNode(tau=2.0))
    theirs = sj.layer.MultiStepContainer(nn.Linear(4, 3), sj.neuron.LIFNode(tau=2.0))
    _copy_params(theirs, ours)
    x = torch.randn(5, N, 4) * 2
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    _assert_close(y1, y2, exact=True)
    y1.sum().backward()
    y2.sum().backward()
    _assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("stateful", [True, False])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_step_mode_container_matches_spikingjelly(sj, stateful, step_mode):
    ours = layer.StepModeContainer(stateful, step_mode, nn.Linear(4, 3), nn.Tanh())
    theirs = sj.layer.StepModeContainer(stateful, step_mode, nn.Linear(4, 3), nn.Tanh())
    _copy_params(theirs, ours)
    x = torch.randn(T, N, 4) if step_mode == "m" else torch.randn(N, 4)
    _assert_close(ours(x), theirs(x))


def test_container_rejects_multi_step_child():
    with pytest.raises(ValueError, match=r"SeqToANNContainer: child 0 \(Conv2d\).*'s'"):
        layer.SeqToANNContainer(layer.Conv2d(1, 1, 1, step_mode="m"))
    with pytest.raises(ValueError, match="MultiStepContainer: child 1"):
        layer.MultiStepContainer(nn.Identity(), neuron.IFNode(step_mode="m"))


def test_multi_step_only_container_rejects_single_step():
    container = layer.SeqToANNContainer(nn.ReLU())
    with pytest.raises(ValueError, match="SeqToANNContainer"):
        container.step_mode = "s"
    with pytest.raises(ValueError, match="SeqToANNContainer is in multi-step mode"):
        container(torch.randn(4))


def test_small_spiking_net_matches_spikingjelly(sj):
    """A conv-BN-LIF-pool-flatten-linear stack in multi-step mode, forward and backward."""

    def build(lay, neu):
        return nn.Sequential(
            lay.Conv2d(1, 4, 3, padding=1, bias=False),
            lay.BatchNorm2d(4),
            neu.LIFNode(),
            lay.MaxPool2d(2),
            lay.Flatten(),
            lay.Linear(4 * 4 * 4, 5),
            neu.LIFNode(),
        )

    ours = build(layer, neuron)
    theirs = build(sj.layer, sj.neuron)
    _copy_params(theirs, ours)
    functional.set_step_mode(ours, "m")
    sj.functional.set_step_mode(theirs, "m")
    x = torch.rand(4, N, 1, 8, 8) * 3
    y1, y2 = ours(x), theirs(x)
    _assert_close(y1, y2, exact=True)
    (y1 * torch.arange(5)).sum().backward()
    (y2 * torch.arange(5)).sum().backward()
    for p1, p2 in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6)
