"""Training in chunks of time (runtime.time_chunks): same outputs and gradients, bounded memory.

The oracle is the unbudgeted compile of the same model and SpikingJelly 2.0.0 eager: outputs
bit-equal, gradients (parameters and input) within float rounding -- the parameter gradients are
sums over chunks, added in another order than the unchunked backward's sum over ``T*N`` rows.
"""

from __future__ import annotations

import re

import pytest
import torch
from time_chunk_helpers import buffers_restored, train_step
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.runtime.memory import LiveBytes, measure_train_step
from snncompile.runtime.recompute import MemoryBudgetError
from snncompile.runtime.time_chunks import TimeChunks, chunk_reruns, time_chunk_blocker

sj = pytest.importorskip("spikingjelly.activation_based", reason="SpikingJelly 2.0.0 is the oracle")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

#: (neuron class name, keyword arguments, surrogate): IF/LIF/PLIF variants, every state layout.
NEURONS = [
    ("IFNode", {}, "ATan"),
    ("LIFNode", {"tau": 2.0, "decay_input": False, "v_reset": None}, "Sigmoid"),
    ("LIFNode", {"tau": 3.0, "detach_reset": True}, "PiecewiseQuadratic"),
    ("ParametricLIFNode", {"init_tau": 3.0}, "Erf"),
    ("ParametricLIFNode", {"init_tau": 2.0, "v_reset": None, "decay_input": False}, "SoftSign"),
    ("IzhikevichNode", {"a": 0.2, "b": 0.3}, "ATan"),
    ("QIFNode", {"tau": 2.0, "v_reset": None}, "Sigmoid"),
]
#: (chunk size, chunk-start states kept): T=6 in 1-step chunks with 2 or 3 states kept (binomial
#: reversal), uneven 4 + 2 with all kept, 3 chunks of 2 recomputed from the first one.
CHUNKS = [(1, 2), (4, "all"), (2, 1), (1, 3), (1, 4)]


def _sj_net(kind: str, kw: dict, sg: str, *, bn_eval: bool, dropout: bool) -> nn.Module:
    def node() -> nn.Module:
        return getattr(sj_neuron, kind)(
            surrogate_function=getattr(sj_surrogate, sg)(), v_threshold=0.4, step_mode="m", **kw
        )

    mods: list[nn.Module] = [sj_layer.Conv2d(2, 6, 3, padding=1)]
    if bn_eval:
        bn = sj_layer.BatchNorm2d(6)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        mods.append(bn.eval())  # frozen BatchNorm: the running statistics normalize
    # The neuron then pooling: with BN, one fused chain (multi-state neurons included).
    mods += [node(), sj_layer.MaxPool2d(2), sj_layer.Flatten()]
    if dropout:
        mods.append(sj_layer.Dropout(0.3))
    fc = sj_layer.Linear(6 * 4 * 4, 5)
    with torch.no_grad():
        fc.weight.mul_(4.0)  # enough drive for the output neurons to spike
        fc.bias.add_(0.5)
    mods += [fc, node()]
    net = nn.Sequential(*mods)
    sj_functional.set_step_mode(net, "m")
    return net


def _step(model: nn.Module, run, x: torch.Tensor, reset, seed: int = 0) -> list[torch.Tensor]:
    y, gx, grads, _ = train_step(model, reset, run, x, seed=seed)
    return [y, gx, *grads]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).abs().max() <= rel * a.abs().max() + 1e-7)


@pytest.mark.parametrize("bn_eval,dropout", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("kind,kw,sg", NEURONS, ids=[f"{n[0]}-{n[2]}" for n in NEURONS])
def test_chunked_equals_compile_and_spikingjelly(
    kind: str, kw: dict, sg: str, bn_eval: bool, dropout: bool
) -> None:
    torch.manual_seed(NEURONS.index((kind, kw, sg)) + 10 * bn_eval + 20 * dropout)
    model = _sj_net(kind, kw, sg, bn_eval=bn_eval, dropout=dropout)
    x = torch.rand(6, 3, 2, 8, 8) * 2
    compiled = snncompile.optimize(model, x, mode="train")
    assert time_chunk_blocker(compiled.gm, compiled.graph, x) is None
    buffers = [b.clone() for b in model.buffers()]
    ref = _step(model, model, x, lambda: sj_functional.reset_net(model))
    plain = _step(model, compiled, x, lambda: functional.reset_net(compiled))
    assert ref[0].sum() > 0 and ref[0].sum() < ref[0].numel()  # some spikes, not all
    assert torch.equal(ref[0], plain[0])
    for chunk, keep in CHUNKS:
        tc = TimeChunks(compiled.gm, chunk, keep)
        got = _step(model, tc.run, x, lambda: functional.reset_net(compiled))
        assert torch.equal(got[0], plain[0]), (chunk, keep)  # outputs bit-equal
        for u, v, w in zip(plain[1:], got[1:], ref[1:], strict=True):
            assert _close(u, v, 1e-5), (chunk, keep)  # vs the unbudgeted compile
            assert _close(w, v, 1e-4), (chunk, keep)  # vs SpikingJelly eager
    for b, before in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, before)  # frozen BatchNorm statistics untouched


@pytest.mark.parametrize("keep", ["all", 1, 2, 3, 5])
def test_reruns_match_the_schedule(keep: str | int) -> None:
    """The backward runs as many chunks as :func:`chunk_reruns` says (the planner's time cost)."""
    model = _nobn_net(4)
    x = torch.rand(13, 2, 2, 16, 16) * 3
    compiled = snncompile.optimize(model, x)
    calls = []
    handle = compiled.gm.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        functional.reset_net(compiled)
        y = TimeChunks(compiled.gm, 2, keep).run(x)
        forward = len(calls)
        y.sum().backward()
    finally:
        handle.remove()
    assert forward == 7 and sum(calls[:forward]) == 13  # chunks of 2 steps, the last one of 1
    assert len(calls) - forward == chunk_reruns(7, keep)


def test_single_step_model_with_per_step_batchnorm() -> None:
    """A single-step model's training BatchNorm normalizes each step alone: it qualifies, and the
    running statistics are updated once per step, as in the unbudgeted compile."""
    torch.manual_seed(3)
    model = nn.Sequential(
        layer.Conv2d(2, 6, 3, padding=1), layer.BatchNorm2d(6),
        neuron.LIFNode(v_threshold=0.3), layer.Flatten(), layer.Linear(6 * 8 * 8, 5),
        neuron.LIFNode(v_threshold=0.3),
    )  # fmt: skip
    x = torch.rand(5, 3, 2, 8, 8) * 2
    compiled = snncompile.optimize(model, x)
    assert time_chunk_blocker(compiled.gm, compiled.graph, x) is None
    reset = lambda: functional.reset_net(compiled)  # noqa: E731
    with buffers_restored(model):
        plain = _step(model, compiled, x, reset)
        after_plain = [b.clone() for b in model.buffers()]
    got = _step(model, TimeChunks(compiled.gm, 2, 1).run, x, reset)
    assert torch.equal(plain[0], got[0]) and plain[0].sum() > 0
    assert all(_close(u, v, 1e-5) for u, v in zip(plain[1:], got[1:], strict=True))
    for b, v in zip(model.buffers(), after_plain, strict=True):
        assert torch.equal(b, v)


def _nobn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)

    def lif() -> nn.Module:
        return neuron.LIFNode(surrogate_function=surrogate.ATan(), v_threshold=0.3, step_mode="m")

    # conv -> pool -> LIF blocks: the neurons (their state) sit after the pooling.
    net = nn.Sequential(
        layer.Conv2d(2, 16, 3, padding=1), layer.MaxPool2d(2), lif(),
        layer.Conv2d(16, 16, 3, padding=1), layer.MaxPool2d(4), lif(),
        layer.Flatten(), layer.Linear(16 * 2 * 2, 5), lif(),
    )  # fmt: skip
    functional.set_step_mode(net, "m")
    return net


def test_budget_chooses_time_chunks_and_reports() -> None:
    model = _nobn_net(0)
    x = torch.rand(16, 4, 2, 16, 16) * 3
    plain = snncompile.optimize(model, x)
    base = measure_train_step(plain, x).peak
    budgeted = snncompile.optimize(model, x, memory_budget=int(base * 0.4))
    plan = budgeted._memory_plan
    assert plan.time_chunks is not None
    text = budgeted.report()
    assert "recomputed in chunks of time" in text
    assert re.search(
        r"time chunks: Tc=\d+ step\(s\), chunk-start states kept: (all|at most \d+); "
        r"\d+ step\(s\) rerun in backward; peak predicted [0-9.]+ MB, measured [0-9.]+ MB",
        text,
    )
    assert plan.measured <= int(base * 0.4)
    a = _step(model, plain, x, lambda: functional.reset_net(plain))
    b = _step(model, budgeted, x, lambda: functional.reset_net(budgeted))
    assert torch.equal(a[0], b[0])
    assert all(_close(u, v, 1e-5) for u, v in zip(a[1:], b[1:], strict=True))
    # After a budgeted forward the state carries no graph.
    functional.reset_net(budgeted)
    budgeted(x)
    states = [v for m in budgeted.modules() for v in getattr(m, "_memories", {}).values()]
    assert all(not (isinstance(v, torch.Tensor) and v.requires_grad) for v in states)


def test_budget_path_equals_spikingjelly_with_dropout_and_plif() -> None:
    """Through optimize(memory_budget=...): same outputs (dropout masks included) and gradients
    as SpikingJelly eager, with time chunks chosen by the planner."""
    torch.manual_seed(5)
    model = _sj_net("ParametricLIFNode", {"init_tau": 2.5}, "ATan", bn_eval=True, dropout=True)
    x = torch.rand(12, 3, 2, 8, 8) * 2
    plain = snncompile.optimize(model, x, mode="train")
    base = measure_train_step(plain, x).peak
    budgeted = snncompile.optimize(model, x, memory_budget=int(base * 0.5))
    assert budgeted._memory_plan.time_chunks is not None
    ref = _step(model, model, x, lambda: sj_functional.reset_net(model), seed=7)
    got = _step(model, budgeted, x, lambda: functional.reset_net(budgeted), seed=7)
    assert torch.equal(ref[0], got[0]) and ref[0].sum() > 0
    assert all(_close(u, v, 1e-4) for u, v in zip(ref[1:], got[1:], strict=True))


def test_training_bn_model_takes_time_chunks() -> None:
    """A training BatchNorm no longer blocks time chunks (tests/test_time_chunks_bn.py checks
    the numbers): a too-small budget names the smallest one time chunks reach."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1), layer.BatchNorm2d(8),
        neuron.LIFNode(step_mode="m"), layer.Flatten(), layer.Linear(8 * 8 * 8, 5),
        neuron.LIFNode(step_mode="m"),
    )  # fmt: skip
    functional.set_step_mode(net, "m")
    x = torch.rand(4, 2, 2, 8, 8)
    compiled = snncompile.optimize(net, x)
    assert time_chunk_blocker(compiled.gm, compiled.graph, x) is None
    with pytest.raises(MemoryBudgetError, match="recomputing in chunks of time needs"):
        snncompile.optimize(net, x, memory_budget="1KB")


def test_time_mixing_refused() -> None:
    class Count(nn.Module):  # running spike count: couples every step with the earlier ones
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.cumsum(0)

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 4), neuron.LIFNode(v_threshold=0.2, step_mode="m"), Count())
    functional.set_step_mode(net, "m")
    x = torch.rand(6, 3, 6) * 3
    compiled = snncompile.optimize(net, x)
    why = time_chunk_blocker(compiled.gm, compiled.graph, x)
    assert why is not None and "mixes time steps" in why


def test_too_small_budget_names_smallest_time_chunk_budget() -> None:
    model = _nobn_net(1)
    x = torch.rand(8, 2, 2, 16, 16) * 3
    with pytest.raises(MemoryBudgetError, match="recomputing in chunks of time needs") as info:
        snncompile.optimize(model, x, memory_budget="1KB")
    smallest = float(re.search(r">= '([0-9.]+)MB'", str(info.value)).group(1))
    compiled = snncompile.optimize(model, x, memory_budget=f"{smallest}MB")  # it works
    assert compiled._memory_plan.time_chunks is not None


def test_live_bytes_flat_in_T() -> None:
    """With a fixed budget the step's live bytes at T=32 stay within 1.2x those at T=4.

    The budget is 10% above the smallest one the planner accepts at T=4 (it binds there); the same
    budget is then met at T=32 and the live bytes of an ordinary ``loss.backward()`` step are
    compared.
    """
    model = _nobn_net(2)
    x4 = torch.rand(4, 4, 2, 16, 16) * 3
    with pytest.raises(MemoryBudgetError) as info:
        snncompile.optimize(model, x4, memory_budget="1KB")
    smallest = float(re.search(r">= '([0-9.]+)MB'", str(info.value)).group(1))
    budget = f"{smallest * 1.1:.3f}MB"  # 10% above the smallest: it binds at T=4
    peaks = {}
    for T in (4, 32):
        x = torch.rand(T, 4, 2, 16, 16) * 3
        compiled = snncompile.optimize(model, x, memory_budget=budget)
        functional.reset_net(compiled)
        meter = LiveBytes()
        with meter:  # an ordinary training step: loss.backward()
            compiled(x).sum().backward()
        peaks[T] = meter.peak
        model.zero_grad()
    assert peaks[32] <= 1.2 * peaks[4], (budget, peaks)
