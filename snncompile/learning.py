"""Spike-timing-dependent plasticity (STDP) and its reward-modulated variants.

This module follows SpikingJelly 2.0.0's ``learning`` semantics (checked by differential tests):

* **Traces first.** At each step the pre/post traces are updated *before* the weight change is
  computed. STDP uses ``trace = trace - trace / tau + spike`` (so ``tau >= 1``); the
  reward-modulated rules (MSTDP, MSTDP-ET) use ``trace = trace * exp(-1 / tau) + spike``
  (``tau > 0``).
* **STDP weight change** for a synapse ``w[o, i]`` (summed over the batch and, for convolutions,
  over output positions; never averaged)::

      delta_w = f_post(w) * sum(out_spike[o] * trace_pre[i])
              - f_pre(w) * sum(trace_post[o] * in_spike[i])

  ``f_pre`` and ``f_post`` default to the identity and must act elementwise on the weight.
* **MSTDP** keeps a per-sample eligibility ``[N, O, I]``; ``MSTDPLearner.step(reward)`` applies
  ``reward[n]`` to the eligibility of the *previous* step (the first update is zero), then computes
  the current eligibility. **MSTDP-ET** low-pass filters the previous eligibility into
  ``trace_e = trace_e * exp(-1 / tau_trace) + eligibility / tau_trace`` and uses
  ``reward * trace_e``.
* **Convolutions** (``nn.Conv1d``, ``nn.Conv2d``; any stride and padding, ``dilation == 1``,
  ``groups == 1``) pad the input spikes the way the layer does, so the presynaptic trace has the
  *padded* input shape.
* ``learner.step(on_grad=True)`` adds ``-delta_w`` to ``synapse.weight.grad``: an SGD step with
  learning rate ``lr`` then *increases* the weight by ``lr * delta_w``. Only the weight is learned,
  never the bias.

Multi-step runs are batched over time. Because the weight is fixed during a multi-step update,
the per-step correlations collapse into one correlation over the ``T * N`` stacked samples (a
matmul for ``Linear``, one convolution weight-gradient for convolutions). The trace recurrence is
a linear filter: for small steps it is evaluated for all ``T`` steps at once as a lower-triangular
decay matrix times the spike sequence (:func:`trace_sequence`, ``method='matmul'``); for large
steps a fused in-place recurrence (one kernel per step) measured faster on CPU and is used instead.

Learners consume ``(pre_spike, post_spike)`` pairs. By default they fill their input/output
monitors (:mod:`snncompile.monitor`) with forward hooks on the synapse and the neuron; with
``hooks=False`` nothing is hooked and pairs are fed with :meth:`STDPLearner.record`, which is how a
compiled model whose fused kernels never call the original modules can drive the same learner.
``CompiledModule.attach(learner, ...)`` (:mod:`snncompile.runtime.learning_hooks`) does that for a
model compiled with :func:`snncompile.optimize`, whatever layout its passes chose.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from snncompile.base import MemoryModule
from snncompile.monitor import BaseMonitor, InputMonitor, OutputMonitor

__all__ = [
    "MSTDPETLearner",
    "MSTDPLearner",
    "STDPLearner",
    "MATMUL_TRACE_MAX_STEP",
    "STDP_BLOCK_BYTES",
    "TRACE_CHUNK",
    "mstdp_linear_single_step",
    "mstdpet_linear_single_step",
    "stdp_conv1d_single_step",
    "stdp_conv2d_single_step",
    "stdp_linear_single_step",
    "stdp_multi_step",
    "trace_sequence",
]

Trace = float | torch.Tensor | None
WeightFn = Callable[[torch.Tensor], torch.Tensor]

#: Steps per decay-matrix block in :func:`trace_sequence` (cost per block is ``chunk**2`` per
#: element; larger T is processed block by block with the trace carried between blocks).
TRACE_CHUNK = 32

#: :func:`trace_sequence` with ``method='auto'`` uses the decay-matrix matmul when one step holds at
#: most this many elements, else the in-place recurrence (measured faster for large steps on CPU).
MATMUL_TRACE_MAX_STEP = 4096

#: Multi-step STDP forms the weight change over blocks of time steps whose spike/trace working set
#: is at most this many bytes (cache-resident; at least one step per block).
STDP_BLOCK_BYTES = 4 * 1024 * 1024

_SYNAPSES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ------------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------------
def _check_tau(owner: str, exponential: bool, **taus: float) -> None:
    for name, tau in taus.items():
        bad = not math.isfinite(tau) or tau <= 0 or (not exponential and tau < 1)
        if bad:
            rule = "> 0 (decay exp(-1/tau))" if exponential else ">= 1 (decay 1 - 1/tau)"
            raise ValueError(f"{owner}: {name} must be a finite time constant {rule}, got {tau!r}.")


def _synapse_kind(owner: str, layer: nn.Module, allowed: tuple[type, ...] = _SYNAPSES) -> type:
    for kind in allowed:
        if isinstance(layer, kind):
            if kind is not nn.Linear:
                _check_conv_config(owner, layer)
            return kind
    names = ", ".join(f"nn.{k.__name__}" for k in allowed)
    raise NotImplementedError(
        f"{owner}: unsupported synapse type {type(layer).__module__}.{type(layer).__name__}; "
        f"supported: {names} (and subclasses such as snncompile.layer or SpikingJelly layers)."
    )


def _check_conv_config(owner: str, conv: nn.Module) -> None:
    if any(d != 1 for d in conv.dilation):
        raise NotImplementedError(
            f"{owner}: STDP for {type(conv).__name__} with dilation={tuple(conv.dilation)} is not "
            f"implemented; use dilation=1."
        )
    if conv.groups != 1:
        raise NotImplementedError(
            f"{owner}: STDP for {type(conv).__name__} with groups={conv.groups} is not "
            f"implemented; use groups=1."
        )


def _pad_input(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pad spikes exactly as ``conv`` pads its input (any padding mode, 'same'/'valid' too)."""
    pad = conv._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pad, mode=mode)


def _check_spikes(
    owner: str,
    layer: nn.Module,
    kind: type,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    lead: str,
) -> None:
    """Check that (padded) input and output spikes fit ``layer``; ``lead`` names leading dims."""
    weight = layer.weight
    ndim = weight.dim()  # 2 for Linear; 3/4 for Conv1d/Conv2d, same as the batched spike dims
    if in_spike.dim() != ndim or out_spike.dim() != ndim:
        raise ValueError(
            f"{owner}: spikes for {type(layer).__name__} must have shape [{lead}, ...] with "
            f"{ndim} dims per step, got in_spike {tuple(in_spike.shape)} and out_spike "
            f"{tuple(out_spike.shape)}."
        )
    if in_spike.shape[0] != out_spike.shape[0]:
        raise ValueError(
            f"{owner}: in_spike batch {in_spike.shape[0]} != out_spike batch {out_spike.shape[0]}."
        )
    if in_spike.shape[1] != weight.shape[1] or out_spike.shape[1] != weight.shape[0]:
        raise ValueError(
            f"{owner}: {type(layer).__name__} weight {tuple(weight.shape)} expects "
            f"{weight.shape[1]} input and {weight.shape[0]} output features/channels, got "
            f"in_spike {tuple(in_spike.shape)} and out_spike {tuple(out_spike.shape)}."
        )
    if kind is not nn.Linear:
        expected = tuple(
            (size - k) // s + 1
            for size, k, s in zip(in_spike.shape[2:], weight.shape[2:], layer.stride, strict=True)
        )
        if tuple(out_spike.shape[2:]) != expected:
            raise ValueError(
                f"{owner}: {type(layer).__name__} (kernel {tuple(weight.shape[2:])}, stride "
                f"{tuple(layer.stride)}, padding {layer.padding}) maps the input spikes to "
                f"spatial shape {expected}, but out_spike has {tuple(out_spike.shape[2:])}; pass "
                f"the spikes of the neuron that directly follows this layer."
            )


def _materialize(owner: str, name: str, trace: Trace, like: torch.Tensor) -> torch.Tensor:
    if trace is None:
        return torch.zeros_like(like)
    if isinstance(trace, torch.Tensor):
        if trace.dim() > 0 and trace.shape != like.shape:
            raise ValueError(
                f"{owner}: {name} has shape {tuple(trace.shape)} but the spikes it follows have "
                f"shape {tuple(like.shape)}; reset the traces (learner.reset()) before changing "
                f"the batch size or input size."
            )
        return trace.to(like.dtype).expand_as(like) if trace.dim() == 0 else trace
    return torch.full_like(like, float(trace))


# ------------------------------------------------------------------------------------------------
# correlations: sum over samples (and output positions) of post[o] * pre[i]
# ------------------------------------------------------------------------------------------------
def _correlate(kind: type, layer: nn.Module, post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Return ``sum_{n,pos} post[n, o, pos] * pre[n, i, pos * stride + k]``, weight-shaped.

    ``post`` is ``[M, O, *out]`` and ``pre`` is the padded ``[M, I, *in]``. For Linear this is a
    matmul; for convolutions it is exactly the convolution weight-gradient with ``post`` as the
    output gradient, which ATen computes in one call.
    """
    if kind is nn.Linear:
        return post.transpose(0, 1) @ pre
    weight = layer.weight.detach()
    d = weight.dim() - 2
    return torch.ops.aten.convolution_backward(
        post,
        pre,
        weight,
        None,
        list(layer.stride),
        [0] * d,
        [1] * d,
        False,
        [0] * d,
        1,
        (False, True, False),
    )[1]


def _stdp_delta(
    kind: type,
    layer: nn.Module,
    weight: torch.Tensor,
    pre: torch.Tensor,
    post: torch.Tensor,
    tr_pre: torch.Tensor,
    tr_post: torch.Tensor,
    f_pre: WeightFn,
    f_post: WeightFn,
) -> torch.Tensor:
    """Sum the STDP weight change over ``[T, N, ...]`` spikes and traces (conv input padded)."""
    if f_pre is f_post:
        # Same modulation (the identity by default): f(w) * (corr(post, tr_pre) - corr(tr_post,
        # pre)) as ONE correlation whose samples interleave the potentiation and the (negated)
        # depression terms of each step. The two terms largely cancel; accumulating them together
        # keeps the float32 rounding error at the level of the per-step loop instead of growing
        # with the size of each separate (large, positive) sum.
        post_all = torch.cat([post, -tr_post], dim=1).flatten(0, 1)
        pre_all = torch.cat([tr_pre, pre], dim=1).flatten(0, 1)
        return f_post(weight) * _correlate(kind, layer, post_all, pre_all)
    potentiation = _correlate(kind, layer, post.flatten(0, 1), tr_pre.flatten(0, 1))
    depression = _correlate(kind, layer, tr_post.flatten(0, 1), pre.flatten(0, 1))
    return f_post(weight) * potentiation - f_pre(weight) * depression


def _prepare(
    owner: str, layer: nn.Module, kind: type, in_spike: torch.Tensor, out_spike: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = layer.weight.detach()
    in_spike = in_spike.detach().to(weight.dtype)
    out_spike = out_spike.detach().to(weight.dtype)
    if kind is not nn.Linear and in_spike.dim() == weight.dim():
        in_spike = _pad_input(layer, in_spike)
    return weight, in_spike, out_spike


def _stdp_single(
    owner: str,
    layer: nn.Module,
    kind: type,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: Trace,
    trace_post: Trace,
    tau_pre: float,
    tau_post: float,
    f_pre: WeightFn,
    f_post: WeightFn,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_tau(owner, False, tau_pre=tau_pre, tau_post=tau_post)
    weight, in_spike, out_spike = _prepare(owner, layer, kind, in_spike, out_spike)
    _check_spikes(owner, layer, kind, in_spike, out_spike, "N")
    trace_pre = _materialize(owner, "trace_pre", trace_pre, in_spike)
    trace_post = _materialize(owner, "trace_post", trace_post, out_spike)
    trace_pre = trace_pre - trace_pre / tau_pre + in_spike
    trace_post = trace_post - trace_post / tau_post + out_spike
    delta_w = _stdp_delta(
        kind, layer, weight, in_spike[None], out_spike[None], trace_pre[None], trace_post[None],
        f_pre, f_post,
    )
    return trace_pre, trace_post, delta_w


# ------------------------------------------------------------------------------------------------
# single-step STDP functions (SpikingJelly's signatures)
# ------------------------------------------------------------------------------------------------
def stdp_linear_single_step(
    fc: nn.Linear,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: Trace,
    trace_post: Trace,
    tau_pre: float,
    tau_post: float,
    f_pre: WeightFn = _identity,
    f_post: WeightFn = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply one STDP step to a linear layer and return ``(trace_pre, trace_post, delta_w)``.

    Args:
        fc: the ``nn.Linear`` (or subclass) whose weight is learned; it is not modified.
        in_spike: presynaptic spikes ``[N, in_features]``.
        out_spike: postsynaptic spikes ``[N, out_features]``.
        trace_pre: presynaptic trace ``[N, in_features]``, a float, or ``None`` for zero.
        trace_post: postsynaptic trace ``[N, out_features]``, a float, or ``None`` for zero.
        tau_pre: presynaptic trace time constant in steps (``>= 1``).
        tau_post: postsynaptic trace time constant in steps (``>= 1``).
        f_pre: elementwise weight modulation of the depression (pre-after-post) term.
        f_post: elementwise weight modulation of the potentiation (post-after-pre) term.

    Returns:
        The updated traces and ``delta_w`` shaped like ``fc.weight`` (summed over the batch).
    """
    owner = "stdp_linear_single_step"
    kind = _synapse_kind(owner, fc, (nn.Linear,))
    return _stdp_single(
        owner,
        fc,
        kind,
        in_spike,
        out_spike,
        trace_pre,
        trace_post,
        tau_pre,
        tau_post,
        f_pre,
        f_post,
    )


def stdp_conv1d_single_step(
    conv: nn.Conv1d,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: torch.Tensor | None,
    trace_post: torch.Tensor | None,
    tau_pre: float,
    tau_post: float,
    f_pre: WeightFn = _identity,
    f_post: WeightFn = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply one STDP step to a 1-D convolution and return ``(trace_pre, trace_post, delta_w)``.

    ``in_spike`` is ``[N, C_in, L_in]`` (unpadded), ``out_spike`` is ``[N, C_out, L_out]``. The
    input is padded as the layer pads it, so ``trace_pre`` has the *padded* shape
    ``[N, C_in, L_in + 2 * padding]``; ``None`` starts either trace at zero. ``delta_w`` is shaped
    like ``conv.weight`` and summed over the batch and output positions.

    Raises:
        NotImplementedError: if ``conv.dilation != (1,)`` or ``conv.groups != 1``.
    """
    owner = "stdp_conv1d_single_step"
    kind = _synapse_kind(owner, conv, (nn.Conv1d,))
    return _stdp_single(
        owner,
        conv,
        kind,
        in_spike,
        out_spike,
        trace_pre,
        trace_post,
        tau_pre,
        tau_post,
        f_pre,
        f_post,
    )


def stdp_conv2d_single_step(
    conv: nn.Conv2d,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: torch.Tensor | None,
    trace_post: torch.Tensor | None,
    tau_pre: float,
    tau_post: float,
    f_pre: WeightFn = _identity,
    f_post: WeightFn = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply one STDP step to a 2-D convolution and return ``(trace_pre, trace_post, delta_w)``.

    ``in_spike`` is ``[N, C_in, H_in, W_in]`` (unpadded), ``out_spike`` is ``[N, C_out, H_out,
    W_out]``. Stride and padding (any padding mode) are honoured; the input is padded as the layer
    pads it, so ``trace_pre`` has the *padded* input shape. ``None`` starts either trace at zero.
    ``delta_w`` is shaped like ``conv.weight`` and summed over the batch and output positions.

    Raises:
        NotImplementedError: if ``conv.dilation != (1, 1)`` or ``conv.groups != 1``.
    """
    owner = "stdp_conv2d_single_step"
    kind = _synapse_kind(owner, conv, (nn.Conv2d,))
    return _stdp_single(
        owner,
        conv,
        kind,
        in_spike,
        out_spike,
        trace_pre,
        trace_post,
        tau_pre,
        tau_post,
        f_pre,
        f_post,
    )


# ------------------------------------------------------------------------------------------------
# multi-step STDP with batched traces
# ------------------------------------------------------------------------------------------------
def _decay_matrix(
    decay: float, steps: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # D[t, k] = decay ** (t - k) for k <= t: row t of D @ S is the trace at t started from zero.
    # Powers are formed in float64 so every entry is correctly rounded in the target dtype.
    idx = torch.arange(steps, dtype=torch.float64)
    lag = idx[:, None] - idx[None, :]
    mat = torch.where(
        lag >= 0, torch.pow(torch.tensor(decay, dtype=torch.float64), lag.clamp(min=0)), 0.0
    )
    return mat.to(dtype=dtype, device=device)


def _trace_init(trace: Trace, like: torch.Tensor) -> torch.Tensor | None:
    if trace is None:
        return None
    if isinstance(trace, torch.Tensor):
        return trace.to(like.dtype).expand(like.shape)
    return torch.full_like(like, float(trace))


def trace_sequence(
    spikes: torch.Tensor,
    trace: Trace,
    tau: float,
    exponential: bool = False,
    method: str = "auto",
    chunk: int = TRACE_CHUNK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the trace after every step of ``spikes`` (``[T, *]``) as a ``[T, *]`` tensor.

    The trace follows ``x[t] = x[t-1] - x[t-1] / tau + s[t]`` (STDP), or ``x[t] = x[t-1] *
    exp(-1/tau) + s[t]`` with ``exponential=True``, starting from ``trace`` (a tensor broadcastable
    to ``spikes.shape[1:]``, a float, or ``None`` for zero). Methods:

    * ``'matmul'``: no time loop. The recurrence is a linear filter, so within a block of ``chunk``
      steps the traces are ``D @ S + decay**(t+1) * x[-1]`` with the lower-triangular decay matrix
      ``D[t, k] = decay**(t-k)``; blocks carry the last trace forward. Equal to the loop to float
      rounding (``decay = 1 - 1/tau`` is rounded once).
    * ``'recurrence'``: the step-by-step recurrence ``x[t] = s[t] + decay * x[t-1]`` written in
      place into the output, one fused kernel per step and no temporaries (equal to the loop to
      float rounding; rounding errors decay with the trace, so they do not grow with T).
    * ``'auto'`` (default): ``'matmul'`` when a step holds few elements (per-step kernel overhead
      dominates), ``'recurrence'`` for large steps, where it was measured faster on CPU: the
      matmul has an inner dimension of only ``chunk`` and is memory-bound.

    ``out`` (optional, shaped like ``spikes``, may be a strided view) receives the result.
    """
    if spikes.dim() < 1 or spikes.shape[0] == 0:
        raise ValueError(
            f"trace_sequence: spikes must be [T, *] with T >= 1, got {tuple(spikes.shape)}."
        )
    if method == "auto":
        method = "matmul" if spikes[0].numel() <= MATMUL_TRACE_MAX_STEP else "recurrence"
    if method not in ("matmul", "recurrence"):
        raise ValueError(
            f"trace_sequence: method must be 'auto', 'matmul' or 'recurrence', got {method!r}."
        )
    if out is None:
        out = torch.empty_like(spikes)
    elif out.shape != spikes.shape:
        raise ValueError(
            f"trace_sequence: out has shape {tuple(out.shape)}, spikes {tuple(spikes.shape)}."
        )
    steps = spikes.shape[0]
    start = _trace_init(trace, spikes[0])
    decay = math.exp(-1.0 / tau) if exponential else 1.0 - 1.0 / tau
    if method == "recurrence":
        for t in range(steps):
            prev = start if t == 0 else out[t - 1]
            if prev is None:
                out[0].copy_(spikes[0])
            else:
                # One fused kernel per step, no temporaries: out[t] = s[t] + decay * out[t-1].
                torch.add(spikes[t], prev, alpha=decay, out=out[t])
        return out
    flat = spikes.reshape(steps, -1)
    result = torch.empty_like(flat)
    carry = None if start is None else start.reshape(-1)
    chunk = max(1, int(chunk))
    mats: dict[int, torch.Tensor] = {}
    for begin in range(0, steps, chunk):
        n = min(chunk, steps - begin)
        if n + 1 not in mats:
            mats[n + 1] = _decay_matrix(decay, n + 1, flat.dtype, flat.device)
        mat = mats[n + 1]
        block = result[begin : begin + n]
        torch.matmul(mat[:n, :n], flat[begin : begin + n], out=block)
        if carry is not None:
            # Column 0 of the (n+1)-step matrix holds decay ** (1..n): the carry's weights.
            block.addcmul_(mat[1:, 0, None], carry[None, :])
        carry = block[-1]
    out.copy_(result.view(spikes.shape))
    return out


def _stdp_multi(
    owner: str,
    layer: nn.Module,
    kind: type,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: Trace,
    trace_post: Trace,
    tau_pre: float,
    tau_post: float,
    f_pre: WeightFn,
    f_post: WeightFn,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_tau(owner, False, tau_pre=tau_pre, tau_post=tau_post)
    weight = layer.weight.detach()
    if in_spike.dim() != weight.dim() + 1 or out_spike.dim() != weight.dim() + 1:
        raise ValueError(
            f"{owner}: multi-step spikes for {type(layer).__name__} must be [T, N, ...] with "
            f"{weight.dim() + 1} dims, got in_spike {tuple(in_spike.shape)} and out_spike "
            f"{tuple(out_spike.shape)}."
        )
    if in_spike.shape[0] != out_spike.shape[0]:
        raise ValueError(
            f"{owner}: in_spike has T={in_spike.shape[0]} steps but out_spike has "
            f"T={out_spike.shape[0]}."
        )
    steps, batch = in_spike.shape[:2]
    # Validate with the first step (padding and shape rules are per sample).
    _, pre0, post0 = _prepare(owner, layer, kind, in_spike[0], out_spike[0])
    _check_spikes(owner, layer, kind, pre0, post0, "T, N")
    if isinstance(trace_pre, torch.Tensor):
        _materialize(owner, "trace_pre", trace_pre, pre0)
    if isinstance(trace_post, torch.Tensor):
        _materialize(owner, "trace_post", trace_post, post0)
    # The weight is fixed for the whole sequence, so sum_t delta_w[t] is a correlation over the
    # stacked T * N samples. It is formed over blocks of steps whose working set stays cache-sized
    # (one huge batch measured ~2x slower than cache-resident blocks for large conv layers);
    # small layers get a single block. Buffers are reused across blocks.
    per_step = 2 * (pre0.numel() + post0.numel()) * pre0.element_size()
    block = max(1, min(steps, STDP_BLOCK_BYTES // max(per_step, 1)))
    shared = f_pre is f_post
    if shared:
        # [block, 2, N, ...]: per step the potentiation pairs (post, trace_pre) then the negated
        # depression pairs (-trace_post, pre), accumulated together (see _stdp_delta).
        pre_buf = pre0.new_empty((block, 2, *pre0.shape))
        post_buf = post0.new_empty((block, 2, *post0.shape))
    acc: torch.Tensor | None = None
    dep: torch.Tensor | None = None
    carry_pre, carry_post = trace_pre, trace_post
    for start in range(0, steps, block):
        n = min(block, steps - start)
        _, pre, post = _prepare(
            owner, layer, kind, in_spike[start : start + n].flatten(0, 1),
            out_spike[start : start + n].flatten(0, 1),
        )
        pre = pre.view(n, batch, *pre0.shape[1:])
        post = post.view(n, batch, *post0.shape[1:])
        if shared:
            pb, qb = pre_buf[:n], post_buf[:n]
            pb[:, 1].copy_(pre)
            qb[:, 0].copy_(post)
            tr_pre = trace_sequence(pre, carry_pre, tau_pre, method=method, out=pb[:, 0])
            tr_post = trace_sequence(post, carry_post, tau_post, method=method, out=qb[:, 1])
            carry_pre, carry_post = tr_pre[-1].clone(), tr_post[-1].clone()
            tr_post.neg_()
            part = _correlate(kind, layer, qb.flatten(0, 2), pb.flatten(0, 2))
            acc = part if acc is None else acc.add_(part)
        else:
            tr_pre = trace_sequence(pre, carry_pre, tau_pre, method=method)
            tr_post = trace_sequence(post, carry_post, tau_post, method=method)
            carry_pre, carry_post = tr_pre[-1], tr_post[-1]
            pot = _correlate(kind, layer, post.flatten(0, 1), tr_pre.flatten(0, 1))
            dpart = _correlate(kind, layer, tr_post.flatten(0, 1), pre.flatten(0, 1))
            acc = pot if acc is None else acc.add_(pot)
            dep = dpart if dep is None else dep.add_(dpart)
    assert acc is not None and isinstance(carry_pre, torch.Tensor)
    assert isinstance(carry_post, torch.Tensor)
    if shared:
        delta_w = f_post(weight) * acc
    else:
        assert dep is not None
        delta_w = f_post(weight) * acc - f_pre(weight) * dep
    return carry_pre, carry_post, delta_w


def stdp_multi_step(
    layer: nn.Linear | nn.Conv1d | nn.Conv2d,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: Trace,
    trace_post: Trace,
    tau_pre: float,
    tau_post: float,
    f_pre: WeightFn = _identity,
    f_post: WeightFn = _identity,
    batched: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply STDP over a sequence and return ``(trace_pre, trace_post, delta_w)``.

    The result equals running the matching single-step function for ``t = 0 .. T-1`` with the
    weight held fixed and summing the ``delta_w``; the returned traces are those after the last
    step.

    Args:
        layer: ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (or a subclass); not modified.
        in_spike: presynaptic spikes ``[T, N, ...]`` (unpadded for convolutions).
        out_spike: postsynaptic spikes ``[T, N, ...]``.
        trace_pre: initial presynaptic trace (padded shape for convolutions), a float, or ``None``.
        trace_post: initial postsynaptic trace, a float, or ``None``.
        tau_pre: presynaptic trace time constant in steps (``>= 1``).
        tau_post: postsynaptic trace time constant in steps (``>= 1``).
        f_pre: elementwise weight modulation of the depression term.
        f_post: elementwise weight modulation of the potentiation term.
        batched: compute all steps with batched tensor ops (default); ``False`` loops over time
            with the single-step rule (the reference the batched path is tested against).

    Raises:
        NotImplementedError: for other layer types, dilated or grouped convolutions.
        ValueError: for spikes whose shapes do not fit the layer.
    """
    owner = "stdp_multi_step"
    kind = _synapse_kind(owner, layer)
    if batched:
        return _stdp_multi(
            owner,
            layer,
            kind,
            in_spike,
            out_spike,
            trace_pre,
            trace_post,
            tau_pre,
            tau_post,
            f_pre,
            f_post,
        )
    if in_spike.dim() < 2 or in_spike.shape[0] != out_spike.shape[0]:
        raise ValueError(
            f"{owner}: in_spike {tuple(in_spike.shape)} and out_spike {tuple(out_spike.shape)} "
            f"must be [T, N, ...] with the same T."
        )
    delta_w = torch.zeros_like(layer.weight.detach())
    for x_t, y_t in zip(in_spike.unbind(0), out_spike.unbind(0), strict=True):
        trace_pre, trace_post, dw = _stdp_single(
            owner, layer, kind, x_t, y_t, trace_pre, trace_post, tau_pre, tau_post, f_pre, f_post
        )
        delta_w += dw
    return trace_pre, trace_post, delta_w


# ------------------------------------------------------------------------------------------------
# reward-modulated STDP functions
# ------------------------------------------------------------------------------------------------
def mstdp_linear_single_step(
    fc: nn.Linear,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: Trace,
    trace_post: Trace,
    tau_pre: float,
    tau_post: float,
    f_pre: WeightFn = _identity,
    f_post: WeightFn = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute one step of reward-modulated STDP eligibility for a linear layer.

    Traces decay exponentially (``trace = trace * exp(-1/tau) + spike``) and are updated first; the
    eligibility is per sample: ``e[n, o, i] = f_post(w) * out[n, o] * trace_pre[n, i] - f_pre(w) *
    trace_post[n, o] * in[n, i]``.

    Args:
        fc: the ``nn.Linear`` whose weight the eligibility refers to.
        in_spike: presynaptic spikes ``[N, in_features]``.
        out_spike: postsynaptic spikes ``[N, out_features]``.
        trace_pre: presynaptic trace, a float, or ``None`` for zero.
        trace_post: postsynaptic trace, a float, or ``None`` for zero.
        tau_pre: presynaptic trace time constant in steps (``> 0``).
        tau_post: postsynaptic trace time constant in steps (``> 0``).
        f_pre: elementwise weight modulation of the depression term.
        f_post: elementwise weight modulation of the potentiation term.

    Returns:
        ``(trace_pre, trace_post, eligibility)``; eligibility is ``[N, out_features, in_features]``.
    """
    owner = "mstdp_linear_single_step"
    kind = _synapse_kind(owner, fc, (nn.Linear,))
    _check_tau(owner, True, tau_pre=tau_pre, tau_post=tau_post)
    weight, in_spike, out_spike = _prepare(owner, fc, kind, in_spike, out_spike)
    _check_spikes(owner, fc, kind, in_spike, out_spike, "N")
    trace_pre = _materialize(owner, "trace_pre", trace_pre, in_spike)
    trace_post = _materialize(owner, "trace_post", trace_post, out_spike)
    trace_pre = trace_pre * math.exp(-1.0 / tau_pre) + in_spike
    trace_post = trace_post * math.exp(-1.0 / tau_post) + out_spike
    eligibility = f_post(weight) * (out_spike[:, :, None] * trace_pre[:, None, :]) - f_pre(
        weight
    ) * (trace_post[:, :, None] * in_spike[:, None, :])
    return trace_pre, trace_post, eligibility


def mstdpet_linear_single_step(
    fc: nn.Linear,
    in_spike: torch.Tensor,
    out_spike: torch.Tensor,
    trace_pre: Trace,
    trace_post: Trace,
    tau_pre: float,
    tau_post: float,
    tau_trace: float,
    f_pre: WeightFn = _identity,
    f_post: WeightFn = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute one step of MSTDP-ET eligibility for a linear layer on *unbatched* spikes.

    ``in_spike`` is ``[in_features]`` and ``out_spike`` ``[out_features]``. Traces decay
    exponentially and are updated first; the eligibility is ``f_post(w) * outer(out, trace_pre) -
    f_pre(w) * outer(trace_post, in)``, shaped like ``fc.weight``. ``tau_trace`` (the eligibility
    trace's time constant, ``> 0``) is validated here and used by :class:`MSTDPETLearner`, which
    filters the eligibility with it.

    Returns:
        ``(trace_pre, trace_post, eligibility)``.
    """
    owner = "mstdpet_linear_single_step"
    kind = _synapse_kind(owner, fc, (nn.Linear,))
    _check_tau(owner, True, tau_pre=tau_pre, tau_post=tau_post, tau_trace=tau_trace)
    if in_spike.dim() != 1 or out_spike.dim() != 1:
        raise ValueError(
            f"{owner}: MSTDP-ET works on unbatched spikes in_spike [in_features], out_spike "
            f"[out_features]; got {tuple(in_spike.shape)} and {tuple(out_spike.shape)}."
        )
    weight, in_b, out_b = _prepare(owner, fc, kind, in_spike[None], out_spike[None])
    _check_spikes(owner, fc, kind, in_b, out_b, "1")
    in_spike, out_spike = in_b[0], out_b[0]
    trace_pre = _materialize(owner, "trace_pre", trace_pre, in_spike)
    trace_post = _materialize(owner, "trace_post", trace_post, out_spike)
    trace_pre = trace_pre * math.exp(-1.0 / tau_pre) + in_spike
    trace_post = trace_post * math.exp(-1.0 / tau_post) + out_spike
    eligibility = f_post(weight) * torch.outer(out_spike, trace_pre) - f_pre(weight) * torch.outer(
        trace_post, in_spike
    )
    return trace_pre, trace_post, eligibility


# ------------------------------------------------------------------------------------------------
# learners
# ------------------------------------------------------------------------------------------------
def _add_to_grad(weight: torch.Tensor, delta_w: torch.Tensor) -> None:
    # -delta_w so that optimizer.step() (w -= lr * grad) moves w by +lr * delta_w.
    weight.grad = -delta_w if weight.grad is None else weight.grad - delta_w


class _MonitoredLearner(MemoryModule):
    """Shared plumbing: the synapse, two spike monitors, enable/disable/close and record()."""

    def _setup_monitors(self, synapse: nn.Module, sn: nn.Module | None, hooks: bool) -> None:
        self.synapse = synapse
        # The neuron is remembered (not registered as a submodule, as in SpikingJelly) so that
        # CompiledModule.attach(learner) can find the matching node of a compiled model.
        self.__dict__["_sn"] = sn
        self.__dict__["_close_callbacks"] = []
        self.in_spike_monitor: BaseMonitor = InputMonitor(
            synapse, function_on_input=torch.Tensor.detach, hooks=hooks
        )
        if sn is None:
            # No neuron module (e.g. a compiled model's fused node): a buffer fed by record().
            self.out_spike_monitor: BaseMonitor = BaseMonitor()
            self.out_spike_monitor.add_name("")
        else:
            self.out_spike_monitor = OutputMonitor(
                sn, function_on_output=torch.Tensor.detach, hooks=hooks
            )
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                f"{type(self).__name__} is closed (its hooks were removed); create a new learner."
            )

    def record(self, in_spike: torch.Tensor, out_spike: torch.Tensor) -> None:
        """Feed one ``(presynaptic, postsynaptic)`` spike pair, as the hooks would.

        This is the hook-free entry point for compiled models and custom loops; it records only
        while the learner is enabled.
        """
        self._check_open()
        self.in_spike_monitor.record(self.in_spike_monitor.monitored_layers[0], in_spike.detach())
        self.out_spike_monitor.record(
            self.out_spike_monitor.monitored_layers[0], out_spike.detach()
        )

    def reset(self) -> None:
        """Clear the traces (and eligibilities) and the recorded spikes; weights are untouched."""
        super().reset()
        self.in_spike_monitor.clear_recorded_data()
        self.out_spike_monitor.clear_recorded_data()

    def enable(self) -> None:
        """Resume recording spikes."""
        self._check_open()
        self.in_spike_monitor.enable()
        self.out_spike_monitor.enable()

    def disable(self) -> None:
        """Stop recording spikes; recorded spikes and traces are kept."""
        self.in_spike_monitor.disable()
        self.out_spike_monitor.disable()

    def close(self) -> None:
        """Remove the hooks and clear all state for good; a closed learner cannot be re-enabled.

        Hooks placed on a compiled model by ``CompiledModule.attach`` are removed too.
        """
        callbacks, self.__dict__["_close_callbacks"] = self.__dict__.get("_close_callbacks", []), []
        for callback in callbacks:
            callback()
        self.in_spike_monitor.close()
        self.out_spike_monitor.close()
        self.reset()
        self._closed = True

    def _take_records(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._check_open()
        pres, posts = self.in_spike_monitor.records, self.out_spike_monitor.records
        if len(pres) != len(posts):
            raise RuntimeError(
                f"{type(self).__name__}: {len(pres)} recorded synapse inputs but {len(posts)} "
                f"neuron outputs; the synapse and the neuron must run the same number of times "
                f"between step() calls."
            )
        return list(zip(pres, posts, strict=True))

    def _clear_records(self) -> None:
        self.in_spike_monitor.clear_recorded_data()
        self.out_spike_monitor.clear_recorded_data()

    def extra_repr(self) -> str:
        taus = ", ".join(
            f"{k}={getattr(self, k)}"
            for k in ("tau_pre", "tau_post", "tau_trace")
            if hasattr(self, k)
        )
        return f"step_mode={self.step_mode}, {taus}"


class STDPLearner(_MonitoredLearner):
    """Unsupervised STDP for a synapse (Linear, Conv1d or Conv2d) followed by a spiking neuron.

    The learner records the synapse's input and the neuron's output on every forward call (or is
    fed with :meth:`record`); :meth:`step` turns all pairs recorded since the last call into one
    weight update, keeping the traces across calls until :meth:`reset`.

    Args:
        step_mode: ``'s'`` if each recorded pair is one step ``[N, ...]``, ``'m'`` if each is a
            sequence ``[T, N, ...]``.
        synapse: the layer whose ``weight`` is learned (``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d`` or a subclass: snncompile's or SpikingJelly's layers work).
        sn: the module emitting the postsynaptic spikes (normally the neuron after ``synapse``);
            ``None`` when spikes are fed with :meth:`record`.
        tau_pre: presynaptic trace time constant in steps (``>= 1``).
        tau_post: postsynaptic trace time constant in steps (``>= 1``).
        f_pre: elementwise weight modulation of the depression term (identity by default).
        f_post: elementwise weight modulation of the potentiation term (identity by default).
        hooks: register forward hooks on ``synapse`` and ``sn`` (default ``True``).

    Example::

        fc, sn = snncompile.layer.Linear(8, 4, bias=False), snncompile.neuron.IFNode()
        learner = STDPLearner('s', fc, sn, tau_pre=2.0, tau_post=2.0)
        opt = torch.optim.SGD(fc.parameters(), lr=0.01)
        for x in spikes:            # x: [N, 8]
            sn(fc(x))
            opt.zero_grad()
            learner.step(on_grad=True)
            opt.step()              # w += 0.01 * delta_w
    """

    def __init__(
        self,
        step_mode: str,
        synapse: nn.Linear | nn.Conv1d | nn.Conv2d,
        sn: nn.Module | None,
        tau_pre: float,
        tau_post: float,
        f_pre: WeightFn = _identity,
        f_post: WeightFn = _identity,
        hooks: bool = True,
    ) -> None:
        owner = "STDPLearner"
        _check_tau(owner, False, tau_pre=tau_pre, tau_post=tau_post)
        kind = _synapse_kind(owner, synapse)
        super().__init__(step_mode)
        self._kind = kind
        self.tau_pre = tau_pre
        self.tau_post = tau_post
        self.f_pre = f_pre
        self.f_post = f_post
        self._setup_monitors(synapse, sn, hooks)
        self.register_memory("trace_pre", None)
        self.register_memory("trace_post", None)

    @torch.no_grad()
    def step(self, on_grad: bool = True, scale: float = 1.0) -> torch.Tensor | None:
        """Consume the recorded spike pairs and compute the STDP weight change.

        Args:
            on_grad: add ``-scale * delta_w`` to ``synapse.weight.grad`` and return ``None``
                (default); with ``False`` return ``scale * delta_w`` and leave the gradient alone.
            scale: multiplier for the weight change (the traces advance the same either way).

        Returns:
            ``delta_w`` shaped like the weight when ``on_grad=False`` and pairs were recorded,
            else ``None``. The weight itself is never modified here.
        """
        pairs = self._take_records()
        if not pairs:
            return None
        owner = f"STDPLearner({type(self.synapse).__name__})"
        if self.step_mode == "s" and len(pairs) > 1:
            shapes = {(tuple(p.shape), tuple(q.shape)) for p, q in pairs}
            if len(shapes) == 1:
                # Several single steps since the last update form one sequence: batch them.
                pairs = [(torch.stack([p for p, _ in pairs]), torch.stack([q for _, q in pairs]))]
                mode = "m"
            else:
                mode = "s"
        else:
            mode = self.step_mode
        delta_w: torch.Tensor | None = None
        for pre, post in pairs:
            if mode == "m":
                tp, tq, dw = _stdp_multi(
                    owner,
                    self.synapse,
                    self._kind,
                    pre,
                    post,
                    self.trace_pre,
                    self.trace_post,
                    self.tau_pre,
                    self.tau_post,
                    self.f_pre,
                    self.f_post,
                )
            else:
                tp, tq, dw = _stdp_single(
                    owner,
                    self.synapse,
                    self._kind,
                    pre,
                    post,
                    self.trace_pre,
                    self.trace_post,
                    self.tau_pre,
                    self.tau_post,
                    self.f_pre,
                    self.f_post,
                )
            self.trace_pre, self.trace_post = tp, tq
            delta_w = dw if delta_w is None else delta_w + dw
        self._clear_records()
        assert delta_w is not None
        if scale != 1.0:
            delta_w = delta_w * scale
        if on_grad:
            _add_to_grad(self.synapse.weight, delta_w)
            return None
        return delta_w


class MSTDPLearner(_MonitoredLearner):
    """Reward-modulated STDP (MSTDP) for a linear synapse, single-step.

    Each :meth:`step` consumes exactly one recorded ``(pre, post)`` pair ``[N, I]`` / ``[N, O]``,
    applies ``reward`` to the eligibility of the *previous* pair (so the first update is zero)
    and then stores the current eligibility ``[N, O, I]``.

    Args:
        step_mode: must be ``'s'``.
        batch_size: the batch size ``N`` of the recorded spikes (checked on every step).
        synapse: the ``nn.Linear`` whose weight is learned.
        sn: the module emitting the postsynaptic spikes, or ``None`` with :meth:`record`.
        tau_pre: presynaptic trace time constant in steps (``> 0``, exponential decay).
        tau_post: postsynaptic trace time constant in steps (``> 0``, exponential decay).
        f_pre: elementwise weight modulation of the depression term.
        f_post: elementwise weight modulation of the potentiation term.
        hooks: register forward hooks on ``synapse`` and ``sn`` (default ``True``).
    """

    @property
    def supported_step_mode(self) -> tuple[str, ...]:
        """MSTDP is defined step by step only."""
        return ("s",)

    def __init__(
        self,
        step_mode: str,
        batch_size: float,
        synapse: nn.Linear,
        sn: nn.Module | None,
        tau_pre: float,
        tau_post: float,
        f_pre: WeightFn = _identity,
        f_post: WeightFn = _identity,
        hooks: bool = True,
    ) -> None:
        owner = "MSTDPLearner"
        _check_tau(owner, True, tau_pre=tau_pre, tau_post=tau_post)
        kind = _synapse_kind(owner, synapse, (nn.Linear,))
        super().__init__(step_mode)
        self._kind = kind
        self.batch_size = int(batch_size)
        self.tau_pre = tau_pre
        self.tau_post = tau_post
        self.f_pre = f_pre
        self.f_post = f_post
        self._setup_monitors(synapse, sn, hooks)
        self.register_memory("trace_pre", None)
        self.register_memory("trace_post", None)
        self.register_memory("eligibility", None)

    @torch.no_grad()
    def step(
        self, reward: float | torch.Tensor, on_grad: bool = True, scale: float = 1.0
    ) -> torch.Tensor | None:
        """Apply ``reward`` (scalar or ``[N]``) to the previous eligibility; record the new one.

        Returns ``scale * sum_n reward[n] * eligibility_prev[n]`` when ``on_grad=False``; with
        ``on_grad=True`` adds its negative to ``synapse.weight.grad`` and returns ``None``. Returns
        ``None`` without advancing anything when no pair was recorded.
        """
        owner = "MSTDPLearner"
        pairs = self._take_records()
        if not pairs:
            return None
        if len(pairs) != 1:
            raise RuntimeError(
                f"{owner}: {len(pairs)} spike pairs were recorded since the last step(); reward "
                f"learners need exactly one forward step per step(reward) call (a compiled "
                f"model records T steps per call: run it on [1, N, ...] inputs)."
            )
        pre, post = pairs[0]
        if pre.dim() >= 1 and pre.shape[0] != self.batch_size:
            raise ValueError(
                f"{owner}: recorded spikes have batch size {pre.shape[0]} but the learner was "
                f"built with batch_size={self.batch_size}; build it with the actual batch size."
            )
        weight = self.synapse.weight
        reward = torch.as_tensor(reward, dtype=weight.dtype, device=weight.device).detach()
        if reward.dim() != 0 and tuple(reward.shape) != (self.batch_size,):
            raise ValueError(
                f"{owner}: reward must be a scalar or shaped [batch_size]=[{self.batch_size}], "
                f"got {tuple(reward.shape)}."
            )
        tp, tq, eligibility = mstdp_linear_single_step(
            self.synapse,
            pre,
            post,
            self.trace_pre,
            self.trace_post,
            self.tau_pre,
            self.tau_post,
            self.f_pre,
            self.f_post,
        )
        previous = self.eligibility
        if previous is None:
            delta_w = torch.zeros_like(weight.detach())
        else:
            if previous.shape != eligibility.shape:
                raise ValueError(
                    f"{owner}: eligibility shape changed from {tuple(previous.shape)} to "
                    f"{tuple(eligibility.shape)}; call reset() before changing the batch size."
                )
            delta_w = (reward.reshape(-1, 1, 1) * previous).sum(0)
        self.trace_pre, self.trace_post, self.eligibility = tp, tq, eligibility
        self._clear_records()
        if scale != 1.0:
            delta_w = delta_w * scale
        if on_grad:
            _add_to_grad(weight, delta_w)
            return None
        return delta_w


class MSTDPETLearner(_MonitoredLearner):
    """Reward-modulated STDP with an eligibility trace (MSTDP-ET) for a linear synapse.

    Spikes are unbatched (``[I]`` / ``[O]``). Each :meth:`step` consumes one recorded pair, first
    filters the *previous* eligibility into ``trace_e = trace_e * exp(-1/tau_trace) +
    eligibility / tau_trace``, returns/accumulates ``reward * trace_e`` and then stores the current
    eligibility.

    Args:
        step_mode: must be ``'s'``.
        synapse: the ``nn.Linear`` whose weight is learned.
        sn: the module emitting the postsynaptic spikes, or ``None`` with :meth:`record`.
        tau_pre: presynaptic trace time constant in steps (``> 0``, exponential decay).
        tau_post: postsynaptic trace time constant in steps (``> 0``, exponential decay).
        tau_trace: eligibility trace time constant in steps (``> 0``).
        f_pre: elementwise weight modulation of the depression term.
        f_post: elementwise weight modulation of the potentiation term.
        hooks: register forward hooks on ``synapse`` and ``sn`` (default ``True``).
    """

    @property
    def supported_step_mode(self) -> tuple[str, ...]:
        """MSTDP-ET is defined step by step only."""
        return ("s",)

    def __init__(
        self,
        step_mode: str,
        synapse: nn.Linear,
        sn: nn.Module | None,
        tau_pre: float,
        tau_post: float,
        tau_trace: float,
        f_pre: WeightFn = _identity,
        f_post: WeightFn = _identity,
        hooks: bool = True,
    ) -> None:
        owner = "MSTDPETLearner"
        _check_tau(owner, True, tau_pre=tau_pre, tau_post=tau_post, tau_trace=tau_trace)
        kind = _synapse_kind(owner, synapse, (nn.Linear,))
        super().__init__(step_mode)
        self._kind = kind
        self.tau_pre = tau_pre
        self.tau_post = tau_post
        self.tau_trace = tau_trace
        self.f_pre = f_pre
        self.f_post = f_post
        self._setup_monitors(synapse, sn, hooks)
        self.register_memory("trace_pre", None)
        self.register_memory("trace_post", None)
        self.register_memory("trace_e", None)
        self.register_memory("eligibility", None)

    @torch.no_grad()
    def step(
        self, reward: float | torch.Tensor, on_grad: bool = True, scale: float = 1.0
    ) -> torch.Tensor | None:
        """Apply a scalar ``reward`` to the filtered previous eligibility; record the new one.

        Returns ``scale * reward * trace_e`` when ``on_grad=False``; with ``on_grad=True`` adds its
        negative to ``synapse.weight.grad`` and returns ``None``. Returns ``None`` without
        advancing anything when no pair was recorded.
        """
        owner = "MSTDPETLearner"
        pairs = self._take_records()
        if not pairs:
            return None
        if len(pairs) != 1:
            raise RuntimeError(
                f"{owner}: {len(pairs)} spike pairs were recorded since the last step(); reward "
                f"learners need exactly one forward step per step(reward) call (a compiled "
                f"model records T steps per call: run it on [1, N, ...] inputs)."
            )
        pre, post = pairs[0]
        weight = self.synapse.weight
        reward = torch.as_tensor(reward, dtype=weight.dtype, device=weight.device).detach()
        if reward.dim() != 0:
            raise ValueError(f"{owner}: reward must be a scalar, got shape {tuple(reward.shape)}.")
        tp, tq, eligibility = mstdpet_linear_single_step(
            self.synapse,
            pre,
            post,
            self.trace_pre,
            self.trace_post,
            self.tau_pre,
            self.tau_post,
            self.tau_trace,
            self.f_pre,
            self.f_post,
        )
        zeros = torch.zeros_like(eligibility)
        previous = zeros if self.eligibility is None else self.eligibility
        trace_e = zeros if self.trace_e is None else self.trace_e
        trace_e = trace_e * math.exp(-1.0 / self.tau_trace) + previous / self.tau_trace
        delta_w = reward * trace_e
        self.trace_e = trace_e
        self.trace_pre, self.trace_post, self.eligibility = tp, tq, eligibility
        self._clear_records()
        if scale != 1.0:
            delta_w = delta_w * scale
        if on_grad:
            _add_to_grad(weight, delta_w)
            return None
        return delta_w
