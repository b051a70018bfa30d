"""Fused neuron forward/backward as PyTorch operators.

Two entry points share one implementation:

* ``torch.ops.snncompile.neuron_forward`` / ``neuron_backward``: ``torch.library.custom_op``s
  with fake (shape) kernels and registered autograd, keyed by a kernel-id string. They are what
  ``torch.compile(fullgraph=True)`` and export see: one opaque op per neuron layer.
* :class:`FusedNeuronFunction`: a plain ``torch.autograd.Function`` calling the same kernels. In
  eager mode it is used by default because the custom-op dispatcher costs per call (DESIGN §8
  measured ~30 us for the custom op vs ~19 us for an autograd.Function on this kind of machine;
  ``benchmarks/bench_neuron_kernels.py`` prints ours), which matters for single-step use.

:func:`fused_multi_step` is the public function: it flattens ``[T, *]`` to ``[T, N]``, evaluates
the per-call uniforms (e.g. PLIF's ``sigmoid(w)``) with PyTorch so autograd carries their
gradients back to the parameters, picks the kernel for the device (C for CPU, CuPy for CUDA, the
torch renderer when no C compiler exists), and converts float16/bfloat16 inputs to float32 for
the kernel (state and arithmetic are float32; spikes, ``v_seq`` and ``grad_x`` come back in the
input dtype; the state ``v`` stays float32).

Only ``h`` (the pre-reset membrane potential) is saved for backward; spikes are recomputed, and
``v`` is recomputed from the previous ``h`` when a neuron's gradient needs it. A neuron with
extra states (:class:`~snncompile.dynamics.neuron.State`) carries them as rows of one ``[S, N]``
state tensor (``v`` first) and also saves the pre-step values of those its backward reads
(:func:`fused_multi_step_states`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from snncompile.codegen.build import CompilerNotFound, find_compiler, warn_no_compiler
from snncompile.codegen.render import evaluate
from snncompile.codegen.torch_backend import torch_multi_step_states
from snncompile.dynamics.neuron import NeuronDynamics

#: Input dtypes the fused kernels take (state and arithmetic are float32 for all of them).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_registry: dict[str, NeuronDynamics] = {}
_lock = threading.Lock()

#: ``backend='auto'`` fuses a multi-step call when it has at least ``AUTO_MIN_STEPS`` steps or
#: ``AUTO_MIN_ELEMENTS`` neuron-steps; below that the torch loop is as fast (one step of a few
#: elementwise ops vs the fused op's fixed per-call cost). Measured with
#: ``benchmarks/bench_neuron_kernels.py --auto-threshold`` (numbers in docs/kernels.md): forward +
#: backward, fused vs torch, was 0.9x at T=1 (N=64..1024), 2.5-3x at T=4 and 17-34x at T>=8.
AUTO_MIN_STEPS = 2
AUTO_MIN_ELEMENTS = 4096


def register_dynamics(dynamics: NeuronDynamics) -> str:
    """Register ``dynamics`` and return its kernel id (the string the custom ops take)."""
    kid = dynamics.__dict__.get("_kernel_id")
    if kid is None:
        kid = f"{dynamics.name}_{dynamics.key()}"
        with _lock:
            _registry.setdefault(kid, dynamics)
        object.__setattr__(dynamics, "_kernel_id", kid)
    return kid


def _dynamics(kernel_id: str) -> NeuronDynamics:
    try:
        return _registry[kernel_id]
    except KeyError:
        raise KeyError(
            f"snncompile.runtime.fused: unknown kernel id {kernel_id!r}; call "
            "register_dynamics(dynamics) in this process first."
        ) from None


def _kernel(kernel_id: str, device: torch.device) -> Any:
    d = _dynamics(kernel_id)
    if device.type == "cuda":
        from snncompile.codegen.cuda import cuda_kernel

        return cuda_kernel(d)
    if device.type != "cpu":
        raise RuntimeError(
            f"snncompile fused neuron {d.name}: tensors on {device} are not supported; use "
            "CPU or CUDA tensors, or backend='torch'."
        )
    from snncompile.codegen.cpu import cpu_kernel

    return cpu_kernel(d)


def _empty(ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty((0,), dtype=dtype or ref.dtype, device=ref.device)


# -- shared implementation ----------------------------------------------------------------------
def _forward_impl(
    kernel_id: str,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    uniforms: torch.Tensor,
    need_h: bool,
    store_v_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _kernel(kernel_id, x_seq.device)
    x32 = x_seq.float().contiguous()
    spikes, h_seq, v_seq, v_last = k.forward(
        x32, v_init.float().contiguous(), uniforms.float().contiguous(), need_h, store_v_seq
    )
    dtype = x_seq.dtype
    return (
        spikes.to(dtype),
        h_seq if h_seq is not None else _empty(x_seq, torch.float32),
        v_seq.to(dtype) if v_seq is not None else _empty(x_seq),
        v_last,
    )


def _backward_impl(
    kernel_id: str,
    grad_spike_seq: torch.Tensor,
    grad_v_seq: torch.Tensor,
    grad_v_last: torch.Tensor | None,
    h_seq: torch.Tensor,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    uniforms: torch.Tensor,
    has_grad_v_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _kernel(kernel_id, h_seq.device)
    needs_x = "x" in k.source.backward_needs
    gx, gv0, gu = k.backward(
        grad_spike_seq.float().contiguous(),
        grad_v_seq.float().contiguous() if has_grad_v_seq else None,
        grad_v_last.float().contiguous() if grad_v_last is not None else None,
        h_seq,
        x_seq.float().contiguous() if needs_x else None,
        v_init.float().contiguous(),
        uniforms.float().contiguous(),
    )
    # Per-neuron partial sums over time, reduced over neurons in float64 for accuracy.
    gu_sum = gu.sum(dim=1, dtype=torch.float64).float() if gu.numel() else uniforms.new_zeros(0)
    return gx.to(grad_spike_seq.dtype), gv0, gu_sum


# -- custom ops (torch.compile / export) ----------------------------------------------------------
@torch.library.custom_op("snncompile::neuron_forward", mutates_args=())
def neuron_forward(
    kernel_id: str,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    uniforms: torch.Tensor,
    need_h: bool,
    store_v_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused multi-step neuron forward on ``x_seq`` ``[T, N]`` from ``v_init`` ``[N]`` (float32).

    Returns ``(spike_seq, h_seq, v_seq, v_last)``; ``h_seq`` (float32) is empty unless
    ``need_h``, ``v_seq`` is empty unless ``store_v_seq``.
    """
    return _forward_impl(kernel_id, x_seq, v_init, uniforms, need_h, store_v_seq)


@neuron_forward.register_fake
def _neuron_forward_fake(
    kernel_id: str,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    uniforms: torch.Tensor,
    need_h: bool,
    store_v_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spikes = torch.empty_like(x_seq)
    k = _dynamics(kernel_id).step_program().num_saved
    saved = x_seq.shape if k == 1 else (k, *x_seq.shape)
    h = x_seq.new_empty(saved, dtype=torch.float32) if need_h else _empty(x_seq, torch.float32)
    v_seq = torch.empty_like(x_seq) if store_v_seq else _empty(x_seq)
    return spikes, h, v_seq, torch.empty_like(v_init, dtype=torch.float32)


@torch.library.custom_op("snncompile::neuron_backward", mutates_args=())
def neuron_backward(
    kernel_id: str,
    grad_spike_seq: torch.Tensor,
    grad_v_seq: torch.Tensor,
    grad_v_last: torch.Tensor,
    h_seq: torch.Tensor,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    uniforms: torch.Tensor,
    has_grad_v_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused BPTT: returns ``(grad_x_seq, grad_v_init, grad_uniforms)``."""
    return _backward_impl(
        kernel_id,
        grad_spike_seq,
        grad_v_seq,
        grad_v_last,
        h_seq,
        x_seq,
        v_init,
        uniforms,
        has_grad_v_seq,
    )


@neuron_backward.register_fake
def _neuron_backward_fake(
    kernel_id: str,
    grad_spike_seq: torch.Tensor,
    grad_v_seq: torch.Tensor,
    grad_v_last: torch.Tensor,
    h_seq: torch.Tensor,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    uniforms: torch.Tensor,
    has_grad_v_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty_like(grad_spike_seq),
        torch.empty_like(v_init, dtype=torch.float32),
        torch.empty_like(uniforms, dtype=torch.float32),
    )


def _save(ctx: Any, kernel_id: str, x_seq: torch.Tensor, h_seq: torch.Tensor, *rest: Any) -> None:
    # x is kept alive for backward only when the neuron's gradient reads it (e.g. PLIF): keeping
    # a layer's input alive otherwise would cost 4 more bytes per neuron-step.
    needs_x = "x" in _dynamics(kernel_id).step_program().backward_needs
    ctx.kernel_id = kernel_id
    ctx.x_dtype = x_seq.dtype
    ctx.save_for_backward(h_seq, x_seq if needs_x else _empty(x_seq), *rest)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    kernel_id, x_seq, v_init, uniforms, need_h, store_v_seq = inputs
    ctx.need_h = need_h
    _save(ctx, kernel_id, x_seq, output[1], v_init, uniforms)


def _grad_or_zeros(g: torch.Tensor | None, ctx: Any, h_seq: torch.Tensor) -> torch.Tensor:
    shape = h_seq.shape[-2:]
    return torch.zeros(shape, dtype=ctx.x_dtype, device=h_seq.device) if g is None else g


def _custom_backward(
    ctx: Any,
    g_spikes: torch.Tensor | None,
    g_h: torch.Tensor | None,
    g_vseq: torch.Tensor | None,
    g_vlast: torch.Tensor | None,
) -> tuple[Any, ...]:
    h_seq, x_seq, v_init, uniforms = ctx.saved_tensors
    if not ctx.need_h:
        raise RuntimeError(
            "snncompile.neuron_forward was called with need_h=False but is being "
            "differentiated; call it with need_h=True when gradients are required."
        )
    has_gv = g_vseq is not None and g_vseq.numel() > 0
    g_vlast = torch.zeros_like(v_init, dtype=torch.float32) if g_vlast is None else g_vlast
    gx, gv0, gu = neuron_backward(
        ctx.kernel_id,
        _grad_or_zeros(g_spikes, ctx, h_seq),
        g_vseq if has_gv else _empty(h_seq, ctx.x_dtype),
        g_vlast,
        h_seq,
        x_seq,
        v_init,
        uniforms,
        has_gv,
    )
    return None, gx, gv0, gu, None, None


neuron_forward.register_autograd(_custom_backward, setup_context=_setup_context)


# -- eager fast path ---------------------------------------------------------------------------
class FusedNeuronFunction(torch.autograd.Function):
    """The same fused forward/backward as a plain autograd.Function (lower eager overhead)."""

    @staticmethod
    def forward(
        ctx: Any,
        kernel_id: str,
        x_seq: torch.Tensor,
        v_init: torch.Tensor,
        uniforms: torch.Tensor,
        need_h: bool,
        store_v_seq: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = _forward_impl(kernel_id, x_seq, v_init, uniforms, need_h, store_v_seq)
        # Unused outputs (h, often v_seq or v_last) get None, not a zero-filled tensor: filling
        # a [T, N] zero gradient cost more than the fused backward itself.
        ctx.set_materialize_grads(False)
        ctx.need_h = need_h
        _save(ctx, kernel_id, x_seq, out[1], v_init, uniforms)
        ctx.mark_non_differentiable(out[1])
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        g_spikes, _, g_vseq, g_vlast = grads
        h_seq, x_seq, v_init, uniforms = ctx.saved_tensors
        if not ctx.need_h:  # pragma: no cover - guarded by fused_multi_step
            raise RuntimeError("snncompile: fused neuron forward ran without saving h.")
        has_gv = g_vseq is not None and g_vseq.numel() > 0
        gx, gv0, gu = _backward_impl(
            ctx.kernel_id,
            _grad_or_zeros(g_spikes, ctx, h_seq),
            g_vseq if has_gv else _empty(h_seq, ctx.x_dtype),
            g_vlast,
            h_seq,
            x_seq,
            v_init,
            uniforms,
            has_gv,
        )
        return None, gx, gv0, gu, None, None


# -- public API --------------------------------------------------------------------------------
def compiler_available() -> bool:
    """True when a C compiler exists (fused CPU kernels can be built)."""
    return find_compiler() is not None


def uniforms_for(
    dynamics: NeuronDynamics, params: Mapping[str, torch.Tensor] | None, device: torch.device
) -> torch.Tensor:
    """Evaluate the neuron's per-call uniforms (e.g. ``sigmoid(w)``) with PyTorch as a float32
    vector; autograd flows from it to ``params``."""
    program = dynamics.step_program()
    if not program.uniforms:
        return torch.zeros(0, dtype=torch.float32, device=device)
    missing = [n for n in dynamics.param_names if not params or n not in params]
    if missing:
        raise ValueError(
            f"snncompile fused neuron {dynamics.name}: missing parameter values {missing}; pass "
            "params={name: tensor}."
        )
    env = {k: v for k, v in params.items()}  # type: ignore[union-attr]
    values = evaluate({f"u{i}": u for i, u in enumerate(program.uniforms)}, env)
    parts = [
        torch.as_tensor(values[f"u{i}"], dtype=torch.float32, device=device).reshape(1)
        for i in range(len(program.uniforms))
    ]
    return torch.cat(parts).float()


def _prepare(dynamics: NeuronDynamics, device_type: str) -> str:
    """Register ``dynamics`` and return its kernel id, or "" when CPU kernels cannot be built.

    Runs once at trace time under ``torch.compile`` (its result is a constant there), so the
    compiler lookup and hashing never enter a compiled graph.
    """
    if device_type == "cpu" and not compiler_available():
        return ""
    return register_dynamics(dynamics)


# What torch.compiler.assume_constant_result(_prepare) does (it only sets this marker), without
# importing torch._dynamo when snncompile is imported (that import alone takes ~2 s).
_prepare._dynamo_marked_constant = True  # type: ignore[attr-defined]


def fused_multi_step(
    dynamics: NeuronDynamics,
    x_seq: torch.Tensor,
    v_init: torch.Tensor | float,
    params: Mapping[str, torch.Tensor] | None = None,
    store_v_seq: bool = False,
    use_custom_op: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run ``dynamics`` over ``x_seq`` ``[T, *]`` with the fused kernel of ``x_seq``'s device.

    ``v_init`` is a tensor broadcastable to ``x_seq.shape[1:]`` or a float. Returns
    ``(spike_seq, v_last, v_seq)``: ``spike_seq`` and ``v_seq`` (None unless ``store_v_seq``)
    in ``x_seq``'s dtype and shape, ``v_last`` float32 of shape ``x_seq.shape[1:]``.
    ``use_custom_op``: None picks the custom op under ``torch.compile`` and the
    autograd.Function in eager mode.
    Without a C compiler CPU inputs run through the torch renderer (one warning per process).
    A neuron with extra states starts them from their initial values; use
    :func:`fused_multi_step_states` to pass them and get their final values.
    """
    spikes, last, v_seq = fused_multi_step_states(
        dynamics, x_seq, {"v": v_init}, params, store_v_seq, use_custom_op
    )
    return spikes, last["v"], v_seq


def fused_multi_step_states(
    dynamics: NeuronDynamics,
    x_seq: torch.Tensor,
    states: Mapping[str, torch.Tensor | float] | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    store_v_seq: bool = False,
    use_custom_op: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Like :func:`fused_multi_step` for every state: ``states`` maps state names (``'v'`` and
    the extra states) to tensors broadcastable to ``x_seq.shape[1:]`` or floats (missing ones
    start from their initial values); returns ``(spike_seq, {state: last value}, v_seq)``, the
    states float32 of shape ``x_seq.shape[1:]``. Gradients flow to every state tensor."""
    if x_seq.dim() < 1:
        raise ValueError(
            f"snncompile fused neuron {dynamics.name}: x_seq must be [T, *], got a 0-dim tensor."
        )
    if x_seq.dtype not in FUSED_DTYPES:
        raise TypeError(
            f"snncompile fused neuron {dynamics.name}: x_seq has dtype {x_seq.dtype}; fused "
            "kernels compute in float32 and take float32/float16/bfloat16 inputs. Use the torch "
            "path (snncompile.codegen.torch_backend.torch_multi_step or backend='torch')."
        )
    shape = x_seq.shape[1:]
    names = dynamics.state_names
    unknown = [k for k in (states or {}) if k not in names]
    if unknown:
        raise ValueError(
            f"snncompile fused neuron {dynamics.name}: unknown states {unknown}; its states are "
            f"{list(names)}."
        )
    values: dict[str, torch.Tensor] = {}
    for name, init in dynamics.initial_states.items():
        value = (states or {}).get(name, init)
        if not isinstance(value, torch.Tensor):
            value = torch.full(shape, float(value), dtype=torch.float32, device=x_seq.device)
        values[name] = value
    kid = _prepare(dynamics, x_seq.device.type)
    if not kid:
        warn_no_compiler()
        return torch_multi_step_states(
            dynamics, x_seq, {k: v.float().expand(shape) for k, v in values.items()}, params,
            store_v_seq,
        )
    T = x_seq.shape[0]
    x2 = x_seq.reshape(T, -1)
    rows = [values[n].float().expand(shape).reshape(-1) for n in names]
    s2 = rows[0] if len(rows) == 1 else torch.stack(rows)
    uniforms = uniforms_for(dynamics, params, x_seq.device)
    need_h = torch.is_grad_enabled() and (
        x2.requires_grad or s2.requires_grad or uniforms.requires_grad
    )
    if use_custom_op is None:
        use_custom_op = torch.compiler.is_compiling()
    try:
        if use_custom_op:
            spikes, _, v_seq, last = torch.ops.snncompile.neuron_forward(
                kid, x2, s2, uniforms, need_h, store_v_seq
            )
        elif need_h:
            spikes, _, v_seq, last = FusedNeuronFunction.apply(
                kid, x2, s2, uniforms, need_h, store_v_seq
            )
        else:  # nothing to differentiate: the kernel without autograd's bookkeeping
            spikes, _, v_seq, last = _forward_impl(kid, x2, s2, uniforms, False, store_v_seq)
    except CompilerNotFound:  # pragma: no cover - compiler disappeared between checks
        warn_no_compiler()
        return torch_multi_step_states(dynamics, x_seq, values, params, store_v_seq)
    lasts = [last] if len(names) == 1 else list(last.unbind(0))
    return (
        spikes.reshape(x_seq.shape),
        {n: t.reshape(shape) for n, t in zip(names, lasts, strict=True)},
        v_seq.reshape(x_seq.shape) if store_v_seq else None,
    )
