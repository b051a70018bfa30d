"""Monitors that record what modules receive and emit, SpikingJelly-style.

A monitor keeps a flat list ``records`` (in call order) and, per monitored module name, the indices
of that module's records (``monitor['fc1']``). :class:`InputMonitor` records the input of a module
(a forward pre-hook), :class:`OutputMonitor` its output (a forward hook). The STDP learners in
:mod:`snncompile.learning` use one of each: the synapse's input is the presynaptic spike train, the
neuron's output the postsynaptic one.

Recording does not have to come from a torch hook. :meth:`BaseMonitor.record` appends a value
directly, which is how a compiled model (whose fused kernels may never call the original modules)
feeds the same monitors: the monitor is the buffer, the hook is only one way to fill it.

Example::

    fc = torch.nn.Linear(4, 3)
    with OutputMonitor(fc, function_on_output=torch.Tensor.detach) as mon:
        fc(torch.rand(2, 4))
        assert mon.records[0].shape == (2, 3)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn

__all__ = ["BaseMonitor", "InputMonitor", "OutputMonitor"]


def _identity(x: Any) -> Any:
    return x


def _unwrap_single(x: Any) -> Any:
    # Hooks see inputs as a tuple; a module called with one tensor is recorded as that tensor.
    if isinstance(x, tuple) and len(x) == 1:
        return x[0]
    return x


class BaseMonitor:
    """A buffer of recorded values with per-module indices, an on/off switch and hook handles.

    Attributes:
        records: every recorded value, oldest first.
        monitored_layers: names (as in ``net.named_modules()``) of the monitored modules.
        name_records_index: for each monitored name, the indices into ``records`` of its values.
        hooks: the torch hook handles this monitor owns (empty for a hook-less monitor).
    """

    def __init__(self) -> None:
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.monitored_layers: list[str] = []
        self.records: list[Any] = []
        self.name_records_index: dict[str, list[int]] = {}
        self._enable = True

    def __getitem__(self, key: int | str) -> Any:
        """Return record ``key`` (an int) or all records of the module named ``key`` (a str)."""
        if isinstance(key, int):
            return self.records[key]
        if isinstance(key, str):
            if key not in self.name_records_index:
                raise KeyError(
                    f"{type(self).__name__}: no monitored module named {key!r}; monitored: "
                    f"{self.monitored_layers}."
                )
            return [self.records[i] for i in self.name_records_index[key]]
        raise TypeError(f"{type(self).__name__}: index with an int or a module name, got {key!r}.")

    def __len__(self) -> int:
        return len(self.records)

    def _select_modules(
        self, net: nn.Module, instance: type | tuple[type, ...] | None
    ) -> list[tuple[str, nn.Module]]:
        # Default: monitor every module of net's own type (for a leaf layer, just net itself).
        kind = type(net) if instance is None else instance
        modules = [(name, m) for name, m in net.named_modules() if isinstance(m, kind)]
        for name, _ in modules:
            self.add_name(name)
        return modules

    def add_name(self, name: str) -> None:
        """Declare a monitored name so that :meth:`record` accepts it (hook-less monitors)."""
        if name not in self.name_records_index:
            self.monitored_layers.append(name)
            self.name_records_index[name] = []

    def record(self, name: str, value: Any) -> None:
        """Append ``value`` as a record of module ``name`` if the monitor is enabled."""
        if not self._enable:
            return
        if name not in self.name_records_index:
            self.add_name(name)
        self.name_records_index[name].append(len(self.records))
        self.records.append(value)

    def clear_recorded_data(self) -> None:
        """Drop every record (the monitored names and hooks stay)."""
        self.records.clear()
        for indices in self.name_records_index.values():
            indices.clear()

    def enable(self) -> None:
        """Resume recording."""
        self._enable = True

    def disable(self) -> None:
        """Stop recording; existing records are kept."""
        self._enable = False

    def is_enable(self) -> bool:
        """Return whether the monitor currently records."""
        return self._enable

    def remove_hooks(self) -> None:
        """Remove every torch hook this monitor registered."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    def close(self) -> None:
        """Disable the monitor and remove its hooks (records are kept until cleared)."""
        self.disable()
        self.remove_hooks()

    def __enter__(self) -> BaseMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.close()
        return False

    def __del__(self) -> None:
        # A monitor that goes away takes its hooks with it (hooks only hold a weak reference).
        try:
            self.remove_hooks()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class OutputMonitor(BaseMonitor):
    """Record ``function_on_output(output)`` of every monitored module on each forward call.

    Args:
        net: the module (or network) to monitor.
        instance: the module type(s) to monitor inside ``net``; ``None`` monitors modules of
            ``type(net)`` (for a single layer or neuron: that module itself).
        function_on_output: applied to the output before it is stored (e.g. ``Tensor.detach``).
        hooks: register forward hooks (default). With ``False`` the monitor is a plain buffer fed
            by :meth:`record`, e.g. by a compiled model.
    """

    def __init__(
        self,
        net: nn.Module,
        instance: type | tuple[type, ...] | None = None,
        function_on_output: Callable[[Any], Any] = _identity,
        hooks: bool = True,
    ) -> None:
        super().__init__()
        self.function_on_output = function_on_output
        for name, module in self._select_modules(net, instance):
            if hooks:
                self.hooks.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Callable[..., None]:
        # A weak reference: the module's hook must not keep a dropped monitor (and its records)
        # alive; when the monitor is collected, __del__ removes the hook.
        ref = weakref.ref(self)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            mon = ref()
            if mon is not None and mon._enable:
                mon.record(name, mon.function_on_output(_unwrap_single(output)))

        return hook


class InputMonitor(BaseMonitor):
    """Record ``function_on_input(input)`` of every monitored module on each forward call.

    Args:
        net: the module (or network) to monitor.
        instance: the module type(s) to monitor inside ``net``; ``None`` monitors modules of
            ``type(net)`` (for a single layer: that layer itself).
        function_on_input: applied to the input before it is stored (e.g. ``Tensor.detach``).
            A module called with a single positional tensor records that tensor, not a tuple.
        hooks: register forward pre-hooks (default). With ``False`` the monitor is a plain
            buffer fed by :meth:`record`.
    """

    def __init__(
        self,
        net: nn.Module,
        instance: type | tuple[type, ...] | None = None,
        function_on_input: Callable[[Any], Any] = _identity,
        hooks: bool = True,
    ) -> None:
        super().__init__()
        self.function_on_input = function_on_input
        for name, module in self._select_modules(net, instance):
            if hooks:
                self.hooks.append(module.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Callable[..., None]:
        ref = weakref.ref(self)  # see OutputMonitor._make_hook

        def hook(module: nn.Module, inputs: Any) -> None:
            mon = ref()
            if mon is not None and mon._enable:
                mon.record(name, mon.function_on_input(_unwrap_single(inputs)))

        return hook
