"""Tests for snncompile.monitor: input/output monitors, also against SpikingJelly's monitors."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from snncompile.monitor import BaseMonitor, InputMonitor, OutputMonitor


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU())


def test_output_monitor_records_per_module_in_call_order():
    net = _net()
    mon = OutputMonitor(net, nn.ReLU)
    assert mon.monitored_layers == ["1", "3"]
    x = torch.rand(5, 4)
    y = net(x)
    net(x)
    assert len(mon) == 4
    assert torch.equal(mon["3"][0], y)
    assert torch.equal(mon[0], torch.relu(net[0](x)))
    assert mon.name_records_index == {"1": [0, 2], "3": [1, 3]}


def test_input_monitor_unwraps_single_input_and_applies_function():
    fc = nn.Linear(4, 3)
    mon = InputMonitor(fc, function_on_input=lambda t: t * 2)
    x = torch.rand(2, 4, requires_grad=True)
    fc(x)
    assert mon.monitored_layers == [""]
    assert torch.equal(mon.records[0], x * 2)
    detach_mon = InputMonitor(fc, function_on_input=torch.Tensor.detach)
    fc(x)
    assert not detach_mon.records[0].requires_grad


def test_enable_disable_clear_close_and_context_manager():
    fc = nn.Linear(4, 3)
    x = torch.rand(1, 4)
    with OutputMonitor(fc) as mon:
        fc(x)
        mon.disable()
        assert not mon.is_enable()
        fc(x)
        assert len(mon) == 1
        mon.enable()
        fc(x)
        assert len(mon) == 2
        mon.clear_recorded_data()
        assert len(mon) == 0 and mon.name_records_index[""] == []
    # leaving the context removed the hooks
    assert mon.hooks == []
    fc(x)
    assert len(mon) == 0
    assert len(fc._forward_hooks) == 0


def test_hookless_monitor_is_a_buffer_fed_by_record():
    fc = nn.Linear(4, 3)
    mon = OutputMonitor(fc, hooks=False)
    fc(torch.rand(1, 4))
    assert len(mon) == 0 and len(fc._forward_hooks) == 0
    mon.record("", torch.ones(3))
    mon.record("other", torch.zeros(3))
    assert mon.monitored_layers == ["", "other"]
    assert torch.equal(mon["other"][0], torch.zeros(3))
    mon.disable()
    mon.record("", torch.ones(3))
    assert len(mon) == 2
    base = BaseMonitor()
    with pytest.raises(KeyError, match="no monitored module"):
        base["missing"]


def test_records_match_spikingjelly_monitors(sj):
    try:
        sj_monitor = importlib.import_module("spikingjelly.activation_based.monitor")
    except Exception as exc:  # pragma: no cover - environment dependent
        pytest.skip(f"spikingjelly monitor not importable ({exc!r})")
    net = _net()
    ours_in, ours_out = InputMonitor(net, nn.Linear), OutputMonitor(net, nn.ReLU)
    sj_in = sj_monitor.InputMonitor(net, nn.Linear)
    sj_out = sj_monitor.OutputMonitor(net, nn.ReLU)
    for _ in range(3):
        net(torch.rand(2, 4))
    for ours, theirs in ((ours_in, sj_in), (ours_out, sj_out)):
        assert ours.monitored_layers == theirs.monitored_layers
        assert ours.name_records_index == theirs.name_records_index
        assert all(torch.equal(a, b) for a, b in zip(ours.records, theirs.records, strict=True))


def test_dropped_monitor_removes_its_hooks():
    import gc

    fc = nn.Linear(4, 3)
    mon = InputMonitor(fc)
    assert len(fc._forward_pre_hooks) == 1
    del mon
    gc.collect()
    assert len(fc._forward_pre_hooks) == 0
    fc(torch.rand(1, 4))  # no stale hook left behind
