"""Measuring training memory: live tensor bytes over a forward + backward step.

:class:`LiveBytes` is a ``TorchDispatchMode`` that sees every ATen op run while it is active --
in forward and, because autograd runs backward on the calling thread with the same dispatch
modes for CPU tensors, in backward too. Each fresh (non-view) output storage is counted from its
creation until its last tensor object dies (``weakref.finalize``), so ``live`` is the bytes held
by tensors created inside the mode (activations, tensors saved for backward, gradients,
workspaces returned by ops) and ``peak`` its maximum. Tensors created before the mode
(parameters, the input) are not counted. ``tests/test_memory_plan.py`` validates it against
``torch.profiler``'s memory events (``profile_memory=True``).

:func:`measure_train_step` runs one forward + backward (gradients by ``torch.autograd.grad``, so
``.grad`` of the parameters is untouched) and restores the buffers (BatchNorm statistics) and the
neuron state afterwards, so that measuring at compile time leaves no trace.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "forward_modes",
    "modes_restored",
    "LiveBytes",
    "StepMeasurement",
    "measure_train_step",
    "memory_slots",
    "snapshot_state",
]


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensor storages created while the mode is active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t._base is not None:
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in inputs or nbytes == 0 or ptr in self._seen:
                continue
            self._seen.add(ptr)
            self.live += nbytes
            weakref.finalize(t, self._free, ptr, nbytes)
        self.peak = max(self.peak, self.live)
        return out


@dataclass(frozen=True)
class StepMeasurement:
    """One measured training step: peak live bytes, bytes left after forward, seconds."""

    peak: int
    after_forward: int
    seconds: float


def memory_slots(module: nn.Module) -> list[tuple[dict[str, Any], str]]:
    """Every neuron-state entry of ``module`` (a ``_memories`` store and its key), in module
    order."""
    out: list[tuple[dict[str, Any], str]] = []
    for sub in module.modules():
        store = getattr(sub, "_memories", None)
        if isinstance(store, dict):
            out.extend((store, k) for k in store)
    return out


def snapshot_state(module: nn.Module, memories: bool = True) -> Callable[[], None]:
    """Copy ``module``'s buffers and (with ``memories``) its neuron memories; the returned
    function restores them."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    saved = [(store, k, store[k]) for store, k in memory_slots(module)] if memories else []

    def restore() -> None:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for store, k, v in saved:
            store[k] = v

    return restore


def forward_modes(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    """The train/eval mode of every module in ``modules`` and below, for a rerun in backward
    (:func:`modes_restored`)."""
    return [(m, m.training) for top in modules for m in top.modules()]


@contextlib.contextmanager
def modes_restored(modes: list[tuple[nn.Module, bool]]) -> Iterator[None]:
    """Run with the modes of :func:`forward_modes` (a BatchNorm's statistics and Dropout's masks
    in a rerun must be those of the forward, whatever the model was switched to since), then put
    the current ones back."""
    now = [(m, m.training) for m, _ in modes]
    for m, training in modes:
        m.training = training
    try:
        yield
    finally:
        for m, training in now:
            m.training = training


def _reset(module: nn.Module) -> None:
    from snncompile.runtime.chunked import reset_states

    reset_states(module)


def _loss(y: Any) -> torch.Tensor:
    leaves = [t for t in tree_flatten(y)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise ValueError("measure_train_step: the model's output does not require grad.")
    return sum(t.float().sum() for t in leaves)  # type: ignore[return-value]


def measure_train_step(
    module: nn.Module,
    example_input: torch.Tensor,
    run: Callable[[torch.Tensor], Any] | None = None,
) -> StepMeasurement:
    """Peak live bytes of one forward + backward of ``module`` (or ``run``) on ``example_input``.

    The loss is the sum of the outputs; gradients are taken with ``torch.autograd.grad`` (the
    parameters' ``.grad`` is not touched). Buffers and neuron state are restored afterwards.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    restore = snapshot_state(module)
    _reset(module)
    fn = run if run is not None else module
    try:
        meter = LiveBytes()
        start = time.perf_counter()
        with meter:
            y = fn(example_input)
            after = meter.live
            loss = _loss(y)
            torch.autograd.grad(loss, params, allow_unused=True)
            del y, loss
        seconds = time.perf_counter() - start
    finally:
        restore()
    return StepMeasurement(meter.peak, after, seconds)
