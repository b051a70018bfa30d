"""Tests for snncompile.learning: STDP, MSTDP and MSTDP-ET against SpikingJelly 2.0.0.

Differential tests use SpikingJelly's functional rules (``functional.learning``) and its learners
(``learning.STDPLearner`` ...). Comparisons run in float64 with ``rtol=1e-6`` (so only a
different formula can fail them) and in float32 with ``rtol=1e-6`` plus an absolute floor of
``1e-6 * max|reference|`` (float32 sums in a different order differ by a few ulps and the
potentiation/depression terms can cancel to near zero).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snncompile import learning
from snncompile.learning import (
    MSTDPETLearner,
    MSTDPLearner,
    STDPLearner,
    mstdp_linear_single_step,
    mstdpet_linear_single_step,
    stdp_conv1d_single_step,
    stdp_conv2d_single_step,
    stdp_linear_single_step,
    stdp_multi_step,
    trace_sequence,
)

F64 = torch.float64
F32 = torch.float32


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """Elementwise ``rtol`` with an absolute floor of ``rtol * max|expected|`` (float32 sums)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = 1e-12 if expected.dtype == F64 else rtol * max(scale, 1.0)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def spikes(*shape: int, p: float = 0.4, dtype: torch.dtype = F64) -> torch.Tensor:
    return (torch.rand(*shape) < p).to(dtype)


@pytest.fixture(scope="module")
def sj_fl(sj):
    """SpikingJelly's functional learning rules."""
    return importlib.import_module("spikingjelly.activation_based.functional.learning")


@pytest.fixture(scope="module")
def sj_learning(sj):
    """SpikingJelly's learning package (imports tensorboard through its monitor module)."""
    try:
        return importlib.import_module("spikingjelly.activation_based.learning")
    except Exception as exc:  # pragma: no cover - environment dependent
        pytest.skip(f"spikingjelly learning not importable ({exc!r}); pip install tensorboard")


def f_pre_custom(w: torch.Tensor) -> torch.Tensor:
    return torch.clamp(w + 1.0, min=0.0) ** 2


def f_post_custom(w: torch.Tensor) -> torch.Tensor:
    return torch.clamp(1.0 - w, min=0.0)


FS = [(None, None), (f_pre_custom, f_post_custom)]


def _fkw(fs):
    f_pre, f_post = fs
    return {} if f_pre is None else {"f_pre": f_pre, "f_post": f_post}


# ------------------------------------------------------------------------------------------------
# functional rules vs SpikingJelly's functional rules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("fs", FS)
def test_linear_single_step_matches_sj(sj_fl, dtype, fs):
    fc = nn.Linear(6, 4, dtype=dtype)
    w = fc.weight.detach()
    tp = tq = None
    ref = (torch.zeros(3, 6, dtype=dtype), torch.zeros(3, 4, dtype=dtype))
    for _ in range(6):
        x, y = spikes(3, 6, dtype=dtype), spikes(3, 4, dtype=dtype)
        tp, tq, dw = stdp_linear_single_step(fc, x, y, tp, tq, 2.0, 5.0, **_fkw(fs))
        dw_ref, ref = sj_fl.stdp_linear_step(x, y, ref, w, tau_pre=2.0, tau_post=5.0, **_fkw(fs))
        assert_rel(dw, dw_ref)
        assert_rel(tp, ref[0])
        assert_rel(tq, ref[1])


@pytest.mark.parametrize("fs", FS)
def test_conv1d_single_step_matches_sj(sj_fl, fs):
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, dtype=F64)
    tp = tq = None
    ref = (torch.zeros(2, 2, 11, dtype=F64), torch.zeros(2, 3, 5, dtype=F64))
    for _ in range(5):
        x, y = spikes(2, 2, 9), spikes(2, 3, 5)
        tp, tq, dw = stdp_conv1d_single_step(conv, x, y, tp, tq, 3.0, 2.0, **_fkw(fs))
        dw_ref, ref = sj_fl.stdp_conv1d_step(
            F.pad(x, (1, 1)),
            y,
            ref,
            conv.weight.detach(),
            stride=(2,),
            tau_pre=3.0,
            tau_post=2.0,
            **_fkw(fs),
        )
        assert_rel(dw, dw_ref)
        assert_rel(tp, ref[0])  # trace_pre lives on the padded input
        assert_rel(tq, ref[1])


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("fs", FS)
def test_conv2d_single_step_stride2_padding1_matches_sj(sj_fl, dtype, fs):
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=dtype)
    tp = tq = None
    ref = (torch.zeros(2, 2, 10, 10, dtype=dtype), torch.zeros(2, 3, 4, 4, dtype=dtype))
    for _ in range(5):
        x, y = spikes(2, 2, 8, 8, dtype=dtype), spikes(2, 3, 4, 4, dtype=dtype)
        tp, tq, dw = stdp_conv2d_single_step(conv, x, y, tp, tq, 2.0, 4.0, **_fkw(fs))
        dw_ref, ref = sj_fl.stdp_conv2d_step(
            F.pad(x, (1, 1, 1, 1)),
            y,
            ref,
            conv.weight.detach(),
            stride=(2, 2),
            tau_pre=2.0,
            tau_post=4.0,
            **_fkw(fs),
        )
        assert_rel(dw, dw_ref)
        assert_rel(tp, ref[0])
        assert_rel(tq, ref[1])


def test_conv2d_rectangular_kernel_and_uneven_stride(sj_fl):
    conv = nn.Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(0, 2), dtype=F64)
    x = spikes(2, 3, 7, 6)
    y = spikes(*conv(x).shape)
    tp, tq, dw = stdp_conv2d_single_step(conv, x, y, 1.5, None, 2.0, 2.0)
    ref_tr = (torch.full((2, 3, 7, 10), 1.5, dtype=F64), torch.zeros_like(y))
    dw_ref, ref = sj_fl.stdp_conv2d_step(
        F.pad(x, (2, 2, 0, 0)),
        y,
        ref_tr,
        conv.weight.detach(),
        stride=(1, 2),
        tau_pre=2.0,
        tau_post=2.0,
    )
    assert_rel(dw, dw_ref)
    assert_rel(tp, ref[0])


@pytest.mark.parametrize("fs", FS)
def test_mstdp_single_step_matches_sj(sj_fl, fs):
    fc = nn.Linear(5, 3, dtype=F64)
    tp = tq = None
    ref = (torch.zeros(4, 5, dtype=F64), torch.zeros(4, 3, dtype=F64))
    for _ in range(4):
        x, y = spikes(4, 5), spikes(4, 3)
        tp, tq, e = mstdp_linear_single_step(fc, x, y, tp, tq, 2.0, 3.0, **_fkw(fs))
        e_ref, ref = sj_fl.mstdp_linear_step(
            x, y, ref, fc.weight.detach(), tau_pre=2.0, tau_post=3.0, **_fkw(fs)
        )
        assert e.shape == (4, 3, 5)
        assert_rel(e, e_ref)
        assert_rel(tp, ref[0])
        assert_rel(tq, ref[1])


@pytest.mark.parametrize("fs", FS)
def test_mstdpet_single_step_matches_sj(sj_fl, fs):
    fc = nn.Linear(5, 3, dtype=F64)
    tp = tq = None
    ref = (torch.zeros(5, dtype=F64), torch.zeros(3, dtype=F64))
    for _ in range(4):
        x, y = spikes(5), spikes(3)
        tp, tq, e = mstdpet_linear_single_step(fc, x, y, tp, tq, 2.0, 3.0, 4.0, **_fkw(fs))
        e_ref, ref = sj_fl.mstdpet_linear_step(
            x, y, ref, fc.weight.detach(), tau_pre=2.0, tau_post=3.0, **_fkw(fs)
        )
        assert_rel(e, e_ref)
        assert_rel(tp, ref[0])
        assert_rel(tq, ref[1])


# ------------------------------------------------------------------------------------------------
# multi-step: batched vs loop vs SpikingJelly
# ------------------------------------------------------------------------------------------------
def _layers(dtype):
    return [
        (nn.Linear(6, 4, dtype=dtype), (3, 6), (3, 4)),
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dtype=dtype), (2, 2, 9), (2, 3, 5)),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=dtype), (2, 2, 8, 8), (2, 3, 4, 4)),
    ]


def _sj_single(sj_fl, layer, x, y, traces, tau_pre, tau_post, fkw):
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return sj_fl.stdp_linear_step(x, y, traces, w, tau_pre=tau_pre, tau_post=tau_post, **fkw)
    x = F.pad(x, layer._reversed_padding_repeated_twice)
    rule = sj_fl.stdp_conv1d_step if isinstance(layer, nn.Conv1d) else sj_fl.stdp_conv2d_step
    return rule(x, y, traces, w, stride=layer.stride, tau_pre=tau_pre, tau_post=tau_post, **fkw)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("fs", FS)
@pytest.mark.parametrize("index", [0, 1, 2], ids=["linear", "conv1d", "conv2d"])
def test_multi_step_matches_sj_loop(sj_fl, dtype, fs, index):
    layer, in_shape, out_shape = _layers(dtype)[index]
    steps = 12
    x, y = spikes(steps, *in_shape, dtype=dtype), spikes(steps, *out_shape, dtype=dtype)
    tp, tq, dw = stdp_multi_step(layer, x, y, None, None, 2.0, 5.0, **_fkw(fs))
    tp_l, tq_l, dw_l = stdp_multi_step(layer, x, y, None, None, 2.0, 5.0, batched=False, **_fkw(fs))
    pre0 = (
        x[0]
        if isinstance(layer, nn.Linear)
        else F.pad(x[0], layer._reversed_padding_repeated_twice)
    )
    ref = (torch.zeros_like(pre0), torch.zeros_like(y[0]))
    dw_ref = torch.zeros_like(layer.weight.detach())
    for t in range(steps):
        d, ref = _sj_single(sj_fl, layer, x[t], y[t], ref, 2.0, 5.0, _fkw(fs))
        dw_ref += d
    for ours in ((tp, tq, dw), (tp_l, tq_l, dw_l)):
        assert_rel(ours[0], ref[0])
        assert_rel(ours[1], ref[1])
        assert_rel(ours[2], dw_ref)


@pytest.mark.parametrize("method", ["matmul", "recurrence"])
@pytest.mark.parametrize("index", [0, 2], ids=["linear", "conv2d"])
def test_multi_step_trace_methods_match_sj_float32(sj_fl, monkeypatch, method, index):
    # Force one trace method inside stdp_multi_step (normally chosen by step size).
    monkeypatch.setattr(
        learning, "MATMUL_TRACE_MAX_STEP", 10**12 if method == "matmul" else 0
    )
    layer, in_shape, out_shape = _layers(F32)[index]
    x, y = spikes(20, *in_shape, dtype=F32), spikes(20, *out_shape, dtype=F32)
    tp, tq, dw = stdp_multi_step(layer, x, y, 0.5, None, 3.0, 2.0)
    pad = getattr(layer, "_reversed_padding_repeated_twice", None)
    pre0 = x[0] if pad is None else F.pad(x[0], pad)
    ref = (torch.full_like(pre0, 0.5), torch.zeros_like(y[0]))
    dw_ref = torch.zeros_like(layer.weight.detach())
    for t in range(20):
        d, ref = _sj_single(sj_fl, layer, x[t], y[t], ref, 3.0, 2.0, {})
        dw_ref += d
    assert_rel(tp, ref[0])
    assert_rel(tq, ref[1])
    assert_rel(dw, dw_ref)


@pytest.mark.parametrize("block_bytes", [1, 3000, 10**9], ids=["1step", "fewsteps", "whole"])
@pytest.mark.parametrize("fs", FS)
@pytest.mark.parametrize("index", [0, 1, 2], ids=["linear", "conv1d", "conv2d"])
def test_multi_step_time_blocks_carry_traces(monkeypatch, block_bytes, fs, index):
    # The weight change is formed over blocks of steps; the traces must carry across blocks.
    monkeypatch.setattr(learning, "STDP_BLOCK_BYTES", block_bytes)
    layer, in_shape, out_shape = _layers(F64)[index]
    x, y = spikes(11, *in_shape), spikes(11, *out_shape)
    start_pre = 0.25
    got = stdp_multi_step(layer, x, y, start_pre, None, 2.0, 3.0, **_fkw(fs))
    ref = stdp_multi_step(layer, x, y, start_pre, None, 2.0, 3.0, batched=False, **_fkw(fs))
    for a, b in zip(got, ref, strict=True):
        assert_rel(a, b)


def test_learner_accepts_spikingjelly_modules(sj, sj_learning):
    # Users migrating keep their SpikingJelly layers and neurons: our learner must drive them.
    conv = sj.layer.Conv2d(2, 3, 3, stride=2, padding=1, bias=False, step_mode="m")
    conv_ref = sj.layer.Conv2d(2, 3, 3, stride=2, padding=1, bias=False, step_mode="m")
    conv_ref.load_state_dict(conv.state_dict())
    sn = sj.neuron.LIFNode(v_threshold=0.3, step_mode="m")
    sn_ref = sj.neuron.LIFNode(v_threshold=0.3, step_mode="m")
    ours = STDPLearner("m", conv, sn, 2.0, 2.0)
    theirs = sj_learning.STDPLearner("m", conv_ref, sn_ref, 2.0, 2.0)
    x = spikes(6, 2, 2, 8, 8, dtype=F32)
    sn(conv(x)), sn_ref(conv_ref(x))
    ours.step(on_grad=True)
    theirs.step(on_grad=True)
    assert_rel(conv.weight.grad, conv_ref.weight.grad)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_trace_sequence_batched_equals_loop(dtype):
    # T spans several chunks (and a partial last chunk); both decay kinds; a tensor start value.
    steps = 75
    s = spikes(steps, 3, 7, p=0.3, dtype=dtype)
    start = torch.rand(3, 7, dtype=dtype)
    for tau, exponential in ((3.0, False), (1.0, False), (20.0, False), (2.5, True)):
        decay = math.exp(-1 / tau) if exponential else None
        x = start.clone()
        loop = []
        for t in range(steps):
            x = x * decay + s[t] if exponential else x - x / tau + s[t]
            loop.append(x)
        loop = torch.stack(loop)
        batched = trace_sequence(s, start, tau, exponential, method="matmul", chunk=16)
        assert_rel(batched, loop)
        assert_rel(trace_sequence(s, start, tau, exponential, method="matmul"), loop)
        assert_rel(trace_sequence(s, start, tau, exponential, method="recurrence"), loop)
        # also into a strided view (how the multi-step STDP path uses it)
        buf = torch.zeros(steps, 6, 7, dtype=dtype)
        trace_sequence(s, start, tau, exponential, method="matmul", out=buf[:, 3:])
        assert_rel(buf[:, 3:], loop)
        assert torch.count_nonzero(buf[:, :3]) == 0


def test_multi_step_initial_traces_and_continuation():
    # Splitting a sequence in two and carrying the traces gives the same delta_w as one call.
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=F64)
    x, y = spikes(10, 2, 2, 8, 8), spikes(10, 2, 3, 4, 4)
    tp, tq, dw = stdp_multi_step(conv, x, y, None, None, 3.0, 3.0)
    tp1, tq1, dw1 = stdp_multi_step(conv, x[:4], y[:4], None, None, 3.0, 3.0)
    tp2, tq2, dw2 = stdp_multi_step(conv, x[4:], y[4:], tp1, tq1, 3.0, 3.0)
    assert_rel(dw1 + dw2, dw)
    assert_rel(tp2, tp)
    assert_rel(tq2, tq)


# ------------------------------------------------------------------------------------------------
# learners vs SpikingJelly's learners, driven through real layers and neurons
# ------------------------------------------------------------------------------------------------
def _our_neuron(sj):
    """Our IFNode once snncompile.neuron provides it, otherwise SpikingJelly's."""
    from snncompile import neuron

    return getattr(neuron, "IFNode", sj.neuron.IFNode)


def _our_layer(sj, name: str):
    from snncompile import layer

    return getattr(layer, name, getattr(sj.layer, name))


def _make_pair(sj, index, step_mode, dtype=F32):
    """Two identical (synapse, neuron) pairs: ours (snncompile modules) and SpikingJelly's."""
    kinds = [
        ("Linear", (6, 4), {}),
        ("Conv1d", (2, 3, 3), {"stride": 2, "padding": 1}),
        ("Conv2d", (2, 3, 3), {"stride": 2, "padding": 1}),
    ]
    name, args, kw = kinds[index]
    ours = _our_layer(sj, name)(*args, **kw, bias=False, step_mode=step_mode).to(dtype)
    theirs = getattr(sj.layer, name)(*args, **kw, bias=False, step_mode=step_mode).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand_like(ours.weight) * 0.8 + 0.1)
        theirs.weight.copy_(ours.weight)
    sn_ours = _our_neuron(sj)(v_threshold=0.5, step_mode=step_mode)
    sn_theirs = sj.neuron.IFNode(v_threshold=0.5, step_mode=step_mode)
    in_shape = [(6,), (2, 9), (2, 8, 8)][index]
    return (ours, sn_ours), (theirs, sn_theirs), in_shape


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("fs", FS)
@pytest.mark.parametrize("index", [0, 1, 2], ids=["linear", "conv1d", "conv2d"])
def test_stdp_learner_matches_sj(sj, sj_learning, step_mode, fs, index):
    (fc, sn), (fc_sj, sn_sj), in_shape = _make_pair(sj, index, step_mode)
    ours = STDPLearner(step_mode, fc, sn, 2.0, 3.0, **_fkw(fs))
    theirs = sj_learning.STDPLearner(step_mode, fc_sj, sn_sj, 2.0, 3.0, **_fkw(fs))
    for rnd in range(3):
        for _ in range(2):  # two forward calls per learner step
            x = (
                spikes(4, 2, *in_shape, dtype=F32)
                if step_mode == "m"
                else spikes(2, *in_shape, dtype=F32)
            )
            out = sn(fc(x))
            out_sj = sn_sj(fc_sj(x))
            assert torch.equal(out, out_sj)
        if rnd == 1:
            grad_before = fc.weight.grad.clone()
            dw = ours.step(on_grad=False, scale=0.5)
            dw_sj = theirs.step(on_grad=False, scale=0.5)
            assert_rel(dw, dw_sj)
            assert torch.equal(fc.weight.grad, grad_before)  # on_grad=False leaves grad alone
        else:
            ours.step(on_grad=True)
            theirs.step(on_grad=True)
            assert_rel(fc.weight.grad, fc_sj.weight.grad)
        assert_rel(ours.trace_pre, theirs.trace_pre)
        assert_rel(ours.trace_post, theirs.trace_post)
        assert len(ours.in_spike_monitor.records) == 0


def test_stdp_learner_on_grad_sgd_increases_weight_by_lr_delta_w():
    fc = nn.Linear(5, 3, bias=False)
    sn = nn.Identity()  # any module emitting the post spikes works
    learner = STDPLearner("s", fc, sn, 2.0, 2.0)
    probe = STDPLearner("s", fc, None, 2.0, 2.0, hooks=False)
    opt = torch.optim.SGD(fc.parameters(), lr=0.1)
    for _ in range(3):  # several steps: at the first step potentiation and depression cancel
        x = spikes(2, 5, dtype=F32)
        y = (fc(x) > 0).float()
        sn(y)
        probe.record(x, y)
    expected = probe.step(on_grad=False)
    w0 = fc.weight.detach().clone()
    opt.zero_grad()
    learner.step(on_grad=True)
    opt.step()
    assert expected.abs().sum() > 0
    assert_rel(fc.weight.detach() - w0, 0.1 * expected, rtol=1e-5)


def test_single_step_records_are_batched_like_a_sequence():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
    a = STDPLearner("s", conv, None, 2.0, 4.0, hooks=False)
    b = STDPLearner("s", conv, None, 2.0, 4.0, hooks=False)
    xs, ys = spikes(5, 2, 2, 8, 8, dtype=F32), spikes(5, 2, 3, 4, 4, dtype=F32)
    dw_one_by_one = 0
    for t in range(5):
        a.record(xs[t], ys[t])
        dw_one_by_one = dw_one_by_one + a.step(on_grad=False)
        b.record(xs[t], ys[t])
    dw_batched = b.step(on_grad=False)
    assert_rel(dw_batched, dw_one_by_one)
    assert_rel(b.trace_pre, a.trace_pre)


def test_hookless_record_equals_hooks():
    fc = nn.Linear(6, 4, bias=False)
    sn = nn.Sigmoid()
    hooked = STDPLearner("m", fc, sn, 2.0, 2.0)
    fed = STDPLearner("m", fc, None, 2.0, 2.0, hooks=False)
    x = spikes(5, 3, 6, dtype=F32)
    y = sn(fc(x))
    fed.record(x, y)
    assert_rel(fed.step(on_grad=False), hooked.step(on_grad=False))


def test_learner_enable_disable_reset_close():
    fc, sn = nn.Linear(4, 2), nn.ReLU()
    learner = STDPLearner("s", fc, sn, 2.0, 2.0)
    x = spikes(1, 4, dtype=F32)
    sn(fc(x))
    assert len(learner.in_spike_monitor.records) == 1
    learner.disable()
    sn(fc(x))
    assert len(learner.in_spike_monitor.records) == 1
    learner.enable()
    sn(fc(x))
    assert len(learner.out_spike_monitor.records) == 2
    learner.step(on_grad=False)
    assert learner.trace_pre is not None
    learner.reset()
    assert learner.trace_pre is None and learner.trace_post is None
    assert learner.step() is None  # nothing recorded: no update, no state change
    learner.close()
    sn(fc(x))
    assert len(learner.in_spike_monitor.records) == 0
    with pytest.raises(RuntimeError, match="closed"):
        learner.enable()


@pytest.mark.parametrize("fs", FS)
def test_mstdp_learner_matches_sj_with_reward_lag(sj, sj_learning, fs):
    (fc, sn), (fc_sj, sn_sj), _ = _make_pair(sj, 0, "s", dtype=F64)
    ours = MSTDPLearner("s", 3, fc, sn, 2.0, 3.0, **_fkw(fs))
    theirs = sj_learning.MSTDPLearner("s", fc_sj, sn_sj, 2.0, 3.0, **_fkw(fs))
    rewards = [torch.tensor([1.0, -0.5, 2.0]), 0.7, torch.tensor([0.0, 1.0, -1.0]), -2.0, 1.0]
    for i, r in enumerate(rewards):
        x = spikes(3, 6, p=0.6)
        assert torch.equal(sn(fc(x)), sn_sj(fc_sj(x)))
        dw = ours.step(r, on_grad=False)
        dw_sj = theirs.step(r, on_grad=False)
        if i == 0:
            assert torch.count_nonzero(dw) == 0  # reward acts on the previous eligibility
        assert_rel(dw, dw_sj)
        assert_rel(ours.eligibility, theirs.eligibility)
    # the lag itself: the update equals reward . eligibility of the previous step
    prev = ours.eligibility.clone()
    x = spikes(3, 6, p=0.6)
    sn(fc(x))
    sn_sj(fc_sj(x))
    ours.step(torch.tensor([1.0, 2.0, 3.0]), on_grad=True, scale=0.5)
    theirs.step(torch.tensor([1.0, 2.0, 3.0]), on_grad=True, scale=0.5)
    assert_rel(fc.weight.grad, fc_sj.weight.grad)
    expected = -0.5 * (torch.tensor([1.0, 2.0, 3.0], dtype=F64)[:, None, None] * prev).sum(0)
    assert_rel(fc.weight.grad, expected)


@pytest.mark.parametrize("fs", FS)
def test_mstdpet_learner_matches_sj(sj, sj_learning, fs):
    fc = nn.Linear(6, 4, bias=False, dtype=F64)
    fc_sj = nn.Linear(6, 4, bias=False, dtype=F64)
    fc_sj.load_state_dict(fc.state_dict())
    sn, sn_sj = nn.Identity(), nn.Identity()
    ours = MSTDPETLearner("s", fc, sn, 2.0, 3.0, 5.0, **_fkw(fs))
    theirs = sj_learning.MSTDPETLearner("s", fc_sj, sn_sj, 2.0, 3.0, 5.0, **_fkw(fs))
    for i, r in enumerate([1.0, -1.0, 0.5, 2.0, torch.tensor(-0.3)]):
        x, y = spikes(6), spikes(4)
        fc(x), sn(y)
        fc_sj(x), sn_sj(y)
        on_grad = i % 2 == 1
        dw = ours.step(r, on_grad=on_grad, scale=2.0)
        dw_sj = theirs.step(r, on_grad=on_grad, scale=2.0)
        if on_grad:
            assert dw is None and dw_sj is None
            assert_rel(fc.weight.grad, fc_sj.weight.grad)
        else:
            assert_rel(dw, dw_sj)
        assert_rel(ours.trace_e, theirs.trace_e)
        assert_rel(ours.eligibility, theirs.eligibility)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_dilation_and_groups_raise_not_implemented():
    x = spikes(1, 4, 8, 8, dtype=F32)
    for conv in (nn.Conv2d(4, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, groups=2)):
        with pytest.raises(NotImplementedError, match="dilation|groups"):
            stdp_conv2d_single_step(conv, x, spikes(1, 4, 4, 4, dtype=F32), None, None, 2.0, 2.0)
        with pytest.raises(NotImplementedError, match="dilation|groups"):
            STDPLearner("s", conv, nn.Identity(), 2.0, 2.0)
    with pytest.raises(NotImplementedError, match="dilation"):
        stdp_conv1d_single_step(
            nn.Conv1d(2, 2, 3, dilation=2),
            spikes(1, 2, 9, dtype=F32),
            spikes(1, 2, 5, dtype=F32),
            None,
            None,
            2.0,
            2.0,
        )


def test_unsupported_synapse_type_is_named():
    with pytest.raises(NotImplementedError, match="MaxPool2d"):
        STDPLearner("s", nn.MaxPool2d(2), nn.Identity(), 2.0, 2.0)
    with pytest.raises(NotImplementedError, match="Conv2d"):
        MSTDPLearner("s", 2, nn.Conv2d(1, 1, 3), nn.Identity(), 2.0, 2.0)
    with pytest.raises(NotImplementedError, match="Conv1d"):
        stdp_linear_single_step(
            nn.Conv1d(1, 1, 3), spikes(1, 1, 5), spikes(1, 1, 3), None, None, 2.0, 2.0
        )


def test_shape_mismatches_raise_value_error():
    fc = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="expects 5 input"):
        stdp_linear_single_step(fc, spikes(2, 4), spikes(2, 3), None, None, 2.0, 2.0)
    with pytest.raises(ValueError, match="batch"):
        stdp_linear_single_step(fc, spikes(2, 5), spikes(3, 3), None, None, 2.0, 2.0)
    with pytest.raises(ValueError, match="reset"):
        stdp_linear_single_step(fc, spikes(2, 5), spikes(2, 3), torch.zeros(4, 5), None, 2.0, 2.0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="spatial shape"):
        stdp_conv2d_single_step(conv, spikes(1, 2, 8, 8), spikes(1, 3, 8, 8), None, None, 2.0, 2.0)
    with pytest.raises(ValueError, match="T="):
        stdp_multi_step(fc, spikes(4, 2, 5), spikes(3, 2, 3), None, None, 2.0, 2.0)
    with pytest.raises(ValueError, match="tau_pre"):
        stdp_linear_single_step(fc, spikes(2, 5), spikes(2, 3), None, None, 0.5, 2.0)


def test_learner_record_errors():
    fc = nn.Linear(5, 3)
    learner = STDPLearner("s", fc, None, 2.0, 2.0, hooks=False)
    learner.in_spike_monitor.record("", spikes(2, 5))
    with pytest.raises(RuntimeError, match="same number of times"):
        learner.step()
    m = MSTDPLearner("s", 2, nn.Linear(5, 3, dtype=F64), None, 2.0, 2.0, hooks=False)
    m.record(spikes(2, 5), spikes(2, 3))
    m.record(spikes(2, 5), spikes(2, 3))
    with pytest.raises(RuntimeError, match="exactly one"):
        m.step(1.0)
    m.reset()
    m.record(spikes(4, 5), spikes(4, 3))
    with pytest.raises(ValueError, match="batch_size=2"):
        m.step(1.0)
    with pytest.raises(ValueError, match="step_mode"):
        MSTDPLearner("m", 2, nn.Linear(5, 3), None, 2.0, 2.0)


def test_public_surface():
    for name in learning.__all__:
        assert hasattr(learning, name)


def test_dropped_learner_leaves_no_hooks():
    import gc

    fc, sn = nn.Linear(4, 2), nn.ReLU()
    learner = STDPLearner("s", fc, sn, 2.0, 2.0)
    assert len(fc._forward_pre_hooks) == 1 and len(sn._forward_hooks) == 1
    del learner
    gc.collect()
    assert len(fc._forward_pre_hooks) == 0 and len(sn._forward_hooks) == 0
