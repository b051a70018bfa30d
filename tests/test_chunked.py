"""Chunked forward, streaming, memory budgets and encoders (snncompile.runtime.chunked)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snncompile import functional, neuron
from snncompile.ann2snn.encoders import ConstantEncoder, PoissonEncoder
from snncompile.runtime.chunked import (
    ChunkedModule,
    chunk_size_for_budget,
    chunked_forward,
    measure_step_memory,
    parse_memory,
    reset_states,
    stream,
)
from snncompile.runtime.memory import LiveBytes

T, N, F_IN = 12, 3, 5


class SmallSNN(nn.Module):
    """Linear -> LIF -> Linear -> IF, multi-step; nn.Linear broadcasts over [T, N, F]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(F_IN, 16)
        self.lif = neuron.LIFNode(tau=2.0, step_mode="m")
        self.fc2 = nn.Linear(16, 4)
        self.sn = neuron.IFNode(v_reset=None, step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.fc2(self.lif(self.fc1(x))))


def _model() -> SmallSNN:
    torch.manual_seed(1)
    return SmallSNN().eval()


def _input(steps: int = T) -> torch.Tensor:
    return torch.rand(steps, N, F_IN) * 2.0


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(model)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("k", [1, 3, T, 5])
def test_chunked_equals_unchunked(k: int) -> None:
    model, x = _model(), _input()
    ref = _reference(model, x)
    v_ref = model.sn.v.clone()
    assert ref.sum() > 0 and ref.mean() < 1  # the test needs real spiking activity
    functional.reset_net(model)
    out = chunked_forward(model, x, k)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    assert torch.equal(model.sn.v, v_ref)  # state carried to the same final value


def test_chunked_carries_state_like_plain_calls() -> None:
    # No reset inside: a second chunked call continues from the first one's state.
    model, x1, x2 = _model(), _input(), _input()
    functional.reset_net(model)
    with torch.no_grad():
        ref = torch.cat([model(x1), model(x2)])
    functional.reset_net(model)
    out = torch.cat([chunked_forward(model, x1, 5), chunked_forward(model, x2, 7)])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_chunked_reduction(reduce: str) -> None:
    model, x = _model(), _input()
    ref = _reference(model, x)
    functional.reset_net(model)
    out = chunked_forward(model, x, 5, reduce=reduce)
    expected = ref.sum(0) if reduce == "sum" else ref.mean(0)
    assert out.shape == (N, 4)
    torch.testing.assert_close(out, expected)


def test_reduction_memory_does_not_grow_with_T() -> None:
    # With a reduction only [N, *] is kept: the peak of live activations is the same for T=32 and
    # T=160, while the unreduced output grows.
    model = _model()
    peaks = {}
    for steps in (32, 160):
        x = _input(steps)
        for reduce in ("sum", None):
            reset_states(model)
            meter = LiveBytes()
            with meter:
                chunked_forward(model, x, 16, reduce=reduce)
            peaks[(steps, reduce)] = meter.peak
    assert peaks[(160, "sum")] <= 1.05 * peaks[(32, "sum")]
    # ... while without a reduction the peak grows by at least the extra output rows.
    extra_output = (160 - 32) * N * 4 * 4
    assert peaks[(160, None)] - peaks[(32, None)] >= extra_output


def test_stream_equals_full_run() -> None:
    model, x = _model(), _input()
    ref = _reference(model, x)
    chunks = [x[:2], x[2:7], x[7:8], x[8:]]  # uneven chunk sizes
    out = torch.cat(list(stream(model, iter(chunks), reset=True)))
    assert torch.equal(out, ref)
    total = stream(model, iter(chunks), reduce="sum", reset=True)
    torch.testing.assert_close(total, ref.sum(0))
    rate = stream(model, iter(chunks), reduce="mean", reset=True)
    torch.testing.assert_close(rate, ref.mean(0))


def test_stream_without_reset_continues_state() -> None:
    model, x = _model(), _input()
    functional.reset_net(model)
    first = torch.cat(list(stream(model, [x[:6]])))
    second = torch.cat(list(stream(model, [x[6:]])))
    ref = _reference(model, x)
    assert torch.equal(torch.cat([first, second]), ref)


def test_stream_with_encoder_matches_materialised_input() -> None:
    model = _model()
    img = torch.rand(N, F_IN)
    for enc in (ConstantEncoder(), PoissonEncoder(seed=3)):
        ref = _reference(model, enc(img, 20))
        out = stream(model, enc.chunks(img, 20, 6), reduce="sum", reset=True)
        torch.testing.assert_close(out, ref.sum(0))


def test_chunked_module_wrapper() -> None:
    model, x = _model(), _input()
    ref = _reference(model, x)
    wrapped = ChunkedModule(model, chunk_size=5).eval()
    wrapped.reset_states()
    assert torch.equal(wrapped(x), ref)
    rate = wrapped.stream(x.split(4), reduce="mean", reset=True)
    torch.testing.assert_close(rate, ref.mean(0))


def test_training_mode_is_refused() -> None:
    model = SmallSNN()  # fresh modules are in training mode
    with pytest.raises(RuntimeError, match="inference only.*eval"):
        chunked_forward(model, _input(), 4)
    with pytest.raises(RuntimeError, match="inference only"):
        stream(model, [_input()], reduce="sum")
    with pytest.raises(RuntimeError, match="inference only"):
        ChunkedModule(model, 4).train()(_input())


def test_bad_arguments() -> None:
    model = _model()
    with pytest.raises(ValueError, match="reduce must be one of"):
        chunked_forward(model, _input(), 4, reduce="max")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_forward(model, _input(), 0)
    with pytest.raises(ValueError, match=r"expects multi-step input \[T, N, \*\]"):
        chunked_forward(model, torch.rand(5), 2)


def test_parse_memory() -> None:
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1.5 GB") == 1_500_000_000
    assert parse_memory("256MiB") == 256 * 2**20
    assert parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="cannot parse"):
        parse_memory("lots")
    with pytest.raises(ValueError, match="must be positive"):
        parse_memory(0)


def test_memory_budget_picks_chunk_size() -> None:
    model = _model()
    small = measure_step_memory(model, _input(8))
    large = measure_step_memory(model, _input(32))
    # Per-step activation bytes are a property of the model, not of the example's T.
    assert small.per_step > 0
    assert abs(large.per_step - small.per_step) <= 0.3 * small.per_step
    per = small.per_step + small.input_per_step + small.output_per_step
    budget = small.fixed + 10 * per
    assert small.chunk_size(budget) == 10
    assert small.chunk_size(budget, total_steps=4) == 4
    assert small.chunk_size(1) == 1  # never below one step
    k_small = chunk_size_for_budget(model, _input(8), 20 * 1024)
    k_big = chunk_size_for_budget(model, _input(8), "1MB")
    assert 1 <= k_small < k_big
    # The measurement left no state behind.
    assert not isinstance(model.sn.v, torch.Tensor)


def test_poisson_encoder_is_chunk_size_independent() -> None:
    img = torch.rand(4, 2, 3)
    enc = PoissonEncoder(seed=7)
    full = enc(img, 50)
    assert full.shape == (50, 4, 2, 3)
    assert set(full.unique().tolist()) <= {0.0, 1.0}
    for k in (1, 3, 7, 50, 64):
        assert torch.equal(torch.cat(list(PoissonEncoder(seed=7).chunks(img, 50, k))), full)
    assert not torch.equal(PoissonEncoder(seed=8)(img, 50), full)
    rate = PoissonEncoder(seed=0)(torch.full((1000,), 0.3), 200).mean()
    assert abs(rate.item() - 0.3) < 0.01


def test_constant_encoder_chunks() -> None:
    img = torch.rand(2, 3)
    chunks = list(ConstantEncoder().chunks(img, 10, 4))
    assert [c.shape[0] for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat(chunks), img.expand(10, 2, 3))


# -- integration with snncompile.optimize ---------------------------------------------------------


def _optimize():
    return pytest.importorskip("snncompile.api").optimize


@pytest.mark.parametrize("kwargs", [{"chunk_size": 3}, {"memory_budget": "12KB"}])
def test_optimize_chunked_equals_eager(kwargs: dict) -> None:
    optimize = _optimize()
    model, x = _model(), _input(20)
    ref = _reference(model, x)
    compiled = optimize(model, x[:6], **kwargs)
    assert 1 <= compiled.chunk_size < 20
    assert any(r.name == "chunk_forward" and r.modified for r in compiled.records)
    functional.reset_net(compiled)
    assert torch.equal(compiled(x), ref)
    rate = compiled.stream(x.split(7), reduce="mean", reset=True)
    torch.testing.assert_close(rate, ref.mean(0))
    outs = list(compiled.stream(iter(x.split(5)), reset=True))
    assert torch.equal(torch.cat(outs), ref)


def test_optimize_memory_budget_scales_chunk_size() -> None:
    optimize = _optimize()
    model, x = _model(), _input(8)
    small = optimize(model, x, memory_budget="20KB").chunk_size
    large = optimize(model, x, memory_budget="2MB").chunk_size
    assert small < large
    assert optimize(model, x, memory_budget="2MB").memory_model.per_step > 0


def test_optimize_chunking_errors() -> None:
    optimize = _optimize()
    from snncompile.passes.chunk import ChunkingError

    model, x = SmallSNN(), _input(6)  # training mode
    with pytest.raises(ChunkingError, match="inference only"):
        optimize(model, x, chunk_size=2, mode="train")

    class MeanOverTime(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).mean(0)

    with pytest.raises(ChunkingError, match="without the time dimension"):
        optimize(MeanOverTime().eval(), x, chunk_size=2)

    class CumulativeInput(MeanOverTime):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.cumsum(0))  # restarts in every chunk: not chunkable

    with pytest.raises(ValueError, match="mixes time steps"):
        optimize(CumulativeInput().eval(), _input(12), chunk_size=2)
    with pytest.raises(ValueError, match="either chunk_size or memory_budget"):
        optimize(_model(), x, chunk_size=2, memory_budget="1MB")


def test_speed_cap_limits_budget_chunk_size() -> None:
    model = measure_step_memory(_model(), _input(8))
    budget = model.fixed + 1000 * (model.per_step + model.input_per_step + model.output_per_step)
    assert model.chunk_size(budget) == 1000
    assert model.chunk_size(budget, max_chunk_bytes=50 * model.per_step) == 50
    assert model.chunk_size(budget, max_chunk_bytes=1) == 1
