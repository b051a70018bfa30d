"""Shape guards: a compiled module runs only programs traced for the input shapes it receives.

``optimize(model, x)`` traces ``model`` on one example, and a traced program may depend on the
example's sizes (a size read at trace time, a decision taken from the recorded shapes). So the
compiled module records the *shape signature* of its example -- ``tuple(x.shape)`` -- and keeps
a cache ``signature -> program``:

* an input with a signature seen before runs the program cached for it;
* an input with a new signature (another batch size, ``T`` or spatial size) is **re-traced**:
  the model is compiled again on that input with the same options. If the new program is the
  same as one already compiled -- the same optimized IR up to the recorded shapes and the same
  generated code -- the signature is mapped to that program (the usual case: the program is
  generic in the sizes; its neuron state, kernels and parameters are then literally the same
  objects). Otherwise the new program is kept as its own *specialisation*;
* a re-trace that fails (the model itself cannot run on that shape, e.g. a ``Linear`` after a
  flatten at another image size) raises a :class:`ShapeGuardError` that names both shapes and
  the reason.

Parameters and buffers: every specialisation is compiled from the same user model, so
parameters and batchnorm statistics are the model's own tensors in all of them (training at one
batch size updates what the others compute with); in inference mode, folded batchnorm weights
are snapshots taken when each specialisation is compiled, like the first compile's.

Neuron state: each specialisation owns its neuron copies, as one compiled module does. A
signature that maps to an existing program shares that program's state exactly as the eager
model would. Switching to a *different* specialisation while the previous one holds state that
was not reset cannot continue that state, so it raises :class:`ShapeGuardError` (call
``functional.reset_net(compiled)`` between batches, as SpikingJelly training loops do; eager
SpikingJelly itself fails when the batch size changes under a live membrane).

The guard is the compiled module's ``shape_guard`` submodule. It owns no tensors of its own
(nothing appears in ``state_dict``); the extra specialisations are kept outside the module tree
and follow the compiled module's ``train()``/``eval()``, ``.to(...)``, ``reset()`` and
``detach()`` (so ``functional.reset_net`` and ``detach_net`` reach them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from snncompile.ir.printer import format_graph

Signature = tuple[Any, ...]

_SHAPE = re.compile(r"^(\s*%\S+ : \w+)\[[^\]]*\]", re.MULTILINE)
_HEADER_SIZES = re.compile(r", T=\d+, N=\d+")


class ShapeGuardError(ValueError):
    """An input shape the compiled module cannot run correctly; the message says what to do."""


def signature(x: Any) -> Signature | None:
    """The shape signature of a forward input: its shape, or the shapes of a tensor tuple."""
    if isinstance(x, torch.Tensor):
        return tuple(int(s) for s in x.shape)
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(tuple(int(s) for s in t.shape) for t in x)
    return None


def format_signature(sig: Signature | None) -> str:
    """``[4, 1, 28, 28]``-style text of a signature."""
    if sig is None:
        return "<not a tensor>"
    if sig and isinstance(sig[0], tuple):
        return "(" + ", ".join(format_signature(s) for s in sig) + ")"
    return "[" + ", ".join(str(s) for s in sig) + "]"


def program_key(compiled: Any) -> str:
    """What a compiled program computes, up to the shapes recorded while tracing.

    The optimized IR's text with the per-node shapes and the header's ``T``/``N`` removed, plus
    the generated fx code. Two programs with the same key run the same code on any input.
    """
    text = _HEADER_SIZES.sub("", _SHAPE.sub(r"\1", format_graph(compiled.graph)))
    return text + "\n--- code ---\n" + compiled.gm.code


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
        )
    try:
        return bool(a == b)
    except Exception:
        return False


def holds_live_state(module: nn.Module) -> bool:
    """Whether a stateful module under ``module`` holds state other than its reset value."""
    for m in module.modules():
        memories = vars(m).get("_memories")
        resets = vars(m).get("_memories_rv")
        if not isinstance(memories, dict) or not isinstance(resets, dict):
            continue
        for name, value in memories.items():
            if name in resets and not _same_value(value, resets[name]):
                return True
    return False


class ShapeGuard(nn.Module):
    """The signature cache of one compiled module (see the module docstring).

    Args:
        recompile: ``recompile(x)`` compiles the user's model on ``x`` with the options of the
            first compile and returns the new :class:`~snncompile.runtime.compiled.CompiledModule`
            (without a guard of its own).
        first: The signature of the example the owning compiled module was traced with.
        first_key: :func:`program_key` of the owning compiled module, taken before anything
            (learner taps) changes its generated code.
    """

    def __init__(
        self, recompile: Callable[[torch.Tensor], Any], first: Signature | None, first_key: str
    ) -> None:
        super().__init__()
        # Plain attributes (not submodules): nothing here is part of the module tree.
        self._recompile = recompile
        self._variants: list[Any] = []  # CompiledModules other than the owner
        self._keys = [first_key]  # program_key of the owner (index 0) then of each variant
        self._by_signature: dict[Signature, int] = {} if first is None else {first: 0}
        self._first = first
        self._active = 0  # index of the program that ran last (0 = the owner)

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def signatures(self) -> dict[Signature, int]:
        """``signature -> program index`` (0: the first compile; k: the k-th specialisation)."""
        return dict(self._by_signature)

    def program(self, owner: nn.Module, index: int) -> Any:
        """The compiled module running program ``index`` (``owner`` for index 0)."""
        return owner if index == 0 else self._variants[index - 1]

    def graph_for(self, owner: nn.Module, shape: Signature) -> Any:
        """The optimized IR graph run for inputs of shape ``shape`` (must have been seen)."""
        key = tuple(shape)
        if key not in self._by_signature:
            raise KeyError(
                f"no program for input shape {format_signature(key)}; compiled shapes: "
                + ", ".join(format_signature(s) for s in self._by_signature)
            )
        return self.program(owner, self._by_signature[key]).graph

    def describe(self) -> list[str]:
        """Report lines: which signatures were compiled and which program each runs."""
        lines = [f"shape signatures ({len(self._variants) + 1} program(s)):"]
        first_of: dict[int, Signature] = {}
        for sig, idx in self._by_signature.items():
            first_of.setdefault(idx, sig)
        for sig, idx in self._by_signature.items():
            text = format_signature(sig)
            if sig == first_of[idx]:
                what = "traced (first compile)" if idx == 0 else f"traced: specialisation {idx}"
            else:
                what = f"re-traced, same program as {format_signature(first_of[idx])}"
            lines.append(f"  {text}: {what}")
        return lines

    # -- dispatch --------------------------------------------------------------------------------
    def select(self, owner: nn.Module, x: Any) -> Any:
        """The compiled module that must run ``x``: ``None`` for the owner, else a variant."""
        sig = signature(x)
        if sig is None:
            return None
        index = self._by_signature.get(sig)
        if index is None:
            index = self._compile(owner, x, sig)
        if index != 0 and getattr(owner, "learners", None):
            raise ShapeGuardError(
                f"compiled model: input shape {format_signature(sig)} runs another "
                f"specialisation than the program for {format_signature(self._first)}, to which "
                "learners are attached (they only see that program). Feed the compiled model "
                "inputs of that shape while learning."
            )
        if index != self._active:
            previous = self.program(owner, self._active)
            if holds_live_state(previous.gm):
                raise ShapeGuardError(
                    f"compiled model: the input shape changed to {format_signature(sig)}, which "
                    "runs a different specialisation of the model than the previous call, while "
                    "the neuron state of that call is still live (not reset). A specialisation "
                    "cannot continue another's state: call functional.reset_net(compiled) "
                    "between inputs of different shapes."
                )
            self._active = index
        if index == 0:
            return None
        variant = self._variants[index - 1]
        if variant.training != owner.training:
            variant.train(owner.training)
        return variant

    def _compile(self, owner: nn.Module, x: torch.Tensor, sig: Signature) -> int:
        try:
            new = self._recompile(x)
        except Exception as exc:
            raise ShapeGuardError(
                "compiled model: it was compiled for input shape(s) "
                + ", ".join(format_signature(s) for s in self._by_signature)
                + f" and got {format_signature(sig)}; re-tracing the model at the new shape "
                f"failed: {type(exc).__name__}: {exc}"
            ) from exc
        key = program_key(new)
        if key in self._keys:
            index = self._keys.index(key)
        else:
            self._variants.append(new)
            self._keys.append(key)
            index = len(self._keys) - 1
        self._by_signature[sig] = index
        return index

    # -- keeping the hidden specialisations in step with the owner -------------------------------
    def train(self, mode: bool = True) -> ShapeGuard:
        """Set training mode here and on every specialisation."""
        super().train(mode)
        for v in self._variants:
            v.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> ShapeGuard:
        super()._apply(fn, recurse)
        for v in self._variants:
            v._apply(fn, recurse)
        return self

    def reset(self) -> None:
        """Reset the state of every specialisation (``functional.reset_net`` calls this)."""
        for v in self._variants:
            for m in v.modules():
                reset = getattr(m, "reset", None)
                if callable(reset) and m is not v:
                    reset()

    def detach(self) -> None:
        """Detach the state of every specialisation (``functional.detach_net`` calls this)."""
        for v in self._variants:
            for m in v.modules():
                detach = getattr(m, "detach", None)
                if callable(detach) and m is not v:
                    detach()

    def extra_repr(self) -> str:
        return ", ".join(format_signature(s) for s in self._by_signature)
