"""A batchnorm / per-channel scale, a neuron and a pooling in one generated kernel: FusedChain.

:mod:`snncompile.passes.fuse_chains` replaces ``BN -> neuron -> pool`` on ``[T, N, C, H, W]``
(each part optional, at least two present) by one node running a :class:`FusedChain`. The module
holds the compiled model's own modules (the neuron keeps its states: ``v`` and any beside it,
such as Izhikevich's ``w``; the batchnorm its
parameters and running statistics, shared with the model), so ``reset_net``, ``train()`` /
``eval()`` and state dicts work unchanged. One call computes, with the kernels of
:mod:`snncompile.codegen.chain_kernels`::

    a_c, b_c = w_c * invstd_c, bias_c - mean_c * a_c         # eval: running stats; train: batch
    x = xin * a_c + b_c (+ r);  h, s, v, *w = neuron(v, *w, x);  out = pool(s)  or  out = e + s

(``r``: a spiking ResNet's residual before the neuron, ``e``: SEW ResNet's ADD after it; their
gradients are the neuron input's and the output's).

Numbers: PyTorch's CPU batchnorm rounds ``a`` and ``b`` and contracts ``x * a + b`` in ways
that depend on its vectorized code path, which the kernel does not reproduce, so the normalised
input may differ from PyTorch's by ~1 ulp of ``|x * a| + |b|`` (eval and train). Training
batchnorm: the batch statistics are one extra read of the input (per-plane float64 sums
``sum(x)``, ``sum(x^2)``, reduced over planes in float64, ``var = E[x^2] - E[x]^2``, then float32
as PyTorch: ``invstd = 1 / sqrt(var + eps)``), all in one C call, so mean and variance agree
with PyTorch's (a float32 reduction in another order) to the last float32 bit or one ulp.
A spike can therefore flip only where ``h`` is within a few ulp of the threshold (none did
over the tests' random inputs); the membrane agrees to a few ulp.
Running statistics are updated in that same C call as ``nn.BatchNorm2d`` does
(``num_batches_tracked += 1``, momentum or cumulative average, unbiased variance, in float64
then rounded once; within one float32 ulp of PyTorch's). The backward is
the neuron's BPTT with the pooled gradient routed in-kernel (no indices stored; ``h`` is
recomputed from the kept input), then PyTorch's batchnorm input gradient
``(gy - mean(gy) - (x - mean) * k) * w * invstd`` with ``k = sum(gy * (x - mean)) * invstd^2 /
M`` from the kernel's float64 per-plane sums, reduced per channel and turned into the
coefficients in the same C call (gradients within ~1e-6 relative of PyTorch's). Every state of
the neuron goes in and out of the kernels (the last values are written back to the neuron's
state slots; BPTT runs through every state, and the gradients of the initial states flow to the
tensors they came from); a fresh state (a float such as ``v_reset`` or Izhikevich's ``w_rest``)
is filled inside the kernels, not materialised.

When the kernel does not apply (not float32 on CPU, no compiler, ``backend='torch'`` or
``'auto'`` below its size threshold) or one of the modules has forward hooks (a monitor: it
must see its module's call), the module runs exactly the unfused ops.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch
from torch import nn

from snncompile.codegen.build import load_library, march
from snncompile.codegen.chain_kernels import ChainSource, chain_name_clash, generate_chain
from snncompile.codegen.cpu import WORKSPACES, num_threads
from snncompile.dynamics.neuron import NeuronDynamics
from snncompile.runtime.fused import compiler_available, uniforms_for
from snncompile.runtime.fused_backends import auto_fuses_size, dynamics_for

__all__ = ["ChainKernel", "FusedChain", "chain_kernel"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32
_F = ctypes.c_float
_D = ctypes.c_double
_lock = threading.Lock()
_kernels: dict[tuple[Any, ...], ChainKernel] = {}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class ChainKernel:
    """The forward, backward, statistics and batchnorm-backward C kernels of one chain."""

    def __init__(
        self,
        dynamics: NeuronDynamics,
        prologue: str,
        pool: str,
        residual: bool = False,
        window: tuple[int, int, int] = (1, 1, 0),
    ) -> None:
        """Build (or load from the cache) the chain ``prologue (+ r) -> dynamics -> pool``
        with the pooling window ``(kernel, stride, padding)``."""
        self.source: ChainSource = generate_chain(dynamics, prologue, pool, residual, window)
        self.window = window
        name = self.source.name
        parts = (
            "forward", "backward", "bn_stats", "bn_backward", "reduce", "bn_partial", "bn_finish"
        )  # fmt: skip
        syms = [f"{name}_{s}" for s in parts]
        lib = load_library(self.source.source, symbols=syms)
        self._lib = lib
        self.fwd = getattr(lib, syms[0])
        self.fwd.argtypes = [_P] * 11 + [_I64] * 6 + [_I32]
        self.bwd = getattr(lib, syms[1])
        self.bwd.argtypes = [_P] * 14 + [_I64] * 6 + [_I32]
        self.bn_stats = getattr(lib, syms[2])
        self.bn_stats.argtypes = [_P] + [_I64] * 3 + [_P] * 2 + [_D] * 2 + [_P] * 4 + [_I32]
        self.bn_bwd = getattr(lib, syms[3])
        self.bn_bwd.argtypes = [_P] * 10 + [_I64] * 5 + [_I32]
        self.reduce = getattr(lib, syms[4])
        self.reduce.argtypes = [_P] + [_I64] * 3 + [_P] * 3
        self.bn_partial = getattr(lib, syms[5])
        self.bn_partial.argtypes = [_P] + [_I64] * 3 + [_P, _I32]
        self.bn_finish = getattr(lib, syms[6])
        self.bn_finish.argtypes = [_P, _D, _I64] + [_P] * 2 + [_D] * 2 + [_P] * 4
        fns = (self.fwd, self.bwd, self.bn_stats, self.bn_bwd, self.reduce)
        for f in (*fns, self.bn_partial, self.bn_finish):
            f.restype = None


def chain_kernel(
    dynamics: NeuronDynamics,
    prologue: str,
    pool: str,
    residual: bool = False,
    window: tuple[int, int, int] = (1, 1, 0),
) -> ChainKernel:
    """The (per-process cached) :class:`ChainKernel` of a chain configuration."""
    key = (dynamics, prologue, pool, residual, window, march())
    with _lock:
        k = _kernels.get(key)
    if k is None:
        k = ChainKernel(dynamics, prologue, pool, residual, window)
        with _lock:
            k = _kernels.setdefault(key, k)
    return k


def _state_args(
    inits: tuple[torch.Tensor | None, ...], fills: tuple[float, ...]
) -> tuple[ctypes.Array[Any], ctypes.Array[Any]]:
    """The kernels' ``s_init`` (one pointer per state, NULL for a fresh one) and ``s_fill``
    (the value a fresh state starts from) arrays."""
    ptrs = (_P * len(inits))(*(_ptr(t) for t in inits))
    return ptrs, (_F * len(fills))(*fills)


def _chain_forward(
    kern: ChainKernel,
    x: torch.Tensor,
    r: torch.Tensor | None,
    e: torch.Tensor | None,
    v0: torch.Tensor | None,
    fills: tuple[float, ...],
    uniforms: torch.Tensor,
    ca: torch.Tensor | None,
    cb: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    bn: _TrainBN | None,
    eb: torch.Tensor | None,
    *s0: torch.Tensor | None,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor | None,
    tuple[torch.Tensor, torch.Tensor] | None,
]:
    """The forward kernels of one chain call (:class:`_ChainFunction`'s arguments): returns
    ``(out, s_last, ca, cb, stats)``, the coefficients as the kernel read them and the training
    batchnorm's ``(mean, invstd)``. Called directly when no gradient is wanted."""
    T, NB, C, H, W = x.shape
    stats = None
    if bn is not None:  # training batchnorm: statistics (and running stats) in one C call
        rows = torch.empty((4, C))
        w_c = None if weight is None else weight.detach()
        b_c = None if bias is None else bias.detach()
        kern.bn_stats(
            _ptr(x), T * NB, C, H * W, _ptr(w_c), _ptr(b_c), bn.eps, bn.momentum,
            _ptr(bn.running_mean), _ptr(bn.running_var), _ptr(bn.num_batches),
            _ptr(rows), num_threads(x.numel()),
        )  # fmt: skip
        ca_c, cb_c, mean32, invstd = rows.unbind(0)
        stats = (mean32, invstd)
    else:
        ca_c = None if ca is None else _f32(ca)
        cb_c = None if cb is None else _f32(cb)
    OH, OW = _pooled(kern.window, H, W)
    out = WORKSPACES.empty((T, NB, C, OH, OW))
    s_last = WORKSPACES.empty((len(fills), NB * C * H * W))
    s_init, s_fill = _state_args((v0, *s0), fills)
    kern.fwd(
        _ptr(x), _ptr(r), _ptr(e), s_init, s_fill, _ptr(uniforms), _ptr(ca_c), _ptr(cb_c),
        _ptr(eb), _ptr(out), _ptr(s_last), T, NB, C, H, W, group_planes(NB * C, H * W),
        num_threads(x.numel()),
    )  # fmt: skip
    return out, s_last, ca_c, cb_c, stats


class _ChainFunction(torch.autograd.Function):
    """Forward and backward of one chain call (see the module docstring).

    The neuron's states are ``v0`` (the membrane) and, after ``eb``, ``s0`` (the extra states,
    in the dynamics' order): each a flat float32 tensor of the initial values, or None for a
    fresh state, which the kernel fills with its entry of ``fills``. The second output holds
    every state's last value, rows ``[S, N * C * H * W]`` (``v`` first).
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_chain_forward` of ``args`` (its arguments, in its order), saved for backward."""
        kern, x, r, _e, v0, fills, uniforms, ca, cb, weight, _bias, bn, eb, *s0 = args
        out, s_last, ca_c, cb_c, stats = _chain_forward(*args)
        ctx.kern, ctx.bn, ctx.fills = kern, bn is not None, fills
        ctx.has_ca, ctx.has_cb = ca is not None and bn is None, cb is not None and bn is None
        ctx.stats = stats
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, r, v0, uniforms, ca_c, cb_c, weight, eb, *s0)
        return out, s_last

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor | None, g_slast: torch.Tensor | None) -> Any:
        x, r, v0, uniforms, ca, cb, weight, eb, *s0 = ctx.saved_tensors
        kern: ChainKernel = ctx.kern
        T, NB, C, H, W = x.shape
        OH, OW = _pooled(kern.window, H, W)
        if g_out is None:
            g_out = torch.zeros((T, NB, C, OH, OW))
        g_out = _f32(g_out)
        gsl = None if g_slast is None else _f32(g_slast)
        nu = kern.source.num_uniforms
        need = ctx.needs_input_grad
        nt = num_threads(x.numel())
        gx = WORKSPACES.empty(tuple(x.shape))
        gxin = None if ctx.bn else WORKSPACES.empty(tuple(x.shape))
        # The initial states' gradients, rows of one [S, N * C * H * W] buffer (v first): those
        # of the states passed as tensors that need one (v0 is input 4, s0 follows eb, 13).
        inits = (v0, *s0)
        slots = (4, *range(13, 12 + len(inits)))
        want = [t is not None and need[i] for t, i in zip(inits, slots, strict=True)]
        g_init = torch.empty((len(inits), NB * C * H * W)) if any(want) else None
        psum = torch.empty((NB * C, 2 + nu), dtype=torch.float64)
        s_init, s_fill = _state_args(inits, ctx.fills)
        kern.bwd(
            _ptr(g_out), _ptr(gsl), _ptr(x), _ptr(r), s_init, s_fill, _ptr(uniforms),
            _ptr(ca), _ptr(cb), _ptr(eb), _ptr(gx), _ptr(gxin), _ptr(g_init), _ptr(psum),
            T, NB, C, H, W, group_planes(NB * C, H * W), nt,
        )  # fmt: skip
        g_states = [g_init[i] if w else None for i, w in enumerate(want)]  # type: ignore[index]
        # One buffer for the per-channel results: rows g_ca / g_w, g_cb / g_b, then g_u.
        small = torch.empty((2 * C + nu,))
        g_u = small[2 * C :] if nu and need[6] else None
        g_ca = g_cb = g_w = g_b = None
        if ctx.bn:
            mean32, invstd = ctx.stats
            g_w = small[:C] if weight is not None and need[9] else None
            g_b = small[C : 2 * C] if need[10] else None
            gxin = WORKSPACES.empty(tuple(x.shape))
            kern.bn_bwd(
                _ptr(gx), _ptr(x), _ptr(psum), _ptr(mean32), _ptr(invstd),
                _ptr(None if weight is None else weight.detach()), _ptr(gxin), _ptr(g_w),
                _ptr(g_b), _ptr(g_u), T * NB, NB, C, H * W, 2 + nu, nt,
            )  # fmt: skip
        else:
            g_ca = small[:C] if ctx.has_ca else None
            g_cb = small[C : 2 * C] if ctx.has_cb else None
            if g_ca is not None or g_cb is not None or g_u is not None:
                kern.reduce(_ptr(psum), NB, C, 2 + nu, _ptr(g_ca), _ptr(g_cb), _ptr(g_u))
        # x = prologue(xin) + r: the residual's gradient is the neuron input's, gx.
        g_r = gx if r is not None and need[2] else None
        # out = s + e: the added residual's gradient is the output's.
        g_e = g_out if need[3] else None
        gv0, *g_s0 = g_states
        return None, gxin, g_r, g_e, gv0, None, g_u, g_ca, g_cb, g_w, g_b, None, None, *g_s0


#: A kernel work item is a group of consecutive ``(n, c)`` planes holding about this many
#: neurons (one plane when planes are larger): the neuron loop then runs over the group's
#: neurons as one contiguous span, which small planes (ResNet's 4x4 ... 1x1) need.
GROUP_NEURONS = 256

#: At least this many work items per call when there are enough planes (load balance).
MIN_GROUPS = 8


def group_planes(planes: int, plane: int) -> int:
    """How many of ``planes`` planes of ``plane`` neurons one kernel work item takes."""
    g = max(1, GROUP_NEURONS // max(plane, 1))
    return max(1, min(g, planes // MIN_GROUPS))


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached as a contiguous float32 tensor (itself when it already is one)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


class _TrainBN:
    """What the statistics kernel needs of a training batchnorm: ``eps``, ``momentum`` (-1 for
    the cumulative average) and its running statistics (None when it tracks none)."""

    __slots__ = ("eps", "momentum", "running_mean", "running_var", "num_batches")

    def __init__(self, bn: nn.Module) -> None:
        self.eps = float(bn.eps)
        self.momentum = -1.0 if bn.momentum is None else float(bn.momentum)
        track = bn.track_running_stats and bn.running_mean is not None
        self.running_mean = bn.running_mean if track else None
        self.running_var = bn.running_var if track else None
        nbt = getattr(bn, "num_batches_tracked", None) if track else None
        self.num_batches = nbt


def _pooled(window: tuple[int, int, int], H: int, W: int) -> tuple[int, int]:
    """The pooled height and width of ``H x W`` planes (floor mode, dilation 1)."""
    k, st, pad = window
    return (H + 2 * pad - k) // st + 1, (W + 2 * pad - k) // st + 1


def _pool_window(pool: nn.Module | None) -> tuple[str, tuple[int, int, int]] | None:
    """``('max' | 'avg' | 'none', (kernel, stride, padding))`` for a pooling module the chain
    kernels express, else None. Max pooling: any square window, stride and padding (at most
    half the window, as PyTorch requires); avg pooling: kernel == stride, no padding."""
    if pool is None:
        return ("none", (1, 1, 0))

    def square(v: Any) -> int | None:
        t = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return int(t[0]) if len(t) == 2 and t[0] == t[1] else None

    k = square(pool.kernel_size)
    s = square(pool.stride if pool.stride is not None else pool.kernel_size)
    pad = square(pool.padding)
    if k is None or s is None or pad is None or getattr(pool, "ceil_mode", False):
        return None
    if isinstance(pool, nn.MaxPool2d):
        if square(pool.dilation) != 1 or pool.return_indices or not 0 <= pad <= k // 2:
            return None
        return ("max", (k, s, pad))
    if isinstance(pool, nn.AvgPool2d):
        if pool.divisor_override is not None or k != s or pad != 0:
            return None
        return ("avg", (k, s, pad))
    return None


#: With ``backend='auto'`` a chain is fused only when its planes have at least this many
#: neurons (``H * W``). Since a kernel work item groups small planes (:func:`group_planes`)
#: and the batchnorm statistics and coefficients are computed in C, the fused chain beat the
#: separate ops on every plane size measured, down to ResNet-18's 1x1 planes
#: (``benchmarks/bench_chain_fusion.py --micro``), so the rule no longer leaves any out; it
#: stays as the place to raise the bound should a machine disagree.
AUTO_MIN_PLANE = 1


def size_blocker(backend: str | None, shape: tuple[int, ...]) -> str | None:
    """Why a chain whose neuron runs ``backend`` (``'auto'`` is size-driven) on ``[T, N, C, H,
    W]`` inputs is left unfused, or None."""
    if backend != "auto" or len(shape) != 5:
        return None
    plane = shape[3] * shape[4]
    if plane < AUTO_MIN_PLANE:
        return (
            f"planes of {plane} < {AUTO_MIN_PLANE} neurons, where the per-plane chain kernel "
            "is slower than the separate ops (backend='cpu' fuses them anyway)"
        )
    return None


def chain_blocker(neuron: nn.Module, bn: nn.Module | None, pool: nn.Module | None) -> str | None:
    """Why ``bn -> neuron -> pool`` has no chain kernel, or None when it has one."""
    d = dynamics_for(neuron)
    if d is None:
        return f"{type(neuron).__name__} has no fused kernel"
    clash = chain_name_clash(d)
    if clash is not None:
        return (
            f"{type(neuron).__name__}'s state {clash!r} has the name of a variable of the chain "
            "kernels, so the neuron runs its own fused kernel (rename the state)"
        )
    if getattr(neuron, "store_v_seq", False):
        return "the neuron stores v_seq"
    if bn is not None and not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not a BatchNorm2d"
    if _pool_window(pool) is None:
        return (
            f"{type(pool).__name__} is not a square, floor-mode pooling the kernels express "
            "(max: dilation 1, padding <= kernel/2, no indices; avg: kernel == stride, no "
            "padding, no divisor override)"
        )
    return None


class FusedChain(nn.Module):
    """``pool(neuron(bn(x) + r))`` on ``[T, N, C, H, W]`` as one generated kernel when possible.

    ``bn`` (a ``BatchNorm2d``) and ``pool`` (``MaxPool2d`` / ``AvgPool2d``) may be None; with
    ``residual`` the forward takes an input ``r`` (same shape as ``x``) added to the
    batchnorm's output before the neuron, with ``added`` an input ``e`` added to the spikes
    (SEW ResNet's ADD: ``out = e + s``). The modules are the compiled model's; see the module
    docstring for the math and the fallback.
    """

    def __init__(
        self,
        neuron: nn.Module,
        bn: nn.Module | None,
        pool: nn.Module | None,
        residual: bool = False,
        added: bool = False,
        scale_in: nn.Module | None = None,
        scale_out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.added = added
        if added and pool is not None:
            raise ValueError("FusedChain: a residual added after the neuron needs no pooling.")
        if scale_in is not None and bn is not None:
            raise ValueError("FusedChain: a batchnorm and an input scale cannot both be merged.")
        if scale_out is not None and (pool is not None or added):
            raise ValueError("FusedChain: an output scale cannot follow a pooling or an add.")
        self.scale_in = scale_in
        self.scale_out = scale_out
        why = chain_blocker(neuron, bn, pool)
        if why is not None:
            raise ValueError(f"FusedChain: {why}; keep the ops separate.")
        self.neuron = neuron
        self.bn = bn
        self.pool = pool
        self.pool_kind, self.pool_window = _pool_window(pool)  # type: ignore[misc]
        #: Set by time chunks (:mod:`snncompile.runtime.batch_stats`) while a training
        #: batchnorm's statistics over all T are gathered or applied chunk by chunk.
        self.batch_stats: Any = None
        #: ``(coefficients, tensors, versions, eps)`` of the last eval batchnorm coefficients.
        self._affine_cache: Any = None

    @property
    def step_mode(self) -> str:
        """The neuron's step mode (the chain runs multi-step ``[T, N, ...]`` inputs)."""
        return getattr(self.neuron, "step_mode", "m")

    @property
    def v(self) -> Any:
        """The neuron's membrane state (the chain holds no state of its own)."""
        return self.neuron.v

    @v.setter
    def v(self, value: Any) -> None:
        self.neuron.v = value

    def _fused_dynamics(self, x_seq: torch.Tensor) -> NeuronDynamics | None:
        """The neuron's dynamics when this call can run fused, else None."""
        backend = getattr(self.neuron, "backend", "torch")
        if backend not in ("cpu", "auto") or x_seq.device.type != "cpu":
            return None
        if x_seq.dtype != torch.float32 or x_seq.dim() != 5:
            return None
        if getattr(self.neuron, "step_mode", "m") != "m" or not compiler_available():
            return None
        if backend == "auto" and not auto_fuses_size(x_seq):
            return None
        # A hooked module (a monitor, a learner) must see its own call: run the ops separately.
        for m in (self.neuron, self.bn, self.pool, self.scale_in, self.scale_out):
            if m is not None and (m._forward_hooks or m._forward_pre_hooks):
                return None
        return dynamics_for(self.neuron)

    def _eval_affine(self, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_eval_affine` of ``bn``, kept while its tensors are the same objects at the
        same versions and no gradient flows to them (recomputing it cost ~15 us a call)."""
        tensors = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _eval_affine(bn)  # the coefficients carry the affine parameters' gradient
        try:
            versions = tuple(-1 if t is None else t._version for t in tensors)
        except RuntimeError:  # inference tensors have no version counter
            return _eval_affine(bn)
        hit = self._affine_cache
        if (
            hit is not None
            and hit[2] == versions
            and hit[3] == bn.eps
            and all(a is b for a, b in zip(hit[1], tensors, strict=True))
        ):
            return hit[0]
        with torch.no_grad():
            ab = _eval_affine(bn)
        # The tensors are held, so a freed one cannot come back under the same id and version.
        self._affine_cache = (ab, tensors, versions, bn.eps)
        return ab

    def _split(
        self, x_seq: torch.Tensor, extra: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(r, e)`` from the inputs after ``x``: ``r`` when ``residual``, then ``e`` when
        ``added``; each must have ``x``'s shape."""
        want = int(self.residual) + int(self.added)
        if len(extra) != want:
            raise ValueError(
                f"FusedChain: built with residual={self.residual}, added={self.added}, so it "
                f"takes {1 + want} input(s), got {1 + len(extra)}"
            )
        for t in extra:
            if t.shape != x_seq.shape:
                raise ValueError(
                    f"FusedChain: a residual input has shape {tuple(t.shape)}, the chain's "
                    f"input {tuple(x_seq.shape)}; the fused add does not broadcast"
                )
        it = iter(extra)
        r = next(it) if self.residual else None
        e = next(it) if self.added else None
        return r, e

    def forward(self, x_seq: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """Run ``x_seq`` ``[T, N, C, H, W]`` (then the residual ``r`` added before the neuron
        when ``residual``, then ``e`` added to the spikes when ``added``, both of that shape);
        returns the (pooled) spikes ``[T, N, C, H', W']`` (plus ``e``)."""
        r_seq, e_seq = self._split(x_seq, extra)
        for t in (r_seq, e_seq):
            if t is not None and (t.dtype != x_seq.dtype or t.device != x_seq.device):
                return self.unfused(x_seq, *extra)
        d = self._fused_dynamics(x_seq)
        if d is None:
            return self.unfused(x_seq, *extra)
        neuron, bn = self.neuron, self.bn
        prologue = "none"
        ca = cb = weight = bias = None
        bn_info = None
        C = x_seq.shape[2]
        eb = None if self.scale_out is None else _per_channel(self.scale_out, C)
        kind = "sum" if self.added else ("scale" if eb is not None else self.pool_kind)
        if bn is not None:
            prologue = "affine"
        elif self.scale_in is not None:
            prologue = "scale"
        kern = chain_kernel(d, prologue, kind, self.residual, self.pool_window)
        if bn is not None:
            if self.batch_stats is not None:  # statistics over all T, taken chunk by chunk
                x_seq, ca, cb = self.batch_stats.chain_inputs(x_seq, kern)
            elif bn.training or bn.running_mean is None:
                weight, bias = bn.weight, bn.bias
                bn_info = _TrainBN(bn)
                if not _stats_ok(bn_info, bn, C):
                    return self.unfused(x_seq, *extra)
            else:
                ca, cb = self._eval_affine(bn)
        if self.scale_in is not None:
            ca = _per_channel(self.scale_in, C)
        r_c = None if r_seq is None else r_seq.contiguous()
        e_c = None if e_seq is None else e_seq.contiguous()
        params = {n: getattr(neuron, n) for n in d.param_names}
        uniforms = uniforms_for(d, params or None, x_seq.device)
        inits, fills = _initial_states(neuron, d.state_names, x_seq[0])
        args = (
            kern, x_seq.contiguous(), r_c, e_c, inits[0], fills, uniforms, ca, cb, weight, bias,
            bn_info, eb, *inits[1:],
        )  # fmt: skip
        if torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            out, s_last = _ChainFunction.apply(*args)
        else:  # nothing to differentiate: the kernels without autograd's bookkeeping
            out, s_last = _chain_forward(*args)[:2]
        shape = x_seq.shape[1:]
        for name, last in zip(d.state_names, s_last.unbind(0), strict=True):
            setattr(neuron, name, last.view(shape))
        return out

    def unfused(self, x_seq: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """The chain as separate ops, as the unfused compiled graph runs them."""
        return self.unfused_with_spikes(x_seq, *extra)[0]

    def unfused_with_spikes(
        self, x_seq: torch.Tensor, *extra: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, spikes)``: the chain as separate ops, and the neuron's own (unpooled)
        spikes ``[T, N, C, H, W]``, which the fused kernel never writes (the profiler counts
        them)."""
        r_seq, e_seq = self._split(x_seq, extra)
        T = x_seq.shape[0]
        if self.bn is not None:
            x_seq = self.bn(x_seq.flatten(0, 1)).unflatten(0, (T, -1))
        if self.scale_in is not None:
            x_seq = self.scale_in(x_seq)
        if r_seq is not None:
            x_seq = x_seq + r_seq
        spikes = out = self.neuron(x_seq)
        if self.pool is not None:
            out = self.pool(spikes.flatten(0, 1)).unflatten(0, (T, -1))
        if e_seq is not None:
            out = e_seq + out
        if self.scale_out is not None:
            out = self.scale_out(out)
        return out, spikes


def _initial_states(
    neuron: nn.Module, names: tuple[str, ...], x: torch.Tensor
) -> tuple[list[torch.Tensor | None], tuple[float, ...]]:
    """``(inits, fills)`` of the neuron's states ``names`` (``v`` first) for a step shaped like
    ``x``: a state that is a float (fresh, after a reset) is None in ``inits`` and its value in
    ``fills`` (the kernels fill it); a tensor state is checked against ``x``'s shape (the
    neuron's own check and message), made ``x``'s dtype and passed flat and contiguous."""
    inits: list[torch.Tensor | None] = []
    fills: list[float] = []
    for name in names:
        value = getattr(neuron, name)
        if isinstance(value, (int, float)):
            inits.append(None)
            fills.append(float(value))
            continue
        neuron._state_to_tensor(name, x)
        inits.append(getattr(neuron, name).float().expand(x.shape).reshape(-1).contiguous())
        fills.append(0.0)
    return inits, tuple(fills)


def _stats_ok(bn: _TrainBN, module: nn.Module, C: int) -> bool:
    """Whether the statistics kernel can read ``module``'s affine parameters and update its
    running statistics in place (float32, contiguous, ``C`` values, an int64 batch counter)."""
    for t in (module.weight, module.bias):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            return False
    if bn.running_mean is None:
        return True
    for t in (bn.running_mean, bn.running_var):
        if t is None or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != C:
            return False
    nb = bn.num_batches
    return nb is None or (nb.dtype == torch.int64 and nb.numel() == 1)


def _per_channel(scale: nn.Module, C: int) -> torch.Tensor:
    """A ``VoltageScale``'s scale as ``C`` contiguous float32 values (a scalar is expanded)."""
    t = scale.scale.detach().float()
    if t.numel() not in (1, C):
        raise ValueError(
            f"FusedChain: {type(scale).__name__} has {t.numel()} scale values for {C} channels"
        )
    return t.reshape(-1).expand(C).contiguous()


def _eval_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 ``(a, b)`` of an eval-mode batchnorm (``x * a + b`` in the kernel)."""
    invstd = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    a = invstd if bn.weight is None else bn.weight * invstd
    b = -bn.running_mean * a if bn.bias is None else bn.bias - bn.running_mean * a
    return a, b
