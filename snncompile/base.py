"""Base classes for step-mode aware and stateful modules.

Every snncompile module that cares about time derives from :class:`StepModule`. Its
``step_mode`` is ``'s'`` (single step: input ``[N, *]``) or ``'m'`` (multi step: input
``[T, N, *]``). Stateful modules (neurons, monitors, learners) derive from :class:`MemoryModule`,
which keeps named *memories*: tensors or floats that persist across calls, are restored to their
registered reset values by :meth:`MemoryModule.reset`, and are cut from the autograd graph by
:meth:`MemoryModule.detach`. The semantics follow SpikingJelly 2.0.0's ``base`` module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

STEP_MODES = ("s", "m")


def check_step_mode(step_mode: str, owner: str = "module") -> str:
    """Return ``step_mode`` if it is ``'s'`` or ``'m'``; otherwise raise a ValueError naming
    ``owner``."""
    if step_mode not in STEP_MODES:
        raise ValueError(
            f"{owner}: step_mode must be 's' (single step, input [N, *]) or 'm' (multi step, "
            f"input [T, N, *]), got {step_mode!r}."
        )
    return step_mode


def check_multi_step_input(x: torch.Tensor, owner: str, min_dim: int = 2) -> None:
    """Raise a clear error when a multi-step module receives a tensor without a time dimension."""
    if not isinstance(x, torch.Tensor):
        return
    if x.dim() < min_dim:
        raise ValueError(
            f"{owner} is in multi-step mode (step_mode='m') and expects input of shape "
            f"[T, N, *] (at least {min_dim} dims), got shape {tuple(x.shape)}. Add the time "
            f"dimension (x.unsqueeze(0) for one step) or set step_mode='s' "
            f"(functional.set_step_mode(net, 's'))."
        )


class StepModule:
    """Mixin giving a module a validated ``step_mode`` attribute ('s' or 'm')."""

    @property
    def supported_step_mode(self) -> tuple[str, ...]:
        """The step modes this module can run in."""
        return STEP_MODES

    @property
    def step_mode(self) -> str:
        """``'s'`` for single-step ``[N, *]`` inputs, ``'m'`` for multi-step ``[T, N, *]``."""
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        owner = type(self).__name__
        check_step_mode(value, owner)
        if value not in self.supported_step_mode:
            raise ValueError(
                f"{owner} supports step_mode in {self.supported_step_mode}, got {value!r}."
            )
        self._step_mode = value


class MemoryModule(nn.Module, StepModule):
    """A module with named state ("memories") that persists across forward calls.

    Subclasses call :meth:`register_memory` in ``__init__`` and then read and write the memory as a
    normal attribute (``self.v``). :meth:`reset` restores every memory to a deep copy of the value
    it was registered with; :meth:`detach` detaches tensor memories from the autograd graph. In
    multi-step mode the default :meth:`multi_step_forward` loops :meth:`single_step_forward` over
    ``x.unbind(0)`` (``unbind`` keeps backward linear in T) and stacks the results.
    """

    def __init__(self, step_mode: str = "s") -> None:
        super().__init__()
        self._memories: dict[str, Any] = {}
        self._memories_rv: dict[str, Any] = {}
        self.step_mode = step_mode

    # -- memories ---------------------------------------------------------------------------------
    def register_memory(self, name: str, value: Any) -> None:
        """Register a memory ``name`` whose reset value is a deep copy of ``value``."""
        if hasattr(self, name) and name not in self._memories:
            raise AttributeError(
                f"{type(self).__name__}: cannot register memory {name!r}: the attribute exists."
            )
        self._memories[name] = value
        self._memories_rv[name] = copy.deepcopy(value)

    def reset(self) -> None:
        """Restore every memory to its registered reset value."""
        for name, value in self._memories_rv.items():
            self._memories[name] = copy.deepcopy(value)

    def set_reset_value(self, name: str, value: Any) -> None:
        """Change the value memory ``name`` is restored to by :meth:`reset`."""
        self._memories_rv[name] = copy.deepcopy(value)

    def detach(self) -> None:
        """Detach every tensor memory from the autograd graph (truncates BPTT here)."""
        for value in self._memories.values():
            if isinstance(value, torch.Tensor):
                value.detach_()

    def memories(self) -> Iterator[Any]:
        """Iterate over the current memory values."""
        yield from self._memories.values()

    def named_memories(self) -> Iterator[tuple[str, Any]]:
        """Iterate over ``(name, value)`` pairs of the current memories."""
        yield from self._memories.items()

    def __getattr__(self, name: str) -> Any:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            return memories[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            memories[name] = value
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            del memories[name]
            del self._memories_rv[name]
        else:
            super().__delattr__(name)

    def __dir__(self) -> list[str]:
        return list(super().__dir__()) + list(self._memories)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # Move tensor memories with the module (.to(), .cuda(), .half()).
        for store in (self._memories, self._memories_rv):
            for name, value in store.items():
                if isinstance(value, torch.Tensor):
                    store[name] = fn(value)
        return super()._apply(fn, *args, **kwargs)

    # -- stepping ---------------------------------------------------------------------------------
    def single_step_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run one time step on ``x`` of shape ``[N, *]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement single_step_forward")

    def multi_step_forward(self, x_seq: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run ``x_seq`` of shape ``[T, N, *]`` step by step and stack the outputs."""
        check_multi_step_input(x_seq, type(self).__name__)
        outputs = [self.single_step_forward(x, *args, **kwargs) for x in x_seq.unbind(0)]
        return torch.stack(outputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.step_mode == "s":
            return self.single_step_forward(*args, **kwargs)
        return self.multi_step_forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}"
