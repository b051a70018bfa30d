"""Partial compilation: a module whose forward cannot be traced runs as written, its parts compiled.

torch.fx cannot trace a forward with data-dependent control flow (``if x.sum() > 0``, ``if
x_seq.ndim != 5`` on an intermediate value), and must not trace one that keeps Python-side state
(``self.t += 1``). Such a module becomes an ``OPAQUE_MODULE`` node. Running it as one black box
would leave every neuron inside it unfused, so instead its forward runs *as written* on a
parameter-sharing copy (the *glue*) in which each child that holds a neuron is replaced by that
child compiled on its own (``snncompile.optimize`` of the child, with the input the child
received when the example ran). A child that cannot be compiled on its own (it takes several
arguments, or is called with inputs of different shapes, or its compilation fails) becomes glue
itself, recursively; children without neurons run as written (they are exactly the user's code).

Why this is exact: the glue's Python code is the user's, run on every call; a compiled child
computes what the child computes (same parameters, its own copy of the state); calls to it happen
in the same order with the same inputs. Two things could tell the difference, and both are
refused rather than silently wrong: glue code reading a compiled child's *state* or its
*submodules* (``self.block.sn.v``) raises (:class:`CompiledPart` does not forward them), and the
glue is run once on the recorded example inputs before it is used, so such code is found at
compile time and the module then runs entirely as written.

A child of a single-step model receives one step ``[N, *]`` per call; its compiled form is built
for ``[1, N, *]`` and called once per step (its neurons keep their state between calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from snncompile.frontend.rules import Kind, classify_module

#: ``compile_part(module, example_input) -> nn.Module``: compiles one part (``optimize``).
CompilePart = Callable[[nn.Module, torch.Tensor], nn.Module]


@dataclasses.dataclass
class CallRecord:
    """The calls a module received while the example ran: the first inputs and every shape."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    signatures: set[tuple[Any, ...]] = dataclasses.field(default_factory=set)


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return ("value", type(value).__name__)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def record_calls(module: nn.Module) -> Iterator[dict[str, CallRecord]]:
    """Record the inputs of ``module``'s calls and its submodules' (keyed by relative path)."""
    records: dict[str, CallRecord] = {}
    handles = []
    for path, sub in module.named_modules():  # '' is the module itself

        def hook(_m: nn.Module, args: Any, kwargs: Any, _path: str = path) -> None:
            sig = (_signature(args), _signature(kwargs))
            rec = records.get(_path)
            if rec is None:
                rec = records[_path] = CallRecord(_detached(args), _detached(kwargs))
            rec.signatures.add(sig)

        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def has_neuron(module: nn.Module) -> bool:
    """Whether ``module`` is or contains a neuron the compiler knows (one worth compiling)."""
    for m in module.modules():
        info = classify_module(m)
        if info is not None and info.kind is Kind.NEURON:
            return True
    return False


class CompiledPart(nn.Module):
    """A compiled child standing in for the user's child inside running-as-written glue code.

    Calls go to the compiled module (for a single-step part: ``compiled(x[None])[0]`` per step).
    Reading a plain attribute of the child (``self.block.stride``) gives the original's value;
    reading its state or its submodules raises, since those are the compiled module's own.
    """

    def __init__(self, compiled: nn.Module, original: nn.Module, path: str, step: bool) -> None:
        super().__init__()
        self.compiled = compiled
        self.step = step
        object.__setattr__(self, "_original", original)  # not a submodule: never reset/moved
        object.__setattr__(self, "_part_path", path)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.step:
            return self.compiled(*args, **kwargs)
        (x,) = args
        out = self.compiled(x.unsqueeze(0))
        return _first_step(out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        original = object.__getattribute__(self, "_original")
        path = object.__getattribute__(self, "_part_path")
        memories = vars(original).get("_memories")
        if (isinstance(memories, dict) and name in memories) or isinstance(
            getattr(original, name, None), nn.Module
        ):
            raise AttributeError(
                f"{path!r} is compiled on its own, so its state and submodules ({name!r}) belong "
                "to the compiled part; code around it cannot read them"
            )
        return getattr(original, name)

    def extra_repr(self) -> str:
        return f"part={object.__getattribute__(self, '_part_path')!r}, step={self.step}"


def _first_step(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out[0]
    if isinstance(out, (tuple, list)):
        return type(out)(_first_step(o) for o in out)
    return out


@dataclasses.dataclass
class GlueReport:
    """What partial compilation did: the parts compiled and the parts that run as written."""

    compiled: list[str] = dataclasses.field(default_factory=list)
    as_written: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def notes(self) -> list[str]:
        """Report lines: one per part that runs as written (with why), then the compiled ones."""
        lines = [f"ran as written: {p!r}: {why}" for p, why in self.as_written]
        if self.compiled:
            lines.append(f"compiled inside: {', '.join(repr(p) for p in self.compiled)}")
        return lines


def build_glue(
    module: nn.Module,
    calls: dict[str, CallRecord],
    compile_part: CompilePart,
    step_mode_of: Callable[[nn.Module], str],
    path: str,
    display: str,
    reason: str,
    report: GlueReport,
) -> nn.Module | None:
    """A copy of ``module`` (sharing parameters) whose neuron-holding children are compiled.

    ``calls`` holds the recorded calls of ``module``'s submodules (relative paths); ``display``
    is the prefix of the parts' names in the report (``''`` for the model itself). Returns
    ``None`` when nothing inside could be compiled (then the module runs as it is).
    """
    from snncompile.frontend.trace import copy_sharing_parameters

    glue = copy_sharing_parameters(module)
    report.as_written.append((path, reason))
    replaced = _replace_children(glue, module, calls, compile_part, step_mode_of, display, report)
    if not replaced:
        report.as_written.pop()
        return None
    return glue


def _replace_children(
    glue: nn.Module,
    original: nn.Module,
    calls: dict[str, CallRecord],
    compile_part: CompilePart,
    step_mode_of: Callable[[nn.Module], str],
    display: str,
    report: GlueReport,
) -> int:
    replaced = 0
    for name, child in list(original.named_children()):
        full = f"{display}.{name}" if display else name
        if not has_neuron(child):
            continue  # no neuron inside: the user's code is what runs, nothing to gain
        sub_calls = {k[len(name) + 1 :]: v for k, v in calls.items() if k.startswith(f"{name}.")}
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # not callable: look inside
            replaced += _replace_children(
                getattr(glue, name), child, sub_calls, compile_part, step_mode_of, full, report
            )
            continue
        rec = calls.get(name)
        part = None
        why = None
        if rec is None:
            why = "not called while the example ran"
        elif len(rec.signatures) != 1:
            why = "called with inputs of different shapes"
        elif rec.kwargs or len(rec.args) != 1 or not isinstance(rec.args[0], torch.Tensor):
            why = "takes other inputs than one tensor"
        else:
            step = step_mode_of(child) == "s"
            x = rec.args[0]
            try:
                compiled = compile_part(child, x.unsqueeze(0) if step else x)
            except Exception as exc:  # noqa: BLE001 - any failure: run this child as written
                why = f"compiling it failed: {type(exc).__name__}: {exc}".splitlines()[0]
            else:
                part = CompiledPart(compiled, child, full, step)
        if part is not None:
            setattr(glue, name, part)
            report.compiled.append(full)
            replaced += 1
            continue
        # Not compiled as a whole: its own forward runs as written, its children compiled.
        report.as_written.append((full, why or "?"))
        mark = len(report.as_written)
        n = _replace_children(
            getattr(glue, name), child, sub_calls, compile_part, step_mode_of, full, report
        )
        if n == 0 and len(report.as_written) == mark:
            report.as_written.pop()  # nothing inside it changed: it is simply the user's code
        replaced += n
    return replaced


def check_glue(glue: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Run ``glue`` once on recorded inputs; the error text if it fails (e.g. a state read).

    Everything the run could change is put back: the RNG, buffers (BatchNorm statistics are
    shared with the user's model), Python attributes and the compiled parts' state.
    """
    from snncompile.frontend.state_guard import python_state, restore_python_state
    from snncompile.frontend.trace import _reset_state

    rng = torch.random.get_rng_state()
    buffers = [(b, b.detach().clone()) for b in glue.buffers()]
    attrs = python_state(glue)
    try:
        with torch.no_grad():
            glue(*_detached(args), **_detached(kwargs))
    except Exception as exc:  # noqa: BLE001 - reported, the module then runs as written
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        torch.random.set_rng_state(rng)
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        restore_python_state(glue, attrs)
        _reset_state(glue)
    return None
