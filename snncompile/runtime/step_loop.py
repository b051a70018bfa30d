"""``StepLoop``: run one op once per time step over ``[T, N, *]`` inputs and stack the results.

The lowering pass uses it for ops that must see one step at a time (stateful opaque modules,
batchnorm with per-step batch statistics, ops that mix the batch). It is exact by construction:
the op is called exactly as the single-step model would call it, step after step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from snncompile.ir.graph import Ref


def _fill(template: Any, values: list[Any]) -> Any:
    if isinstance(template, Ref):
        return values[template.index]
    if isinstance(template, tuple):
        return tuple(_fill(t, values) for t in template)
    if isinstance(template, list):
        return [_fill(t, values) for t in template]
    if isinstance(template, dict):
        return {k: _fill(v, values) for k, v in template.items()}
    return template


def _stack(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([o[i] for o in outputs]) for i in range(len(first)))
    raise TypeError(f"StepLoop: cannot stack per-step outputs of type {type(first).__name__}")


class StepLoop(nn.Module):
    """Call ``module`` (or ``target``) once per time step.

    ``args``/``kwargs`` are argument templates whose :class:`~snncompile.ir.Ref` entries index the
    forward's inputs; inputs flagged in ``seq_inputs`` are ``[T, N, *]`` and are unbound over
    ``T`` (``unbind`` keeps backward linear in ``T``), the others are passed unchanged.
    """

    def __init__(
        self,
        module: nn.Module | None,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seq_inputs: tuple[bool, ...],
    ) -> None:
        super().__init__()
        self.module = module
        self.target = target
        self.args_template = args
        self.kwargs_template = kwargs
        self.seq_inputs = seq_inputs

    def forward(self, *inputs: Any) -> Any:
        steps = [x.unbind(0) if s else None for x, s in zip(inputs, self.seq_inputs, strict=True)]
        T = next(len(s) for s in steps if s is not None)
        outputs = []
        for t in range(T):
            values = [s[t] if s is not None else x for x, s in zip(inputs, steps, strict=True)]
            args = _fill(self.args_template, values)
            kwargs = _fill(self.kwargs_template, values)
            if self.module is not None:
                outputs.append(self.module(*args, **kwargs))
            elif isinstance(self.target, str):
                outputs.append(getattr(args[0], self.target)(*args[1:], **kwargs))
            else:
                outputs.append(self.target(*args, **kwargs))
        return _stack(outputs)

    def extra_repr(self) -> str:
        if self.module is None:
            return f"target={self.target!r}"
        return ""
