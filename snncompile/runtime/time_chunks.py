r"""Training in chunks of time: the whole program recomputed chunk by chunk in backward.

Math: a multi-step SNN without ops that couple time steps is a per-step map
``(y_t, s_t) = F(x_t, s_{t-1}; \theta)`` where ``s`` is the neurons' state (``v`` and any extra
state variables, a dropout mask). Cut ``[0, T)`` into chunks ``c`` of ``Tc`` steps; with
``s^c`` the state at the start of chunk ``c`` the chunked program is
``(Y_c, s^{c+1}) = F_c(X_c, s^c; \theta)`` and BPTT factorises over chunks::

    g_{s^c} = (dF_c/ds^c)^T [g_{Y_c}, g_{s^{c+1}}]          (carried to chunk c - 1)
    g_theta = sum_c (dF_c/d theta)^T [g_{Y_c}, g_{s^{c+1}}]  (summed over the chunks)
    g_{X_c} = (dF_c/dX_c)^T [g_{Y_c}, g_{s^{c+1}}]

:class:`_TimeChunked` (an autograd Function) runs the forward chunk by chunk without a graph,
keeping the outputs, each chunk's RNG state and the chunk-start states. Its backward goes
through the chunks in reverse: it puts back a chunk's start state (as leaves requiring grad),
reruns the chunk with gradients and backpropagates the chunk's slice of ``grad_output`` together
with the gradient carried for the chunk's end state; the gradient reaching the start state is
carried to the previous chunk. Only one chunk's graph is alive at a time, so activations cost
``O(Tc)`` instead of ``O(T)``.

Two ways to keep the chunk-start states (``keep``):

- ``'all'``: every chunk's start state is kept in forward: ``n = T / Tc`` states, one extra
  forward.
- ``slots`` (an int ``s >= 1``): at most ``s`` chunk-start states are alive at any time, the
  first chunk's among them; the others are recomputed by forward sweeps without a graph, as in
  binomial checkpointing (Griewank's *revolve*). With ``beta(s, t) = C(s + t, s)`` the number of
  chunks that ``s`` states reverse when every chunk runs forward at most ``t`` extra times, the
  backward of chunks ``[a, b)`` (``L = b - a``, start state held) takes the smallest ``t`` with
  ``beta(s, t) >= L``, computes the state at ``m = b - min(L - 1, beta(s - 1, t))``, reverses
  ``[m, b)`` with ``s - 1`` states, drops the state at ``m`` and reverses ``[a, m)`` with ``s``.
  With ``s = 1`` each chunk is recomputed from the first one (``O(n^2)`` chunk forwards). The
  states, and with them the peak, no longer grow with ``T`` for a fixed ``Tc`` and ``s``; the
  price is up to ``t`` extra forwards.

Exactness: every rerun executes the same ops on the same values (same chunk shapes as the
forward, same RNG state, the state the chunk started from), so the outputs of the forward are
bit-equal to the unchunked program's whenever the kernels give the same values for a smaller
batch of rows (checked on the example at compile time), and the per-chunk gradients are the
exact gradients of the chunk. The parameter gradients are the per-chunk sums added in another
order than the unchunked backward's sum over all ``T*N`` rows, so they agree with it to float
rounding (relative differences of order 1e-6), not bit for bit. Random masks are the same as
the unchunked program's when the draws do not depend on ``T`` (SpikingJelly's ``Dropout`` draws
one ``[N, *]`` mask per simulation, in the first chunk); a program that draws over the whole
sequence fails the compile-time check below. Buffers written in forward (running statistics of
per-step BatchNorm) are restored after each rerun: they are updated once per step.

Training BatchNorm over ``T*N`` couples every step through its statistics: such batchnorms
(*sites*, :mod:`snncompile.runtime.batch_stats`) take their statistics in extra forward sweeps
and their gradient sums in extra reverse sweeps, one per level, before the output sweep and
the last reverse sweep above (a per-step BatchNorm of a single-step model and a BatchNorm in
eval mode need nothing extra). Which batchnorms are sites is decided at each call, from their
``training`` flag.

Which programs qualify (:func:`time_chunk_blocker`): one ``[T, N, *]`` input, one tensor
output with ``T`` first, no training batchnorm hidden inside another module, and on the
example the chunked forward gives the unchunked output (this catches reductions, attention or
randomness over ``T`` inside the network).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from snncompile.ir.graph import Graph
from snncompile.progress import progress_bar
from snncompile.runtime.batch_stats import BatchStats, SweepDone, batch_stat_sites
from snncompile.runtime.memory import (
    forward_modes,
    measure_train_step,
    memory_slots,
    modes_restored,
    snapshot_state,
)

__all__ = [
    "ChunkChoice",
    "TimeChunkPlan",
    "TimeChunks",
    "chunk_reruns",
    "plan_time_chunks",
    "spine",
    "sweeps",
    "time_chunk_blocker",
]

Slot = tuple[dict[str, Any], str]


def sweeps(slots: int, chunks: int) -> int:
    """Extra forward sweeps ``t`` that ``slots`` kept states need to reverse ``chunks`` chunks:
    the smallest ``t`` with ``C(slots + t, slots) >= chunks`` (0 for one chunk)."""
    t = 0
    while math.comb(slots + t, slots) < chunks:
        t += 1
    return t


def _split(slots: int, length: int) -> int:
    """Chunks of ``length`` (a start state held, ``slots >= 2``) left of the next kept state."""
    t = sweeps(slots, length)
    return length - min(length - 1, math.comb(slots - 1 + t, slots - 1))


def spine(chunks: int, slots: int) -> list[int]:
    """The chunks whose start states the reversal computes first, in order: the forward keeps
    them (they are all alive together at the first chunk's backward anyway), so the backward
    does not have to sweep forward to them."""
    out: list[int] = []
    a, length = 0, chunks
    while slots > 1 and length > 1:
        m = a + _split(slots, length)
        out.append(m)
        a, length, slots = m, length - (m - a), slots - 1
    return out


RngState = tuple[torch.Tensor, torch.Tensor | None]


def _rng_state(device: torch.device) -> RngState:
    """The CPU generator's state, and the CUDA generator's of ``device`` when it is a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_at(state: RngState, device: torch.device) -> Iterator[None]:
    """Run the block from the generator ``state``; the generators are put back afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class TimeChunks:
    """A time-chunked training run of ``gm``: chunks of ``chunk`` steps; ``keep`` is ``'all'``
    (every chunk-start state kept) or the number of chunk-start states alive at most."""

    def __init__(self, gm: fx.GraphModule, chunk: int, keep: str | int = "all") -> None:
        if keep != "all" and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"TimeChunks: keep must be 'all' or an int >= 1, got {keep!r}")
        if chunk < 1:
            raise ValueError(f"TimeChunks: chunk must be >= 1, got {chunk!r}")
        self.gm = gm
        self.chunk = int(chunk)
        self.keep = keep
        self.slots: list[Slot] = memory_slots(gm)
        #: The training batchnorms, whose statistics over all T the chunks take in sweeps.
        self.batch_stats: BatchStats | None = None
        self.find_batch_stats(ValueError)

    def find_batch_stats(self, error: type[Exception]) -> None:
        """(Re)find the batchnorms that normalize with batch statistics -- ``train()`` and
        ``eval()`` change which do -- and raise ``error`` when one cannot be chunked."""
        sites = batch_stat_sites(self.gm)
        if isinstance(sites, str):
            raise error(f"TimeChunks: {sites}")
        if not sites:
            self.batch_stats = None
        elif self.batch_stats is None or not self.batch_stats.matches(sites):
            self.batch_stats = BatchStats(self.gm, sites, self.slots)

    def batch_stats_installed(self) -> contextlib.AbstractContextManager[None]:
        """Route the training batchnorms through :attr:`batch_stats` while the block runs."""
        if self.batch_stats is None:
            return contextlib.nullcontext()
        return self.batch_stats.installed()

    def state(self) -> list[Any]:
        """The current value of every state slot."""
        return [store[k] for store, k in self.slots]

    def set_state(self, values: list[Any]) -> None:
        """Put ``values`` (aligned with the slots) into the modules."""
        for (store, k), v in zip(self.slots, values, strict=True):
            store[k] = v

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Run the program on ``x`` ``[T, N, *]`` through :class:`_TimeChunked`."""
        for (_, k), v in zip(self.slots, self.state(), strict=True):
            if isinstance(v, torch.Tensor) and v.requires_grad:
                raise RuntimeError(
                    f"optimize(memory_budget=...): neuron state {k!r} carries an autograd graph "
                    "from an earlier call; a time-chunked step starts from a detached state. "
                    "Call functional.reset_net(compiled) or detach_net(compiled) between steps."
                )
        self.find_batch_stats(RuntimeError)  # the batchnorms' modes as of this call
        params = [p for p in self.gm.parameters() if p.requires_grad]
        return _TimeChunked.apply(self, x, *params)

    def forward_chunks(
        self, chunks: list[torch.Tensor], start: int, stop: int, rng: list[RngState]
    ) -> None:
        """Run chunks ``start .. stop - 1`` without a graph from the current state."""
        with torch.no_grad():
            for c in range(start, stop):
                with _rng_at(rng[c], chunks[c].device):
                    self.gm(chunks[c])


def _output_chunk(y: Any, xc: torch.Tensor) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != xc.shape[0]:
        raise RuntimeError(
            "optimize(memory_budget=...): a time chunk of "
            f"{xc.shape[0]} step(s) returned {type(y).__name__} "
            f"{list(y.shape) if isinstance(y, torch.Tensor) else ''}; time chunks need "
            "one [T, N, *] output tensor."
        )
    return y


def _chunk_bar(desc: str, total: int) -> Any:
    """A progress bar over chunk runs, drawn only when a step runs over a second (and on a
    terminal): a long-T, small-budget step can take minutes."""
    return progress_bar(desc=desc, total=total, unit="chunk", delay=1.0)


def _statistics_sweeps(tc: TimeChunks, chunks: list[torch.Tensor], bar: Any) -> None:
    """The forward sweeps that take the training batchnorms' statistics over all chunks, one
    per level (module docstring of :mod:`snncompile.runtime.batch_stats`), from the current
    state and generator state, which are left as they were; then the running statistics are
    updated once."""
    stats = tc.batch_stats
    assert stats is not None
    stats.begin_step()
    start = tc.state()
    device = chunks[0].device
    rng = _rng_state(device)
    restore = snapshot_state(tc.gm, memories=False)
    stop_early = False  # set once the first chunk, run whole, is seen to draw no random numbers
    try:
        for i, level in enumerate(stats.levels):
            stats.collecting(level, stop_early)
            with torch.no_grad(), _rng_at(rng, device):
                for c, xc in enumerate(chunks):
                    stats.chunk_begins()
                    try:
                        tc.gm(xc)
                    except SweepDone:
                        pass  # the rest of the chunk runs downstream of the level's sites
                    bar.update(1)
                    if i == 0 and c == 0:
                        now = _rng_state(device)
                        stop_early = torch.equal(now[0], rng[0]) and (
                            now[1] is None or torch.equal(now[1], rng[1])
                        )
                        stats.stop_early = stop_early
            restore()  # buffers a sweep wrote (per-step statistics) are the forward's to write
            tc.set_state(start)
            stats.finish_level(level)
    finally:
        tc.set_state(start)
        restore()
    stats.update_running_stats()


class _TimeChunked(torch.autograd.Function):
    """Forward chunk by chunk without a graph; backward chunk by chunk in reverse."""

    @staticmethod
    def forward(ctx: Any, tc: TimeChunks, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        chunks = list(x.split(tc.chunk, 0))
        if tc.keep == "all":
            keep = set(range(len(chunks)))
        elif tc.batch_stats is not None:  # several reverse sweeps: each recomputes its spine
            keep = {0}
        else:
            keep = {0, *spine(len(chunks), tc.keep)}
        starts: list[list[Any] | None] = []
        rng: list[RngState] = []
        out: torch.Tensor | None = None
        step = 0
        levels = 0 if tc.batch_stats is None else len(tc.batch_stats.levels)
        bar = _chunk_bar("time chunks (forward)", (levels + 1) * len(chunks))
        with tc.batch_stats_installed(), bar:
            if tc.batch_stats is not None:
                _statistics_sweeps(tc, chunks, bar)
            for c, xc in enumerate(chunks):
                starts.append(tc.state() if c in keep else None)
                rng.append(_rng_state(x.device))
                y = _output_chunk(tc.gm(xc), xc)
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out[step : step + xc.shape[0]].copy_(y)
                step += xc.shape[0]
                del y
                bar.update(1)
        ctx.tc, ctx.starts, ctx.rng = tc, starts, rng
        # This step's batchnorms and statistics: the backward's, whatever ran since.
        ctx.stats = tc.batch_stats
        ctx.statistics = None if tc.batch_stats is None else tc.batch_stats.statistics()
        ctx.modes = forward_modes([tc.gm])  # the reruns take the forward's train/eval modes
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor) -> tuple[Any, ...]:
        tc: TimeChunks = ctx.tc
        if getattr(ctx, "backward_ran", False):
            raise RuntimeError(
                "optimize(memory_budget=...): a second backward through the same time-chunked "
                "step (retain_graph=True); its backward frees the chunk-start states as it goes. "
                "Run the forward again for another backward."
            )
        ctx.backward_ran = True
        if torch.is_grad_enabled():  # backward(create_graph=True): the reruns build no graph
            raise RuntimeError(
                "optimize(memory_budget=...): backward(create_graph=True) through a time-chunked "
                "step; the chunks are rerun inside backward without a graph of their own, so no "
                "second-order gradient would exist. Compile without memory_budget (or with one "
                "that segments meet) for higher-order gradients."
            )
        (x,) = ctx.saved_tensors
        stats: BatchStats | None = ctx.stats
        if stats is not None:
            stats.begin_backward(ctx.statistics)
        installed = contextlib.nullcontext() if stats is None else stats.installed()
        with modes_restored(ctx.modes), installed:
            return _Reverse(tc, ctx, x, g_out).run()


class _Reverse:
    """The backward of one time-chunked step: one reverse sweep over the chunks, or, with
    training batchnorms, one per level gathering its gradient sums and then the last one."""

    def __init__(self, tc: TimeChunks, ctx: Any, x: torch.Tensor, g_out: torch.Tensor) -> None:
        self.tc, self.ctx = tc, ctx
        self.stats: BatchStats | None = ctx.stats  # the forward's (tc's may have changed since)
        self.need_x = ctx.needs_input_grad[1]
        self.params = [p for p in tc.gm.parameters() if p.requires_grad]
        self.chunks = list(x.split(tc.chunk, 0))
        self.g_chunks = list(g_out.split(tc.chunk, 0))
        self.g_params: list[torch.Tensor | None] = [None] * len(self.params)
        self.g_x = torch.zeros_like(x) if self.need_x else None
        self.after = tc.state()  # the state the forward left: put back at the end
        self.bounds = [0]
        for xc in self.chunks:
            self.bounds.append(self.bounds[-1] + xc.shape[0])
        self.bar: Any = None  # the progress bar over chunk runs (set by run)
        self.level: int | None = None  # the level whose sums this sweep gathers (None: last)
        self.mask: list[bool] = [True] * len(tc.slots)

    def run(self) -> tuple[Any, ...]:
        stats = self.stats
        levels = 0 if stats is None else len(stats.levels)
        reruns = chunk_reruns(len(self.chunks), self.tc.keep, spine_kept=stats is None)
        with _chunk_bar("time chunks (backward)", (levels + 1) * reruns) as self.bar:
            if stats is not None:
                for level in reversed(stats.levels):
                    self.level, self.mask = level, stats.slots_after(level)
                    self.sweep(final=False)
                self.level, self.mask = None, [True] * len(self.tc.slots)
                stats.gathering(None)
            self.sweep(final=True)
        return (None, self.g_x, *self.g_params)

    def sweep(self, final: bool) -> None:
        tc, ctx = self.tc, self.ctx
        g_state: list[Any] = [None] * len(tc.slots)
        n = len(self.chunks)
        if tc.keep == "all":
            for c in reversed(range(n)):
                g_state = self.chunk_backward(c, ctx.starts[c], g_state, final)
                if final:
                    ctx.starts[c] = None  # this chunk's start state is no longer needed
        else:
            start0 = ctx.starts[0]
            if final:
                ctx.starts[0] = None
            self.revolve(0, n, start0, g_state, int(tc.keep), final)

    def chunk_backward(self, c: int, start: list[Any], g_end: list[Any], final: bool) -> list[Any]:
        tc, stats = self.tc, self.stats
        leaves: list[tuple[int, torch.Tensor]] = []
        values = []
        for i, v in enumerate(start):
            if self.mask[i] and isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.detach().requires_grad_(True)
                leaves.append((i, v))
            values.append(v)
        tc.set_state(values)
        need_x = self.need_x and final
        xc = self.chunks[c].detach().requires_grad_(need_x)
        restore = snapshot_state(tc.gm, memories=False)
        if stats is not None:
            stats.gathering(self.level)
        try:
            with torch.enable_grad(), _rng_at(self.ctx.rng[c], xc.device):
                y = tc.gm(xc)
            outs, grads = [], []
            if y.requires_grad:
                outs.append(y)
                grads.append(self.g_chunks[c])
            for v, g in zip(tc.state(), g_end, strict=True):
                if g is not None and isinstance(v, torch.Tensor) and v.requires_grad:
                    outs.append(v)
                    grads.append(g)
            del y
            gathered = stats.gathered() if stats is not None else []
            extra = (self.params + ([xc] if need_x else [])) if final else gathered
            wrt = [v for _, v in leaves] + extra
            got = (
                torch.autograd.grad(outs, wrt, grads, allow_unused=True)
                if outs and wrt
                else [None] * len(wrt)
            )
            del outs, grads
            rest = list(got[len(leaves) :])
            if not final:
                assert stats is not None
                stats.add_gathered(rest)  # before the rerun's leaves are dropped
        finally:
            tc.set_state(self.after)
            restore()  # running statistics: updated once per step, by the forward
            if stats is not None:
                stats.clear_rerun()
        self.bar.update(1)
        carried: list[Any] = [None] * len(start)
        for (i, _), g in zip(leaves, got[: len(leaves)], strict=True):
            carried[i] = g
        if not final:
            return carried
        for j, g in enumerate(rest[: len(self.params)]):
            if g is not None:
                self.g_params[j] = g if self.g_params[j] is None else self.g_params[j] + g
        if need_x and rest[-1] is not None:
            self.g_x[self.bounds[c] : self.bounds[c + 1]] = rest[-1]
        return carried

    def state_at(self, c: int, start_of: int, state: list[Any]) -> list[Any]:
        """The state at the start of chunk ``c``, from ``state`` at ``start_of``."""
        tc = self.tc
        tc.set_state(state)
        restore = snapshot_state(tc.gm, memories=False)
        try:
            tc.forward_chunks(self.chunks, start_of, c, self.ctx.rng)
            self.bar.update(c - start_of)
            return tc.state()
        finally:
            tc.set_state(self.after)
            restore()

    def revolve(
        self, a: int, b: int, state_a: list[Any], g_end: list[Any], slots: int, final: bool
    ) -> Any:
        length = b - a
        if length == 1:
            return self.chunk_backward(a, state_a, g_end, final)
        if slots == 1:  # each chunk recomputed from the held state at a
            g = g_end
            for c in reversed(range(a, b)):
                state_c = self.state_at(c, a, state_a) if c > a else state_a
                g = self.chunk_backward(c, state_c, g, final)
                del state_c
            return g
        m = a + _split(slots, length)
        starts = self.ctx.starts
        state_m = starts[m] if starts[m] is not None else self.state_at(m, a, state_a)
        if final:
            starts[m] = None
        g_mid = self.revolve(m, b, state_m, g_end, slots - 1, final)
        del state_m
        return self.revolve(a, m, state_a, g_mid, slots, final)


# -- qualification ------------------------------------------------------------------------------


def time_chunk_blocker(gm: fx.GraphModule, graph: Graph, example_input: torch.Tensor) -> str | None:
    """Why ``gm`` cannot be trained in chunks of time, or None when it can (module docstring)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or not isinstance(example_input, torch.Tensor):
        return f"the program has {len(placeholders)} inputs; time chunks need one [T, N, *] input"
    if example_input.shape[0] < 2:
        return "the example has T=1 time step"
    sites = batch_stat_sites(gm)
    if isinstance(sites, str):
        return sites
    from snncompile.runtime.chunked import reset_states

    restore = snapshot_state(gm)
    try:
        with torch.no_grad(), _rng_at(_rng_state(example_input.device), example_input.device):
            state = _rng_state(example_input.device)
            reset_states(gm)
            full = gm(example_input)
            if not isinstance(full, torch.Tensor) or full.dim() < 1:
                return "the program's output is not one tensor; time chunks need one [T, N, *]"
            if full.shape[0] != example_input.shape[0]:
                return (
                    f"the output has shape {list(full.shape)}, without T="
                    f"{example_input.shape[0]} first (a reduction over time inside the model)"
                )
            reset_states(gm)
            k = math.ceil(example_input.shape[0] / 2)
            with _rng_at(state, example_input.device):  # the draws of the whole-sequence run
                if sites:  # the batchnorms' statistics taken over both chunks
                    chunked = TimeChunks(gm, k).run(example_input)
                else:
                    chunked = torch.cat([gm(xc) for xc in example_input.split(k, 0)], 0)
    finally:
        restore()
    if chunked.shape != full.shape:
        return "the output of a chunk does not have the chunk's time steps first"
    differ = ~torch.isclose(chunked, full, rtol=1e-5, atol=1e-6)
    if differ.float().mean().item() > 1e-3:
        return (
            f"running the example in two chunks changes {differ.float().mean().item():.1%} of "
            "the outputs: the program mixes time steps outside its neurons (a reduction, "
            "attention or random draws over T)"
        )
    return None


# -- planning -----------------------------------------------------------------------------------


@dataclass
class ChunkChoice:
    """One candidate: chunk size, how states are kept, predicted and measured peak (bytes)."""

    chunk: int
    keep: str | int
    predicted: int
    reruns: int  # time steps run forward again in backward (with or without a graph)
    measured: int | None = None
    seconds: float | None = None


@dataclass
class TimeChunkPlan:
    """The time-chunk plan attached to a memory plan: the run and the numbers behind it."""

    runner: TimeChunks
    choice: ChunkChoice
    state_bytes: int
    per_step: float
    fixed: float
    tried: list[ChunkChoice] = field(default_factory=list)

    def describe(self) -> str:
        """One line for ``report()``."""
        c = self.choice
        kept = "all" if c.keep == "all" else f"at most {c.keep}"
        stats = self.runner.batch_stats
        levels = (
            ""
            if stats is None
            else f"{len(stats.levels)} training BatchNorm level(s): statistics over all T in "
            f"{len(stats.levels)} extra forward sweep(s), their gradient sums in "
            f"{len(stats.levels)} extra reverse sweep(s); "
        )
        return (
            f"time chunks: Tc={c.chunk} step(s), chunk-start states kept: {kept}; {levels}"
            f"{c.reruns} step(s) rerun in backward; peak predicted {c.predicted / 1e6:.1f} MB, "
            "measured "
            + (f"{c.measured / 1e6:.1f} MB" if c.measured is not None else "n/a")
            + f" (one state {self.state_bytes / 1e6:.2f} MB, {self.per_step / 1e6:.2f} MB per "
            "step in a chunk)"
        )


def _state_bytes(gm: fx.GraphModule, x: torch.Tensor) -> int:
    from snncompile.runtime.chunked import reset_states

    restore = snapshot_state(gm)
    try:
        reset_states(gm)
        with torch.no_grad():
            gm(x[:1])
        seen: set[int] = set()
        total = 0
        for store, k in memory_slots(gm):
            v = store[k]
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    finally:
        restore()
    return total


@functools.lru_cache(maxsize=4096)
def _reruns(chunks: int, slots: int, on_spine: bool) -> int:
    if chunks == 1:
        return 1
    if slots == 1:
        return chunks * (chunks + 1) // 2
    left = _split(slots, chunks)
    sweep = 0 if on_spine else left  # the forward kept the spine's states
    return sweep + _reruns(chunks - left, slots - 1, on_spine) + _reruns(left, slots, False)


def chunk_reruns(chunks: int, keep: str | int, spine_kept: bool = True) -> int:
    """Chunk forwards (with or without a graph) one reverse sweep runs for ``chunks`` chunks;
    ``spine_kept``: the forward kept the states the reversal needs first (:func:`spine`)."""
    if keep == "all":
        return chunks
    return _reruns(chunks, int(keep), spine_kept)


def _live_states(keep: str | int, n: int) -> int:
    """States alive at the peak: the kept ones, the rerun chunk's end state, carried gradients."""
    return (n if keep == "all" else min(int(keep), n)) + 2


def _candidates(T: int) -> list[int]:
    sizes = {T}
    k = 1
    while k < T:
        sizes.add(k)
        k *= 2
    return sorted(sizes, reverse=True)


#: Candidates predicted up to this factor over the budget are measured too (the peak model
#: overestimates: it charges every state and the whole chunk at once).
PREDICTION_SLACK = 1.25
#: At most this many of them are measured, of at most this many candidate plans in all.
SLACK_TRIES = 2
MAX_TRIES = 6
#: Kept-state counts the planner tries besides ``'all'``.
SLOT_CHOICES = (8, 4, 3, 2, 1)


def plan_time_chunks(
    gm: fx.GraphModule, example_input: torch.Tensor, budget: int
) -> tuple[TimeChunkPlan | None, int]:
    """Choose ``Tc`` and the kept states so that the measured step fits ``budget`` bytes.

    The peak is modelled as ``fixed + Tc * per_step + live_states * state_bytes`` with
    ``state_bytes`` measured (one chunk-start state) and ``fixed`` and ``per_step`` fitted from
    two measured steps (chunks of ``T/2`` and ``T/4`` steps, one state kept). Candidates are
    ordered by the time steps rerun in backward (:func:`chunk_reruns` times ``Tc``), fewest
    first. Up to :data:`SLACK_TRIES` faster candidates predicted within :data:`PREDICTION_SLACK`
    over the budget are measured first (those predicted closest to the budget first), then
    those predicted to fit, until one measures within the budget (at most :data:`MAX_TRIES`
    measured); the least-memory candidate is the last resort. Returns the plan (None when
    nothing fits) and the smallest peak measured.
    """
    T = example_input.shape[0]
    s = _state_bytes(gm, example_input)
    sites = batch_stat_sites(gm)
    reverse_sweeps = 1 + (len({site.level for site in sites}) if isinstance(sites, list) else 0)

    def measure(choice: ChunkChoice) -> None:
        runner = TimeChunks(gm, choice.chunk, choice.keep)
        m = measure_train_step(gm, example_input, run=runner.run)
        choice.measured, choice.seconds = m.peak, m.seconds

    # Probes with one kept state (2 + 1 states alive): chunks of T/2 and T/4 steps, where the
    # chunk's activations dominate and the per-step slope is well measured.
    probes = sorted({max(1, T // 2), max(1, T // 4)}, reverse=True)
    points = []
    for k in probes:
        probe = ChunkChoice(k, 1, 0, 0)
        measure(probe)
        assert probe.measured is not None
        points.append((k, probe.measured - _live_states(1, math.ceil(T / k)) * s))
    if len(points) == 2:
        (k1, m1), (k2, m2) = points
        per_step = max(0.0, (m1 - m2) / (k1 - k2))
    else:
        per_step = max(0.0, points[0][1] / points[0][0])
    fixed = max(0.0, points[-1][1] - per_step * points[-1][0])
    options = []
    for k in _candidates(T):
        n = math.ceil(T / k)
        if n == 1:
            continue  # one chunk is the unchunked step
        for keep in ("all", *(c for c in SLOT_CHOICES if c < n)):
            pred = int(fixed + k * per_step + _live_states(keep, n) * s)
            one = chunk_reruns(n, keep, spine_kept=reverse_sweeps == 1)
            reruns = reverse_sweeps * one * k
            options.append(ChunkChoice(k, keep, pred, reruns))
    options.sort(key=lambda o: (o.reruns, -o.chunk))
    tried: list[ChunkChoice] = []
    strict = [o for o in options if o.predicted <= budget]
    first = strict[0].reruns if strict else math.inf
    # A few faster plans predicted a little over the budget first (the model overestimates:
    # it charges every state and the whole chunk at once), those predicted closest to the
    # budget (the likeliest to fit) first; then those predicted to fit, fastest first.
    slack = [
        o for o in options if budget < o.predicted <= budget * PREDICTION_SLACK and o.reruns < first
    ]
    slack.sort(key=lambda o: (o.predicted, o.reruns))
    queue = slack[:SLACK_TRIES] + strict
    for choice in queue[:MAX_TRIES]:
        measure(choice)
        assert choice.measured is not None
        tried.append(choice)
        if choice.measured <= budget:
            runner = TimeChunks(gm, choice.chunk, choice.keep)
            return TimeChunkPlan(runner, choice, s, per_step, fixed, tried), choice.measured
    # The least memory the model knows of: the plan when it fits, the error's figure otherwise.
    best = min(options, key=lambda o: (o.predicted, o.reruns))
    if best.measured is None:
        measure(best)
        tried.append(best)
    assert best.measured is not None
    if best.measured <= budget:
        runner = TimeChunks(gm, best.chunk, best.keep)
        return TimeChunkPlan(runner, best, s, per_step, fixed, tried), best.measured
    smallest = min([best.measured, *(c.measured for c in tried if c.measured is not None)])
    return None, smallest
