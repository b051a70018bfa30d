r"""Per-layer activity of a spiking network: firing rates, synaptic operations, MACs and energy.

:func:`profile` runs a model (an eager SpikingJelly-style model, snncompile's or SpikingJelly
2.0.0's modules, or a module compiled by :func:`snncompile.optimize`) once on an input
``[T, N, ...]`` and returns a :class:`Profile`: one row per layer (eager) or per IR node
(compiled) with what it computed and how long it took. ``str(profile)`` is a table,
``profile.as_dict()`` the same numbers for code.

**What is counted** (totals over the whole input: all ``T`` steps and all ``N`` samples):

* *Neuron layers*: ``spikes`` = number of non-zero outputs; ``neurons`` = outputs per sample and
  step; ``firing_rate = spikes / (neurons * T * N)``.
* *Synapse layers* (``Conv1d/2d/3d``, ``Linear``): ``dense_macs`` = multiply-accumulates of the
  layer run densely, ``C_in/groups * prod(kernel) * numel(out)`` for a convolution and
  ``in_features * numel(out)`` for a linear layer. When the layer's input is binary (every
  element 0 or 1: spikes), it costs ``sops`` synaptic operations (accumulates), one per
  (input spike, weight) pair actually used: ``spikes x fan-out`` with the fan-out of each spike
  counted exactly (fewer at the borders of a padded convolution). A layer with a non-binary
  input (the first layer under direct encoding) costs ``macs = dense_macs`` MACs instead. These
  are the conventions of SpikingJelly's ``op_counter.SynOpCounter`` and ``MACCounter``; the
  test suite checks the numbers against them. Biases, pooling, batchnorm, additions and neuron
  updates are not counted (as in ``SynOpCounter``).
* *Energy* with the 45 nm figures SNN papers use (Horowitz, ISSCC 2014, 32-bit float):
  :data:`E_AC` = 0.9 pJ per accumulate and :data:`E_MAC` = 4.6 pJ per multiply-accumulate::

      E_SNN = E_AC * sum(sops) + E_MAC * sum(macs)            (the spiking network, T steps)
      E_ANN = E_MAC * sum(dense_macs) / T                     (the same layers as an ANN, 1 pass)

  Both are for the whole batch; :class:`Profile` also reports them per sample.
* *Time*: wall time per layer, summed over its calls. Layers are timed one by one (a
  compiled module runs node by node under :class:`torch.fx.Interpreter`), so the sum is a bit
  more than an uninterrupted forward; compare layers with each other, not with a benchmark.

On a compiled module the rows are the IR nodes that compute something (synapse and neuron ops);
a fused neuron's row counts its (possibly scaled) non-zero outputs as spikes. A fused
batchnorm -> neuron -> pooling chain (one kernel that never writes the neuron's spikes) runs its
ops separately under the profiler, so its row counts the neuron's own spikes and its time is
that of the separate ops.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["E_AC", "E_MAC", "LayerStats", "Profile", "profile"]

#: Energy of one accumulate (32-bit float add) at 45 nm, in picojoules.
E_AC = 0.9
#: Energy of one multiply-accumulate (32-bit float) at 45 nm, in picojoules.
E_MAC = 4.6

_CONVS: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}


@dataclasses.dataclass
class LayerStats:
    """The counts of one layer (eager) or one IR node (compiled); see the module docstring."""

    name: str
    op: str
    kind: str  # 'neuron', 'synapse' or 'other'
    shape: tuple[int, ...] = ()  # output shape of one sample at one step
    calls: int = 0
    seconds: float = 0.0
    outputs: int = 0  # output elements over the run
    spikes: int = 0
    input_binary: bool | None = None
    input_spikes: int = 0
    sops: int = 0
    macs: int = 0
    dense_macs: int = 0
    spike_record: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False)
    membrane_record: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False)

    @property
    def firing_rate(self) -> float:
        """Spikes per neuron and step (neuron layers; 0.0 for others)."""
        return self.spikes / self.outputs if self.outputs and self.kind == "neuron" else 0.0

    @property
    def fan_out(self) -> float:
        """Average synaptic operations per input spike (synapse layers with spike input)."""
        return self.sops / self.input_spikes if self.input_spikes else 0.0

    @property
    def energy_pj(self) -> float:
        """``E_AC * sops + E_MAC * macs`` in picojoules."""
        return E_AC * self.sops + E_MAC * self.macs


class Profile:
    """What :func:`profile` measured: rows per layer, totals, and the energy constants used.

    ``str(profile)`` (or :meth:`table`) is a text table; :meth:`as_dict` returns plain numbers.
    ``profile['name']`` is the :class:`LayerStats` of one row. With ``record=True``,
    :meth:`spikes` and :meth:`membrane` give a layer's recorded tensors for plotting
    (:mod:`snncompile.plot`).
    """

    def __init__(
        self, rows: list[LayerStats], *, T: int, N: int, source: str, seconds: float
    ) -> None:
        self.rows = rows
        self.T = T
        self.N = N
        self.source = source
        self.seconds = seconds

    def __getitem__(self, name: str) -> LayerStats:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"profile: no layer {name!r}; layers: {', '.join(self.names())}")

    def names(self, kind: str | None = None) -> list[str]:
        """The row names, in execution order (only ``kind`` rows if given)."""
        return [r.name for r in self.rows if kind is None or r.kind == kind]

    @property
    def neuron_layers(self) -> list[LayerStats]:
        """The rows of neuron layers, in execution order."""
        return [r for r in self.rows if r.kind == "neuron"]

    def totals(self) -> dict[str, float]:
        """Sums over all rows, the energy of the SNN and of its ANN equivalent, and ratios."""
        sops = sum(r.sops for r in self.rows)
        macs = sum(r.macs for r in self.rows)
        dense = sum(r.dense_macs for r in self.rows)
        spikes = sum(r.spikes for r in self.rows if r.kind == "neuron")
        neuron_outputs = sum(r.outputs for r in self.rows if r.kind == "neuron")
        e_snn = E_AC * sops + E_MAC * macs
        ann_macs = dense / self.T
        e_ann = E_MAC * ann_macs
        return {
            "spikes": spikes,
            "firing_rate": spikes / neuron_outputs if neuron_outputs else 0.0,
            "sops": sops,
            "macs": macs,
            "dense_macs": dense,
            "ann_macs": ann_macs,
            "energy_snn_pj": e_snn,
            "energy_ann_pj": e_ann,
            "energy_snn_pj_per_sample": e_snn / self.N,
            "energy_ann_pj_per_sample": e_ann / self.N,
            "energy_ratio_ann_over_snn": e_ann / e_snn if e_snn else math.inf,
            "seconds": sum(r.seconds for r in self.rows),
        }

    def as_dict(self) -> dict[str, Any]:
        """Everything as plain numbers: ``{'layers': {name: {...}}, 'totals': {...}, ...}``."""
        layers = {}
        for r in self.rows:
            layers[r.name] = {
                "op": r.op,
                "kind": r.kind,
                "shape": list(r.shape),
                "calls": r.calls,
                "time_ms": r.seconds * 1e3,
                "neurons": r.outputs // (self.T * self.N) if r.kind == "neuron" else 0,
                "spikes": r.spikes,
                "firing_rate": r.firing_rate,
                "input_binary": r.input_binary,
                "input_spikes": r.input_spikes,
                "fan_out": r.fan_out,
                "sops": r.sops,
                "macs": r.macs,
                "dense_macs": r.dense_macs,
                "energy_pj": r.energy_pj,
            }
        return {
            "source": self.source,
            "T": self.T,
            "N": self.N,
            "constants": {"E_AC_pj": E_AC, "E_MAC_pj": E_MAC, "node": "45 nm, 32-bit float"},
            "layers": layers,
            "totals": self.totals(),
        }

    def spikes(self, name: str) -> torch.Tensor:
        """The recorded output of neuron layer ``name`` as ``[T, N, *]`` (needs ``record=True``)."""
        row = self[name]
        if not row.spike_record:
            raise ValueError(
                f"profile: no spikes recorded for {name!r}; call snncompile.profile(..., "
                f"record=True) (neuron layers only)"
            )
        return _stack_steps(row.spike_record, self.T)

    def membrane(self, name: str) -> torch.Tensor:
        """The recorded membrane (after reset) of neuron layer ``name`` as ``[T, N, *]``.

        Needs ``record=True`` on an eager model whose neurons keep ``v`` (SpikingJelly-style).
        """
        row = self[name]
        if not row.membrane_record:
            raise ValueError(
                f"profile: no membrane recorded for {name!r}; it is recorded with record=True on "
                f"eager models (a compiled module's fused neurons do not keep per-step membranes)"
            )
        return _stack_steps(row.membrane_record, self.T)

    def table(self) -> str:
        """The text table: one line per layer, then the totals and the constants used."""
        head = ("layer", "op", "shape", "neurons", "spikes", "rate", "SOPs", "MACs",
                "dense MACs", "energy nJ", "ms")
        lines: list[tuple[str, ...]] = [head]
        for r in self.rows:
            neuron = r.kind == "neuron"
            synapse = r.kind == "synapse"
            lines.append(
                (
                    r.name,
                    r.op,
                    "x".join(str(s) for s in r.shape),
                    f"{r.outputs // (self.T * self.N):,}" if neuron else "",
                    f"{r.spikes:,}" if neuron else "",
                    f"{r.firing_rate:.3f}" if neuron else "",
                    f"{r.sops:,}" if synapse else "",
                    f"{r.macs:,}" if synapse else "",
                    f"{r.dense_macs:,}" if synapse else "",
                    f"{r.energy_pj / 1e3:.2f}" if synapse else "",
                    f"{r.seconds * 1e3:.2f}",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        left = {0, 1, 2}
        out = []
        for k, line in enumerate(lines):
            cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                     enumerate(zip(line, widths, strict=True))]
            out.append("  ".join(cells).rstrip())
            if k == 0:
                out.append("  ".join("-" * w for w in widths))
        t = self.totals()
        out.append("")
        out.append(
            f"{self.source}, T={self.T}, N={self.N}: {t['spikes']:,} spikes (mean rate "
            f"{t['firing_rate']:.3f}), {t['sops']:,} SOPs, {t['macs']:,} MACs; "
            f"ANN equivalent {t['ann_macs']:,.0f} MACs per pass"
        )
        out.append(
            f"energy per sample: SNN {t['energy_snn_pj_per_sample'] / 1e3:.2f} nJ, ANN "
            f"{t['energy_ann_pj_per_sample'] / 1e3:.2f} nJ (ANN/SNN "
            f"{t['energy_ratio_ann_over_snn']:.2f}x) with E_AC={E_AC} pJ, E_MAC={E_MAC} pJ "
            f"(45 nm)"
        )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<Profile {self.source}: {len(self.rows)} layers, T={self.T}, N={self.N}>"


def _stack_steps(records: list[torch.Tensor], T: int) -> torch.Tensor:
    """One ``[T, N, *]`` tensor from one multi-step record or ``T`` single-step ones."""
    if len(records) == 1:
        return records[0]
    if len(records) != T:
        raise ValueError(f"profile: expected 1 or {T} recorded steps, got {len(records)}")
    return torch.stack(records)


# ----------------------------------------------------------------------------- counting


def _is_binary(x: torch.Tensor) -> bool:
    if x.dtype == torch.bool:
        return True
    return bool(((x == 0) | (x == 1)).all())


def _synapse_kind(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    for cls, fn in _CONVS.items():
        if isinstance(module, cls):
            return fn
    return None


def _count_synapse(row: LayerStats, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """Add the MACs / SOPs of one call of ``module`` (a conv or linear layer) to ``row``."""
    with torch.no_grad():
        binary = _is_binary(x)
        row.input_binary = binary if row.input_binary is None else (row.input_binary and binary)
        if isinstance(module, nn.Linear):
            dense = module.in_features * out.numel()
            sops = int(torch.count_nonzero(x)) * module.out_features if binary else 0
        else:
            conv = _synapse_kind(module)
            assert conv is not None
            w = module.weight
            d = w.dim() - 2
            if x.dim() > d + 2:  # [T, N, C, ...] of a multi-step layer
                x = x.flatten(0, x.dim() - d - 2)
            groups = module.groups
            dense = (w.shape[1] * math.prod(w.shape[2:])) * out.numel()
            sops = 0
            if binary:
                padding: Any = module.padding
                xf = x.float()
                if module.padding_mode != "zeros":
                    pad = module._reversed_padding_repeated_twice
                    xf = F.pad(xf, pad, mode=module.padding_mode)
                    padding = 0
                ones = torch.ones((groups, w.shape[1], *w.shape[2:]), dtype=torch.float32,
                                  device=x.device)
                uses = conv(xf, ones, None, module.stride, padding, module.dilation, groups)
                sops = int(uses.sum(dtype=torch.float64).item()) * (w.shape[0] // groups)
        row.dense_macs += dense
        if binary:
            row.sops += sops
            row.input_spikes += int(torch.count_nonzero(x))
        else:
            row.macs += dense


def _count_neuron(
    row: LayerStats, out: torch.Tensor, membrane: torch.Tensor | None, record: bool
) -> None:
    with torch.no_grad():
        row.outputs += out.numel()
        row.spikes += int(torch.count_nonzero(out))
        if record:
            row.spike_record.append(out.detach().to("cpu", copy=True))
            if membrane is not None:
                row.membrane_record.append(membrane.detach().float().to("cpu", copy=True))


def _neuron_classes() -> tuple[type, ...]:
    from snncompile.neuron import BaseNode

    classes: list[type] = [BaseNode]
    sj = sys.modules.get("spikingjelly.activation_based.neuron")
    if sj is not None and hasattr(sj, "BaseNode"):
        classes.append(sj.BaseNode)
    return tuple(classes)


def _is_synapse(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _synapse_kind(module) is not None


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (tuple, list)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def _is_multi_step(model: nn.Module) -> bool:
    return any(getattr(m, "step_mode", "s") == "m" for m in model.modules())


# ----------------------------------------------------------------------------- eager


def _profile_eager(model: nn.Module, x: torch.Tensor, record: bool) -> list[LayerStats]:
    neuron_types = _neuron_classes()
    rows: dict[str, LayerStats] = {}
    handles = []
    starts: dict[str, float] = {}
    saved_store: list[tuple[nn.Module, bool]] = []
    inside_neuron: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, neuron_types):
            inside_neuron.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    for name, module in model.named_modules():
        if name in inside_neuron or name == "" and len(list(model.children())):
            continue
        is_neuron = isinstance(module, neuron_types)
        if not is_neuron and next(module.children(), None) is not None:
            continue  # a container: its leaves are rows
        kind = "neuron" if is_neuron else ("synapse" if _is_synapse(module) else "other")
        rows[name or type(module).__name__] = LayerStats(
            name=name or type(module).__name__, op=type(module).__name__, kind=kind
        )
        if is_neuron and record and getattr(module, "step_mode", "s") == "m":
            if hasattr(module, "store_v_seq"):
                saved_store.append((module, module.store_v_seq))
                module.store_v_seq = True

        def pre(mod: nn.Module, args: Any, key: str = name or type(module).__name__) -> None:
            starts[key] = time.perf_counter()

        def post(
            mod: nn.Module, args: Any, out: Any, key: str = name or type(module).__name__
        ) -> None:
            row = rows[key]
            row.seconds += time.perf_counter() - starts.pop(key, time.perf_counter())
            row.calls += 1
            y = _first_tensor((out,))
            if y is None:
                return
            if not row.shape:
                multi = getattr(mod, "step_mode", "s") == "m"
                row.shape = tuple(y.shape[2:] if multi and y.dim() >= 2 else y.shape[1:])
            if row.kind == "neuron":
                membrane = None
                if record:
                    if getattr(mod, "step_mode", "s") == "m":
                        membrane = getattr(mod, "v_seq", None)
                    else:
                        v = getattr(mod, "v", None)
                        membrane = v if isinstance(v, torch.Tensor) else None
                _count_neuron(row, y, membrane, record)
            elif row.kind == "synapse":
                inp = _first_tensor(args)
                if inp is not None:
                    _count_synapse(row, mod, inp, y)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    from snncompile.functional import reset_net

    try:
        reset_net(model)
        with torch.no_grad():
            if _is_multi_step(model):
                model(x)
            else:
                for x_t in x.unbind(0):
                    model(x_t)
    finally:
        for h in handles:
            h.remove()
        for module, flag in saved_store:
            module.store_v_seq = flag
        reset_net(model)
    return [r for r in rows.values() if r.calls]


# ----------------------------------------------------------------------------- compiled


class _NodeProfiler(fx.Interpreter):
    """Runs a compiled module's ``fx.GraphModule`` node by node, timing and counting each."""

    def __init__(self, gm: fx.GraphModule, graph: Any, record: bool) -> None:
        super().__init__(gm)
        from snncompile.ir.ops import OpGroup

        self.ir = {n.name: n for n in graph.nodes}
        self.group = OpGroup
        self.record = record
        self.rows: dict[str, LayerStats] = {}

    def run_node(self, n: fx.Node) -> Any:
        from snncompile.passes.fuse_chains import CHAIN_ATTR
        from snncompile.runtime.fused_chain import FusedChain

        chain = self.fetch_attr(n.target) if n.op == "call_module" else None
        spikes: torch.Tensor | None = None
        start = time.perf_counter()
        if isinstance(chain, FusedChain):
            # A fused batchnorm -> neuron -> pooling chain returns the pooled spikes: run its
            # ops separately so the neuron's own spikes can be counted.
            args, _ = self.fetch_args_kwargs_from_env(n)
            result, spikes = chain.unfused_with_spikes(*args)
        else:
            result = super().run_node(n)
        seconds = time.perf_counter() - start
        ir_name = n.meta.get("snn_node")
        ir_node = self.ir.get(ir_name) if ir_name is not None else None
        if ir_node is None or ir_node.op.group not in (self.group.SYNAPSE, self.group.NEURON):
            return result
        row = self.rows.get(ir_name)
        if row is None:
            kind = "neuron" if ir_node.op.group is self.group.NEURON else "other"
            module = self.fetch_attr(n.target) if n.op == "call_module" else None
            inner = getattr(module, "module", None)
            if module is not None and not _is_synapse(module) and isinstance(inner, nn.Module):
                module = inner  # a per-step loop around the layer
            if module is not None and _is_synapse(module):
                kind = "synapse"
            row = self.rows[ir_name] = LayerStats(name=ir_name, op=ir_node.op.label, kind=kind)
            row._module = module  # type: ignore[attr-defined]
        row.seconds += seconds
        row.calls += 1
        y = spikes if spikes is not None else _first_tensor((result,))
        if y is None:
            return result
        # A fused chain's node has the pooled shape; its record keeps the neuron's own.
        shape = ir_node.attrs.get(CHAIN_ATTR, {}).get("shape", ir_node.shape)
        if not row.shape and shape:
            row.shape = tuple(shape[2:] if ir_node.layout.name == "SEQ" else shape[1:])
        if row.kind == "neuron":
            _count_neuron(row, y, None, self.record)
        elif row.kind == "synapse":
            inp = _first_tensor(self.map_nodes_to_values(n.args, n))
            if inp is not None:
                _count_synapse(row, row._module, inp, y)  # type: ignore[attr-defined]
        return result


def _profile_compiled(compiled: Any, x: torch.Tensor, record: bool) -> list[LayerStats]:
    from snncompile.functional import reset_net

    reset_net(compiled)
    try:
        with torch.no_grad():
            runner = _NodeProfiler(compiled.gm, compiled.graph, record)
            runner.run(x)
    finally:
        reset_net(compiled)
    return list(runner.rows.values())


# ----------------------------------------------------------------------------- entry point


def profile(model_or_compiled: nn.Module, x: torch.Tensor, *, record: bool = False) -> Profile:
    """Run ``model_or_compiled`` once on ``x`` and count spikes, SOPs, MACs, energy and time.

    Args:
        model_or_compiled: An eager SNN (snncompile's or SpikingJelly 2.0.0's modules,
            single-step or multi-step) or a module returned by :func:`snncompile.optimize`.
            Its state is reset before and after the run (``functional.reset_net``); parameters
            are not changed and no gradients are recorded. It runs in its current mode: in
            ``train()`` mode BatchNorm updates its running statistics as in any forward, so
            profile in ``eval()`` mode unless that is what you want.
        x: The input, ``[T, N, ...]``. A single-step model is called once per step on
            ``x[t]``; a multi-step model (any submodule with ``step_mode='m'``) and a compiled
            module get the whole sequence.
        record: Also keep every neuron layer's output (and, on eager models, its membrane after
            reset) for :meth:`Profile.spikes`, :meth:`Profile.membrane` and the plots in
            :mod:`snncompile.plot`.

    Returns:
        A :class:`Profile`; ``print(p)`` shows the table, ``p.as_dict()`` gives the numbers.

    Raises:
        TypeError: ``model_or_compiled`` is not an ``nn.Module`` or ``x`` not a tensor.
        ValueError: ``x`` has fewer than two dimensions (it must be ``[T, N, ...]``).
    """
    from snncompile.runtime.compiled import CompiledModule

    if not isinstance(model_or_compiled, nn.Module):
        raise TypeError(
            f"profile: expected an nn.Module or a compiled module, got "
            f"{type(model_or_compiled).__name__}"
        )
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"profile: x must be a [T, N, ...] tensor, got {shape}")
    T, N = int(x.shape[0]), int(x.shape[1])
    start = time.perf_counter()
    if isinstance(model_or_compiled, CompiledModule):
        rows = _profile_compiled(model_or_compiled, x, record)
        source = f"compiled ({model_or_compiled.mode}, backend={model_or_compiled.backend})"
    else:
        rows = _profile_eager(model_or_compiled, x, record)
        mode = "multi-step" if _is_multi_step(model_or_compiled) else "single-step"
        source = f"eager {type(model_or_compiled).__name__} ({mode})"
    return Profile(rows, T=T, N=N, source=source, seconds=time.perf_counter() - start)
