r"""Training BatchNorm over all ``T*N`` samples, run chunk by chunk (for time chunks).

A multi-step SpikingJelly BatchNorm in train mode normalises with statistics over every time
step, so a chunk of time cannot be run on its own: its output depends on the other chunks'
inputs, and in backward every sample's input gradient depends on every sample's output
gradient. With ``M`` samples per channel, ``x_hat = (x - mean) * invstd`` and ``g`` the
gradient of the output ``y = w * x_hat + b``::

    g_w = S2 = sum(g * x_hat),   g_b = S1 = sum(g)
    g_x = w * invstd * (g - S1 / M - x_hat * S2 / M)
        = [w * invstd * g]  +  [-(w * invstd / M) * (S1 + x_hat * S2)]

The first bracket is the gradient of the same batchnorm with its statistics held constant;
the second, once ``S1`` and ``S2`` are known, is a per-channel affine map of ``x`` -- the
gradient of ``sum(k1 * x + k2 * x^2 / 2)`` -- which the reruns add as one more output
gradient at the batchnorm's input. So, for the training batchnorms of a program (*sites*):

- forward: the statistics of a site need exact inputs, i.e. the statistics of every site
  before it. A site's *level* is one plus the largest level among the sites it depends on;
  one no-grad sweep over all chunks per level gathers the float64 sums of the level's inputs
  (every earlier level applied with its statistics, later ones with placeholders), then the
  output sweep applies all of them.
- backward: ``S1``, ``S2`` of a site need the exact output gradient, i.e. ``S`` of every site
  after it. One reverse sweep per level, from the last, gathers the level's sums as the
  gradients of two zero-valued leaves ``dw``, ``db`` (``y = (w + dw) * x_hat + b + db``),
  adding the corrections of the levels already known; the last sweep, with every correction,
  gives the gradients of the parameters, the input and the state.

Numbers: in a fused chain the sums are the chain kernel's own (``bn_partial`` of
:mod:`snncompile.codegen.chain_kernels`: per-plane float64 sums added per channel over the
rows in order, carried from chunk to chunk, so the same float64 adds as one call over all
``T*N`` rows) and ``bn_finish`` turns them into the same ``a = w * invstd``,
``b = bias - mean * a``: the forward is bit-equal to the unchunked chain's. A batchnorm outside
a chain (``backend='torch'``, ResNet downsample branches) takes float64 sums by torch and
``F.batch_norm`` with the statistics held, which rounds like PyTorch's training batchnorm to
about one float32 ulp. Gradients differ from the unchunked ones by float rounding (the
correction is applied as a separate term). The running statistics are updated once per step,
from the statistics over all ``T*N`` samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["BatchStatSite", "BatchStats", "SweepDone", "batch_stat_sites"]

_BN = nn.modules.batchnorm._BatchNorm


class SweepDone(Exception):
    """Raised inside a statistics sweep's chunk once every site of the level has been summed
    (what follows would not change the sums)."""


class _StatisticsGradient(torch.autograd.Function):
    """Identity in forward; backward adds ``k1 + k2 * (x - mean)`` (per channel) to the
    incoming gradient: the batch statistics' share of a training batchnorm's input gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, mean: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, mean, k1, k2)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, mean, k1, k2 = ctx.saved_tensors
        out = (x - mean).mul_(k2).add_(k1)
        return out.add_(g), None, None, None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(eq=False)
class BatchStatSite:
    """One training batchnorm of the program: the fx node that runs it, the module the node
    calls (a :class:`~snncompile.runtime.fused_chain.FusedChain` or the batchnorm itself), the
    batchnorm, and its level (see the module docstring)."""

    name: str
    node: fx.Node
    module: nn.Module
    bn: _BN
    level: int = 1
    #: ``'collect'`` (sum the inputs, output a placeholder), ``'apply'`` (the statistics held)
    mode: str = "apply"
    acc: torch.Tensor | None = None  # float64 [C, 2]: sum(x), sum(x^2) of the inputs so far
    count: int = 0  # samples per channel in acc
    rows: torch.Tensor | None = None  # float32 [4, C]: a, b, mean, invstd
    var: torch.Tensor | None = None  # the biased variance over all chunks (plain batchnorm)
    grad_sums: torch.Tensor | None = None  # float64 [2, C]: S1 = sum(g), S2 = sum(g * x_hat)
    kern: Any = None  # the chain kernel whose sums were gathered (its finish is used)
    owner: Any = None  # the BatchStats told after each sum (to end a sweep's chunk early)
    gather: bool = False  # the reruns attach zero leaves dw, db to gather S1, S2
    leaves: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def chained(self) -> bool:
        """Whether the batchnorm runs inside a fused chain."""
        return self.module is not self.bn

    def reset(self) -> None:
        """Forget the statistics and gradient sums of the last step."""
        self.acc, self.count, self.rows, self.var, self.grad_sums = None, 0, None, None, None
        self.kern = None
        self.leaves.clear()

    # -- the pieces the modules call ------------------------------------------------------

    def _accumulate(self, x: torch.Tensor, channel_dim: int, kern: Any = None) -> None:
        C = x.shape[channel_dim]
        if self.acc is None:  # on x's device (a chain kernel's input is on the CPU)
            self.acc = torch.zeros((C, 2), dtype=torch.float64, device=x.device)
        if kern is not None:  # the chain kernel's own float64 sums, carried from chunk to chunk
            from snncompile.codegen.cpu import num_threads

            self.kern = kern
            xc = x.detach().contiguous()
            rows = xc.shape[0] * xc.shape[1]
            kern.bn_partial(
                _ptr(xc), rows, C, xc[0, 0, 0].numel(), _ptr(self.acc), num_threads(xc.numel())
            )
        else:
            dims = [d for d in range(x.dim()) if d != channel_dim]
            xd = x.detach().double()
            self.acc[:, 0] += xd.sum(dims)
            self.acc[:, 1] += (xd * xd).sum(dims)
        self.count += x.numel() // C
        if self.owner is not None:
            self.owner.collected(self)

    def _affine_params(self, C: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w', b')``: the batchnorm's weight and bias (1 and 0 without affine), plus the
        gathering leaves when this sweep gathers the gradient sums."""
        bn = self.bn
        kw: dict[str, Any] = {"dtype": like.dtype, "device": like.device}
        w = bn.weight if bn.weight is not None else torch.ones(C, **kw)
        b = bn.bias if bn.bias is not None else torch.zeros(C, **kw)
        if self.gather and torch.is_grad_enabled():
            dw = torch.zeros(C, **kw, requires_grad=True)
            db = torch.zeros(C, **kw, requires_grad=True)
            self.leaves.append((dw, db))
            w, b = w + dw, b + db
        return w, b

    def _with_statistics_gradient(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``x`` itself in forward; in backward the statistics' share of the input gradient,
        ``-(w * invstd / M) * (S1 + x_hat * S2)`` per channel, is added to the gradient
        reaching it (once ``S1``, ``S2`` are known; computed then, one site at a time)."""
        if self.grad_sums is None or not x.requires_grad or not torch.is_grad_enabled():
            return x
        assert self.rows is not None
        a, _, mean, invstd = self.rows.unbind(0)  # a = w * invstd
        s1, s2 = self.grad_sums.double().unbind(0)
        k = -a.double() / self.count
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        # k * (S1 + (x - mean) * invstd * S2) = k1 + k2 * (x - mean)
        k1 = (k * s1).to(x.dtype).view(shape)
        k2 = (k * invstd.double() * s2).to(x.dtype).view(shape)
        return _StatisticsGradient.apply(x, mean.to(x.dtype).view(shape), k1, k2)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The batchnorm's forward on ``[B, C, *]`` with the statistics over all chunks."""
        if self.mode == "collect":
            self._accumulate(x, 1)
            return x  # a placeholder: what follows waits for a later level
        assert self.rows is not None and self.var is not None, (
            f"%{self.name}: batch statistics used before they were gathered"
        )
        x = self._with_statistics_gradient(x, 1)
        w, b = self._affine_params(x.shape[1], x)
        mean = self.rows[2].to(x.dtype)
        return F.batch_norm(x, mean, self.var.to(x.dtype), w, b, False, 0.0, self.bn.eps)

    def chain_inputs(self, x_seq: torch.Tensor, kern: Any) -> tuple[torch.Tensor, Any, Any]:
        """``(x_seq, a, b)`` for a fused chain's kernel (``x * a + b`` per channel): the input
        (with the statistics' gradient attached) and coefficients carrying the gradients of
        the weight, the bias and the gathering leaves; in ``'collect'`` mode the chain
        kernel's sums of ``x_seq`` are added and placeholder coefficients returned."""
        C = x_seq.shape[2]
        if self.mode == "collect":
            self._accumulate(x_seq, 2, kern)
            ones = torch.ones(C, dtype=torch.float32)
            return x_seq, ones, torch.zeros(C, dtype=torch.float32)
        assert self.rows is not None, f"%{self.name}: batch statistics used before gathered"
        x_seq = self._with_statistics_gradient(x_seq, 2)
        a, b, mean, invstd = self.rows.unbind(0)
        if not torch.is_grad_enabled():
            return x_seq, a, b
        w, bias = self._affine_params(C, x_seq)
        dw = w - w.detach()  # zero, with the gradient of w (and of the gathering leaf)
        return x_seq, a + dw * invstd, b + (bias - bias.detach()) - mean * invstd * dw

    # -- per step ---------------------------------------------------------------------------

    def finish(self, update: bool) -> None:
        """Turn the gathered sums into the forward coefficients; with ``update``, update the
        running statistics too (once per step, after the sweeps)."""
        assert self.acc is not None and self.count > 0, f"%{self.name}: no input was summed"
        bn = self.bn
        C = self.acc.shape[0]
        n = float(self.count)
        track = update and bn.track_running_stats and bn.running_mean is not None
        momentum = -1.0 if bn.momentum is None else float(bn.momentum)
        mean = self.acc[:, 0] / n
        var = (self.acc[:, 1] / n - mean * mean).clamp_min(0.0)
        dtype = bn.weight.dtype if bn.weight is not None else torch.float32
        self.var = var.to(dtype)
        if self.kern is not None:  # the chain kernel's own finish: the unchunked chain's bits
            rows = torch.empty((4, C), dtype=torch.float32)
            w = None if bn.weight is None else bn.weight.detach().float().contiguous()
            b = None if bn.bias is None else bn.bias.detach().float().contiguous()
            self.kern.bn_finish(
                _ptr(self.acc), n, C, _ptr(w), _ptr(b), float(bn.eps), momentum,
                _ptr(bn.running_mean if track else None), _ptr(bn.running_var if track else None),
                _ptr(bn.num_batches_tracked if track else None), _ptr(rows),
            )  # fmt: skip
            self.rows = rows
            return
        mean32 = mean.to(dtype)
        invstd = 1.0 / torch.sqrt(self.var + bn.eps)
        w = torch.ones_like(mean32) if bn.weight is None else bn.weight.detach()
        b = torch.zeros_like(mean32) if bn.bias is None else bn.bias.detach()
        a = w * invstd
        self.rows = torch.stack([a, b - mean32 * a, mean32, invstd])
        if track:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else momentum
                unbiased = var * (n / max(n - 1.0, 1.0))
                rm, rv = bn.running_mean, bn.running_var
                rm.copy_(rm.double() * (1.0 - f) + mean * f)
                rv.copy_(rv.double() * (1.0 - f) + unbiased * f)

    def add_gathered(self, grads: list[torch.Tensor | None]) -> None:
        """Add this rerun's gradients of the gathering leaves (``dw``, ``db`` pairs, in the
        order of :attr:`leaves`) to the sums ``S2``, ``S1``."""
        if self.grad_sums is None:
            assert self.rows is not None
            C, device = self.rows.shape[1], self.rows.device
            self.grad_sums = torch.zeros((2, C), dtype=torch.float64, device=device)
        for i, g in enumerate(grads):
            if g is not None:
                self.grad_sums[1 - i % 2] += g.double()


def _training_bn(module: nn.Module) -> _BN | None:
    """The batchnorm that normalises with batch statistics in ``module`` (itself or a fused
    chain's), or None."""
    from snncompile.runtime.fused_chain import FusedChain

    bn = module.bn if isinstance(module, FusedChain) else module
    if isinstance(bn, _BN) and (bn.training or bn.running_mean is None):
        return bn
    return None


def batch_stat_sites(gm: fx.GraphModule) -> list[BatchStatSite] | str:
    """The training batchnorms of ``gm`` with their levels, or why they cannot be taken chunk
    by chunk (a batchnorm inside another module, or one module called twice)."""
    from snncompile.runtime.fused_chain import FusedChain
    from snncompile.runtime.step_loop import PerStepBatchNorm, StepLoop

    sites: list[BatchStatSite] = []
    seen: dict[int, str] = {}
    level_out: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        below = max((level_out.get(a, 0) for a in node.all_input_nodes), default=0)
        level_out[node] = below
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        name = str(node.meta.get("snn_node", node.name))
        if isinstance(module, (PerStepBatchNorm, StepLoop)):
            continue  # statistics per time step: no coupling across steps
        bn = _training_bn(module)
        if bn is None:
            inner = isinstance(module, FusedChain) and module.bn is not None
            for sub in [] if inner else module.modules():
                if sub is not module and _training_bn(sub) is not None:
                    return (
                        f"%{name} ({type(module).__name__}) holds a training {type(sub).__name__}"
                        " inside it, whose statistics over all T*N samples the time chunks "
                        "cannot take (put it in eval mode, i.e. frozen BatchNorm, or train "
                        "without time chunks)"
                    )
            continue
        if isinstance(bn, nn.SyncBatchNorm):
            return (
                f"%{name} is a training SyncBatchNorm, whose statistics are reduced across "
                "processes; the time chunks would take them in this process alone (use "
                "BatchNorm, freeze it with eval(), or train without time chunks)"
            )
        if id(bn) in seen:
            return (
                f"%{name} and %{seen[id(bn)]} call the same training {type(bn).__name__}; "
                "time chunks take one set of statistics per batchnorm call site"
            )
        seen[id(bn)] = name
        level_out[node] = below + 1
        sites.append(BatchStatSite(name, node, module, bn, below + 1))
    return sites


class BatchStats:
    """The training batchnorms of a time-chunked program and the sweeps over them."""

    def __init__(self, gm: fx.GraphModule, sites: list[BatchStatSite], slots: list[Any]) -> None:
        self.gm = gm
        self.sites = sites
        self.levels = sorted({s.level for s in sites})
        for s in sites:
            s.owner = self
        self._level, self.stop_early, self._remaining = 0, False, 0
        owner: dict[int, fx.Node] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                for sub in gm.get_submodule(str(node.target)).modules():
                    store = getattr(sub, "_memories", None)
                    if isinstance(store, dict):
                        owner.setdefault(id(store), node)
        self._slot_owner = [owner.get(id(store)) for store, _ in slots]

    def of_level(self, level: int) -> list[BatchStatSite]:
        """The sites of ``level``."""
        return [s for s in self.sites if s.level == level]

    def slots_after(self, level: int) -> list[bool]:
        """Per state slot: whether its module runs downstream of a site of ``level`` (its
        state's gradient is exact in that level's gathering sweep); slots of modules the graph
        does not call are kept too."""
        reach: set[fx.Node] = set()
        todo = [s.node for s in self.of_level(level)]
        while todo:
            n = todo.pop()
            if n not in reach:
                reach.add(n)
                todo.extend(n.users)
        return [o is None or o in reach for o in self._slot_owner]

    def begin_step(self) -> None:
        """Forget the last step's statistics and gradient sums."""
        for s in self.sites:
            s.reset()

    def statistics(self) -> list[tuple[Any, ...]]:
        """This step's statistics, per site: a step's forward keeps them for its backward
        (another step's forward may run in between, e.g. a loss over two calls)."""
        return [(s.rows, s.var, s.count) for s in self.sites]

    def begin_backward(self, statistics: list[tuple[Any, ...]]) -> None:
        """Put back the statistics of the step whose backward runs (:meth:`statistics`) and
        forget the gradient sums of any backward before."""
        for s, (rows, var, count) in zip(self.sites, statistics, strict=True):
            s.rows, s.var, s.count = rows, var, count
            s.grad_sums, s.mode, s.gather = None, "apply", False
            s.leaves.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route every site's batchnorm through its :class:`BatchStatSite` (in a chain, the
        chain's kernel path too) while the block runs."""
        from snncompile.runtime.fused_chain import FusedChain

        before = [s.bn.__dict__.get("forward") for s in self.sites]
        try:
            for s in self.sites:
                s.bn.forward = s.plain_forward  # type: ignore[method-assign]
                if isinstance(s.module, FusedChain):
                    s.module.batch_stats = s
            yield
        finally:
            for s, f in zip(self.sites, before, strict=True):
                s.bn.__dict__.pop("forward", None)
                if f is not None:
                    s.bn.forward = f  # type: ignore[method-assign]
                if isinstance(s.module, FusedChain):
                    s.module.batch_stats = None

    def matches(self, sites: list[BatchStatSite]) -> bool:
        """Whether ``sites`` (found again, e.g. after ``train()`` / ``eval()``) are these."""
        return [(s.node, s.bn) for s in sites] == [(s.node, s.bn) for s in self.sites]

    def collecting(self, level: int, stop_early: bool = False) -> None:
        """Sites without statistics sum their inputs; the others apply theirs. With
        ``stop_early``, a chunk ends (:class:`SweepDone`) once every site of ``level`` has
        summed its input (only where the program draws no random numbers: the chunks after
        must start from the generator state a whole chunk leaves)."""
        for s in self.sites:
            s.mode = "collect" if s.rows is None else "apply"
            if s.rows is None:
                s.acc, s.count, s.kern = None, 0, None
        self._level, self.stop_early = level, stop_early
        self._remaining = 0

    def chunk_begins(self) -> None:
        """A statistics sweep's next chunk starts: every site of the level is still to come."""
        self._remaining = len(self.of_level(self._level))

    def collected(self, site: BatchStatSite) -> None:
        """``site`` summed its input; end the chunk when it was the level's last."""
        if site.level == self._level:
            self._remaining -= 1
            if self._remaining == 0 and self.stop_early:
                raise SweepDone

    def finish_level(self, level: int) -> None:
        """The level's statistics from the sums of the sweep just run (running statistics
        not yet updated); the sums of the later levels are placeholders and dropped."""
        for s in self.sites:
            if s.rows is None and s.level == level:
                s.finish(update=False)
            if s.rows is None:
                s.acc, s.count, s.kern = None, 0, None
        for s in self.sites:
            s.mode = "apply"

    def update_running_stats(self) -> None:
        """Update every site's running statistics once, from its statistics over all T."""
        for s in self.sites:
            s.finish(update=True)

    def gathering(self, level: int | None) -> None:
        """Prepare a rerun: the sites of ``level`` attach gathering leaves (None: none do)."""
        for s in self.sites:
            s.gather = s.level == level
            s.leaves.clear()

    def gathered(self) -> list[torch.Tensor]:
        """The gathering leaves of the rerun just run, in site order."""
        return [t for s in self.sites for pair in s.leaves for t in pair]

    def add_gathered(self, grads: list[torch.Tensor | None]) -> None:
        """Add the gradients of :meth:`gathered`'s leaves to their sites' sums."""
        i = 0
        for s in self.sites:
            k = 2 * len(s.leaves)
            if k:
                s.add_gathered(grads[i : i + k])
            i += k

    def clear_rerun(self) -> None:
        """Drop the tensors the last rerun recorded."""
        for s in self.sites:
            s.leaves.clear()
