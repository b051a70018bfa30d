"""Training under a memory budget: segments between neurons recomputed in backward.

Math: backpropagation needs, for each op, the tensors its backward reads (its input, ``h`` of a
neuron, BatchNorm's input ...). Keeping them for the whole step costs ``S = sum_k S_k`` bytes over
the segments ``k`` of the network (a segment is the run of ops up to and including one neuron,
cut in the order the compiled program runs). A *recomputed* segment keeps only its inputs -- packed
1 bit per spike when the input is a binary spike tensor -- and in backward runs its forward again
(with gradients) from them, from the neuron state it started from, then backpropagates through
the fresh graph. Its saved tensors exist only while its own backward runs. With ``R`` the set of
recomputed segments, ``P_0`` the measured peak of the unbudgeted step and ``I_k`` the bytes of
segment ``k``'s kept inputs, the planner predicts::

    peak(R) = P_0 - sum_{k in R} S_k + sum_{k in R} I_k + max_{k in R} S_k

and picks the ``R`` that fits ``memory_budget`` at the least recompute time (segments in order
of ``S_k / time_k``, most bytes per second of recompute first). Exactness: the recomputed forward
runs the same ops on the same values (spikes unpack to the same 0/1 tensor, the neuron state is
restored, the RNG state too), so gradients are bit-equal to the unbudgeted compile; BatchNorm's
running statistics are restored after each recompute so that they are updated once per step.
After a budgeted forward, the neurons' state carries no autograd graph (as after ``detach_net``).

:func:`configure_memory_plan` measures ``S_k``, ``I_k`` and times on the example input (buffers and
state restored afterwards), plans, measures the planned step and attaches the plan to the compiled
module; ``compiled.report()`` prints it. When even recomputing every segment does not fit, and the
program has no op that couples time steps, the plan recomputes the whole program in chunks of
time instead (:mod:`snncompile.runtime.time_chunks`, whose peak does not grow with ``T``); the
report says why when the program does not qualify.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from snncompile.ir.graph import Graph
from snncompile.ir.ops import OpGroup
from snncompile.runtime.memory import (
    forward_modes,
    measure_train_step,
    modes_restored,
    snapshot_state,
)
from snncompile.runtime.packed_ops import PackedBits, pack_bits, unpack_bits
from snncompile.runtime.time_chunks import TimeChunkPlan, plan_time_chunks, time_chunk_blocker

__all__ = ["MemoryBudgetError", "MemoryPlan", "Segment", "configure_memory_plan"]


class MemoryBudgetError(ValueError):
    """The requested training memory budget cannot be met."""


@dataclass
class Segment:
    """A run of fx nodes ending at a neuron (or at the end of the program)."""

    index: int
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # values defined before the segment and read inside it
    outputs: list[fx.Node]  # values defined inside and read after it
    modules: list[nn.Module]
    params: list[nn.Parameter]
    neuron: str | None
    saved: int = 0  # bytes autograd saves during its forward (measured)
    kept_inputs: int = 0  # bytes its inputs cost when it is recomputed
    seconds: float = 0.0  # forward time (measured)
    recompute: bool = False


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _free_after(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values whose last reader it is (dropped from the env after it)."""
    last: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for a in node.all_input_nodes:
            last[a] = node
    out: dict[fx.Node, list[fx.Node]] = {n: [] for n in gm.graph.nodes}
    for value, reader in last.items():
        out[reader].append(value)
    return out


def _run_nodes(
    gm: fx.GraphModule,
    nodes: list[fx.Node],
    env: dict[fx.Node, Any],
    free: dict[fx.Node, list[fx.Node]] | None = None,
) -> None:
    """Execute ``nodes`` of ``gm``'s graph, reading and writing values in ``env``.

    With ``free``, values are dropped from ``env`` after their last reader (as the generated
    code does with ``x = None``), so activations that nothing saves are freed early.
    """
    for node in nodes:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            env[node] = _fetch(gm, node.target)(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "get_attr":
            env[node] = _fetch(gm, node.target)
        else:  # pragma: no cover - placeholders/outputs are handled by the caller
            raise RuntimeError(f"recompute: unexpected fx node {node.op}")
        if free is not None:
            for value in free[node]:
                env.pop(value, None)


def build_segments(gm: fx.GraphModule, graph: Graph) -> list[Segment]:
    """Cut ``gm``'s program after every neuron (see the module docstring)."""
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    groups: list[tuple[list[fx.Node], str | None]] = []
    current: list[fx.Node] = []
    for node in body:
        current.append(node)
        ir_name = node.meta.get("snn_node")
        if ir_name in graph and graph[ir_name].op.group is OpGroup.NEURON:
            groups.append((current, ir_name))
            current = []
    if current:
        groups.append((current, None))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    segments = []
    for k, (nodes, neuron) in enumerate(groups):
        inside = set(nodes)
        inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in inputs:
                    inputs.append(a)
        last = order[nodes[-1]]
        outputs = [n for n in nodes if any(order[u] > last for u in n.users)]
        modules: list[nn.Module] = []
        for n in nodes:
            if n.op in ("call_module", "get_attr"):
                obj = _fetch(gm, n.target)
                if isinstance(obj, nn.Module):
                    modules.append(obj)
        seen: set[int] = set()
        params = []
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        segments.append(Segment(k, nodes, inputs, outputs, modules, params, neuron))
    return segments


def _memories(modules: list[nn.Module]) -> list[tuple[dict[str, Any], str, Any]]:
    out = []
    for m in modules:
        for sub in m.modules():
            store = getattr(sub, "_memories", None)
            if isinstance(store, dict):
                out.extend((store, k, v) for k, v in store.items())
    return out


class _Recompute(torch.autograd.Function):
    """Run a segment without keeping its graph; rerun it with gradients in backward."""

    @staticmethod
    def forward(ctx: Any, job: _Job, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_in = len(job.tensor_slots)
        ctx.job = job
        ctx.state = _memories(job.segment.modules)
        for _, k, v in ctx.state:
            if isinstance(v, torch.Tensor) and v.requires_grad:
                raise RuntimeError(
                    f"optimize(memory_budget=...): neuron state {k!r} in segment "
                    f"{job.segment.index} carries an autograd graph from an earlier call; a "
                    "recomputed segment starts from a detached state. Call "
                    "functional.reset_net(compiled) or detach_net(compiled) between steps."
                )
        ctx.rng = torch.get_rng_state()
        # The rerun in backward takes the forward's train/eval modes (a BatchNorm's statistics
        # and Dropout's masks depend on them), whatever the model was switched to since.
        ctx.modes = forward_modes(job.segment.modules)
        kept: list[Any] = []
        plain: list[torch.Tensor] = []
        for i, t in enumerate(tensors[:n_in]):
            if job.binary[i]:
                kept.append(pack_bits(t))
            else:
                kept.append(len(plain))
                plain.append(t)
        ctx.kept = kept
        ctx.requires = [t.requires_grad for t in tensors[:n_in]]
        ctx.save_for_backward(*plain)
        outs = job.run(list(tensors[:n_in]))
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        job: _Job = ctx.job
        if torch.is_grad_enabled():  # backward(create_graph=True): the rerun builds no graph
            raise RuntimeError(
                "optimize(memory_budget=...): backward(create_graph=True) through a recomputed "
                f"segment ({job.segment.index}); it is rerun inside backward without a graph of "
                "its own, so no second-order gradient would exist. Compile without "
                "memory_budget for higher-order gradients."
            )
        plain = ctx.saved_tensors
        inputs = []
        for k, req in zip(ctx.kept, ctx.requires, strict=True):
            t = unpack_bits(k) if isinstance(k, PackedBits) else plain[k].detach()
            inputs.append(t.requires_grad_(req))
        restore = snapshot_state(nn.ModuleList(job.segment.modules))
        current = _memories(job.segment.modules)
        for store, k, v in ctx.state:
            store[k] = v
        wrt = [t for t in inputs if t.requires_grad] + job.segment.params
        try:
            with modes_restored(ctx.modes), torch.enable_grad(), torch.random.fork_rng(devices=[]):
                torch.set_rng_state(ctx.rng)
                outs = job.run(inputs)
            for store, k, v in current:
                store[k] = v
            pairs = [
                (o, g)
                for o, g in zip(outs, grads, strict=True)
                if g is not None and isinstance(o, torch.Tensor) and o.requires_grad
            ]
            del outs
            got = (
                torch.autograd.grad(
                    [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
                )
                if pairs and wrt
                else [None] * len(wrt)
            )
            del pairs
        finally:
            # BN running statistics: updated once per step, not once per recompute (restored
            # after the gradient: batch_norm's backward checks the buffers' versions).
            restore()
            for store, k, v in current:
                store[k] = v
        it = iter(got)
        in_grads = [next(it) if t.requires_grad else None for t in inputs]
        return (None, *in_grads, *list(it))


class _Job:
    """One call of a recomputed segment: its fixed non-tensor inputs and how to run it."""

    def __init__(
        self,
        gm: fx.GraphModule,
        segment: Segment,
        env: dict[fx.Node, Any],
        binary: set[fx.Node],
        free: dict[fx.Node, list[fx.Node]],
    ) -> None:
        self.gm = gm
        self.free = free
        self.segment = segment
        self.fixed = {n: env[n] for n in segment.inputs if not isinstance(env[n], torch.Tensor)}
        self.tensor_slots = [n for n in segment.inputs if isinstance(env[n], torch.Tensor)]
        self.binary = [n in binary for n in self.tensor_slots]
        self.extra: dict[fx.Node, Any] = {}

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        env: dict[fx.Node, Any] = dict(self.fixed)
        env.update(zip(self.tensor_slots, tensors, strict=True))
        del tensors
        _run_nodes(self.gm, self.segment.nodes, env, self.free)
        outs = []
        for n in self.segment.outputs:
            v = env[n]
            if isinstance(v, torch.Tensor):
                outs.append(v)
            else:
                self.extra[n] = v
        return outs


@dataclass
class MemoryPlan:
    """The chosen recompute plan of a compiled training module, with its numbers."""

    gm: fx.GraphModule
    segments: list[Segment]
    binary: set[fx.Node]
    budget: int
    base_peak: int = 0
    predicted: int = 0
    measured: int | None = None
    notes: list[str] = field(default_factory=list)
    free: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    #: Why the program cannot run in chunks of time (None: it can); see runtime.time_chunks.
    time_blocker: str | None = None
    #: The time-chunk plan when segments alone cannot meet the budget.
    time_chunks: TimeChunkPlan | None = None

    def __post_init__(self) -> None:
        self.free = _free_after(self.gm)

    def run(self, x: torch.Tensor) -> Any:
        """Run the program on ``x``, recomputed segments through :class:`_Recompute` (or the
        whole program in chunks of time when the plan has :attr:`time_chunks`)."""
        if self.time_chunks is not None and torch.is_grad_enabled():
            return self.time_chunks.runner.run(x)
        graph = self.gm.graph
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        env[placeholders[0]] = x
        for seg in self.segments:
            if not seg.recompute or not torch.is_grad_enabled():
                _run_nodes(self.gm, seg.nodes, env, self.free)
                continue
            job = _Job(self.gm, seg, env, self.binary, self.free)
            outs = _Recompute.apply(job, *[env[n] for n in job.tensor_slots], *seg.params)
            tensor_outs = iter(outs)
            for n in seg.outputs:
                env[n] = job.extra[n] if n in job.extra else next(tensor_outs)
            for node in seg.nodes:
                for value in self.free[node]:
                    env.pop(value, None)
        out = next(n for n in graph.nodes if n.op == "output")
        return fx.node.map_arg(out.args[0], env.__getitem__)

    def predict(self, chosen: list[Segment]) -> int:
        """Predicted peak bytes when the segments in ``chosen`` are recomputed."""
        if not chosen:
            return self.base_peak
        return (
            self.base_peak
            - sum(s.saved for s in chosen)
            + sum(s.kept_inputs for s in chosen)
            + max(s.saved for s in chosen)
        )

    def describe(self) -> list[str]:
        """Lines for ``compiled.report()``."""
        mb = 1e6
        if self.time_chunks is not None:
            return [
                f"memory plan (training, budget {self.budget / mb:.1f} MB): the whole program "
                f"recomputed in chunks of time in backward; peak predicted "
                f"{self.predicted / mb:.1f} MB, measured "
                + (f"{self.measured / mb:.1f} MB" if self.measured is not None else "n/a")
                + f" (unbudgeted {self.base_peak / mb:.1f} MB)",
                "  " + self.time_chunks.describe(),
                *(f"  note: {n}" for n in self.notes),
            ]
        lines = [
            f"memory plan (training, budget {self.budget / mb:.1f} MB): "
            f"{sum(s.recompute for s in self.segments)}/{len(self.segments)} segment(s) "
            f"recomputed in backward; peak predicted {self.predicted / mb:.1f} MB, measured "
            + (f"{self.measured / mb:.1f} MB" if self.measured is not None else "n/a")
            + f" (unbudgeted {self.base_peak / mb:.1f} MB)"
        ]
        for s in self.segments:
            what = "recompute" if s.recompute else "keep"
            lines.append(
                f"  segment {s.index} (to {'%' + s.neuron if s.neuron else 'output'}, "
                f"{len(s.nodes)} ops): {what}; saves {s.saved / mb:.2f} MB, inputs "
                f"{s.kept_inputs / mb:.2f} MB when recomputed, forward {s.seconds * 1e3:.1f} ms"
            )
        lines.append(
            "  time chunks: "
            + (
                f"not possible: {self.time_blocker}"
                if self.time_blocker is not None
                else "possible, not needed (segments fit the budget)"
            )
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        return lines


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def _measure_segments(plan: MemoryPlan, x: torch.Tensor) -> None:
    """Fill ``saved``, ``kept_inputs`` and ``seconds`` of every segment (one forward)."""
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in plan.gm.graph.nodes if n.op == "placeholder"]
    env[placeholders[0]] = x
    seen: set[tuple[int, int]] = {_storage_key(x)}
    for p in plan.gm.parameters():
        seen.add(_storage_key(p))
    for b in plan.gm.buffers():
        seen.add(_storage_key(b))
    for seg in plan.segments:
        counted = [0]

        def pack(t: torch.Tensor, counted: list[int] = counted) -> torch.Tensor:
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                counted[0] += key[1]
            return t

        start = time.perf_counter()
        kept = 0
        for n in seg.inputs:
            v = env.get(n)
            if isinstance(v, torch.Tensor) and n.op != "placeholder":
                nbytes = v.numel() * v.element_size()
                kept += (v.numel() + 7) // 8 if n in plan.binary else nbytes
        seg.kept_inputs = kept
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _run_nodes(plan.gm, seg.nodes, env, plan.free)
        seg.seconds = time.perf_counter() - start
        seg.saved = counted[0]


def _binary_fx_nodes(gm: fx.GraphModule, graph: Graph) -> set[fx.Node]:
    return {
        n
        for n in gm.graph.nodes
        if n.meta.get("snn_node") in graph and graph[n.meta["snn_node"]].meta.get("binary")
    }


def _choose(plan: MemoryPlan) -> list[Segment]:
    """The recompute set: most saved bytes per second of recompute first, until it fits."""
    order = sorted(
        (s for s in plan.segments if s.saved > s.kept_inputs),
        key=lambda s: -(s.saved - s.kept_inputs) / max(s.seconds, 1e-6),
    )
    chosen: list[Segment] = []
    best = plan.predict([])
    if best <= plan.budget:
        return chosen
    for s in order:
        chosen.append(s)
        if plan.predict(chosen) <= plan.budget:
            return chosen
    return chosen


def _raise_budget(
    plan: MemoryPlan, budget: int, x: torch.Tensor, smallest: int, time_smallest: int | None
) -> None:
    for s in plan.segments:
        s.recompute = False
    best = smallest if time_smallest is None else min(smallest, time_smallest)
    suggest = math.ceil(best * 1.03 / 1e4) / 100  # MB, rounded up, with a 3% margin
    if time_smallest is not None:
        chunks = f"; recomputing in chunks of time needs about {time_smallest / 1e6:.1f} MB"
    else:
        chunks = f"; time chunks are not possible: {plan.time_blocker}"
    raise MemoryBudgetError(
        f"optimize: memory_budget={budget / 1e6:.1f} MB cannot be met for training at the "
        f"example input's shape {list(x.shape)}: the unbudgeted step peaks at "
        f"{plan.base_peak / 1e6:.1f} MB, recomputing every segment between neurons still "
        f"needs about {smallest / 1e6:.1f} MB{chunks} (peak live tensor bytes; parameters and "
        f"the input not counted). Pass memory_budget >= '{suggest:.2f}MB', or train on a "
        "smaller batch or T."
    )


def _try_time_chunks(
    plan: MemoryPlan, budget: int, x: torch.Tensor, smallest: int, restore: Callable[[], None]
) -> None:
    """Plan chunks of time when segments cannot meet ``budget``; raise when they cannot either."""
    if plan.time_blocker is not None:
        _raise_budget(plan, budget, x, smallest, None)
    for s in plan.segments:
        s.recompute = False
    try:
        chosen, time_smallest = plan_time_chunks(plan.gm, x, budget)
    finally:
        restore()
    if chosen is None:
        _raise_budget(plan, budget, x, smallest, time_smallest)
    plan.notes.append(
        f"segments alone need about {smallest / 1e6:.1f} MB: the whole program is recomputed "
        "in chunks of time instead"
    )
    plan.time_chunks = chosen
    plan.predicted = chosen.choice.predicted
    plan.measured = chosen.choice.measured


def configure_memory_plan(
    compiled: nn.Module, graph: Graph, example_input: torch.Tensor, budget: int
) -> MemoryPlan:
    """Measure, plan and attach a recompute plan meeting ``budget`` bytes (see the module doc).

    Raises :class:`MemoryBudgetError` naming the smallest budget the planner can meet when
    ``budget`` is below it.
    """
    gm = compiled.gm
    plan = MemoryPlan(gm, build_segments(gm, graph), _binary_fx_nodes(gm, graph), budget)
    restore = snapshot_state(compiled)
    try:
        measure_train_step(gm, example_input, run=plan.run)  # warm-up (kernels, caches)
        plan.base_peak = measure_train_step(gm, example_input, run=plan.run).peak
        from snncompile.runtime.chunked import reset_states

        reset_states(gm)
        _measure_segments(plan, example_input)
        plan.time_blocker = time_chunk_blocker(gm, graph, example_input)
    finally:
        restore()
    chosen = _choose(plan)
    plan.predicted = plan.predict(chosen)
    everything = [s for s in plan.segments if s.saved > s.kept_inputs]
    if plan.predicted > budget:
        for s in everything:
            s.recompute = True
        try:
            smallest = measure_train_step(gm, example_input, run=plan.run).peak
        finally:
            restore()
        _try_time_chunks(plan, budget, example_input, min(smallest, plan.base_peak), restore)
        compiled._memory_plan = plan
        return plan
    for s in chosen:
        s.recompute = True
    plan.measured = plan.base_peak
    while True:
        if any(s.recompute for s in plan.segments):
            try:
                plan.measured = measure_train_step(gm, example_input, run=plan.run).peak
            finally:
                restore()
        if plan.measured <= budget:
            break
        rest = [s for s in everything if not s.recompute]
        if not rest:
            _try_time_chunks(plan, budget, example_input, plan.measured, restore)
            break
        # The prediction was low (backward transients): recompute the next segment too.
        rest[0].recompute = True
        plan.predicted = plan.predict([s for s in plan.segments if s.recompute])
        plan.notes.append(
            f"measured {plan.measured / 1e6:.1f} MB > budget: also recomputing segment "
            f"{rest[0].index}"
        )
    if plan.time_chunks is None and not any(s.recompute for s in plan.segments):
        plan.notes.append("the unbudgeted step fits: nothing is recomputed")
    compiled._memory_plan = plan
    return plan
