"""``StepLoop``: run one op once per time step over ``[T, N, *]`` inputs and stack the results.

The lowering pass uses it for ops that must see one step at a time (stateful opaque modules,
batchnorm with per-step batch statistics, ops that mix the batch). It is exact by construction:
the op is called exactly as the single-step model would call it, step after step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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


def _unbind(x: Any) -> Any:
    """``[T, ...] -> T`` steps; a list/tuple of sequences (per-step lists, stacked) -> T lists."""
    if isinstance(x, (tuple, list)):
        parts = [_unbind(v) for v in x]
        return [type(x)(p[t] for p in parts) for t in range(len(parts[0]))]
    return x.unbind(0)


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
        steps = [_unbind(x) if s else None for x, s in zip(inputs, self.seq_inputs, strict=True)]
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


class PerStepBatchNorm(nn.Module):
    """BatchNorm with per-time-step batch statistics, computed for all ``T`` steps at once.

    A single-step model in training mode normalizes step ``t`` with the mean and variance of
    that step's batch and updates the running statistics once per step. Viewing ``[T, N, C, *]``
    as ``[N, T*C, *]`` makes every ``(t, c)`` pair its own channel, so one ``batch_norm`` call
    computes exactly the per-step statistics (the same elements, reduced in the same order);
    the ``T`` running-statistic updates are then applied in step order, like eager.
    Without batch statistics (eval mode with running statistics) it normalizes ``[T*N, C, *]``.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        T = x.shape[0]
        if not bn.training and bn.running_mean is not None:
            return bn(x.flatten(0, 1)).unflatten(0, (T, -1))
        N, C, rest = x.shape[1], x.shape[2], x.shape[3:]
        z = x.transpose(0, 1).reshape(N, T * C, *rest)
        w = bn.weight.repeat(T) if bn.weight is not None else None
        b = bn.bias.repeat(T) if bn.bias is not None else None
        track = bn.training and bn.track_running_stats and bn.running_mean is not None
        if track:
            # momentum 1.0 into fresh buffers leaves exactly each (t, c) batch mean/unbiased var.
            mean = torch.zeros(T * C, dtype=bn.running_mean.dtype, device=x.device)
            var = torch.ones(T * C, dtype=bn.running_var.dtype, device=x.device)
            y = F.batch_norm(z, mean, var, w, b, True, 1.0, bn.eps)
            self._update(mean.view(T, C), var.view(T, C))
        else:
            y = F.batch_norm(z, None, None, w, b, True, 0.0, bn.eps)
        return y.reshape(N, T, C, *rest).transpose(0, 1)

    @torch.no_grad()
    def _update(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        bn = self.bn
        for t in range(means.shape[0]):
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                m = 1.0 / float(bn.num_batches_tracked)
            else:
                m = bn.momentum
            bn.running_mean.copy_(m * means[t] + (1.0 - m) * bn.running_mean)
            bn.running_var.copy_(m * variances[t] + (1.0 - m) * bn.running_var)
