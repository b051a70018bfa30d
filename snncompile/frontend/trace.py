"""torch.fx capture of an SNN model into the IR (:func:`trace_model`).

How a model is read:

1. **Step form.** A model is *multi-step* when any of its step-mode aware modules (neurons,
   layers, containers) has ``step_mode='m'``; it then receives ``[T, N, *]``. Otherwise it is
   *single-step*: it is called once per time step on ``[N, *]`` and the IR is built for one step
   (``step`` layout); the step-mode lowering pass turns it into a sequence program.
2. **Tracing.** A throw-away deep copy of the model (the *probe*) is traced with torch.fx.
   Neurons, other ``MemoryModule`` subclasses (snncompile's and SpikingJelly's), step-mode aware
   layers and plain ``torch.nn`` layers are leaves. ``SeqToANNContainer`` and (when all its
   children are neurons or stateless layers) ``MultiStepContainer`` are expanded into their
   children between explicit ``MERGE_TIME``/``SPLIT_TIME`` ops, and a multi-step stateless layer
   becomes ``MERGE_TIME -> layer -> SPLIT_TIME``. Hand-written sequence code gets the same ops:
   ``x_seq.flatten(0, 1)`` is ``MERGE_TIME`` and ``y.unflatten(0, (x_seq.size(0), -1))`` (or a
   ``view``/``reshape`` to ``(T, -1, ...)`` with ``T`` read from a sequence) is ``SPLIT_TIME``
   (rules and the fallback in :mod:`snncompile.frontend.time_reshape`; ``ann2snn.convert``
   emits this form). The example runs beside the proxies
   (:mod:`snncompile.frontend.shape_values`), so ranks, shape unpacking and shape-derived
   ``if``/``raise`` trace, specialised to the example (the compiled module's shape guard
   re-traces at every new input shape). A submodule fx cannot trace (data-dependent control
   flow) is retried as a leaf and becomes an ``OPAQUE_MODULE`` that runs the module itself;
   with ``strict=True`` that is a :class:`FrontendError` naming the module and reason.
3. **Shapes.** The probe runs the example once (twice for single-step models, with batch sizes
   ``N`` and ``N+1``, to learn which values keep the batch in dimension 0 -- those may run over
   ``[T*N, *]`` after lowering). The user's model and its state are never touched; the global
   RNG state is restored afterwards.
4. **Modules in the IR.** Stateless layers are the user's own module objects (parameters and
   BN running statistics are shared). Stateful modules (neurons, dropout masks, opaque stateful
   blocks) are *copies that share parameters and buffers* but own their state, so the compiled
   module's state is separate from the model's. SpikingJelly IF/LIF/PLIF neurons are rebuilt
   as snncompile neurons with the same configuration and an equivalent surrogate (PLIF's ``w``
   is shared), so kernel fusion applies to them; the differential tests check spikes and
   gradients against the SpikingJelly model. A SpikingJelly neuron with no snncompile
   equivalent (a custom surrogate, ``store_v_seq=True``) runs as a copy of the original module.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from snncompile.frontend.partial import (
    CallRecord,
    CompilePart,
    GlueReport,
    build_glue,
    check_glue,
    record_calls,
)
from snncompile.frontend.rules import (
    Kind,
    ModuleInfo,
    classify_call,
    classify_module,
    convert_spikingjelly_neuron,
    is_stateful_module,
    memory_module_types,
    neuron_attrs,
    step_module_types,
    supported_step_modes,
)
from snncompile.frontend.shape_values import ValueProxy, ValueRecorder, concrete_bool
from snncompile.frontend.state_guard import (
    StateWriteError,
    check_no_python_state,
    check_no_state_writes,
    memory_stores,
    python_state,
    state_guarded,
)
from snncompile.frontend.time_reshape import (
    call_label,
    drop_unused_time_sizes,
    tag_time_size,
    time_layout_consistent,
    time_reshape,
)
from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Layout, Op


class FrontendError(ValueError):
    """The model or example input cannot be captured; the message says where and what to do."""


# -- time-layout markers (real functions so the probe can run the traced graph) --------------------
def merge_time(x: torch.Tensor) -> torch.Tensor:
    """``[T, N, *] -> [T*N, *]`` (a view)."""
    return x.flatten(0, 1)


def split_time(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[T*N, *] -> [T, N, *]`` with ``T`` taken from the sequence ``like``."""
    return y.unflatten(0, (like.shape[0], -1))


def state_copy_memo(module: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo that copies live autograd state as detached tensors.

    A model that ran with autograd and was not reset holds non-leaf state tensors (a neuron's
    ``v`` or ``v_seq``), which ``copy.deepcopy`` refuses. Copies made by the compiler reset their
    state anyway, so they get detached clones of those tensors instead.
    """
    stores = [vars(sub) for sub in module.modules()]  # plain attributes, e.g. v_seq
    stores += [memories for _path, memories in memory_stores(module)]
    return {
        id(value): value.detach().clone()
        for store in stores
        for value in store.values()
        if isinstance(value, torch.Tensor) and value.grad_fn is not None
    }


def copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are the original tensors."""
    memo = state_copy_memo(module)
    memo.update({id(t): t for t in itertools.chain(module.parameters(), module.buffers())})
    return copy.deepcopy(module, memo)


def single_step_copy(module: nn.Module) -> nn.Module:
    """A copy of a step-mode aware stateless layer in ``step_mode='s'`` sharing its tensors."""
    clone = copy_sharing_parameters(module)
    clone.step_mode = "s"
    return clone


def _reset_state(module: nn.Module) -> None:
    types = memory_module_types()
    for m in module.modules():
        if isinstance(m, types):
            m.reset()


def _flatten_sequential(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if type(child) is nn.Sequential:
            yield from _flatten_sequential(child, path)
        else:
            yield path, child


def model_step_mode(model: nn.Module) -> str:
    """``'m'`` if any step-mode aware module of ``model`` is multi-step, else ``'s'``."""
    step_types = step_module_types()
    stack: list[nn.Module] = [model]
    while stack:
        m = stack.pop()
        if isinstance(m, step_types) and getattr(m, "step_mode", None) == "m":
            return "m"
        if isinstance(m, step_types):
            # SpikingJelly's MultiStepModule classes support only 'm' and may not store it.
            if supported_step_modes(m) == ("m",):
                return "m"
        info = classify_module(m) if m is not model else None
        if info is not None and info.kind in (Kind.SEQ_CONTAINER, Kind.STEP_CONTAINER):
            continue
        stack.extend(m.children())
    return "s"


class _Plan:
    """Decisions made on the probe before tracing (paths are module qualified names)."""

    def __init__(self) -> None:
        self.seq_layers: set[str] = set()  # multi-step stateless layers, run as 's' copies
        self.seq_containers: set[str] = set()  # SeqToANNContainer: expanded
        self.step_containers: set[str] = set()  # MultiStepContainer: expanded
        self.seq_neurons: set[str] = set()  # neurons inside expanded MultiStepContainers
        self.opaque: dict[str, str] = {}  # forced leaves: path -> reason
        self.state_access: set[str] = set()  # opaque because code touches a module's state

    def run_mode(self, path: str) -> str | None:
        """The step mode the module at ``path`` runs in inside the traced program, if it differs
        from its own: its calls receive ``[T*N, *]`` (``'s'``) or ``[T, N, *]`` (``'m'``).

        The user's modules (and the probe's) keep their own ``step_mode``: forwards that read it
        (``if self.avgpool.step_mode == 's'``) must see what the user set. The shape probe and
        the IR run copies in this mode instead.
        """
        if path in self.opaque:
            return None
        if path in self.seq_layers:
            return "s"
        if path in self.seq_neurons:
            return "m"
        return None


def _make_plan(probe: nn.Module, step_mode: str) -> _Plan:
    plan = _Plan()
    if step_mode != "m":
        return plan
    stack: list[tuple[str, nn.Module]] = list(probe.named_children())
    while stack:
        path, m = stack.pop()
        info = classify_module(m)
        if info is None:
            stack.extend((f"{path}.{n}", c) for n, c in m.named_children())
            continue
        if info.kind is Kind.SEQ_CONTAINER:
            plan.seq_containers.add(path)
        elif info.kind is Kind.STEP_CONTAINER:
            children = list(_flatten_sequential(m, path))
            infos = [classify_module(c) for _, c in children]
            ok = all(
                i is not None
                and (
                    i.kind is Kind.NEURON
                    or (
                        i.kind is Kind.STATELESS
                        and i.op is not Op.BATCHNORM
                        and i.op is not Op.OPAQUE_MODULE
                    )
                )
                for i in infos
            )
            if ok and children:
                plan.step_containers.add(path)
                for cpath, cinfo in zip((p for p, _ in children), infos, strict=True):
                    if cinfo is not None and cinfo.kind is Kind.NEURON:
                        plan.seq_neurons.add(cpath)
        elif (
            info.kind is Kind.STATELESS
            and info.step_mode == "m"
            and info.op is not Op.OPAQUE_MODULE
            and hasattr(m, "step_mode")
        ):
            plan.seq_layers.add(path)
    return plan


class SNNTracer(fx.Tracer):
    """An fx tracer that keeps neurons, stateful and known layers as leaves and expands
    SpikingJelly-style containers into explicit time-layout ops (see the module docstring)."""

    def __init__(self, plan: _Plan, root: nn.Module, example: Any = None) -> None:
        super().__init__()
        self.plan = plan
        # Values beside the proxies (sizes, ranks, shape checks): see frontend.shape_values.
        self.values: ValueRecorder | None = None
        if example is not None:
            shadow = copy.deepcopy(root, state_copy_memo(root))
            _reset_state(shadow)  # the user's model may hold state from an earlier run
            own = example.detach().clone() if isinstance(example, torch.Tensor) else example
            self.values = ValueRecorder(shadow, own, self._mode_module)  # in-place ops: a copy
        self._mode_copies: dict[str, nn.Module] = {}
        # Classify before tracing: during tracing fx records every parameter read as a node.
        self._leaf = {id(m): classify_module(m) is not None for m in root.modules()}
        self._stack: list[str] = []
        self.failure: tuple[str, BaseException] | None = None

    def _mode_module(self, path: str, module: nn.Module) -> nn.Module:
        """The module a ``call_module`` node runs (a copy in the plan's step mode, see _Plan)."""
        mode = self.plan.run_mode(path)
        if mode is None:
            return module
        if path not in self._mode_copies:
            clone = copy_sharing_parameters(module)
            clone.step_mode = mode
            self._mode_copies[path] = clone
        return self._mode_copies[path]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if self.values is not None:
            proxy = ValueProxy(node, self, self.values)
            self.values.watch(proxy)
            return proxy
        return super().proxy(node)

    def create_proxy(self, *args: Any, **kwargs: Any) -> fx.Proxy:
        proxy = super().create_proxy(*args, **kwargs)
        if self.values is not None:
            self.values.record(proxy.node)
        return proxy

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = concrete_bool(obj)  # a shape-derived condition: specialise (shape-guarded)
        return super().to_bool(obj) if value is None else value

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.plan.opaque:
            return True
        if id(m) in self._leaf:
            return self._leaf[id(m)]
        return classify_module(m) is not None

    def _seq(self, x: Any, path: str, modules: list[tuple[str, nn.Module]]) -> Any:
        merged = self.create_proxy("call_function", merge_time, (x,), {})
        y = merged
        for _, child in modules:
            y = self._call_plain(child, child.forward, (y,), {})
        return self.create_proxy("call_function", split_time, (y, x), {})

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.values is not None and self.values.running:
            return forward(*args, **kwargs)  # the value copy runs its modules for real
        path = self.path_of_module(m)
        plan = self.plan
        if path not in plan.opaque:
            if path in plan.seq_containers:
                return self._seq(args[0], path, list(_flatten_sequential(m, path)))
            if path in plan.seq_layers:
                return self._seq(args[0], path, [(path, m)])
            if path in plan.step_containers:
                y = args[0]
                run: list[tuple[str, nn.Module]] = []
                for cpath, child in _flatten_sequential(m, path):
                    if cpath in plan.seq_neurons:
                        if run:
                            y = self._seq(y, path, run)
                            run = []
                        y = super().call_module(child, child.forward, (y,), {})
                    else:
                        run.append((cpath, child))
                if run:
                    y = self._seq(y, path, run)
                return y
        return self._call_plain(m, forward, args, kwargs)

    def _call_plain(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        path = self.path_of_module(m)
        self._stack.append(path)
        try:
            if self.is_leaf_module(m, path):
                return super().call_module(m, forward, args, kwargs)
            before = python_state(m)
            out = super().call_module(m, forward, args, kwargs)
            check_no_state_writes(m, path)
            check_no_python_state(m, before)
            return out
        except Exception as exc:
            if self.failure is None:
                self.failure = (path, exc)
            raise
        finally:
            self._stack.pop()


class _RootWrapper(nn.Module):
    """Holds a model that cannot be traced at all, so it becomes one opaque leaf."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return self.model(x)


class _ProbeError(Exception):
    def __init__(self, node: fx.Node, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.node = node
        self.exc = exc


class _Probe(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, plan: _Plan | None = None) -> None:
        super().__init__(gm)
        self.plan = plan
        self.shapes: dict[str, tuple[tuple[int, ...], str] | None] = {}
        self.kinds: dict[str, str] = {}
        self._mode_copies: dict[str, nn.Module] = {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mode = None if self.plan is None else self.plan.run_mode(str(target))
        if mode is None:
            return super().call_module(target, args, kwargs)
        module = self._mode_copies.get(str(target))
        if module is None:  # a copy in the mode the traced program runs it in (see _Plan)
            module = copy_sharing_parameters(self.fetch_attr(str(target)))
            module.step_mode = mode
            self._mode_copies[str(target)] = module
        return module(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise _ProbeError(n, exc) from exc
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = (tuple(out.shape), str(out.dtype).replace("torch.", ""))
        else:
            self.shapes[n.name] = None
        if isinstance(out, torch.Tensor):
            self.kinds[n.name] = "tensor"
        elif (
            isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out)
        ):
            self.kinds[n.name] = "tensors"
        else:
            self.kinds[n.name] = type(out).__name__
        return out


def _trace(
    probe: nn.Module, plan: _Plan, strict: bool, example: Any = None
) -> tuple[fx.GraphModule, nn.Module]:
    """Trace ``probe``, retrying untraceable submodules as leaves. Returns (gm, traced root)."""
    limit = sum(1 for _ in probe.modules()) + 1
    root_reason = "the model's forward cannot be traced"
    root_state = False
    for _ in range(limit):
        tracer = SNNTracer(plan, probe, example)
        try:
            with state_guarded(probe):
                before = python_state(probe)
                fx_graph = tracer.trace(probe)
                check_no_state_writes(probe, "")  # the model's own forward
                check_no_python_state(probe, before)
            if tracer.values is not None:
                tracer.values.drop_unused_static(fx_graph)
            return fx.GraphModule(tracer.root, fx_graph), probe
        except Exception as exc:
            path, err = tracer.failure if tracer.failure is not None else ("", exc)
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            where = (
                f"module {path!r} ({type(probe.get_submodule(path)).__name__})"
                if path
                else (f"the model's own forward ({type(probe).__name__})")
            )
            if strict:
                raise FrontendError(
                    f"strict=True: torch.fx cannot trace {where}: {reason}. Rewrite it "
                    "without data-dependent control flow, Python attributes assigned in forward "
                    "or state access from outside the stateful module, or pass strict=False to "
                    "run it as written (its parts compiled where possible)."
                ) from exc
            if not path or path in plan.opaque:
                root_reason = reason
                root_state = isinstance(err, StateWriteError)
                break
            plan.opaque[path] = reason
            if isinstance(err, StateWriteError):
                plan.state_access.add(path)
    # The model itself cannot be traced: run the whole thing as one opaque module.
    root = _RootWrapper(probe)
    plan.opaque["model"] = root_reason
    if root_state:
        plan.state_access.add("model")
    tracer = SNNTracer(plan, root)
    return fx.GraphModule(root, tracer.trace(root)), root


def _example_error(example: torch.Tensor, step_mode: str, err: _ProbeError, root: nn.Module) -> str:
    node = err.node
    where = f"node {node.name!r}"
    if node.op == "call_module":
        try:
            mod = root.get_submodule(str(node.target))
            where = f"module {str(node.target)!r} ({type(mod).__name__})"
        except AttributeError:
            pass
    fed = (
        f"each step example_input[t] of shape {tuple(example.shape[1:])} was fed to this "
        "single-step model"
        if step_mode == "s"
        else f"the whole example of shape {tuple(example.shape)} was fed to this multi-step model"
    )
    return (
        f"running the example input through the model failed at {where}: "
        f"{type(err.exc).__name__}: {err.exc}. snncompile expects the example input as "
        f"[T, N, ...] (time first, then batch); {fed}. Check the example's rank and sizes."
    )


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _probe_shapes(
    gm: fx.GraphModule,
    root: nn.Module,
    example: torch.Tensor,
    step_mode: str,
    plan: _Plan,
    watch: dict[str, nn.Module],
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, dict[str, CallRecord]]]:
    """Run the traced program on the example: value shapes (for batch ``N``, and ``N+1`` for
    single-step models) and the calls received by the submodules of the ``watch`` modules."""
    with torch.no_grad(), _rng_kept():
        x = (example[0] if step_mode == "s" else example).clone()  # in-place ops: a copy
        _reset_state(root)
        probe = _Probe(gm, plan)
        try:
            with contextlib.ExitStack() as stack:
                calls = {p: stack.enter_context(record_calls(m)) for p, m in watch.items()}
                probe.run(x)
        except _ProbeError as err:
            raise FrontendError(_example_error(example, step_mode, err, root)) from err.exc
        second = None
        if step_mode == "s":
            _reset_state(root)
            probe2 = _Probe(gm, plan)
            try:
                probe2.run(torch.cat([x, x[:1]]))
            except _ProbeError as err:
                # Typically a missing time dimension: [N, C, H, W] examples make every step an
                # unbatched [C, H, W] input, which breaks as soon as the "batch" changes.
                msg = _example_error(example, step_mode, err, root)
                raise FrontendError(
                    f"the model ran on the example but failed when its batch size changed from "
                    f"{x.shape[0]} to {x.shape[0] + 1} (snncompile checks which values keep the "
                    f"batch in dimension 0); {msg[0].lower()}{msg[1:]}"
                ) from err.exc
            second = probe2.shapes
        _reset_state(root)
    probe.shapes["__kinds__"] = probe.kinds  # type: ignore[assignment]
    return probe.shapes, second, calls


def _layout_of(inputs: list[Node], default: Layout, name: str) -> Layout:
    timed = {i.layout for i in inputs if i.layout is not Layout.NONE}
    if not timed:
        return default
    if len(timed) > 1:
        got = ", ".join(f"%{i.name}: {i.layout.value}" for i in inputs)
        raise FrontendError(f"node %{name} mixes time layouts ({got}); this is a frontend bug")
    return timed.pop()


def trace_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    strict: bool = False,
    compile_part: CompilePart | None = None,
) -> Graph:
    """Capture ``model`` into an IR graph using ``example_input`` (``[T, N, *]``) for shapes.

    The graph's ``meta`` records ``step_mode`` (``'s'``/``'m'``), ``T`` and ``N``. For a
    single-step model the graph describes one step (``step`` layout); for a multi-step model it
    describes the whole sequence (``seq``/``flat`` layouts). See the module docstring.

    ``compile_part(module, example)`` (``optimize`` passes one) enables partial compilation: a
    module that runs as written gets its neuron-holding children compiled by it (see
    :mod:`snncompile.frontend.partial`). ``graph.meta['frontend_notes']`` lists what runs as
    written and why.
    """
    if not isinstance(example_input, torch.Tensor):
        raise FrontendError(
            "example_input must be a tensor of shape [T, N, ...], got "
            f"{type(example_input).__name__}"
        )
    if example_input.dim() < 2:
        raise FrontendError(
            f"example_input must have shape [T, N, ...] (time, batch, features...), got shape "
            f"{tuple(example_input.shape)} with {example_input.dim()} dimension(s)"
        )
    for dim, what in ((0, "T=0 time steps"), (1, "batch size N=0")):
        if example_input.shape[dim] == 0:
            raise FrontendError(
                f"example_input of shape {tuple(example_input.shape)} has {what}; the example "
                "is run through the model to record shapes, so it needs at least one time step "
                "and one sample ([T, N, ...] with T >= 1 and N >= 1)"
            )
    if classify_module(model) is not None:
        # The model is itself a leaf (e.g. one neuron, a compiled part): fx traces a root's
        # forward without asking is_leaf_module, so trace a wrapper that calls it instead.
        model = _RootWrapper(model)
    step_mode = model_step_mode(model)
    T, N = int(example_input.shape[0]), int(example_input.shape[1])
    probe = copy.deepcopy(model, state_copy_memo(model))
    plan = _make_plan(probe, step_mode)
    call_input = example_input[0] if step_mode == "s" else example_input
    with _rng_kept():
        gm, traced_root = _trace(probe, plan, strict, call_input)
    work_root: nn.Module = model if traced_root is probe else _RootWrapper(model)
    watch = {}
    if compile_part is not None:
        watch = {p: traced_root.get_submodule(p) for p in plan.opaque if p not in plan.state_access}
    shapes, second, calls = _probe_shapes(gm, traced_root, example_input, step_mode, plan, watch)
    glues: dict[str, nn.Module | None] = {}
    notes: dict[str, list[str]] = {}

    def make_glue(path: str, module: nn.Module) -> nn.Module | None:
        """The module at ``path`` running as written with its parts compiled, or ``None``."""
        if path not in glues:
            reason = plan.opaque[path]
            glue = None
            if compile_part is not None and path in calls:
                report = GlueReport()
                display = "" if path == "model" else path
                glue = build_glue(
                    module,
                    calls[path],
                    compile_part,
                    model_step_mode,
                    path,
                    display,
                    reason,
                    report,
                )
                if glue is not None:
                    rec = calls[path].get("", None)
                    failed = None
                    if rec is not None:
                        failed = check_glue(glue, rec.args, rec.kwargs)
                    if failed is not None:
                        glue = None
                        reason = (
                            f"{reason}; its parts were not compiled either: running it with "
                            f"compiled parts failed ({failed})"
                        )
                    else:
                        notes[path] = report.notes()
            glues[path] = glue
            notes.setdefault(path, [f"ran as written: {path!r}: {reason}"])
        return glues[path]

    def build(recognise_time: bool) -> Graph:
        graph = Graph({"step_mode": step_mode, "T": T, "N": N})
        base = Layout.STEP if step_mode == "s" else Layout.SEQ
        copies: dict[int, nn.Module] = {}
        call_counts: dict[str, int] = {}
        time_size_readers: set[str] = set()  # T-size values read only by recognised time reshapes

        def own_copy(m: nn.Module, convert: bool = False) -> nn.Module:
            if id(m) not in copies:
                converted = convert_spikingjelly_neuron(m) if convert else None
                clone = converted if converted is not None else copy_sharing_parameters(m)
                _reset_state(clone)
                copies[id(m)] = clone
            return copies[id(m)]

        for fxn in gm.graph.nodes:
            inputs: list[str] = []

            def ref(arg: fx.Node, _inputs: list[str] = inputs) -> Ref:
                if arg.name not in _inputs:
                    _inputs.append(arg.name)
                return Ref(_inputs.index(arg.name))

            args = fx.node.map_arg(fxn.args, ref)
            kwargs = fx.node.map_arg(fxn.kwargs, ref)
            in_nodes = [graph[i] for i in inputs]
            rec = shapes.get(fxn.name)
            shape, dtype = rec if rec is not None else (None, None)
            node: Node
            if fxn.op == "placeholder":
                node = Node(fxn.name, Op.INPUT, layout=base)
            elif fxn.op == "get_attr":
                value = _fetch_attr(work_root, str(fxn.target))
                node = Node(
                    fxn.name,
                    Op.CONSTANT,
                    layout=Layout.NONE,
                    attrs={"target": str(fxn.target), "_value": value},
                )
            elif fxn.op == "output":
                node = Node("output", Op.OUTPUT, tuple(inputs), {"args": args}, layout=Layout.NONE)
            elif fxn.op == "call_function" and fxn.target is merge_time:
                node = Node(fxn.name, Op.MERGE_TIME, (inputs[0],), layout=Layout.FLAT)
            elif fxn.op == "call_function" and fxn.target is split_time:
                node = Node(fxn.name, Op.SPLIT_TIME, (inputs[0],), layout=Layout.SEQ)
            elif fxn.op == "call_module":
                path = str(fxn.target)
                call_counts[path] = call_counts.get(path, 0) + 1
                node = _module_node(
                    fxn.name,
                    path,
                    work_root,
                    plan,
                    step_mode,
                    own_copy,
                    args,
                    kwargs,
                    inputs,
                    make_glue,
                )
                node.layout = _layout_of(in_nodes, base, fxn.name)
            elif recognise_time and (
                (time_op := time_reshape(fxn, args, kwargs, in_nodes, shape, T, N)) is not None
            ):
                # Hand-written sequence code: x_seq.flatten(0, 1) / y.unflatten(0, (T, -1)) ...
                op, data = time_op
                layout = Layout.FLAT if op is Op.MERGE_TIME else Layout.SEQ
                node = Node(fxn.name, op, (data,), layout=layout)
                node.meta["source_call"] = call_label(fxn)
                time_size_readers.update(i for i in inputs if i != data)
            else:
                is_method = fxn.op == "call_method"
                op = classify_call(fxn.target, is_method)
                node = Node(
                    fxn.name,
                    op,
                    tuple(inputs),
                    {"args": args, "kwargs": dict(kwargs)},
                    target=fxn.target,
                )
                node.layout = _layout_of(in_nodes, Layout.NONE, fxn.name)
                tag_time_size(node, fxn, args, kwargs, in_nodes)
            if node.op is not Op.OUTPUT:
                node.shape, node.dtype = shape, dtype
                node.meta["value_kind"] = shapes["__kinds__"].get(fxn.name, "tensor")
            if second is not None and shape is not None:
                rec2 = second.get(fxn.name)
                node.meta["batch_aligned"] = bool(
                    rec2 is not None
                    and len(shape) >= 1
                    and shape[0] == N
                    and rec2[0][0] == N + 1
                    and rec2[0][1:] == shape[1:]
                )
            graph.add(node)

        drop_unused_time_sizes(graph, time_size_readers)
        if step_mode == "s":
            shared = [
                p
                for p, c in call_counts.items()
                if c > 1 and is_stateful_module(work_root.get_submodule(p))
            ]
            if shared:
                graph.meta["shared_stateful"] = tuple(sorted(shared))
        return graph

    try:
        graph = build(recognise_time=True)
        consistent = time_layout_consistent(graph)
    except FrontendError:  # e.g. a recognised flat value mixed with a seq-labelled one
        consistent = False
    if not consistent:
        # Time reshapes were recognised but the code around them reshapes dimension 0 itself
        # (e.g. a literal-T view): record everything the old way rather than mislabel values.
        # Genuine errors are raised again by this second build.
        graph = build(recognise_time=False)
    if notes:
        graph.meta["frontend_notes"] = [line for p in sorted(notes) for line in notes[p]]
    return graph



def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_node(
    name: str,
    path: str,
    work_root: nn.Module,
    plan: _Plan,
    step_mode: str,
    own_copy: Any,
    args: Any,
    kwargs: Any,
    inputs: list[str],
    make_glue: Any,
) -> Node:
    module = work_root.get_submodule(path)
    template = {"args": args, "kwargs": dict(kwargs)}
    if path in plan.opaque:
        stateful = is_stateful_module(module)
        attrs = {"path": path, "type": type(module).__name__, "stateful": stateful}
        attrs["reason"] = plan.opaque[path]
        glue = make_glue(path, module)
        if glue is not None:  # runs as written, its neuron-holding parts compiled
            attrs["stateful"] = True
            run = glue
        else:
            run = own_copy(module) if stateful else module
        return Node(name, Op.OPAQUE_MODULE, tuple(inputs), {**attrs, **template}, module=run)
    info: ModuleInfo | None = classify_module(module)
    assert info is not None, f"leaf {path} has no rule"
    if info.multi_step_only and step_mode == "s":
        raise FrontendError(
            f"module {path!r} ({type(module).__name__}) only runs multi-step ([T, N, ...] input) "
            "but the model is single-step, so it cannot be run per time step. Make the model "
            "multi-step (functional.set_step_mode(model, 'm')) or register a rule for it with "
            "snncompile.frontend.register_module_rule."
        )
    attrs = {"path": path, **info.attrs}
    if info.kind is Kind.NEURON:
        clone = own_copy(module, convert=True)
        if type(clone) is not type(module):  # a SpikingJelly neuron rebuilt as ours
            attrs = {"path": path, **neuron_attrs(clone), "source": "spikingjelly"}
        if path in plan.seq_neurons:
            clone.step_mode = "m"
        wanted = "m" if step_mode == "m" else "s"
        if clone.step_mode != wanted:
            # A neuron in the other step mode than the model: keep eager semantics, run as is.
            attrs = {"path": path, "type": type(module).__name__, "stateful": True}
            return Node(name, Op.OPAQUE_MODULE, tuple(inputs), {**attrs, **template}, module=clone)
        return Node(name, Op.NEURON, tuple(inputs), {**attrs, **template}, module=clone)
    if info.kind in (Kind.STATEFUL, Kind.STEP_CONTAINER, Kind.SEQ_CONTAINER):
        attrs["stateful"] = True
        return Node(name, info.op, tuple(inputs), {**attrs, **template}, module=own_copy(module))
    run = single_step_copy(module) if path in plan.seq_layers else module
    if info.op is Op.OPAQUE_MODULE:
        attrs["stateful"] = False
    return Node(name, info.op, tuple(inputs), {**attrs, **template}, module=run)
