"""STDP learners on compiled models: :meth:`CompiledModule.attach` and :class:`LearnerHandle`.

A learner (:class:`~snncompile.learning.STDPLearner`, ``MSTDPLearner``, ``MSTDPETLearner``)
learns from ``(synapse input, neuron output)`` spike pairs. In a compiled model these tensors do
not look like the eager model's: after step-mode lowering a ``Linear``/``Conv`` runs once over
``[T*N, ...]`` and the neuron runs multi-step over ``[T, N, ...]`` (possibly as a fused C kernel
that never calls the model's neuron), in a multi-step model the layers are copies that share the
model's weights, and a composite module used as ``sn`` may have been traced through so that no
module of it runs at all. Module hooks therefore cannot see the right tensors. Instead,
``attach`` adds two *taps* to the generated code (``compiled.gm``): small submodules called
with the IR value the synapse reads and the IR value the chosen neuron node produces (plus the
call's input, for ``T``). A tap puts its value back into the eager layout and the pair is fed
to the learner with :meth:`~snncompile.learning.STDPLearner.record`:

* a ``flat`` value ``[T*N, ...]`` is unflattened with the ``T`` of the current call (the length
  of the compiled input, per chunk for chunked inference); a ``seq`` value ``[T, N, ...]`` (also
  what per-step nodes produce, stacked) is kept;
* the pair is recorded once per compiled call as ``[T, N, ...]`` / ``[T, N, ...]`` for a learner
  with ``step_mode='m'``, and as ``T`` pairs ``[N, ...]`` (step after step) for
  ``step_mode='s'``: exactly what the eager single-step model records in its own loop over
  ``T``. ``MSTDPETLearner`` works on unbatched spikes: compiled models are batched, so it needs
  ``N == 1`` and gets its pairs without the batch dimension.

Because the taps live in the compiled code only, running the eager model (whose layers a
training-mode compile shares) never feeds the learner, and a module called by several nodes is
no problem. :meth:`LearnerHandle.remove`, :meth:`CompiledModule.detach_learner` and
``learner.close()`` take the taps out of the code again (``compiled.gm`` is recompiled).
"""

from __future__ import annotations

import dataclasses
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import Layout, OpGroup

if TYPE_CHECKING:
    from snncompile.runtime.compiled import CompiledModule

__all__ = ["AttachError", "LearnerHandle", "attach_learner"]

_SYNAPSE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class AttachError(ValueError):
    """A learner cannot be attached to the requested nodes of a compiled model."""


def _describe(node: Node) -> str:
    path = node.attrs.get("path")
    where = f" (module path {path!r})" if path is not None else ""
    return f"%{node.name}{where}, {node.op.name}"


def _module_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph if n.module is not None]


def _listing(nodes: list[Node]) -> str:
    return ", ".join(_describe(n) for n in nodes) if nodes else "none"


@dataclasses.dataclass(eq=False)
class _Attachment:
    """One learner on one (synapse node, neuron node) pair, with its taps and pending input."""

    learner: Any
    synapse: Node
    neuron: Node
    pre_value: Node  # the value the synapse reads (its input)
    taps: list[str] = dataclasses.field(default_factory=list)  # tap submodule names in the gm
    pending: torch.Tensor | None = None  # the synapse input of the current call, [T, N, ...]
    on_close: Any = None  # the callback registered with the learner's close()


class _Tap(nn.Module):
    """A generated-code call that hands a value (and the call's input, for ``T``) to a callback."""

    def __init__(self, callback: Any, what: str) -> None:
        super().__init__()
        self.callback = callback
        self.what = what

    def forward(self, value: Any, time_input: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(value, time_input)

    def __getstate__(self) -> dict[str, Any]:
        # A deep copy or pickle of the compiled model keeps the tap as a no-op: the copy does not
        # feed the learner (and the callback's closure need not be copyable).
        state = self.__dict__.copy()
        state["callback"] = None
        return state

    def extra_repr(self) -> str:
        return self.what


class LearnerHandle:
    """The attachment of one learner to a compiled model; :meth:`remove` takes its taps out.

    Attributes:
        learner: the attached learner.
        synapse: the name of the synapse node whose input is recorded.
        neuron: the name of the neuron node whose output is recorded.
    """

    def __init__(self, hub: _LearningHub, attachment: _Attachment) -> None:
        self._hub = hub
        self._attachment = attachment
        self.learner = attachment.learner
        self.synapse = attachment.synapse.name
        self.neuron = attachment.neuron.name

    @property
    def attached(self) -> bool:
        """Whether the learner still receives spikes from the compiled model."""
        return self._attachment in self._hub.attachments

    def remove(self) -> None:
        """Remove this attachment's taps; the learner itself stays usable (idempotent)."""
        self._hub.remove(self._attachment)

    def __enter__(self) -> LearnerHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return (
            f"<LearnerHandle {type(self.learner).__name__} %{self.synapse} -> %{self.neuron} "
            f"({state})>"
        )


def _as_sequence(value: Any, node: Node, time_input: torch.Tensor, what: str) -> torch.Tensor:
    """``value`` of IR ``node`` (flat ``[T*N, ...]`` or seq ``[T, N, ...]``) as ``[T, N, ...]``."""
    T = int(time_input.shape[0])
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        raise RuntimeError(
            f"learner on compiled model: the {what} %{node.name} is a {type(value).__name__}, "
            f"not a spike tensor."
        )
    value = value.detach()
    if node.layout is Layout.FLAT:
        if value.shape[0] % T:
            raise RuntimeError(
                f"learner on compiled model: the {what} %{node.name} has shape "
                f"{tuple(value.shape)}, which is not [T*N, ...] for T={T}."
            )
        return value.unflatten(0, (T, -1))
    if value.shape[0] != T:
        raise RuntimeError(
            f"learner on compiled model: the {what} %{node.name} has shape {tuple(value.shape)}, "
            f"which is not [T, N, ...] for T={T}."
        )
    return value


def _deliver(att: _Attachment, pre_seq: torch.Tensor, post_seq: torch.Tensor) -> None:
    from snncompile.learning import MSTDPETLearner

    learner = att.learner
    if isinstance(learner, MSTDPETLearner):
        if pre_seq.dim() < 3 or pre_seq.shape[1] != 1 or post_seq.shape[1] != 1:
            raise RuntimeError(
                f"MSTDPETLearner on compiled nodes %{att.synapse.name} -> %{att.neuron.name}: "
                f"MSTDP-ET learns from unbatched spikes, so the compiled model must run with "
                f"batch size N=1 (got synapse input {tuple(pre_seq.shape)}, neuron output "
                f"{tuple(post_seq.shape)} as [T, N, ...])."
            )
        pre_seq, post_seq = pre_seq[:, 0], post_seq[:, 0]
    if learner.step_mode == "m":
        learner.record(pre_seq, post_seq)
    else:
        for p, q in zip(pre_seq.unbind(0), post_seq.unbind(0), strict=True):
            learner.record(p, q)


class _LearningHub:
    """Per compiled module: the attachments and their taps in the generated code."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.attachments: list[_Attachment] = []
        self._count = 0

    def _fx_nodes(self) -> dict[str, fx.Node]:
        return {
            n.meta["snn_node"]: n for n in self.gm.graph.nodes if "snn_node" in n.meta
        }

    def _time_input(self, graph: Graph, fx_nodes: dict[str, fx.Node]) -> fx.Node:
        seq = [n for n in graph.input_nodes if n.layout is Layout.SEQ] or graph.input_nodes
        if not seq or seq[0].name not in fx_nodes:
            raise AttachError("attach: the compiled graph has no [T, N, ...] input to read T from.")
        return fx_nodes[seq[0].name]

    def add(self, att: _Attachment, graph: Graph) -> LearnerHandle:
        fx_nodes = self._fx_nodes()
        for node in (att.pre_value, att.synapse, att.neuron):
            if node.name not in fx_nodes:
                raise AttachError(
                    f"attach: node %{node.name} has no counterpart in the generated code "
                    f"(compiled.gm); it cannot be recorded."
                )
        time_input = self._time_input(graph, fx_nodes)

        def on_pre(value: Any, x: torch.Tensor) -> None:
            if att.learner.in_spike_monitor.is_enable():
                att.pending = _as_sequence(value, att.pre_value, x, "input of synapse")

        def on_post(value: Any, x: torch.Tensor) -> None:
            pre, att.pending = att.pending, None
            if not att.learner.out_spike_monitor.is_enable() or pre is None:
                return
            post = _as_sequence(value, att.neuron, x, "neuron output")
            if post.shape[0] != pre.shape[0]:
                raise RuntimeError(
                    f"learner on compiled model: synapse %{att.synapse.name} saw "
                    f"{pre.shape[0]} steps but neuron %{att.neuron.name} {post.shape[0]}."
                )
            _deliver(att, pre, post)

        fxg = self.gm.graph
        pre_name, post_name = self._fresh(), self._fresh()
        self.gm.add_submodule(pre_name, _Tap(on_pre, f"input of %{att.synapse.name}"))
        self.gm.add_submodule(post_name, _Tap(on_post, f"output of %{att.neuron.name}"))
        with fxg.inserting_before(fx_nodes[att.synapse.name]):
            fxg.call_module(pre_name, (fx_nodes[att.pre_value.name], time_input))
        with fxg.inserting_after(fx_nodes[att.neuron.name]):
            fxg.call_module(post_name, (fx_nodes[att.neuron.name], time_input))
        att.taps = [pre_name, post_name]
        self.gm.recompile()
        self.attachments.append(att)
        handle = LearnerHandle(self, att)
        att.on_close = handle.remove
        att.learner.__dict__.setdefault("_close_callbacks", []).append(handle.remove)
        return handle

    def _fresh(self) -> str:
        while True:
            self._count += 1
            name = f"learning_tap_{self._count}"
            if not hasattr(self.gm, name):
                return name

    def remove(self, att: _Attachment) -> None:
        if att.taps:
            taps = set(att.taps)
            for fxn in list(self.gm.graph.nodes):
                if fxn.op == "call_module" and fxn.target in taps:
                    self.gm.graph.erase_node(fxn)
            for name in att.taps:
                delattr(self.gm, name)
            att.taps = []
            self.gm.recompile()
        att.pending = None
        callbacks = att.learner.__dict__.get("_close_callbacks", [])
        if att.on_close is not None and att.on_close in callbacks:
            callbacks.remove(att.on_close)
        att.on_close = None
        if att in self.attachments:
            self.attachments.remove(att)


# ------------------------------------------------------------------------------------------------
# resolving nodes
# ------------------------------------------------------------------------------------------------
def _nodes_for_module(graph: Graph, module: nn.Module, shared_tensors: bool) -> list[Node]:
    exact = [n for n in graph if n.module is module]
    if exact or not shared_tensors:
        return exact
    own = {id(t) for t in [*module.parameters(), *module.buffers()]}
    if not own:
        return []
    return [
        n
        for n in _module_nodes(graph)
        if any(id(t) in own for t in [*n.module.parameters(), *n.module.buffers()])
    ]


def _resolve(
    graph: Graph, spec: str | nn.Module, role: str, model: nn.Module | None
) -> Node:
    """Find the node ``spec`` names: a node name, a module path, or a module object."""
    if isinstance(spec, str):
        if spec in graph:
            return graph[spec]
        by_path = [n for n in graph if n.attrs.get("path") == spec and n.module is not None]
        if len(by_path) == 1:
            return by_path[0]
        if len(by_path) > 1:
            raise AttachError(
                f"attach: {role} {spec!r} names the module of several nodes ({_listing(by_path)}); "
                f"pass one node name instead."
            )
        inside = [
            n
            for n in graph
            if str(n.attrs.get("path") or n.attrs.get("target") or "").startswith(spec + ".")
        ]
        if inside:
            raise AttachError(
                f"attach: module path {spec!r} has no node of its own: the frontend traced "
                f"through its forward (its code is inlined; nodes inside it: {_listing(inside)}). "
                f"Pass the name of the node that computes its output as {role}=<node name> "
                f"(see print(compiled.graph))."
            )
        raise AttachError(
            f"attach: the compiled graph has no node or module path {spec!r} for the {role}. "
            f"Nodes that run modules: {_listing(_module_nodes(graph))} (see compiled.graph)."
        )
    if not isinstance(spec, nn.Module):
        raise TypeError(
            f"attach: {role} must be a node name, a module path (str) or an nn.Module, got "
            f"{type(spec).__name__}."
        )
    nodes = _nodes_for_module(graph, spec, shared_tensors=True)
    if not nodes and model is not None:
        paths = {id(m): p for p, m in model.named_modules()}
        if id(spec) not in paths:
            raise AttachError(
                f"attach: the {role} module {type(spec).__name__} is not a submodule of the "
                f"model passed as model=."
            )
        return _resolve(graph, paths[id(spec)], role, None)
    if not nodes:
        folded = [n for n in graph if n.attrs.get("folded_bn") is not None]
        hint = (
            f" Layers with a BatchNorm folded into them (inference mode) are new modules: "
            f"{_listing(folded)}."
            if folded
            else ""
        )
        raise AttachError(
            f"attach: the {role} module {type(spec).__name__} is not run by the compiled model "
            f"(neurons and other stateful modules of a compiled model are copies of the model's "
            f"modules). Pass its node name or module path (e.g. {role}='sn1'), or the model as "
            f"model=model so that its path can be looked up.{hint} Nodes that run modules: "
            f"{_listing(_module_nodes(graph))}."
        )
    if len(nodes) > 1:
        raise AttachError(
            f"attach: the {role} module {type(spec).__name__} is run by several nodes "
            f"({_listing(nodes)}); pass one node name instead."
        )
    return nodes[0]


def _downstream(graph: Graph, start: Node) -> list[Node]:
    """Nodes that read ``start``'s value directly or through other nodes, in graph order."""
    users = graph.users_map()
    seen: set[str] = set()
    stack = [start.name]
    while stack:
        for user in users.get(stack.pop(), []):
            if user.name not in seen:
                seen.add(user.name)
                stack.append(user.name)
    return [n for n in graph if n.name in seen]


def _first_neurons(graph: Graph, synapse: Node) -> list[Node]:
    """The neuron nodes downstream of ``synapse`` with no other neuron on the way."""
    users = graph.users_map()
    found: list[str] = []
    seen: set[str] = set()
    stack = [synapse.name]
    while stack:
        for user in users.get(stack.pop(), []):
            if user.name in seen:
                continue
            seen.add(user.name)
            if user.op.group is OpGroup.NEURON:
                found.append(user.name)
            else:
                stack.append(user.name)
    return [n for n in graph if n.name in found]


def _check_recordable(node: Node, what: str) -> None:
    if not node.is_tensor or node.layout not in (Layout.FLAT, Layout.SEQ):
        raise AttachError(
            f"attach: the {what} {_describe(node)} is a {node.layout.value!r} value of shape "
            f"{node.shape}; only tensors in flat [T*N, ...] or seq [T, N, ...] layout can be "
            f"recorded."
        )


def attach_learner(
    compiled: CompiledModule,
    learner: Any,
    synapse: str | nn.Module | None = None,
    neuron: str | nn.Module | None = None,
    *,
    model: nn.Module | None = None,
) -> LearnerHandle:
    """Attach ``learner`` to a (synapse, neuron) node pair of ``compiled``; see the module doc.

    This is the implementation of :meth:`CompiledModule.attach`, which documents the arguments.
    """
    from snncompile.learning import _MonitoredLearner

    if not isinstance(learner, _MonitoredLearner):
        raise TypeError(
            f"attach: expected an snncompile.learning learner (STDPLearner, MSTDPLearner, "
            f"MSTDPETLearner), got {type(learner).__name__}."
        )
    learner._check_open()
    graph = compiled.graph
    hub = compiled._learning_hub_for()
    if any(att.learner is learner for att in hub.attachments):
        raise AttachError(
            f"attach: this {type(learner).__name__} is already attached to the compiled model; "
            f"call compiled.detach_learner(learner) first."
        )

    # -- the synapse ------------------------------------------------------------------------------
    syn_node = _resolve(graph, learner.synapse if synapse is None else synapse, "synapse", model)
    layer = syn_node.module
    if syn_node.attrs.get("folded_bn") is not None:
        raise AttachError(
            f"attach: synapse {_describe(syn_node)} has the BatchNorm "
            f"{syn_node.attrs['folded_bn']!r} folded into it (inference mode): it runs a new "
            f"layer whose weight is a compile-time snapshot, not the model's weight, and the "
            f"neuron sees BN(conv(x)). Compile with snncompile.optimize(model, x, mode='train') "
            f"to learn this layer with STDP."
        )
    if not isinstance(layer, _SYNAPSE_TYPES):
        raise AttachError(
            f"attach: synapse {_describe(syn_node)} runs {type(layer).__name__}, not an "
            f"nn.Linear / nn.Conv1d / nn.Conv2d; pick the layer whose weight is learned."
        )
    if layer.weight is not learner.synapse.weight:
        raise AttachError(
            f"attach: learner.synapse ({type(learner.synapse).__name__}) is not the layer that "
            f"{_describe(syn_node)} runs: their weights are different tensors, so the learner "
            f"would update a weight the compiled model does not use. Build the learner on the "
            f"model's layer (the compiled model shares the model's weights in mode='train')."
        )

    # -- the neuron -------------------------------------------------------------------------------
    candidates = _first_neurons(graph, syn_node)
    sn_spec = neuron if neuron is not None else learner.__dict__.get("_sn")
    if sn_spec is None:
        if len(candidates) != 1:
            raise AttachError(
                f"attach: cannot choose the neuron after synapse {_describe(syn_node)}: the "
                f"first neurons downstream are {_listing(candidates)}; pass neuron=<node name "
                f"or module path>."
            )
        sn_node = candidates[0]
    else:
        sn_node = _resolve(graph, sn_spec, "neuron", model)
    downstream = _downstream(graph, syn_node)
    if sn_node not in downstream:
        raise AttachError(
            f"attach: neuron {_describe(sn_node)} does not consume the output of synapse "
            f"{_describe(syn_node)} (directly or through other nodes), so they are not a "
            f"synapse -> neuron pair. Neurons downstream of %{syn_node.name}: "
            f"{_listing([n for n in downstream if n.op.group is OpGroup.NEURON])}."
        )
    if not syn_node.inputs:
        raise AttachError(f"attach: synapse {_describe(syn_node)} has no input to record.")
    pre_value = graph[syn_node.inputs[0]]
    _check_recordable(pre_value, f"input of synapse {_describe(syn_node)},")
    _check_recordable(sn_node, "neuron")
    if sn_node.attrs.get("merged"):
        raise AttachError(
            f"attach: neuron {_describe(sn_node)} has scales merged into its kernel "
            f"(fuse_elementwise), so its value is the scaled spikes, not the spikes the learner "
            f"needs. Compile without that pass: snncompile.optimize(..., passes=[...]) listing "
            f"the passes you want but not 'fuse_elementwise'."
        )

    # The learner's own hooks (on the eager model's modules) would record the wrong tensors or
    # nothing at all: the compiled model feeds it from now on.
    learner.in_spike_monitor.remove_hooks()
    learner.out_spike_monitor.remove_hooks()
    att = _Attachment(learner, syn_node, sn_node, pre_value)
    return hub.add(att, graph)
