"""Online training through time: OTTT, SLTT and FPTT, on eager and compiled models.

Backpropagation through time (BPTT) keeps every time step's activations until the backward pass,
so its training memory grows linearly with the number of steps ``T``. The online methods here
update (or accumulate gradients) after every step and cut the graph between steps, so memory
does not depend on ``T``:

* **OTTT** (Xiao et al., 2022, *Online Training Through Time for Spiking Neural Networks*): the
  membrane potential is detached every step and each spiking layer keeps a presynaptic trace
  ``trace_t = trace_{t-1} * (1 - 1/tau) + spike_t``. The next layer's *output value* is computed
  from the spikes, but its *weight gradient* from the trace (``dL/dW = delta^T . trace``), which
  carries the temporal credit that detaching the membrane removed. :class:`OTTTLIFNode` emits
  ``[spike, trace]`` in training; :class:`OTTTSequential` (or explicit :class:`GradwithTrace` /
  :class:`SpikeTraceOp` wrappers) consume the pair.
* **SLTT** (Meng et al., 2023): like OTTT without traces; :class:`SLTTLIFNode` only detaches the
  membrane every step, so the gradient at step ``t`` flows through the spatial path only.
* **FPTT** (Kag & Saligrama, 2021; Yin et al., 2023): every step does a gradient update on the
  step loss plus a dynamic regulariser ``alpha/2 * mse(w, w_ra + g_prev / (2 alpha))`` that pulls
  the weights toward a running average ``w_ra``. See :func:`fptt_online_training`.

The training loops (:func:`ottt_online_training`, :func:`fptt_online_training`) take any module
called once per step: an eager single-step network, or the per-step compiled module returned by
:func:`compile_online` (which shares parameters with the eager network, so one optimizer serves
both). The compiler side of that lives in :mod:`snncompile.runtime.online_compile`: this module
(the eager layers and the loops) imports no compiler code, and ``compile_online`` here forwards
to it on first use.

Semantics follow SpikingJelly 2.0.0 (``spikingjelly.activation_based.layer.online_learning``,
``neuron.online_learning`` and ``learning.online_learning``), checked by differential tests, with
two documented deviations: ``w_ra`` holds independent copies (see
:func:`fptt_online_training_init_w_ra`), and a target shorter than the input raises an
``IndexError`` *before* any update instead of part-way through the sequence.

Import note: :class:`OTTTLIFNode` and :class:`SLTTLIFNode` subclass ``LIFNode`` and are defined in
:mod:`snncompile.neuron` (imported here); :mod:`snncompile.layer` and :mod:`snncompile.functional`
re-export the other public names from here, so this module must not import them at module level
(it would be an import cycle).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from snncompile.base import MemoryModule
from snncompile.neuron import OTTTLIFNode, SLTTLIFNode
from snncompile.progress import progress_bar

if TYPE_CHECKING:
    from snncompile.runtime.online_compile import OnlineModule

__all__ = [
    "OTTTLIFNode",
    "SLTTLIFNode",
    "ReplaceforGrad",
    "GradwithTrace",
    "SpikeTraceOp",
    "OTTTSequential",
    "fptt_online_training_init_w_ra",
    "fptt_online_training",
    "ottt_online_training",
    "compile_online",
]


# =================================================================================================
# Spike / trace plumbing
# =================================================================================================
class ReplaceforGrad(torch.autograd.Function):
    """Return ``x_r`` in the forward pass and send the incoming gradient to both inputs.

    ``ReplaceforGrad.apply(x, x_r)`` has the *value* of ``x_r`` but is differentiable as if it
    were ``x`` (and ``x_r``): backward returns ``(grad, grad)``. It is the one trick behind OTTT:
    a layer is evaluated on the trace to obtain trace-based weight gradients, and the result is
    swapped for the spike-based output value without changing which graph the gradient follows.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_r: torch.Tensor) -> torch.Tensor:
        # Returning an input unchanged is allowed: autograd hands back a view of `x_r` that
        # carries this Function's grad_fn, so the gradient goes to both inputs as backward says.
        return x_r

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad


def _split_pair(x: Any, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack a ``[spike, trace]`` pair, raising a helpful error for anything else."""
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        got = type(x).__name__
        if isinstance(x, torch.Tensor):
            got = f"a tensor of shape {tuple(x.shape)}"
        raise TypeError(
            f"{owner} expects the [spike, trace] pair an OTTTLIFNode emits in training mode, got "
            f"{got}. Put it right after an OTTTLIFNode (or SpikeTraceOp); in eval() mode the "
            f"wrappers accept the plain spike tensor the neuron emits then."
        )
    return x[0], x[1]


def _grad_with_trace(module: nn.Module, x: Any, owner: str = "GradwithTrace") -> torch.Tensor:
    """Evaluate ``module`` on spikes for the value and on traces for the weight gradient."""
    spike, trace = _split_pair(x, owner)
    with torch.no_grad():
        value = module(spike)
    # Differentiable through `module` at the trace; the input gradient still reaches `spike`
    # (ReplaceforGrad routes it), so upstream OTTT neurons get their spatial gradient.
    for_grad = module(ReplaceforGrad.apply(spike, trace))
    return ReplaceforGrad.apply(for_grad, value)


def _apply_to_spike_and_trace(
    module: nn.Module, x: Any, owner: str = "SpikeTraceOp"
) -> list[torch.Tensor]:
    """Apply a parameter-free ``module`` to the spike (with grad) and the trace (without)."""
    spike, trace = _split_pair(x, owner)
    spike = module(spike)
    with torch.no_grad():
        trace = module(trace)
    return [spike, trace]


class GradwithTrace(nn.Module):
    """Wrap a parametric module so its output comes from spikes and its weight grad from traces.

    The input is the ``[spike, trace]`` pair of an :class:`OTTTLIFNode` in training mode. The
    output is ``module(spike)`` (a plain tensor); in backward, ``module``'s parameters receive the
    gradient of ``module`` evaluated at ``trace`` (for a linear layer: ``dL/dW = delta^T .
    trace``, ``dL/db = sum(delta)``) and ``spike`` receives ``module``'s input gradient.

    Args:
        module: the layer to wrap (``nn.Linear``, ``nn.Conv2d``, ...).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Return ``module(spike)`` with trace-based parameter gradients (see the class doc).

        In eval mode a plain tensor (the spike an OTTT neuron emits in eval mode) is passed to
        ``module`` as it is.
        """
        if isinstance(x, torch.Tensor) and not self.training:
            return self.module(x)
        owner = f"GradwithTrace({type(self.module).__name__})"
        return _grad_with_trace(self.module, x, owner=owner)


class SpikeTraceOp(nn.Module):
    """Apply a parameter-free module to both halves of a ``[spike, trace]`` pair.

    The spike goes through ``module`` with autograd (gradients flow back to the neuron), the trace
    without (it only feeds later weight gradients). Use it for pooling, flattening, dropout and
    similar layers between an :class:`OTTTLIFNode` and the next :class:`GradwithTrace`.

    Args:
        module: a module without parameters.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Sequence[torch.Tensor] | torch.Tensor) -> Any:
        """Return ``[module(spike), module(trace)]``, the second computed without autograd.

        In eval mode a plain tensor is passed to ``module`` as it is.
        """
        if isinstance(x, torch.Tensor) and not self.training:
            return self.module(x)
        return _apply_to_spike_and_trace(
            self.module, x, owner=f"SpikeTraceOp({type(self.module).__name__})"
        )


class OTTTSequential(nn.Sequential):
    """An ``nn.Sequential`` that routes OTTT ``[spike, trace]`` pairs automatically.

    While the running value is a plain tensor, each module is called normally. After an
    :class:`OTTTLIFNode` in training mode the value is a ``[spike, trace]`` list, and the next
    modules are handled as follows: another :class:`OTTTLIFNode` takes the spike; a module with
    parameters is evaluated as :class:`GradwithTrace` would (value from spikes, weight gradient
    from traces) and turns the pair back into a tensor; a module without parameters is applied to
    both halves as :class:`SpikeTraceOp` would. Explicit ``GradwithTrace`` / ``SpikeTraceOp``
    members are called as they are. In eval mode OTTT neurons emit plain spikes, so this is an
    ordinary ``nn.Sequential`` (explicit wrappers then pass the tensor to the module they wrap).
    """

    def forward(self, input: Any) -> Any:
        """Run the members in order with the OTTT routing described in the class doc."""
        x = input
        for index, module in enumerate(self):
            if isinstance(x, list):
                if isinstance(module, OTTTLIFNode):
                    x = module(x[0])
                elif isinstance(module, (GradwithTrace, SpikeTraceOp)):
                    x = module(x)
                elif next(module.parameters(), None) is None:
                    x = _apply_to_spike_and_trace(module, x, owner=self._member_name(index))
                else:
                    x = _grad_with_trace(module, x, owner=self._member_name(index))
            else:
                x = module(x)
        return x

    def _member_name(self, index: int) -> str:
        return f"OTTTSequential[{index}] ({type(self[index]).__name__})"


# =================================================================================================
# Network state helpers (work for our MemoryModules and SpikingJelly's alike)
# =================================================================================================
def _is_memory_module(module: nn.Module) -> bool:
    if isinstance(module, MemoryModule):
        return True
    # SpikingJelly's base.MemoryModule (and compatible third-party modules): duck-typed so the
    # loops also drive models built from SpikingJelly's layers without importing it.
    return isinstance(getattr(module, "_memories", None), dict) and callable(
        getattr(module, "detach", None)
    )


def _memory_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    return tuple(m for m in model.modules() if _is_memory_module(m))


def _detach_states(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        module.detach()


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_target_length(x_len: int, target_len: int, x_name: str, fn: str) -> None:
    if target_len < x_len:
        raise IndexError(
            f"{fn}: target_seq has {target_len} time steps but x_seq has {x_len} (time axis is "
            f"{x_name}); give one target per input step (repeat a per-sample label with "
            f"target.unsqueeze(...).expand(...))."
        )


# =================================================================================================
# FPTT
# =================================================================================================
def fptt_online_training_init_w_ra(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Return the initial running-average list ``w_ra`` for :func:`fptt_online_training`.

    One tensor per optimizer parameter, in ``optimizer.param_groups`` order, holding the
    parameter's current value. The tensors are **independent copies** (``p.detach().clone()``),
    not aliases of ``p.data``: an alias would silently follow every optimizer update until
    :func:`fptt_online_training` first replaces the list entry, so the running average would
    not be an average of past weights (with ``T == 1`` it would track the weights forever and
    the FPTT regulariser would stay exactly zero). SpikingJelly's documentation describes the
    entries as ``w.data`` (aliases); its 2.0.0 implementation also clones, and so do we.

    Args:
        optimizer: the optimizer that trains the network.

    Returns:
        A list of detached tensors aligned with the optimizer's parameters.
    """
    return [p.detach().clone() for p in _optimizer_parameters(optimizer)]


def fptt_online_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_seq: torch.Tensor,
    target_seq: torch.Tensor,
    f_loss_t: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    alpha: float,
    w_ra: list[torch.Tensor],
    *,
    progress: bool = True,
) -> None:
    """Train ``model`` on one sequence with FPTT, updating the weights at every time step.

    For each step ``t`` of ``x_seq`` (time first, ``[T, N, ...]``):

    1. ``loss = f_loss_t(model(x_t), target_t) + alpha/2 * sum_i mse(w_i, w_ra_i + g_i/(2 alpha))``
       where ``g_i`` is the previous step's loss gradient (0 at ``t = 0``); backward, optimizer
       step, then the network state is detached (the graph never spans two steps).
    2. Except at the last step, the step-``t`` loss gradient at the *updated* weights, ``g``, is
       computed by running the model once more, and ``w_ra_i <- (w_ra_i + w_i)/2 - g_i/(2 alpha)``
       (in place in the list). The network state is saved before and restored after this extra
       pass, so it does not advance the dynamics. As in SpikingJelly 2.0.0, the extra pass feeds
       ``x_t`` to the state reached *after* step ``t``.

    ``model`` is called with one step ``[N, ...]`` at a time: an eager single-step network or a
    :func:`compile_online` module. Its state is not reset here (call ``functional.reset_net``
    between sequences).

    Args:
        model: the network, called once per time step.
        optimizer: its optimizer; ``w_ra`` must follow the order of its parameters.
        x_seq: input sequence ``[T, N, ...]``.
        target_seq: target sequence ``[T, N, ...]`` (at least ``T`` steps).
        f_loss_t: per-step loss ``f_loss_t(y_t, target_t) -> scalar tensor``.
        alpha: the FPTT regularisation strength (> 0).
        w_ra: the running averages from :func:`fptt_online_training_init_w_ra`; updated in place.
        progress: show a progress bar over the time steps when one sequence takes more than a
            second and stderr is a terminal (``False``: never).

    Returns:
        None.

    Raises:
        IndexError: ``target_seq`` has fewer time steps than ``x_seq`` (raised before training).
        ValueError: ``w_ra`` does not have one entry per optimizer parameter.
        Exception: errors from the model, the loss, backward or the optimizer propagate unchanged.
    """
    parameters = _optimizer_parameters(optimizer)
    if len(w_ra) != len(parameters):
        raise ValueError(
            f"fptt_online_training: w_ra has {len(w_ra)} entries but the optimizer has "
            f"{len(parameters)} parameters; build it with "
            f"fptt_online_training_init_w_ra(optimizer)."
        )
    steps = x_seq.shape[0]
    _check_target_length(steps, target_seq.shape[0], "dim 0, [T, N, ...]", "fptt_online_training")
    memory_modules = _memory_modules(model)
    previous_grads: list[torch.Tensor | float] = [0.0] * len(parameters)

    bar = progress_bar(
        x_seq.unbind(0), desc="fptt_online_training", total=steps, unit="step",
        progress=progress, delay=1.0,
    )
    for t, x_t in enumerate(bar):
        target_t = target_seq[t]
        optimizer.zero_grad()
        loss = f_loss_t(model(x_t), target_t)
        loss = loss + (alpha / 2.0) * sum(
            F.mse_loss(p, w_ra[i] + previous_grads[i] / (2.0 * alpha))
            for i, p in enumerate(parameters)
        )
        loss.backward()
        optimizer.step()
        _detach_states(memory_modules)

        if t < steps - 1:
            # Snapshot the state the next step must start from; the extra pass below moves it.
            saved = [copy.deepcopy(m._memories) for m in memory_modules]
            optimizer.zero_grad()
            f_loss_t(model(x_t), target_t).backward()
            with torch.no_grad():
                for i, p in enumerate(parameters):
                    # An unused parameter has no gradient: treat it as zero (SpikingJelly fails).
                    grad = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                    previous_grads[i] = grad
                    w_ra[i] = (w_ra[i] + p) / 2.0 - grad / (2.0 * alpha)
            for module, state in zip(memory_modules, saved, strict=True):
                module._memories = state
        optimizer.zero_grad()


# =================================================================================================
# OTTT / SLTT
# =================================================================================================
def ottt_online_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_seq: torch.Tensor,
    target_seq: torch.Tensor,
    f_loss_t: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    online: bool,
    *,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``model`` on a batch of sequences with OTTT (or SLTT), one step at a time.

    ``x_seq`` and ``target_seq`` are **batch first**, ``[N, T, ...]``. For each step ``t`` the
    model runs on ``x_seq[:, t]`` (if it returns a ``[spike, trace]`` pair the spike is used), the
    step loss is backpropagated immediately and the network state is detached, so the graph never
    holds more than one step. With ``online=True`` the optimizer steps after every time step (the
    gradients are zeroed before each step); with ``online=False`` the gradients of all steps are
    accumulated and applied once at the end.

    Use it with :class:`OTTTSequential` + :class:`OTTTLIFNode` (OTTT) or with a network of
    :class:`SLTTLIFNode` (SLTT); it accepts a :func:`compile_online` module as ``model`` too.

    Args:
        model: the network, called once per time step with ``[N, ...]``.
        optimizer: its optimizer.
        x_seq: inputs ``[N, T, ...]``.
        target_seq: targets ``[N, T, ...]`` (at least ``T`` steps on dim 1).
        f_loss_t: per-step loss ``f_loss_t(y_t, target_t) -> scalar tensor``.
        online: update every step (True) or once per sequence (False).
        progress: show a progress bar over the time steps when one batch takes more than a
            second and stderr is a terminal (``False``: never).

    Returns:
        ``(batch_loss, y_all)``: the sum of the detached step losses (a 0-dim tensor) and the
        detached outputs stacked batch first, ``[N, T, ...]``.

    Raises:
        IndexError: ``target_seq`` has fewer time steps than ``x_seq`` (raised before training).
        Exception: errors from the model, the loss, backward or the optimizer propagate unchanged.
    """
    if x_seq.dim() < 2:
        raise ValueError(
            f"ottt_online_training: x_seq must be batch first [N, T, ...], got shape "
            f"{tuple(x_seq.shape)}."
        )
    steps = x_seq.shape[1]
    target_steps = target_seq.shape[1] if target_seq.dim() >= 2 else 0
    _check_target_length(steps, target_steps, "dim 1, [N, T, ...]", "ottt_online_training")
    memory_modules = _memory_modules(model)
    xs = x_seq.transpose(0, 1).unbind(0)
    targets = target_seq.transpose(0, 1)

    # Both results are filled in place in buffers allocated at the first step: appending one
    # small long-lived tensor per step (then stacking) interleaves them with each step's
    # temporaries on the heap, and glibc's heap then grows with T although nothing leaks.
    batch_loss: torch.Tensor | None = None
    y_all: torch.Tensor | None = None
    if not online:
        optimizer.zero_grad()
    bar = progress_bar(
        xs, desc="ottt_online_training", total=steps, unit="step", progress=progress, delay=1.0
    )
    for t, x_t in enumerate(bar):
        if online:
            optimizer.zero_grad()
        y_t = model(x_t)
        if isinstance(y_t, (list, tuple)):
            y_t = y_t[0]
        loss = f_loss_t(y_t, targets[t].contiguous())
        loss.backward()
        if online:
            optimizer.step()
        # Only this step's graph is used; cut the state so the next backward cannot reach it.
        _detach_states(memory_modules)
        if batch_loss is None or y_all is None:
            batch_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
            y_all = y_t.new_empty((y_t.shape[0], steps, *y_t.shape[1:]))
        batch_loss.add_(loss.detach())
        y_all[:, t].copy_(y_t.detach())
    if not online:
        optimizer.step()
    if batch_loss is None or y_all is None:  # T = 0
        return torch.zeros(()), torch.empty(0)
    return batch_loss, y_all


# =================================================================================================
# Compiled models: the compiler side lives in snncompile.runtime.online_compile
# =================================================================================================
def compile_online(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    backend: str = "auto",
    strict: bool = False,
) -> OnlineModule:
    """Compile ``model`` for online training: a module that runs one time step per call.

    The result goes wherever the eager single-step network would: ``ottt_online_training``,
    ``fptt_online_training`` or a hand-written loop. It shares parameters with ``model`` and
    keeps its own neuron state. Two routes:

    * An :class:`OTTTSequential` (any network with :class:`OTTTLIFNode`): the spike/trace
      routing is resolved once into generated ``fx`` code (train and eval variants), and the
      OTTT neurons run their step with the fused kernel when ``backend`` selects one.
    * Any other single-step network (LIF/IF/PLIF, :class:`SLTTLIFNode`, residual blocks, ...):
      :func:`snncompile.optimize` in ``'train'`` mode with ``T = 1``, called once per step.
      Every neuron copy inside it gets ``backend``.

    With ``backend='torch'`` the results equal the eager network's exactly; fused kernels
    (``'cpu'``, ``'cuda'``, or ``'auto'`` on steps with at least
    ``snncompile.runtime.fused.AUTO_MIN_ELEMENTS`` neurons) give the same spikes and states
    and gradients equal to float rounding.

    Args:
        model: the eager single-step network (``step_mode='s'``).
        example_input: one time step ``[N, ...]`` as ``model(x_t)`` receives it.
        backend: neuron backend: ``'auto'``, ``'torch'``, ``'cpu'`` or ``'cuda'``.
        strict: passed to :func:`snncompile.optimize` (fail instead of running untraceable
            submodules opaquely).

    Returns:
        An :class:`OnlineModule` in the same train/eval mode as ``model``.

    Raises:
        ValueError: unknown ``backend``.
        NotImplementedError: OTTT neurons that are not direct members of an OTTTSequential.
        snncompile.frontend.trace.FrontendError: the optimize route could not trace the model.
    """
    from snncompile.runtime.online_compile import compile_online as _compile_online

    return _compile_online(model, example_input, backend=backend, strict=strict)


def __getattr__(name: str) -> Any:
    # OnlineModule lives with the compiler (snncompile.runtime.online_compile).
    if name == "OnlineModule":
        from snncompile.runtime.online_compile import OnlineModule

        return OnlineModule
    raise AttributeError(f"module 'snncompile.online' has no attribute {name!r}")
