"""Training under optimize(memory_budget=...): recomputed segments, same gradients, BN once."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.runtime.memory import LiveBytes, measure_train_step
from snncompile.runtime.recompute import MemoryBudgetError


def _net(seed: int, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)

    def lif() -> nn.Module:
        return neuron.LIFNode(surrogate_function=surrogate.ATan(), v_threshold=0.3, step_mode="m")

    mods: list[nn.Module] = [
        layer.Conv2d(2, 8, 3, padding=1, bias=False),
        layer.BatchNorm2d(8),
        lif(),
        layer.Conv2d(8, 16, 3, padding=1),
        layer.BatchNorm2d(16),
        lif(),
        layer.Conv2d(16, 8, 3, padding=1),
        layer.BatchNorm2d(8),
        lif(),
        layer.MaxPool2d(4),
        layer.Flatten(),
    ]
    if dropout:
        mods.append(layer.Dropout(0.3))
    mods += [layer.Linear(8 * 4 * 4, 5), lif()]
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


def _step(compiled: nn.Module, model: nn.Module, x: torch.Tensor, seed: int = 0) -> list:
    functional.reset_net(compiled)
    torch.manual_seed(seed)
    y = compiled(x)
    (y * torch.linspace(-1, 1, 5)).sum().backward()
    return [y.detach(), *[p.grad.clone() for p in model.parameters()]]


@pytest.mark.parametrize("seed", range(3))
def test_budget_grads_and_bn_stats_equal(seed: int) -> None:
    model = _net(seed, dropout=seed == 2)
    twin = copy.deepcopy(model)
    x = torch.rand(4, 2, 2, 16, 16) * 3
    plain = snncompile.optimize(model, x)
    budgeted = snncompile.optimize(twin, x, memory_budget="1GB")
    plan = budgeted._memory_plan
    for s in plan.segments:  # every segment recomputed: the strongest check of exactness
        s.recompute = True
    a, b = _step(plain, model, x, seed), _step(budgeted, twin, x, seed)
    assert a[0].sum() > 0
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    # Running statistics: one update per step, as in the unbudgeted compile.
    for p, q in zip(model.buffers(), twin.buffers(), strict=True):
        assert torch.equal(p, q)
    text = budgeted.report()
    assert "memory plan (training" in text and "recompute" in text
    assert re.search(r"peak predicted [0-9.]+ MB, measured [0-9.]+ MB", text)


def test_budget_lowers_memory_kept_after_forward() -> None:
    model = _net(0)
    x = torch.rand(4, 2, 2, 16, 16) * 3
    plain = snncompile.optimize(model, x)
    base = measure_train_step(plain, x)
    budgeted = snncompile.optimize(model, x, memory_budget=int(base.peak * 2))
    assert not any(s.recompute for s in budgeted._memory_plan.segments)  # it fits as it is
    for s in budgeted._memory_plan.segments:
        s.recompute = True
    got = measure_train_step(budgeted, x)
    assert got.after_forward < base.after_forward / 4


def test_budget_too_small_names_smallest() -> None:
    model = _net(1)
    x = torch.rand(4, 2, 2, 16, 16)
    with pytest.raises(MemoryBudgetError, match=r"memory_budget >= '[0-9.]+MB'") as info:
        snncompile.optimize(model, x, memory_budget="1KB")
    smallest = float(re.search(r">= '([0-9.]+)MB'", str(info.value)).group(1))
    snncompile.optimize(model, x, memory_budget=f"{smallest}MB")  # the named budget works


def test_chunk_size_still_refused_in_training() -> None:
    from snncompile.passes.chunk import ChunkingError

    with pytest.raises(ChunkingError, match="inference only"):
        snncompile.optimize(_net(0), torch.rand(4, 2, 2, 16, 16), chunk_size=2)


def test_live_bytes_matches_profiler() -> None:
    """The dispatch-mode counter agrees with torch.profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    model = _net(0)
    x = torch.rand(4, 2, 2, 16, 16)
    compiled = snncompile.optimize(model, x)
    functional.reset_net(compiled)
    compiled(x).sum().backward()  # warm-up
    functional.reset_net(compiled)
    meter = LiveBytes()
    with meter:
        y = compiled(x)
        after = meter.live
        del y
    functional.reset_net(compiled)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = compiled(x)
    events = [e for e in prof.events() if e.cpu_memory_usage != 0]
    # Net bytes allocated during the forward and still alive at its end.
    top = [e for e in events if e.cpu_parent is None]
    net = sum(e.cpu_memory_usage for e in top)
    del y
    assert after > 0
    assert abs(net - after) <= 0.1 * after + 65536


def _all_recomputed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    budgeted = snncompile.optimize(model, x, memory_budget="1GB")
    for s in budgeted._memory_plan.segments:
        s.recompute = True
    return budgeted


def _two_calls_one_backward(compiled: nn.Module, model: nn.Module, x1, x2, between=None) -> list:
    """A loss over two calls (the second after ``between``), then one backward."""
    functional.reset_net(compiled)
    y1 = compiled(x1)
    if between is not None:
        between()
    functional.reset_net(compiled)
    y2 = compiled(x2)
    w = torch.linspace(-1, 1, 5)
    ((y1 * w).sum() + 0.5 * (y2 * w).sum()).backward()
    return [y1.detach(), y2.detach(), *[p.grad.clone() for p in model.parameters()]]


def test_two_forwards_then_one_backward() -> None:
    """Each recomputed segment reruns from its own forward's inputs and states."""
    model = _net(0)
    twin = copy.deepcopy(model)
    x1, x2 = torch.rand(4, 2, 2, 16, 16) * 3, torch.rand(4, 2, 2, 16, 16) * 3
    plain, budgeted = snncompile.optimize(model, x1), _all_recomputed(twin, x1)
    a = _two_calls_one_backward(plain, model, x1, x2)
    b = _two_calls_one_backward(budgeted, twin, x1, x2)
    assert a[0].sum() > 0 and a[1].sum() > 0
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_mode_switch_between_forward_and_backward() -> None:
    """A training forward, then ``eval()`` before backward: the rerun in backward still takes
    the batch statistics (the modes of its forward), as autograd's saved graph does."""
    model = _net(1)
    twin = copy.deepcopy(model)
    x = torch.rand(4, 2, 2, 16, 16) * 3
    plain, budgeted = snncompile.optimize(model, x), _all_recomputed(twin, x)
    got = []
    for compiled, m in ((plain, model), (budgeted, twin)):
        functional.reset_net(compiled)
        y = compiled(x)
        compiled.eval()
        (y * torch.linspace(-1, 1, 5)).sum().backward()
        assert not any(mod.training for mod in compiled.modules())  # the switch is kept
        compiled.train()
        got.append([y.detach(), *[p.grad.clone() for p in m.parameters()]])
    assert got[0][0].sum() > 0
    assert all(torch.equal(u, v) for u, v in zip(*got, strict=True))


def test_create_graph_refused_by_name() -> None:
    """A recomputed segment is rerun in backward without a graph of its own: a double backward
    is refused with a message instead of silently missing its second-order terms."""
    model = _net(0)
    x = (torch.rand(4, 2, 2, 16, 16) * 3).requires_grad_()
    budgeted = _all_recomputed(model, x)
    functional.reset_net(budgeted)
    y = budgeted(x)
    with pytest.raises(RuntimeError, match=r"create_graph=True\) through a recomputed segment"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
