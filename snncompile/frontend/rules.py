"""Rules that map modules and torch calls to IR ops.

:func:`classify_module` says what a leaf module is (a neuron, a known stateless layer, a stateful
black box, a container the tracer expands) and which :class:`~snncompile.ir.Op` and attributes it
gets. It knows snncompile's own modules, plain ``torch.nn`` layers and -- when SpikingJelly is
imported -- SpikingJelly 2.0.0's ``activation_based`` modules. :func:`register_module_rule` and
:func:`register_neuron_type` extend it for user types.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snncompile import base as sc_base
from snncompile.ir.ops import Op


class Kind(enum.Enum):
    """How the frontend and the lowering treat a leaf module."""

    NEURON = "neuron"  # a neuron with known dynamics: runs as a multi-step op after lowering
    STATELESS = "stateless"  # no state across calls: may run once over [T*N, *]
    STATEFUL = "stateful"  # keeps state across calls: copied, run per step (or raw when 'm')
    SEQ_CONTAINER = "seq_container"  # SeqToANNContainer: children run once over [T*N, *]
    STEP_CONTAINER = "step_container"  # MultiStepContainer: children run step by step


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """What :func:`classify_module` found out about a module."""

    op: Op
    kind: Kind
    attrs: dict[str, Any]
    #: ``'s'``/``'m'`` for step-mode aware modules, ``None`` for plain torch modules.
    step_mode: str | None = None
    #: Only runs in multi-step form ([T, N, *] input), e.g. SpikingJelly's MultiStepModule layers.
    multi_step_only: bool = False


ModuleRule = Callable[[nn.Module], ModuleInfo | None]
_USER_RULES: list[tuple[type, ModuleRule]] = []
_NEURON_TYPES: set[type] = set()


def register_module_rule(module_type: type, rule: ModuleRule) -> None:
    """Map instances of ``module_type`` with ``rule(module) -> ModuleInfo`` (checked first)."""
    _USER_RULES.insert(0, (module_type, rule))


def register_neuron_type(module_type: type) -> None:
    """Treat instances of exactly ``module_type`` (a ``MemoryModule`` with ``step_mode``) as
    neurons: stateful, one multi-step op after lowering, state copied into the compiled module."""
    _NEURON_TYPES.add(module_type)


#: Methods that define a neuron's dynamics (charge -> fire -> reset and the step loops). A class
#: registered with :func:`register_neuron_subclass` must inherit all of them unchanged.
DYNAMICS_METHODS = (
    "neuronal_charge",
    "neuronal_fire",
    "neuronal_reset",
    "_step",
    "single_step_forward",
    "multi_step_forward",
    "_multi_step_torch",
)


def register_neuron_subclass(module_type: type) -> None:
    """Treat instances of exactly ``module_type`` as the snncompile neuron it subclasses.

    This is for subclasses of ``IFNode`` / ``LIFNode`` / ``ParametricLIFNode`` that change only
    configuration -- e.g. :class:`snncompile.ann2snn.HalfThresholdIFNode`, whose membrane starts
    at ``v_threshold / 2`` (reported through ``NeuronSpec.v_init``) -- and not the dynamics. The
    compiler then fuses them and exporters render them from their ``NeuronSpec``, so overriding
    any of :data:`DYNAMICS_METHODS` is refused here with a ``TypeError`` (register such a class
    with :func:`register_module_rule` as an opaque stateful module instead). Only the exact type
    is registered: its own subclasses are not accepted implicitly.
    """
    from snncompile import neuron as sc_neuron

    bases = (sc_neuron.IFNode, sc_neuron.LIFNode, sc_neuron.ParametricLIFNode)
    if not isinstance(module_type, type) or not issubclass(module_type, bases):
        raise TypeError(
            f"register_neuron_subclass: {module_type!r} is not a subclass of snncompile's "
            "IFNode, LIFNode or ParametricLIFNode; use register_neuron_type or "
            "register_module_rule for other neuron classes."
        )
    base = next(b for b in module_type.__mro__ if b in bases)
    for method in DYNAMICS_METHODS:
        owner = next((c for c in module_type.__mro__ if method in c.__dict__), None)
        if owner is not None and owner not in base.__mro__:
            raise TypeError(
                f"register_neuron_subclass: {module_type.__name__} overrides {method} (defined "
                f"in {owner.__name__}), so its dynamics are not {base.__name__}'s and its "
                "NeuronSpec does not describe it. Register it with register_module_rule as an "
                "opaque stateful module, or move the change into configuration."
            )
    _NEURON_SUBCLASSES.add(module_type)


_NEURON_SUBCLASSES: set[type] = set()


def sj_modules() -> Any | None:
    """SpikingJelly's ``activation_based`` package if it is already imported, else ``None``.

    Models built from SpikingJelly modules have imported it; we never import it ourselves (it is
    an optional, heavy dependency).
    """
    if "spikingjelly.activation_based.neuron" not in sys.modules:
        return None
    return sys.modules.get("spikingjelly.activation_based")


def memory_module_types() -> tuple[type, ...]:
    """The ``MemoryModule`` base classes known: snncompile's and SpikingJelly's (if imported)."""
    types: list[type] = [sc_base.MemoryModule]
    sj = sj_modules()
    if sj is not None:
        types.append(sj.base.MemoryModule)
    return tuple(types)


def step_module_types() -> tuple[type, ...]:
    """The ``StepModule`` base classes known: snncompile's and SpikingJelly's (if imported)."""
    types: list[type] = [sc_base.StepModule]
    sj = sj_modules()
    if sj is not None:
        types.append(sj.base.StepModule)
    return tuple(types)


def supported_step_modes(module: nn.Module) -> tuple[str, ...]:
    """The step modes ``module`` supports: ``('s', 'm')`` unless it says otherwise.

    SpikingJelly 2.0.0 defines ``supported_step_mode`` as a *method*; snncompile's modules and
    older code use a tuple attribute. Both are read here.
    """
    supported = getattr(module, "supported_step_mode", ("s", "m"))
    if callable(supported):
        supported = supported()
    return tuple(supported)


def is_stateful_module(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule keeps state across calls (is a ``MemoryModule``)."""
    types = memory_module_types()
    return any(isinstance(m, types) for m in module.modules())


#: Methods that run a neuron's time loop; a snncompile neuron subclass that overrides one of them
#: (e.g. the online OTTT/SLTT neurons, which return ``[spike, trace]``) is not a plain neuron.
LOOP_METHODS = (
    "single_step_forward",
    "multi_step_forward",
    "_multi_step_torch",
    "forward",
    "supported_step_mode",
)


def is_snncompile_neuron(module_type: type) -> bool:
    """Whether ``module_type`` is a snncompile neuron the compiler treats as a ``NEURON`` node.

    A class defined with :meth:`snncompile.neuron.BaseNode.define_dynamics` (its own or an
    ancestor's) whose time loop is the base class's: the node runs as one multi-step op, and its
    dynamics (or, for a subclass that overrides ``neuronal_charge``, the captured charge) are
    fused and exported. Subclasses that change the loop itself are opaque stateful modules.
    """
    from snncompile import neuron as sc_neuron

    if not isinstance(module_type, type) or not issubclass(module_type, sc_neuron.BaseNode):
        return False
    defining = next((c for c in module_type.__mro__ if "define_dynamics" in c.__dict__), None)
    if defining is None or defining is sc_neuron.BaseNode:
        return False
    for method in LOOP_METHODS:
        owner = next((c for c in module_type.__mro__ if method in c.__dict__), None)
        if owner is not None and owner not in sc_neuron.BaseNode.__mro__:
            return False
    return True


def sj_equivalents() -> dict[type, type]:
    """``SpikingJelly neuron class -> snncompile class`` for every class with a
    ``spikingjelly_name`` (when SpikingJelly is imported)."""
    sj = sj_modules()
    if sj is None:
        return {}
    from snncompile import neuron as sc_neuron

    out: dict[type, type] = {}
    for cls in sc_neuron.BaseNode.registry.values():
        name = cls.__dict__.get("spikingjelly_name")
        sj_cls = getattr(sj.neuron, name, None) if name else None
        if isinstance(sj_cls, type):
            out[sj_cls] = cls
    return out


def _is_neuron(module: nn.Module) -> bool:
    t = type(module)
    if t in _NEURON_TYPES or t in _NEURON_SUBCLASSES or t in sj_equivalents():
        return True
    return is_snncompile_neuron(t)


def _spec_describes(module: nn.Module) -> bool:
    """Whether the module's ``NeuronSpec`` is its dynamics (no step method overridden below the
    class that defines them)."""
    from snncompile.runtime.fused_backends import overridden_step_methods

    return not overridden_step_methods(type(module))


def neuron_attrs(module: nn.Module) -> dict[str, Any]:
    """Printable attributes of a neuron (kind, threshold, reset, tau, ...), plus ``_spec`` for
    IF/LIF/PLIF (their ``NeuronSpec``)."""
    spec_fn = getattr(module, "dynamics_spec", None)
    if callable(spec_fn) and _spec_describes(module):
        try:
            spec = spec_fn()
        except NotImplementedError:
            spec = None
        if spec is not None:
            attrs: dict[str, Any] = {
                "kind": spec.kind,
                "v_threshold": spec.v_threshold,
                "v_reset": spec.v_reset,
            }
            if spec.tau is not None:
                attrs["tau"] = spec.tau
            attrs["decay_input"] = spec.decay_input
            attrs["detach_reset"] = spec.detach_reset
            attrs["surrogate"] = type(spec.surrogate).__name__
            v_init = getattr(spec, "v_init", None)
            if v_init is not None:
                # The membrane starts (and reset() restores it) here instead of at v_reset / 0.
                attrs["v_init"] = v_init
            attrs["_spec"] = spec
            return attrs
    if callable(getattr(module, "define_dynamics", None)):
        attrs = {
            "kind": type(module).__name__,
            "v_threshold": float(module.v_threshold),
            "v_reset": None if module.v_reset is None else float(module.v_reset),
            "detach_reset": bool(module.detach_reset),
            "surrogate": type(getattr(module, "surrogate_function", None)).__name__,
        }
        step = module._eager()
        if step is not None and step.extra_states:
            attrs["states"] = ("v", *step.extra_states)
        return attrs
    name = type(module).__name__
    kind = {"IFNode": "if", "LIFNode": "lif", "ParametricLIFNode": "plif"}.get(name, name)
    attrs = {
        "kind": kind,
        "v_threshold": float(module.v_threshold),
        "v_reset": None if module.v_reset is None else float(module.v_reset),
    }
    if kind == "lif":
        attrs["tau"] = float(module.tau)
    attrs["decay_input"] = bool(getattr(module, "decay_input", False))
    attrs["detach_reset"] = bool(module.detach_reset)
    attrs["surrogate"] = type(getattr(module, "surrogate_function", None)).__name__
    attrs["source"] = "spikingjelly"
    return attrs


def _conv_attrs(m: nn.Module) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": tuple(m.kernel_size),
        "stride": tuple(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
        "groups": m.groups,
        "bias": m.bias is not None,
    }


def _pool_attrs(m: nn.Module) -> dict[str, Any]:
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding}


_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Hardtanh,
    nn.Softplus,
)

# (torch base type, op, attribute extractor); order matters (first match wins).
_TORCH_RULES: list[tuple[type | tuple[type, ...], Op, Callable[[Any], dict[str, Any]]]] = [
    (nn.Conv1d, Op.CONV1D, _conv_attrs),
    (nn.Conv2d, Op.CONV2D, _conv_attrs),
    (
        nn.Linear,
        Op.LINEAR,
        lambda m: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        },
    ),
    (
        (nn.BatchNorm1d, nn.BatchNorm2d),
        Op.BATCHNORM,
        lambda m: {"num_features": m.num_features, "eps": m.eps, "affine": m.affine},
    ),
    ((nn.MaxPool1d, nn.MaxPool2d), Op.MAXPOOL, _pool_attrs),
    ((nn.AvgPool1d, nn.AvgPool2d), Op.AVGPOOL, _pool_attrs),
    (
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d),
        Op.ADAPTIVE_AVGPOOL,
        lambda m: {"output_size": m.output_size},
    ),
    (nn.Flatten, Op.FLATTEN, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d), Op.DROPOUT, lambda m: {"p": m.p}),
    (nn.Identity, Op.IDENTITY, lambda m: {}),
    (_ELEMENTWISE_MODULES, Op.ELEMENTWISE, lambda m: {"fn": type(m).__name__}),
]


def _container_kind(module: nn.Module) -> Kind | None:
    if not isinstance(module, nn.Sequential):
        return None
    name = type(module).__name__
    origin = type(module).__module__
    if not (origin.startswith("snncompile") or origin.startswith("spikingjelly")):
        return None
    if name == "SeqToANNContainer":
        return Kind.SEQ_CONTAINER
    if name == "MultiStepContainer":
        return Kind.STEP_CONTAINER
    if name == "StepModeContainer" and getattr(module, "step_mode", None) == "m":
        # Multi-step: stateless children run over [T*N, *], stateful ones step by step.
        return Kind.STEP_CONTAINER if getattr(module, "stateful", True) else Kind.SEQ_CONTAINER
    return None


#: SpikingJelly containers whose forward depends on Python types of run-time values
#: (``OTTTSequential`` passes ``[spike, trace]`` lists between modules in training): tracing them
#: would record the wrong branch, so they always run as written.
_AS_WRITTEN_CONTAINERS = ("OTTTSequential",)


def _runs_as_written(module: nn.Module) -> bool:
    origin = type(module).__module__
    return origin.startswith("spikingjelly") and type(module).__name__ in _AS_WRITTEN_CONTAINERS


def _opaque_info(module: nn.Module, step_mode: str | None, multi_only: bool = False) -> ModuleInfo:
    """An OPAQUE_MODULE that runs ``module`` as written (stateful if it holds state)."""
    kind = Kind.STATEFUL if is_stateful_module(module) else Kind.STATELESS
    return ModuleInfo(
        Op.OPAQUE_MODULE, kind, {"type": type(module).__name__}, step_mode, multi_only
    )


def classify_module(module: nn.Module) -> ModuleInfo | None:
    """Describe a module the tracer keeps as a leaf, or ``None`` if it should be traced through.

    Neurons and other ``MemoryModule`` subclasses, step-mode aware layers, SpikingJelly/snncompile
    containers and plain ``torch.nn`` layers are leaves; everything else (user modules,
    ``nn.Sequential``) is traced into.
    """
    for mtype, rule in _USER_RULES:
        if isinstance(module, mtype):
            info = rule(module)
            if info is not None:
                return info
    step_mode = getattr(module, "step_mode", None)
    step_mode = step_mode if step_mode in ("s", "m") else None
    if _runs_as_written(module):
        return _opaque_info(module, step_mode)
    ckind = _container_kind(module)
    if ckind is not None:
        return ModuleInfo(Op.OPAQUE_MODULE, ckind, {"container": type(module).__name__}, "m")
    if _is_neuron(module):
        return ModuleInfo(Op.NEURON, Kind.NEURON, neuron_attrs(module), step_mode)
    if isinstance(module, memory_module_types()):
        name = type(module).__name__
        if name in ("Dropout", "Dropout2d") and hasattr(module, "p"):
            return ModuleInfo(Op.DROPOUT, Kind.STATEFUL, {"p": module.p}, step_mode)
        return ModuleInfo(Op.OPAQUE_MODULE, Kind.STATEFUL, {"type": name}, step_mode)
    for base_type, op, extract in _TORCH_RULES:
        if isinstance(module, base_type):
            return ModuleInfo(op, Kind.STATELESS, extract(module), step_mode)
    is_step = isinstance(module, step_module_types())
    sj = sj_modules()
    multi_only = False
    if sj is not None and isinstance(module, sj.base.MultiStepModule):
        multi_only = True
    if is_step:
        # A step-mode aware module with no rule: run it as a black box in its own mode.
        multi = multi_only or step_mode == "m" and "s" not in supported_step_modes(module)
        return _opaque_info(module, step_mode, multi)
    origin = type(module).__module__
    if origin.startswith("torch.nn") or origin.startswith("torch.ao.nn"):
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return None
        return ModuleInfo(
            Op.OPAQUE_MODULE, Kind.STATELESS, {"type": type(module).__name__, "torch_nn": True}
        )
    return None


# -- functions and methods -------------------------------------------------------------------------
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_CAT = {torch.cat, torch.concat}
_FLATTEN = {torch.flatten}
_RESHAPE = {torch.reshape}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, torch.dropout}
_ELEMENTWISE_FN = {
    F.relu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.leaky_relu,
    F.gelu,
    F.silu,
    operator.sub,
    operator.isub,
    operator.truediv,
    operator.neg,
    torch.sub,
    torch.div,
    torch.neg,
    torch.abs,
    torch.clamp,
    torch.exp,
    torch.sign,
}
_METHODS: dict[str, Op] = {
    "add": Op.ADD,
    "add_": Op.ADD,
    "mul": Op.MUL,
    "flatten": Op.FLATTEN,
    "view": Op.RESHAPE,
    "reshape": Op.RESHAPE,
    "relu": Op.ELEMENTWISE,
    "sigmoid": Op.ELEMENTWISE,
    "tanh": Op.ELEMENTWISE,
    "sub": Op.ELEMENTWISE,
    "div": Op.ELEMENTWISE,
    "neg": Op.ELEMENTWISE,
    "abs": Op.ELEMENTWISE,
    "clamp": Op.ELEMENTWISE,
}


def classify_call(target: Any, is_method: bool) -> Op:
    """The op of an fx ``call_function`` (``target`` callable) or ``call_method`` (name)."""
    if is_method:
        return _METHODS.get(target, Op.FUNCTION)
    try:
        if target in _ADD:
            return Op.ADD
        if target in _MUL:
            return Op.MUL
        if target in _CAT:
            return Op.CAT
        if target in _FLATTEN:
            return Op.FLATTEN
        if target in _RESHAPE:
            return Op.RESHAPE
        if target in _DROPOUT:
            return Op.DROPOUT
        if target in _ELEMENTWISE_FN:
            return Op.ELEMENTWISE
    except TypeError:  # unhashable callable
        return Op.OPAQUE_FUNCTION
    origin = getattr(target, "__module__", None) or ""
    if origin.startswith("torch") or origin in ("_operator", "operator", "builtins", "math"):
        return Op.FUNCTION
    return Op.OPAQUE_FUNCTION


# -- SpikingJelly neurons -> snncompile neurons --
def _convert_surrogate(sj_surrogate: nn.Module) -> nn.Module | None:
    import inspect

    from snncompile import surrogate as sc_surrogate

    name = type(sj_surrogate).__name__
    if type(sj_surrogate).__module__ != "spikingjelly.activation_based.surrogate":
        return None
    ours = getattr(sc_surrogate, name, None)
    if not isinstance(ours, type) or not issubclass(ours, nn.Module):
        return None
    kwargs: dict[str, Any] = {}
    for pname in inspect.signature(ours.__init__).parameters:
        if pname == "self":
            continue
        if not hasattr(sj_surrogate, pname):
            return None
        kwargs[pname] = getattr(sj_surrogate, pname)
    try:
        return ours(**kwargs)
    except (TypeError, ValueError):
        return None


def convert_spikingjelly_neuron(module: nn.Module) -> nn.Module | None:
    """A snncompile neuron equivalent to a SpikingJelly neuron, or ``None``.

    The equivalent is the snncompile class whose ``spikingjelly_name`` is the module's class name
    (IF, LIF, PLIF, QIF, EIF, Izhikevich, CUBA-LIF, ...). Its constructor arguments are read from
    the SpikingJelly module's attributes of the same names (SpikingJelly stores each argument
    under its own name), the surrogate is converted to snncompile's, and parameters of the same
    name are *shared* (PLIF's ``w``: training either model trains both). Neurons with a
    surrogate snncompile does not have, or ``store_v_seq=True``, are not converted (the caller
    then runs a copy of the original module).
    """
    import inspect

    ours = sj_equivalents().get(type(module))
    if ours is None or getattr(module, "store_v_seq", False):
        return None
    surrogate = _convert_surrogate(module.surrogate_function)
    if surrogate is None:
        return None
    kwargs: dict[str, Any] = {}
    for pname, p in inspect.signature(ours.__init__).parameters.items():
        if pname in ("self", "backend", "store_v_seq") or p.kind in (
            p.VAR_POSITIONAL,
            p.VAR_KEYWORD,
        ):
            continue
        if pname == "surrogate_function":
            kwargs[pname] = surrogate
        elif hasattr(module, pname):
            value = getattr(module, pname)
            if isinstance(value, torch.Tensor):
                continue
            is_int = isinstance(value, int) and not isinstance(value, bool)
            kwargs[pname] = float(value) if is_int else value
    try:
        new = ours(**kwargs)
    except (TypeError, ValueError):
        return None
    for pname, _ in list(new.named_parameters(recurse=False)):
        theirs = getattr(module, pname, None)
        if isinstance(theirs, nn.Parameter):
            setattr(new, pname, theirs)  # shared: training either model trains both
    new.train(module.training)
    return new
