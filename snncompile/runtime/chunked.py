"""Chunked forward and streaming: run ``[T, N, *]`` inputs in bounded memory.

A multi-step SNN executed layer by layer keeps every layer's ``[T, N, *]`` activation alive, so
its memory grows linearly with ``T``; a step-by-step loop keeps memory flat but pays Python and
kernel-launch overhead ``T`` times per layer. Chunking sits in between: the time axis is cut into
chunks of ``K`` steps, each chunk runs layer by layer, and the neurons' state (their ``v``
memories, kept by the modules across calls exactly as in SpikingJelly) carries the dynamics from
one chunk into the next. Because every neuron update only depends on the previous state and the
current input, the result is identical to the unchunked run for any ``K``.

Public API:

- :func:`chunked_forward` runs a tensor input in chunks (optionally reducing over time instead of
  materialising the ``[T, N, *]`` output);
- :func:`stream` consumes an iterator of input chunks (the full input never has to exist);
- :func:`measure_step_memory` / :func:`chunk_size_for_budget` pick ``K`` from a memory budget;
- :class:`ChunkedModule` wraps a module so that ``forward`` is chunked and ``.stream`` exists.

Chunking is an inference feature: everything here runs under ``torch.no_grad()`` and refuses
modules in training mode (gradients through a chunked run would keep every chunk's graph alive,
which defeats the purpose; use the online-training loops for training).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from snncompile.progress import progress_bar
from snncompile.runtime.memory import LiveBytes

__all__ = [
    "REDUCTIONS",
    "SPEED_CHUNK_BYTES",
    "ChunkedModule",
    "StepMemory",
    "check_inference",
    "chunk_size_for_budget",
    "chunked_forward",
    "configure_chunking",
    "verify_chunkable",
    "measure_step_memory",
    "parse_memory",
    "reset_states",
    "stream",
]

#: Accepted values of ``reduce``: no reduction, sum over time (spike counts), mean over time.
REDUCTIONS = (None, "sum", "mean")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


#: Speed cap applied when ``optimize(memory_budget=...)`` picks the chunk size: larger chunks do
#: not run faster on CPU once their activations leave the caches (measured in
#: benchmarks/bench_ann2snn.py: a bandwidth-bound CNN ran ~2x faster with 16 MB chunks than with
#: 60-130 MB chunks; an overhead-bound one was as fast at 1 MB as at 50 MB).
SPEED_CHUNK_BYTES = 16 * 2**20


def parse_memory(budget: str | int | float) -> int:
    """Return a memory size in bytes from an int or a string such as ``'512MB'`` or ``'2 GiB'``.

    Decimal units (``KB``, ``MB``, ``GB``) are powers of 1000, binary units (``KiB``, ``MiB``,
    ``GiB``) powers of 1024; a bare number is bytes.
    """
    if isinstance(budget, bool):
        raise TypeError("memory_budget must be a number of bytes or a string like '512MB'.")
    if isinstance(budget, (int, float)):
        value = int(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"memory_budget: cannot parse {budget!r}; use bytes (int) or a string like "
                f"'512MB', '1.5GB' or '256MiB'."
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget!r}.")
    return value


def check_inference(module: nn.Module, what: str = "chunked forward") -> None:
    """Raise a RuntimeError when ``module`` is in training mode: chunking is inference-only."""
    if module.training:
        raise RuntimeError(
            f"{what} of {type(module).__name__} is for inference only (it runs under "
            f"torch.no_grad() so memory stays bounded), but the module is in training mode. "
            f"Call .eval() first; for training over long sequences use the online-training "
            f"loops (fptt/ottt) or run without chunk_size/memory_budget."
        )


def reset_states(module: nn.Module) -> None:
    """Call ``reset()`` on every stateful submodule (ours or SpikingJelly's) of ``module``.

    Stateful modules are recognised by having both ``reset`` and a ``_memories`` store (the
    :class:`snncompile.base.MemoryModule` / SpikingJelly ``MemoryModule`` convention) or by
    defining ``reset_states`` (compiled modules).
    """
    for sub in module.modules():
        if hasattr(sub, "_memories") and callable(getattr(sub, "reset", None)):
            sub.reset()
        elif sub is not module and callable(getattr(sub, "reset_states", None)):
            sub.reset_states()


def _check_reduce(reduce: str | None) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")


def _as_tensor_output(y: Any, module: nn.Module) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"chunked execution of {type(module).__name__} needs a single tensor output "
            f"[T, N, *], got {type(y).__name__}. Wrap the module so it returns one tensor."
        )
    return y


def _check_seq(x: torch.Tensor, module: nn.Module) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"chunked execution of {type(module).__name__} expects multi-step input [T, N, *], "
            f"got {shape}."
        )


class _Accumulator:
    """Collects chunk outputs into a preallocated ``[T, *]`` tensor or a running reduction."""

    def __init__(self, module: nn.Module, reduce: str | None, total_steps: int | None) -> None:
        self.module = module
        self.reduce = reduce
        self.total_steps = total_steps
        self.steps = 0
        self.value: torch.Tensor | None = None

    def add(self, y: torch.Tensor, expected_steps: int) -> None:
        y = _as_tensor_output(y, self.module)
        if y.dim() < 1 or y.shape[0] != expected_steps:
            raise ValueError(
                f"{type(self.module).__name__} returned shape {tuple(y.shape)} for a chunk of "
                f"{expected_steps} steps; chunking needs outputs with the time dimension first."
            )
        if self.reduce is None:
            if self.value is None:
                # One allocation of the final size: stacking a list of chunks would briefly hold
                # the output twice.
                assert self.total_steps is not None
                self.value = y.new_empty((self.total_steps, *y.shape[1:]))
            self.value[self.steps : self.steps + expected_steps].copy_(y)
        else:
            part = y.sum(0)
            self.value = part if self.value is None else self.value.add_(part)
        self.steps += expected_steps

    def result(self) -> torch.Tensor:
        if self.value is None:
            raise ValueError(f"chunked run of {type(self.module).__name__} received no steps.")
        if self.reduce == "mean":
            return self.value.div_(self.steps)
        return self.value


def chunked_forward(
    module: nn.Module,
    x_seq: torch.Tensor,
    chunk_size: int,
    *,
    reduce: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run the multi-step ``module`` on ``x_seq`` (``[T, N, *]``) in chunks of ``chunk_size`` steps.

    The module must keep its neuron state across calls (SpikingJelly semantics: state persists
    until ``reset_net``), which is what makes the chunked run equal to ``module(x_seq)``. The state
    is *not* reset before the run, exactly like a plain call. With ``reduce=None`` the result is the
    full ``[T, N, *]`` output (written chunk by chunk into one preallocated tensor); with
    ``reduce='sum'`` or ``'mean'`` only the time-sum or time-mean ``[N, *]`` is kept, so memory
    does not grow with ``T``. Runs under ``torch.no_grad()``; raises in training mode.
    A progress bar over the steps appears when the run takes more than a second and stderr is a
    terminal; ``progress=False`` turns it off.
    """
    check_inference(module)
    _check_seq(x_seq, module)
    _check_reduce(reduce)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}.")
    T = x_seq.shape[0]
    acc = _Accumulator(module, reduce, T)
    bar = progress_bar(desc="chunked forward", total=T, unit="step", progress=progress, delay=1.0)
    with torch.no_grad(), bar:
        for chunk in x_seq.split(int(chunk_size), 0):
            acc.add(module(chunk), chunk.shape[0])
            bar.update(chunk.shape[0])
    return acc.result()


def _stream_outputs(
    module: nn.Module, chunks: Iterable[torch.Tensor], bar: Any
) -> Iterator[torch.Tensor]:
    with torch.no_grad(), bar:
        for chunk in chunks:
            _check_seq(chunk, module)
            y = _as_tensor_output(module(chunk), module)
            bar.update(chunk.shape[0])
            yield y


def stream(
    module: nn.Module,
    chunks: Iterable[torch.Tensor],
    *,
    reduce: str | None = None,
    reset: bool = False,
    progress: bool = True,
    total_steps: int | None = None,
) -> Iterator[torch.Tensor] | torch.Tensor:
    """Feed an iterable of input chunks (each ``[K_i, N, *]``) through ``module`` in order.

    With ``reduce=None`` this returns an iterator that yields each chunk's output as it is
    computed (nothing is kept); with ``reduce='sum'`` it returns the time-sum of all outputs
    (spike counts for a spiking output layer) and with ``reduce='mean'`` the time-mean (firing
    rate), of shape ``[N, *]``. Chunk sizes may vary. ``reset=True`` resets every stateful
    submodule first (otherwise the state carries on from previous calls, like a plain call).
    Runs under ``torch.no_grad()``; raises in training mode. A progress bar over the steps (out
    of ``total_steps`` when given) appears when the stream runs for more than a second and stderr
    is a terminal; ``progress=False`` turns it off.
    """
    check_inference(module, "stream")
    _check_reduce(reduce)
    if reset:
        reset_states(module)
    bar = progress_bar(
        desc="stream", total=total_steps, unit="step", progress=progress, delay=1.0
    )
    outputs = _stream_outputs(module, chunks, bar)
    if reduce is None:
        return outputs
    acc = _Accumulator(module, reduce, None)
    for y in outputs:
        acc.add(y, y.shape[0])
    return acc.result()


# -- memory model -------------------------------------------------------------------------------


def _tensor_bytes(values: Iterable[Any]) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class StepMemory:
    """Measured memory model of a multi-step module (bytes).

    Attributes:
        per_step: peak bytes of activations alive during the example run, divided by its number of
            steps (conservative: the part of the peak that does not grow with ``T`` is charged to
            the steps too).
        input_per_step: bytes of one step of input.
        output_per_step: bytes of one step of output.
        fixed: parameters + buffers + neuron state after the run (independent of ``T``).
        example_steps: ``T`` of the example input.
    """

    per_step: int
    input_per_step: int
    output_per_step: int
    fixed: int
    example_steps: int

    def chunk_size(
        self,
        budget_bytes: int,
        total_steps: int | None = None,
        max_chunk_bytes: int | None = None,
    ) -> int:
        """Largest ``K`` with ``fixed + K * (per_step + input_step + output_step) <= budget``.

        A chunk holds its input slice, its activations and its output slice at once, hence the
        three per-step terms. With ``max_chunk_bytes``, ``K`` is also capped so that one chunk's
        activations (``K * per_step``) stay below it (a speed cap, see
        :data:`SPEED_CHUNK_BYTES`). The result is clamped to ``[1, total_steps]``.
        """
        per = max(1, self.per_step + self.input_per_step + self.output_per_step)
        k = max(1, (budget_bytes - self.fixed) // per)
        if max_chunk_bytes is not None:
            k = min(k, max(1, max_chunk_bytes // max(1, self.per_step)))
        if total_steps is not None:
            k = min(k, max(1, total_steps))
        return int(k)


def measure_step_memory(module: nn.Module, example_input: torch.Tensor) -> StepMemory:
    """Run ``module`` once on ``example_input`` (``[T, N, *]``) and measure its per-step memory.

    Activations are counted with a dispatch mode that adds every fresh op output until it is
    freed and records the peak. The neuron state is reset before and after the measurement so the
    example run leaves no trace.
    """
    check_inference(module, "memory measurement")
    _check_seq(example_input, module)
    reset_states(module)
    T = max(1, example_input.shape[0])
    with torch.no_grad():
        meter = LiveBytes()
        with meter:
            y = module(example_input)
        y = _as_tensor_output(y, module)
        state = 0
        for sub in module.modules():
            store = getattr(sub, "_memories", None)
            if isinstance(store, dict):
                state += _tensor_bytes(store.values())
    reset_states(module)
    fixed = _tensor_bytes(module.parameters()) + _tensor_bytes(module.buffers()) + state
    return StepMemory(
        per_step=math.ceil(meter.peak / T),
        input_per_step=math.ceil(example_input.numel() * example_input.element_size() / T),
        output_per_step=math.ceil(y.numel() * y.element_size() / T),
        fixed=fixed,
        example_steps=T,
    )


def chunk_size_for_budget(
    module: nn.Module,
    example_input: torch.Tensor,
    memory_budget: str | int,
    total_steps: int | None = None,
) -> int:
    """Return the chunk size ``K`` that keeps one chunk of ``module`` within ``memory_budget``.

    ``K = floor((budget - fixed) / (per_step + input_per_step + output_per_step))`` with the terms
    of :class:`StepMemory` measured on ``example_input``; at least 1, and at most ``total_steps``
    when given. The budget covers the module's own memory (weights, state, one chunk in flight),
    not the Python interpreter and the torch libraries.
    """
    budget = parse_memory(memory_budget)
    model = measure_step_memory(module, example_input)
    return model.chunk_size(budget, total_steps)


def verify_chunkable(module: nn.Module, example_input: torch.Tensor, chunk_size: int) -> None:
    """Check on ``example_input`` that running ``module`` in chunks gives the unchunked output.

    Chunking is exact only when nothing but the stateful modules carries information across time
    steps; a model that mixes steps elsewhere (``x.flip(0)``, ``cumsum`` over time, attention
    over ``T``...) gives different results. The example is run whole and in chunks of
    ``min(chunk_size, ceil(T / 2))`` steps (so that it is really cut), with the state reset
    before each run and after. Outputs may differ by float rounding (kernels pick algorithms by
    batch size, which can flip a spike whose membrane sits exactly at threshold), so up to 0.1% of
    the elements may differ; more raises a ValueError.
    """
    T = example_input.shape[0]
    k = max(1, min(int(chunk_size), math.ceil(T / 2)))
    with torch.no_grad():
        reset_states(module)
        full = _as_tensor_output(module(example_input), module)
        reset_states(module)
        chunked = chunked_forward(module, example_input, k)
        reset_states(module)
    if full.shape != chunked.shape:
        raise ValueError(
            f"{type(module).__name__}: chunked output shape {tuple(chunked.shape)} differs from "
            f"the unchunked {tuple(full.shape)}; the model cannot run in chunks over time."
        )
    if full.numel() == 0:
        return
    differ = ~torch.isclose(chunked, full, rtol=1e-5, atol=1e-6)
    if differ.float().mean().item() > 1e-3:
        raise ValueError(
            f"{type(module).__name__}: running the example input in chunks of {k} steps changes "
            f"{differ.float().mean().item():.1%} of the outputs: the model mixes time steps "
            f"outside its stateful modules (e.g. flip/cumsum/mean over time), so it cannot be "
            f"chunked. Compile without chunk_size/memory_budget."
        )


def configure_chunking(
    compiled: nn.Module,
    example_input: torch.Tensor,
    *,
    chunk_size: int | None = None,
    memory_budget: str | int | None = None,
) -> int:
    """Set up chunked execution on a compiled module (called by :func:`snncompile.optimize`).

    ``K`` is ``chunk_size`` if given, else the largest chunk that fits ``memory_budget``
    (:meth:`StepMemory.chunk_size` on the example input's measurement), capped so that one
    chunk's activations stay below :data:`SPEED_CHUNK_BYTES`. The chunked run is checked against the
    unchunked one on the example (:func:`verify_chunkable`), then ``compiled.chunk_size = K`` and
    ``compiled.memory_model`` (the :class:`StepMemory`, or None) are set. Returns ``K``.
    """
    if (chunk_size is None) == (memory_budget is None):
        raise ValueError("optimize: give either chunk_size or memory_budget, not both.")
    check_inference(compiled, "optimize(..., chunk_size/memory_budget)")
    runner = getattr(compiled, "gm", compiled)
    model: StepMemory | None = None
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"optimize: chunk_size must be an int >= 1, got {chunk_size!r}.")
        k = chunk_size
    else:
        assert memory_budget is not None
        budget = parse_memory(memory_budget)
        model = measure_step_memory(runner, example_input)
        k = model.chunk_size(budget, max_chunk_bytes=SPEED_CHUNK_BYTES)
    verify_chunkable(runner, example_input, k)
    compiled.chunk_size = k
    compiled.memory_model = model
    return k


class ChunkedModule(nn.Module):
    """Wraps a multi-step module so that ``forward`` runs in chunks of ``chunk_size`` steps.

    ``forward(x_seq)`` equals ``module(x_seq)`` (same state carrying, no reset), computed chunk by
    chunk under ``torch.no_grad()``; ``stream(chunks, reduce=...)`` feeds an iterator of chunks.
    ``reduce`` set at construction makes ``forward`` return the time-sum/mean only.
    """

    def __init__(self, module: nn.Module, chunk_size: int, reduce: str | None = None) -> None:
        super().__init__()
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}.")
        _check_reduce(reduce)
        self.module = module
        self.chunk_size = int(chunk_size)
        self.reduce = reduce

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Run ``x_seq`` (``[T, N, *]``) in chunks; see :func:`chunked_forward`."""
        if self.training:
            check_inference(self)
        return chunked_forward(self.module, x_seq, self.chunk_size, reduce=self.reduce)

    def stream(
        self,
        chunks: Iterable[torch.Tensor],
        reduce: str | None = None,
        reset: bool = False,
    ) -> Iterator[torch.Tensor] | torch.Tensor:
        """Feed an iterator of input chunks through the wrapped module; see :func:`stream`."""
        if self.training:
            check_inference(self, "stream")
        return stream(self.module, chunks, reduce=reduce, reset=reset)

    def reset_states(self) -> None:
        """Reset every stateful submodule of the wrapped module."""
        reset_states(self.module)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, reduce={self.reduce!r}"
