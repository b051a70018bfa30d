"""The chunked-forward pass: plan running the sequence graph ``K`` time steps at a time.

Math: a multi-step SNN is a composition of per-step maps ``y_t = f(x_t, s_{t-1})``,
``s_t = g(x_t, s_{t-1})`` where ``s`` is the neurons' state. Splitting ``[0, T)`` into windows
``[t_0, t_0 + K)`` and running the whole graph on each window in order, with ``s`` carried by the
neuron modules from one window to the next, computes the same ``y_0 .. y_{T-1}`` for any ``K``;
stateless synapse ops see ``[K*N, *]`` instead of ``[T*N, *]``, so activation memory is
``O(K)`` instead of ``O(T)``.

Cases: the pass only runs when :func:`snncompile.optimize` was given ``chunk_size=K`` or
``memory_budget=...`` (it finds the request in ``graph.meta['chunk']``); otherwise it reports no
change. It refuses training pipelines (chunked execution runs under ``no_grad``) and graphs that
cannot be cut along time: graphs whose input is not ``[T, N, *]`` or whose tensor outputs do not
keep ``T`` as their leading dimension (e.g. a model that averages over time inside). It records
the plan (``graph.meta['chunk']['status'] = 'planned'``) instead of rewriting nodes: the time loop
over chunks is run by the runtime (:mod:`snncompile.runtime.chunked`), which also measures the
per-step memory on the example input to turn a ``memory_budget`` into ``K`` (that measurement
needs to execute the graph, which a pass cannot). Time ops other than the neurons are checked at
compile time by comparing the chunked and the unchunked run on the example input.
"""

from __future__ import annotations

from typing import Any

from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import Op
from snncompile.passes.base import PassResult

__all__ = ["ChunkingError", "chunk_forward"]


class ChunkingError(ValueError):
    """The model cannot run in chunks (training mode, or outputs without a time dimension)."""


def _output_tensors(graph: Graph) -> list[Node]:
    out = graph.output_node
    return [graph[name] for name in out.inputs if graph[name].is_tensor]


def chunk_forward(graph: Graph) -> PassResult:
    """Validate and record a chunked-forward plan requested through ``graph.meta['chunk']``."""
    request: dict[str, Any] | None = graph.meta.get("chunk")
    if not request:
        return PassResult(graph, False)
    if graph.meta.get("mode") == "train":
        raise ChunkingError(
            "optimize: chunk_size/memory_budget are for inference only (chunked execution runs "
            "under torch.no_grad() so that memory stays bounded), but the model is compiled for "
            "training. Call model.eval() or pass mode='inference'; for training over long "
            "sequences use the online-training loops."
        )
    T = graph.meta.get("T")
    inputs = graph.input_nodes
    if len(inputs) != 1:
        raise ChunkingError(
            f"optimize: chunked forward needs exactly one [T, N, *] input, the graph has "
            f"{len(inputs)} ({[n.name for n in inputs]})."
        )
    for node in _output_tensors(graph):
        if node.shape is not None and T is not None and (not node.shape or node.shape[0] != T):
            raise ChunkingError(
                f"optimize: cannot chunk over time: output %{node.name} ({node.op.name}) has "
                f"shape {list(node.shape)}, without the time dimension T={T} first. Chunking needs "
                f"[T, N, *] outputs; move the reduction over time out of the model (use "
                f"compiled.stream(..., reduce='mean') instead)."
            )
    # Opaque stateful modules (e.g. unregistered neuron subclasses) carry state across chunks too.
    neurons = len(graph.find(Op.NEURON, Op.FUSED_NEURON)) + sum(
        1 for n in graph.find(Op.OPAQUE_MODULE) if n.attrs.get("stateful")
    )
    request = dict(request, status="planned")
    graph.meta["chunk"] = request
    if request.get("chunk_size") is not None:
        what = f"chunk_size={request['chunk_size']}"
    else:
        what = f"memory_budget={request.get('memory_budget')!r} (K measured at compile time)"
    note = f"chunked forward planned: {what}, {neurons} stateful op(s) carry state"
    return PassResult(graph, True, [note])
