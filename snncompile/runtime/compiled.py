"""Execution of IR graphs: lowering to an ``fx.GraphModule`` and the :class:`CompiledModule`.

:func:`lower_to_fx` turns a sequence-form graph into Python code through torch.fx: module nodes
become ``call_module`` of the very module objects the IR holds (so parameters stay shared and
training works), functions and methods are called as recorded, ``MERGE_TIME`` is
``x.flatten(0, 1)``, ``SPLIT_TIME`` is ``x.unflatten(0, (T, -1))`` with ``T`` read at run time
from the sequence the value was merged from (the input's ``T``, unless ``forward`` builds its own
sequence from an ``[N, *]`` input), and per-step nodes run inside a
:class:`~snncompile.runtime.step_loop.StepLoop`.

:class:`CompiledModule` wraps the result: it takes ``[T, N, *]`` input, holds its own copies of
the stateful modules (reset them with ``functional.reset_net(compiled)``; the original model's
state is never read or written), and exposes ``.graph`` and ``.report()``. Its ``state_dict()``
and ``load_state_dict()`` use the model's keys (:mod:`snncompile.runtime.state_names`), so a
checkpoint moves between a model and its compiled form both ways. Its ``shape_guard``
(:mod:`snncompile.runtime.shape_guard`) sends inputs of shapes other than the example's to
programs re-traced for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from snncompile.ir.graph import Graph, Node, Ref, fill_refs
from snncompile.ir.ops import Layout, Op
from snncompile.ir.printer import format_graph
from snncompile.passes.base import PassRecord
from snncompile.runtime.host_memory import large_tensor_note
from snncompile.runtime.one_step import build_one_step
from snncompile.runtime.packed_ops import packed_call
from snncompile.runtime.state_names import StateNames
from snncompile.runtime.step_loop import PerStepBatchNorm, StepLoop


class _Root(nn.Module):
    """Owner of the submodules and constants the generated code refers to."""


def _safe(name: str) -> str:
    out = "".join(c if (c.isalnum() or c == "_") else "_" for c in name)
    return out if out and not out[0].isdigit() else f"m_{out}"


def lower_to_fx(graph: Graph) -> fx.GraphModule:
    """Generate an ``fx.GraphModule`` that executes ``graph`` (which must be in sequence form)."""
    if any(n.layout is Layout.STEP for n in graph):
        raise ValueError(
            "lower_to_fx: the graph is still in single-step form; run the 'lower_step_mode' "
            "pass first"
        )
    root = _Root()
    fxg = fx.Graph()
    env: dict[str, Any] = {}
    registered: dict[int, str] = {}
    attrs: dict[str, str] = {}  # IR node name -> the attribute of the root it runs / reads
    time_size: list[fx.Node] = []

    def register(obj: Any, name: str) -> str:
        if id(obj) in registered:
            return registered[id(obj)]
        attr = _safe(name)
        while hasattr(root, attr):
            attr += "_"
        if isinstance(obj, nn.Module):
            root.add_module(attr, obj)
        elif isinstance(obj, nn.Parameter):
            root.register_parameter(attr, obj)
        elif isinstance(obj, torch.Tensor):
            root.register_buffer(attr, obj)
        else:
            setattr(root, attr, obj)
        registered[id(obj)] = attr
        return attr

    def fill(template: Any, node: Node) -> Any:
        return fill_refs(template, lambda i: env[node.inputs[i]])

    def time_steps() -> fx.Node:
        if not time_size:
            seq_input = next(
                (n for n in graph.input_nodes if n.layout is Layout.SEQ), graph.input_nodes[0]
            )
            time_size.append(fxg.call_method("size", (env[seq_input.name], 0)))
        return time_size[0]

    # T of a flat [T*N, *] value is read from the sequence it was merged from, not from the
    # graph input: a forward that builds its sequence itself (x.unsqueeze(0).repeat(T, ...) of
    # an [N, *] input) has an input whose dimension 0 is the batch, not T.
    merged_from: dict[str, str] = {}
    time_of: dict[str, fx.Node] = {}

    def time_steps_of(node: Node) -> fx.Node:
        origin = merged_from.get(node.inputs[0]) if node.inputs else None
        if origin is None:
            return time_steps()
        if origin not in time_of:
            time_of[origin] = fxg.call_method("size", (env[origin], 0))
        return time_of[origin]

    for node in graph.nodes:
        if node.op is Op.MERGE_TIME and node.inputs:
            merged_from[node.name] = node.inputs[0]
        elif node.layout is Layout.FLAT:
            origin = next((merged_from[i] for i in node.inputs if i in merged_from), None)
            if origin is not None:
                merged_from[node.name] = origin
        args_t = node.attrs.get("args")
        if args_t is None:
            args_t = tuple(Ref(i) for i in range(len(node.inputs)))
        kwargs_t = node.attrs.get("kwargs") or {}
        if node.op is Op.INPUT:
            env[node.name] = fxg.placeholder(node.name)
        elif node.op is Op.CONSTANT:
            attr = attrs[node.name] = register(
                node.attrs["_value"], node.attrs.get("target", node.name)
            )
            env[node.name] = fxg.get_attr(attr)
        elif node.op is Op.OUTPUT:
            fxg.output(fill(args_t[0] if len(args_t) == 1 else args_t, node))
        elif node.op is Op.MERGE_TIME:
            env[node.name] = fxg.call_method("flatten", (env[node.inputs[0]], 0, 1))
        elif node.op is Op.SPLIT_TIME:
            env[node.name] = fxg.call_method(
                "unflatten", (env[node.inputs[0]], 0, (time_steps_of(node), -1))
            )
        elif (
            node.attrs.get("per_step")
            and node.op is Op.BATCHNORM
            and isinstance(node.module, nn.modules.batchnorm._BatchNorm)
            and len(node.inputs) == 1
            and not kwargs_t
        ):
            per_step_bn = PerStepBatchNorm(node.module)
            attr = attrs[node.name] = register(per_step_bn, f"{node.name}_per_step")
            env[node.name] = fxg.call_module(attr, (env[node.inputs[0]],))
        elif node.attrs.get("per_step"):
            seq = tuple(
                graph[i].layout is Layout.SEQ
                and (graph[i].is_tensor or graph[i].meta.get("value_kind") == "tensors")
                for i in node.inputs
            )
            loop = StepLoop(node.module, node.target, args_t, dict(kwargs_t), seq)
            attr = attrs[node.name] = register(loop, f"{node.name}_loop")
            env[node.name] = fxg.call_module(attr, tuple(env[i] for i in node.inputs))
        elif node.attrs.get("packed_input") and node.module is not None:
            # Binary-spike input saved 1 bit per spike for backward (passes.pack_spikes).
            attr = attrs[node.name] = register(node.module, node.name)
            env[node.name] = fxg.call_function(
                packed_call, (fxg.get_attr(attr), env[node.inputs[0]])
            )
        elif node.module is not None:
            attr = attrs[node.name] = register(node.module, node.name)
            env[node.name] = fxg.call_module(attr, fill(args_t, node), fill(kwargs_t, node))
        elif isinstance(node.target, str):
            env[node.name] = fxg.call_method(node.target, fill(args_t, node), fill(kwargs_t, node))
        elif node.target is not None:
            env[node.name] = fxg.call_function(
                node.target, fill(args_t, node), fill(kwargs_t, node)
            )
        else:
            raise ValueError(f"lower_to_fx: node %{node.name} ({node.op.name}) has nothing to run")
    for ir_name, value in env.items():
        # Which IR node each fx node computes (learning_hooks taps values by IR node name).
        if isinstance(value, fx.Node):
            value.meta.setdefault("snn_node", ir_name)
    fxg.lint()
    gm = fx.GraphModule(root, fxg, class_name="SNNCompiled")
    gm.meta["snn_attrs"] = attrs  # read by runtime.one_step, which calls the same attributes
    return gm


class CompiledModule(nn.Module):
    """The result of :func:`snncompile.optimize`: runs the optimized graph on ``[T, N, *]``.

    It returns what the original multi-step model returns, or for a single-step model what
    stacking its per-step outputs gives. Neurons and other stateful modules inside are the
    compiled module's own copies (sharing parameters with the model; ``parameters()`` yields
    them in the model's order), so
    ``functional.reset_net(compiled)`` / ``detach_net(compiled)`` act on the compiled state only.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        graph: Graph,
        records: list[PassRecord],
        *,
        example_shape: tuple[int, ...],
        mode: str,
        backend: str,
        source: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.gm = gm
        self._graph = graph
        self._records = list(records)
        self.example_shape = tuple(example_shape)
        self.mode = mode
        self.backend = backend
        self.source_step_mode = graph.meta.get("step_mode", "s")
        self._learning_hub: Any = None  # learning_hooks._LearningHub, created by attach()
        self.chunk_size: int | None = None  # set by optimize(chunk_size=/memory_budget=)
        # T = 1 calls (streaming) run this program: the same modules, no time-layout reshapes,
        # neurons stepped directly (see snncompile.runtime.one_step); None when it cannot.
        self._one_step = build_one_step(graph, gm)
        self._ndim = len(self.example_shape)
        self._state_names: StateNames | None = None
        # The model's parameter and buffer order (a fused chain registers its neuron before its
        # batchnorm; fx registers modules in call order): named_parameters/buffers follow it.
        self._tensor_rank: dict[int, int] = (
            {}
            if source is None
            else {id(t): i for i, t in enumerate([*source.parameters(), *source.buffers()])}
        )
        if source is not None:
            names = StateNames(self, gm, graph, source)
            if names.sources is not None:
                self._sources = names.sources
            self._state_names = names

    def state_dict(  # type: ignore[override]
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The model's state dict: the keys of ``model.state_dict()``, in the same order.

        The values are the tensors this module runs with (shared with the model where the
        compile shares them). In an inference compile with batchnorms folded, the folded
        layers are derived values and do not appear: the state dict holds the original layer
        and batchnorm tensors, exactly as the model's does (see
        :mod:`snncompile.runtime.state_names`). Save it with ``torch.save(compiled.state_dict(),
        path)``; it loads into the model, a fresh model or another compiled module.
        """
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._state_names is None:
            return sd
        return self._state_names.to_model(sd, prefix)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # ``load_state_dict`` takes the model's keys: they are rewritten to the local ones here,
        # before the children (``gm``, ``_sources``) load theirs; folded layers are recomputed.
        if self._state_names is not None:
            self._state_names.to_local(self, state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _in_model_order(self, items: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        rank = self._tensor_rank
        if not rank:
            return iter(items)
        return iter(sorted(items, key=lambda item: rank.get(id(item[1]), len(rank))))

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """This module's parameters (its own names), in the order of the model's
        ``parameters()``: they are the model's tensors, so ``zip(compiled.parameters(),
        model.parameters())`` pairs each with itself, and an optimizer's state saved for one
        loads into an optimizer over the other. Parameters the model does not have (the folded
        layers of an inference compile) follow, in this module's order."""
        return self._in_model_order(
            list(super().named_parameters(prefix, recurse, remove_duplicate))
        )

    def named_buffers(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """This module's buffers (its own names) in the order of the model's ``buffers()``,
        as :meth:`named_parameters`; buffers the model does not have follow."""
        return self._in_model_order(list(super().named_buffers(prefix, recurse, remove_duplicate)))

    @property
    def graph(self) -> Graph:
        """The optimized IR graph this module runs."""
        return self._graph

    @property
    def records(self) -> list[PassRecord]:
        """One :class:`~snncompile.passes.PassRecord` per pass that ran."""
        return list(self._records)

    def forward(self, x: Any) -> Any:
        """Run the compiled model on ``x`` of shape ``[T, N, *]``.

        A ``T = 1`` call (one time step, e.g. streaming with the state carried between calls)
        takes a shorter path with the same result, unless learners are attached.
        """
        if isinstance(x, torch.Tensor) and x.dim() != len(self.example_shape):
            raise ValueError(
                f"compiled model: expected input of shape [T, N, ...] with "
                f"{len(self.example_shape)} dimensions like the example "
                f"{list(self.example_shape)}, got shape {list(x.shape)}"
            )
        if isinstance(x, torch.Tensor) and x.shape[0] == 0:
            raise ValueError(
                f"compiled model: the input of shape {list(x.shape)} has T=0 time steps; a "
                "[T, N, ...] input needs T >= 1 (there is no output of a model run for no steps)"
            )
        guard = self._modules.get("shape_guard")  # runtime.shape_guard, set by optimize
        if guard is not None:
            other = guard.select(self, x)  # another program for another input shape
            if other is not None:
                return other(x)
        one_step = self._one_step
        if (
            one_step is not None
            and type(x) is torch.Tensor
            and x.dim() == self._ndim
            and x.shape[0] == 1
            and (self._learning_hub is None or not self._learning_hub.attachments)
        ):
            return one_step(self.gm, x)
        plan = self.__dict__.get("_memory_plan")  # runtime.recompute, optimize(memory_budget=)
        if plan is not None and torch.is_grad_enabled() and type(x) is torch.Tensor:
            return plan.run(x)
        chunk = self.chunk_size
        if chunk is not None and isinstance(x, torch.Tensor) and x.shape[0] > chunk:
            from snncompile.runtime.chunked import chunked_forward

            return chunked_forward(self.gm, x, chunk)
        return self.gm(x)

    def attach(
        self,
        learner: Any,
        synapse: str | nn.Module | None = None,
        neuron: str | nn.Module | None = None,
        *,
        model: nn.Module | None = None,
    ) -> Any:
        """Feed ``learner`` (STDP, MSTDP, MSTDP-ET) from a synapse -> neuron pair of this model.

        Build the learner exactly as in SpikingJelly, on the *model's* modules, and hand it to
        the compiled model, which re-targets it::

            learner = STDPLearner('s', model.fc1, model.sn1, tau_pre=2.0, tau_post=2.0)
            compiled = snncompile.optimize(model, x)
            compiled.attach(learner, model=model)          # or neuron='sn1'

        Why this API: the learner keeps SpikingJelly's constructor and its ``step()`` /
        ``synapse.weight.grad`` contract unchanged, so the training loop is the eager one with
        ``model`` replaced by ``compiled``; ``attach`` only decides where the spikes come from.
        The learned weight is the model's own (the compiled model shares it), so an optimizer
        over ``model.parameters()`` applies the update. The learner's own hooks on the model's
        modules are removed: from now on only compiled calls feed it, through two taps in the
        generated code (see :mod:`snncompile.runtime.learning_hooks`), so fused kernels, layers
        run over ``[T*N, ...]`` and traced-through modules are all handled. The learner receives
        what the eager model would have given it, whatever the compiled layout: per-step
        ``[N, ...]`` pairs for ``step_mode='s'`` (``T`` of them per compiled call, so a reward
        learner that needs one pair per ``step(reward)`` is run on ``[1, N, ...]`` inputs), one
        ``[T, N, ...]`` pair per call for ``step_mode='m'``.

        Args:
            learner: an ``STDPLearner``, ``MSTDPLearner`` or ``MSTDPETLearner`` whose ``synapse``
                is the layer to learn (its weight must be the weight the compiled node uses).
            synapse: the synapse node: a node name (``compiled.graph``), a module path of the
                model (``'fc1'``, ``'features.0'``) or a module object (the model's layer or the
                compiled copy). Default: ``learner.synapse``.
            neuron: the node whose output are the postsynaptic spikes, given the same ways; any
                node computing a tensor works (e.g. the output node of a composite module the
                frontend traced through). It must consume the synapse's output, directly or
                through other nodes (as in SpikingJelly, anything may sit in between, e.g. a
                BatchNorm; the learner checks that the shapes fit). Default: the learner's
                ``sn``, or if that is ``None`` the first neuron after the synapse when there is
                exactly one.
            model: the model that was compiled; only needed to find a *model's* neuron object
                (neurons of a compiled model are copies, so their objects differ).

        Returns:
            A :class:`~snncompile.runtime.learning_hooks.LearnerHandle`; ``handle.remove()``,
            ``compiled.detach_learner(learner)`` or ``learner.close()`` remove the taps (and
            nothing else is hooked).

        Raises:
            AttachError: (a ``ValueError``) naming the nodes when a node does not exist, the pair
                is not synapse -> neuron, the layer is not the learner's, or the synapse has a
                BatchNorm folded into it (inference mode: compile with ``mode='train'``).
        """
        from snncompile.runtime.learning_hooks import attach_learner

        return attach_learner(self, learner, synapse, neuron, model=model)

    def detach_learner(self, learner: Any) -> None:
        """Remove the taps that :meth:`attach` placed for ``learner`` (the learner stays usable)."""
        hub = self._learning_hub
        attached = [] if hub is None else [a for a in hub.attachments if a.learner is learner]
        if not attached:
            raise ValueError(
                f"detach_learner: this {type(learner).__name__} is not attached to the compiled "
                f"model (attached: {len(self.learners)} learner(s))."
            )
        for att in attached:
            hub.remove(att)

    @property
    def learners(self) -> list[Any]:
        """The learners currently attached with :meth:`attach`, in attach order."""
        hub = self._learning_hub
        return [] if hub is None else [a.learner for a in hub.attachments]

    def _learning_hub_for(self) -> Any:
        from snncompile.runtime.learning_hooks import _LearningHub

        if self._learning_hub is None or self._learning_hub.gm is not self.gm:
            self._learning_hub = _LearningHub(self.gm)
        return self._learning_hub

    def stream(self, chunks: Any, reduce: str | None = None, reset: bool = False) -> Any:
        """Feed an iterator of ``[K_i, N, ...]`` input chunks, state carried between them.

        Yields each chunk's output (``reduce=None``) or returns the time-sum (``'sum'``) or
        time-mean (``'mean'``) of all outputs; see :func:`snncompile.runtime.chunked.stream`.
        """
        from snncompile.runtime.chunked import stream

        return stream(self, chunks, reduce=reduce, reset=reset)

    def report(self) -> str:
        """A table of the passes that ran: changed or not, node counts, time and notes."""
        rows = [("pass", "changed", "nodes", "ms", "notes")]
        for r in self._records:
            rows.append(
                (
                    r.name,
                    "yes" if r.modified else "no",
                    f"{r.nodes_before}->{r.nodes_after}",
                    f"{r.seconds * 1e3:.2f}",
                    "; ".join(r.notes),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for k, row in enumerate(rows):
            cells = [row[i].ljust(widths[i]) for i in range(4)] + [row[4]]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths) + "  -----")
        head = (
            f"snncompile: mode={self.mode}, backend={self.backend}, source step_mode="
            f"{self.source_step_mode}, {len(self._graph)} IR nodes"
        )
        if any(r.name == "fold_batchnorm" and r.modified for r in self._records):
            lines.append(
                "note: BatchNorm was folded into conv/linear weights; outputs are not bit-exact "
                "with the eager model (~1e-6 relative on pre-activations can flip spikes near "
                "threshold). Compile with fold_batchnorm=False for exact eval outputs."
            )
        plan = self.__dict__.get("_memory_plan")
        if plan is not None:
            lines.extend(plan.describe())
        host_note = large_tensor_note(self._largest_tensor_bytes())
        if host_note is not None:
            lines.append(host_note)
        guard = self._modules.get("shape_guard")
        if guard is not None:
            lines.extend(guard.describe())
        return head + "\n" + "\n".join(lines)

    def _largest_tensor_bytes(self) -> int:
        """Bytes of the largest tensor an IR node produced for the example input."""
        sizes = []
        for n in self._graph:
            if n.shape is None:
                continue
            dtype = getattr(torch, n.dtype or "float32", None)
            itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
            sizes.append(math.prod(n.shape) * itemsize)
        return max(sizes, default=0)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, backend={self.backend}, nodes={len(self._graph)}"

    def graph_text(self) -> str:
        """``str(self.graph)``: the stable text form of the optimized IR."""
        return format_graph(self._graph)
