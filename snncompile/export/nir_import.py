"""NIR import: ``nir.NIRGraph`` (or a NIR file) -> a multi-step snncompile model
(:func:`import_nir`).

Each NIR node becomes a snncompile module (fields validated as the modules validate their
arguments), wired into an ``fx.GraphModule`` in topological order of the graph's strongly
connected components (``networkx.condensation``). A component with a cycle becomes a
:class:`snncompile.nir_modules.RecurrentBlock`: edges leaving a neuron inside the cycle
carry its output of the previous step; a cycle without a neuron is refused.
"""

from __future__ import annotations

import keyword
import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import fx, nn

from snncompile.export.nir_format import (
    DEFAULT_DT,
    RESET_KEY,
    RTOL,
    SURROGATE_KEY,
    V_INIT_KEY,
    NIRImportError,
    check_dt,
    require_nir,
)
from snncompile.export.nir_read import DEFAULT_MAX_BYTES, read_nir_file

# Module attribute names a NIR node name must not take (fx.GraphModule's and nn.Module's own).
_RESERVED_NAMES = frozenset(dir(fx.GraphModule)) | frozenset(vars(nn.Module())) | {"self"}
_NEURON_TYPES = ("IF", "LIF", "LI", "I", "CubaLIF", "CubaLI")


def _arr(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _uniform(value: Any) -> float | None:
    """The single value of an array whose entries are all equal, else ``None``."""
    a = _arr(value)
    if a.size == 0:
        return None
    first = float(a.reshape(-1)[0])
    return first if bool(np.all(a == first)) else None


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= RTOL * max(abs(a), abs(b))


def _snap_one(x: np.ndarray) -> np.ndarray:
    """Entries within :data:`RTOL` of 1 become exactly 1 (a gain of 1 stored in float32)."""
    x = np.array(x, dtype=np.float64)
    x[np.abs(x - 1.0) <= RTOL] = 1.0
    return x


def _tidy(x: float) -> float:
    """``x`` rounded to 12 significant digits when that moves it by at most a few ulps."""
    y = float(f"{x:.12g}")
    return y if abs(y - x) <= 8 * np.spacing(abs(x)) else x


def _meta(node: Any) -> dict[str, Any]:
    md = getattr(node, "metadata", None) or {}
    out: dict[str, Any] = {}
    for k, v in md.items():
        if isinstance(v, bytes):
            v = v.decode("utf8")
        elif isinstance(v, np.ndarray) and v.shape == ():
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        out[str(k)] = v
    return out


class _Importer:
    """Maps NIR nodes to modules and wires them into an ``fx.GraphModule``.

    Every parameter field is validated the way snncompile's modules validate their arguments
    (finite values, a per-step retention ``beta = 1 - dt / tau`` in ``(0, 1)``, matching
    shapes), and every error names the NIR node and the field.
    """

    def __init__(self, graph: Any, dt: float, integrator: str) -> None:
        self.nir = require_nir()
        self.graph = graph
        self.dt = dt
        self.integrator = integrator

    def fail(self, name: str, node: Any, why: str) -> NIRImportError:
        return NIRImportError(f"import_nir: NIR node {name!r} ({type(node).__name__}): {why}")

    # -- validated field access --
    def field(self, name: str, node: Any, fld: str, *, finite: bool = True) -> np.ndarray:
        """Field ``fld`` of the node as a float64 array, checked to be numeric and finite."""
        value = getattr(node, fld, None)
        if value is None:
            raise self.fail(name, node, f"field {fld!r} is missing")
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise self.fail(name, node, f"field {fld!r} is not numeric ({err})") from err
        if finite and a.size and not bool(np.all(np.isfinite(a))):
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            at = f" at index {idx}" if a.ndim else ""
            raise self.fail(
                name,
                node,
                f"field {fld!r} has the non-finite value {float(a[idx])!r}{at}; snncompile's "
                "modules need finite parameters (as SpikingJelly's neurons do)",
            )
        return a

    def retention(self, name: str, node: Any, fld: str) -> np.ndarray:
        """``beta = 1 - dt / tau`` of time-constant field ``fld``, checked to lie in ``(0, 1)``."""
        tau = self.field(name, node, fld)
        bad = ~(tau > self.dt)
        if bool(np.any(bad)):
            idx = tuple(int(i) for i in np.argwhere(bad)[0]) if tau.ndim else ()
            t = float(tau[idx])
            beta = 1.0 - self.dt / t if t != 0 else -math.inf
            at = f" at index {idx}" if tau.ndim else ""
            raise self.fail(
                name,
                node,
                f"field {fld!r} = {t!r} s{at} with dt = {self.dt} s gives a per-step retention "
                f"beta = 1 - dt/{fld} = {beta:.6g}, outside (0, 1); snncompile's neurons need "
                f"{fld} > dt (SpikingJelly: tau > 1 step). Pass a smaller dt, or fix {fld}.",
            )
        return 1.0 - self.dt / tau

    def meta_float(self, name: str, node: Any, key: str, default: float | None = None) -> float:
        """Metadata ``key`` as a finite float (``default`` when absent; absent and no default:
        an error naming the key)."""
        md = _meta(node)
        if key not in md:
            if default is None:
                raise self.fail(
                    name,
                    node,
                    f"metadata {key!r} is missing (its 'snncompile.neuron' metadata needs it); "
                    "drop the 'snncompile.*' metadata to import the NIR fields as they are",
                )
            return default
        value = md[key]
        try:
            out = float(value)
        except (TypeError, ValueError) as err:
            raise self.fail(name, node, f"metadata {key!r}={value!r} is not a number") from err
        if not math.isfinite(out):
            raise self.fail(name, node, f"metadata {key!r}={value!r} is not finite")
        return out

    def meta_flag(self, name: str, node: Any, key: str, default: bool) -> bool:
        value = self.meta_float(name, node, key, float(default))
        if value not in (0.0, 1.0):
            raise self.fail(name, node, f"metadata {key!r}={value!r} must be 0 or 1")
        return bool(value)

    # -- neurons --
    def _reset(self, name: str, node: Any) -> str:
        mode = _meta(node).get(RESET_KEY, "hard")
        if mode not in ("hard", "zero", "subtract"):
            raise self.fail(
                name, node, f"metadata {RESET_KEY}={mode!r} is unknown (use 'hard' or 'subtract')"
            )
        return "subtract" if mode == "subtract" else "hard"

    def _surrogate(self, name: str, node: Any) -> nn.Module | None:
        """The surrogate recorded in our metadata (``snncompile.surrogate`` and its parameters
        ``snncompile.surrogate_<param>``), or ``None`` (the module's default) without it."""
        from snncompile import surrogate

        md = _meta(node)
        param_keys = sorted(k for k in md if k.startswith(SURROGATE_KEY + "_"))
        if SURROGATE_KEY not in md:
            if param_keys:
                raise self.fail(name, node, f"metadata {param_keys[0]!r} without {SURROGATE_KEY!r}")
            return None
        sg_name = str(md[SURROGATE_KEY])
        cls = surrogate.SURROGATES.get(sg_name)
        if cls is None:
            raise self.fail(
                name,
                node,
                f"metadata {SURROGATE_KEY!r}={sg_name!r} is not a snncompile surrogate "
                f"({', '.join(surrogate.SURROGATES)}); remove the key to use the default "
                "Sigmoid(alpha=4)",
            )
        kwargs: dict[str, float] = {}
        for key in param_keys:
            pname = key[len(SURROGATE_KEY) + 1 :]
            if pname not in cls.param_names:
                raise self.fail(
                    name,
                    node,
                    f"metadata {key!r}: {sg_name} has no parameter {pname!r} (its parameters: "
                    f"{', '.join(cls.param_names)})",
                )
            kwargs[pname] = self.meta_float(name, node, key)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            keys = ", ".join(repr(k) for k in param_keys) or repr(SURROGATE_KEY)
            raise self.fail(name, node, f"metadata {keys}: {err}") from err

    def _sj_kwargs(
        self, name: str, node: Any, soft: bool, thr: float, v_reset: float
    ) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            v_threshold=thr,
            v_reset=None if soft else v_reset,
            detach_reset=self.meta_flag(name, node, "snncompile.detach_reset", False),
            step_mode="m",
        )
        sg = self._surrogate(name, node)
        if sg is not None:
            kw["surrogate_function"] = sg
        return kw

    def _spiking_fields(self, name: str, node: Any, soft: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(v_threshold, v_reset)``, finite; a soft reset needs ``v_reset == 0``."""
        thr = self.field(name, node, "v_threshold")
        v_reset = self.field(name, node, "v_reset")
        if soft and np.any(v_reset != 0.0):
            raise self.fail(
                name, node, "soft reset (metadata 'subtract') with a nonzero v_reset field"
            )
        return thr, v_reset

    def map_if(self, name: str, node: Any) -> nn.Module:
        from snncompile import neuron
        from snncompile.nir_modules import NIRNeuron

        soft = self._reset(name, node) == "subtract"
        thr_a, v_reset_a = self._spiking_fields(name, node, soft)
        r = self.field(name, node, "r")
        ours = _meta(node).get("snncompile.neuron") == "if"
        gain = _snap_one(r * self.dt if (self.integrator == "euler" or ours) else r)
        thr, v_r = _uniform(thr_a), _uniform(v_reset_a)
        if V_INIT_KEY in _meta(node):
            v_init = self.meta_float(name, node, V_INIT_KEY)
            return self._half_threshold_if(name, node, soft, gain, thr, v_init)
        if _uniform(gain) == 1.0 and thr is not None and v_r is not None:
            return neuron.IFNode(**self._sj_kwargs(name, node, soft, thr, v_r))
        return NIRNeuron(
            beta=1.0,
            gain=gain,
            v_leak=0.0,
            v_threshold=thr_a,
            v_reset=None if soft else v_reset_a,
            surrogate_function=self._surrogate(name, node),
        )

    def _half_threshold_if(
        self, name: str, node: Any, soft: bool, gain: np.ndarray, thr: float | None, v_init: float
    ) -> nn.Module:
        """ann2snn's IF neuron that starts at half threshold (metadata ``snncompile.v_init``)."""
        from snncompile.ann2snn.modules import HalfThresholdIFNode

        if not (soft and thr is not None and _uniform(gain) == 1.0 and v_init == 0.5 * thr):
            raise self.fail(
                name,
                node,
                f"metadata {V_INIT_KEY}={v_init} is only understood for soft-reset IF neurons "
                "with gain 1 and v_init = v_threshold / 2 (ann2snn's half-threshold neurons); "
                "remove the key to start at v_reset",
            )
        return HalfThresholdIFNode(v_threshold=thr, step_mode="m")

    def _ours_lif(self, name: str, node: Any, soft: bool) -> nn.Module | None:
        """The exact snncompile neuron recorded in our metadata (checked against the fields)."""
        from snncompile import neuron

        md = _meta(node)
        kind = md.get("snncompile.neuron")
        if kind not in ("lif", "plif"):
            return None
        tau_sj = self.meta_float(name, node, "snncompile.tau")
        decay_input = self.meta_flag(name, node, "snncompile.decay_input", True)
        tau, r = _uniform(node.tau), _uniform(node.r)
        thr, v_r, v_leak = _uniform(node.v_threshold), _uniform(node.v_reset), _uniform(node.v_leak)
        ok = (
            None not in (tau, r, thr, v_r, v_leak)
            and _close(tau / self.dt, tau_sj)
            and _close(r, 1.0 if decay_input else tau_sj)
            and v_leak == (0.0 if soft else v_r)
        )
        if not ok:
            raise self.fail(
                name,
                node,
                "its snncompile metadata does not match its LIF fields (edited after export, or "
                f"imported with a different dt than the export's {self.dt}?); pass the export's "
                "dt or drop the 'snncompile.neuron' metadata to import the fields as they are",
            )
        kw = self._sj_kwargs(name, node, soft, thr, v_r)
        if kind == "plif":
            w = self.meta_float(name, node, "snncompile.plif_w")
            m = neuron.ParametricLIFNode(init_tau=2.0, decay_input=decay_input, **kw)
            with torch.no_grad():
                m.w.fill_(w)
            return m
        if not tau_sj > 1.0:
            raise self.fail(
                name, node, f"metadata 'snncompile.tau'={tau_sj!r}: LIFNode needs tau > 1 step"
            )
        return neuron.LIFNode(tau=tau_sj, decay_input=decay_input, **kw)

    def map_lif(self, name: str, node: Any) -> nn.Module:
        from snncompile import neuron

        soft = self._reset(name, node) == "subtract"
        thr_a, v_reset_a = self._spiking_fields(name, node, soft)
        self.retention(name, node, "tau")
        tau, r, v_leak = (self.field(name, node, f) for f in ("tau", "r", "v_leak"))
        ours = self._ours_lif(name, node, soft)
        if ours is not None:
            return ours
        ut, ur, ul = _uniform(tau), _uniform(r), _uniform(v_leak)
        thr, v_r = _uniform(thr_a), _uniform(v_reset_a)
        if None not in (ut, ur, ul, thr, v_r) and ut / self.dt > 1.0:
            tau_sj = _tidy(ut / self.dt)
            leak_ok = ul == (0.0 if soft else v_r)
            for decay_input, want in ((True, 1.0), (False, ut / self.dt)):
                if leak_ok and _close(ur, want) and tau_sj > 1.0:
                    kw = self._sj_kwargs(name, node, soft, thr, v_r)
                    return neuron.LIFNode(tau=tau_sj, decay_input=decay_input, **kw)
        return self._general(name, node, spiking=True, soft=soft)

    def _general(self, name: str, node: Any, spiking: bool, soft: bool) -> nn.Module:
        from snncompile.nir_modules import NIRNeuron

        beta = self.retention(name, node, "tau")
        ratio = self.dt / self.field(name, node, "tau")
        r, v_leak = self.field(name, node, "r"), self.field(name, node, "v_leak")
        thr = self.field(name, node, "v_threshold") if spiking else None
        v_reset = self.field(name, node, "v_reset") if spiking and not soft else None
        return NIRNeuron(
            beta=beta,
            gain=_snap_one(r * ratio),
            v_leak=v_leak,
            v_threshold=thr,
            v_reset=v_reset,
            surrogate_function=self._surrogate(name, node) if spiking else None,
        )

    def map_li(self, name: str, node: Any) -> nn.Module:
        return self._general(name, node, spiking=False, soft=False)

    def map_i(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import NIRNeuron

        r = self.field(name, node, "r")
        gain = _snap_one(r * self.dt if self.integrator == "euler" else r)
        return NIRNeuron(beta=1.0, gain=gain, v_leak=0.0, v_threshold=None)

    def map_cuba(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import NIRCubaNeuron

        spiking = hasattr(node, "v_threshold")
        soft = spiking and self._reset(name, node) == "subtract"
        thr = v_reset = None
        if spiking:
            thr, v_reset = self._spiking_fields(name, node, soft)
        alpha = self.retention(name, node, "tau_syn")
        beta = self.retention(name, node, "tau_mem")
        tau_syn, tau_mem = self.field(name, node, "tau_syn"), self.field(name, node, "tau_mem")
        return NIRCubaNeuron(
            alpha=alpha,
            syn_gain=_snap_one(self.field(name, node, "w_in") * self.dt / tau_syn),
            beta=beta,
            gain=_snap_one(self.field(name, node, "r") * self.dt / tau_mem),
            v_leak=self.field(name, node, "v_leak"),
            v_threshold=thr,
            v_reset=None if soft else v_reset,
            surrogate_function=self._surrogate(name, node) if spiking else None,
        )

    # -- synapses --
    def weight(self, name: str, node: Any, fld: str = "weight") -> torch.Tensor:
        return torch.as_tensor(self.field(name, node, fld).astype(np.float32))

    def bias(self, name: str, node: Any, out_features: int) -> torch.Tensor:
        b = self.weight(name, node, "bias").reshape(-1)
        if b.numel() != out_features:
            raise self.fail(
                name,
                node,
                f"field 'bias' has {b.numel()} entries, but the weight has {out_features} outputs",
            )
        return b

    def ints(self, name: str, node: Any, fld: str, n: int, low: int) -> Any:
        """Integer field ``fld`` (one value or ``n``), each ``>= low``."""
        a = self.field(name, node, fld).reshape(-1)
        if a.size not in (1, n) or not bool(np.all(a == np.round(a))) or bool(np.any(a < low)):
            raise self.fail(
                name,
                node,
                f"field {fld!r} = {a.tolist()} must be 1 or {n} integers >= {low}",
            )
        return _ints(a.astype(np.int64), n)

    def map_affine(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        w = self.weight(name, node)
        if w.dim() != 2:
            raise self.fail(
                name, node, f"field 'weight' must be 2-d [out, in], got shape {tuple(w.shape)}"
            )
        has_bias = hasattr(node, "bias")
        bias = self.bias(name, node, int(w.shape[0])) if has_bias else None
        m = layer.Linear(w.shape[1], w.shape[0], bias=has_bias, step_mode="m")
        with torch.no_grad():
            m.weight.copy_(w)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def map_conv(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        w = self.weight(name, node)
        if w.dim() not in (3, 4) or 0 in w.shape:
            raise self.fail(
                name,
                node,
                f"field 'weight' must be [out, in/groups, *kernel] with 1 or 2 kernel dims, got "
                f"shape {tuple(w.shape)}",
            )
        two_d = w.dim() == 4
        cls = layer.Conv2d if two_d else layer.Conv1d
        nd = 2 if two_d else 1
        pad = node.padding
        if isinstance(pad, (str, bytes, np.str_)):
            pad = pad.decode("utf8", "replace") if isinstance(pad, bytes) else str(pad)
            if pad not in ("same", "valid"):
                raise self.fail(name, node, f"padding {pad!r} is not 'same', 'valid' or integers")
        else:
            pad = self.ints(name, node, "padding", nd, 0)
        groups = int(self.ints(name, node, "groups", 1, 1))
        if int(w.shape[0]) % groups:
            raise self.fail(
                name, node, f"field 'groups' = {groups} does not divide the {w.shape[0]} outputs"
            )
        bias = self.bias(name, node, int(w.shape[0]))
        m = cls(
            int(w.shape[1]) * groups,
            int(w.shape[0]),
            tuple(int(k) for k in w.shape[2:]),
            stride=self.ints(name, node, "stride", nd, 1),
            padding=pad,
            dilation=self.ints(name, node, "dilation", nd, 1),
            groups=groups,
            bias=True,
            step_mode="m",
        )
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(bias)
        return m

    def map_pool(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        divisor = 1 if type(node).__name__ == "SumPool2d" else None
        kernel = self.ints(name, node, "kernel_size", 2, 1)
        padding = self.ints(name, node, "padding", 2, 0)
        if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
            raise self.fail(
                name, node, f"field 'padding' {padding} is more than half the kernel {kernel}"
            )
        return layer.AvgPool2d(
            kernel,
            stride=self.ints(name, node, "stride", 2, 1),
            padding=padding,
            divisor_override=divisor,
            step_mode="m",
        )

    def map_flatten(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        start = int(self.ints(name, node, "start_dim", 1, -(2**31)))
        end = int(self.ints(name, node, "end_dim", 1, -(2**31)))
        return layer.Flatten(
            start + 1 if start >= 0 else start, end + 1 if end >= 0 else end, step_mode="m"
        )

    def map_scale(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import Scale

        return Scale(self.field(name, node, "scale"))

    def map_threshold(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import Threshold

        return Threshold(self.field(name, node, "threshold"))

    def module_for(self, name: str, node: Any) -> nn.Module:
        table: dict[str, Callable[[str, Any], nn.Module]] = {
            "Affine": self.map_affine,
            "Linear": self.map_affine,
            "Conv1d": self.map_conv,
            "Conv2d": self.map_conv,
            "SumPool2d": self.map_pool,
            "AvgPool2d": self.map_pool,
            "Flatten": self.map_flatten,
            "IF": self.map_if,
            "LIF": self.map_lif,
            "LI": self.map_li,
            "I": self.map_i,
            "CubaLIF": self.map_cuba,
            "CubaLI": self.map_cuba,
            "Scale": self.map_scale,
            "Threshold": self.map_threshold,
        }
        kind = type(node).__name__
        fn = table.get(kind)
        if fn is None:
            raise self.fail(
                name,
                node,
                "has no snncompile equivalent. Supported: Input, Output, "
                + ", ".join(table)
                + ". Replace it in the source model (nested NIRGraph subgraphs: flatten them "
                "first; Delay: not supported).",
            )
        try:
            return fn(name, node)
        except NIRImportError:
            raise
        except (ValueError, TypeError, RuntimeError, IndexError, KeyError, AttributeError) as err:
            # A module refused a value the checks above did not anticipate: still name the node.
            raise self.fail(name, node, f"{type(err).__name__}: {err}") from err

    # -- wiring --
    def build(self) -> fx.GraphModule:
        from snncompile.nir_modules import RecurrentBlock

        g = self.graph
        names = list(g.nodes)
        preds: dict[str, list[str]] = {n: [] for n in names}
        succs: dict[str, list[str]] = {n: [] for n in names}
        for a, b in g.edges:
            if a not in preds or b not in preds:
                raise NIRImportError(f"import_nir: edge ({a!r}, {b!r}) names a missing node")
            preds[b].append(a)
            succs[a].append(b)
        inputs = [n for n in names if type(g.nodes[n]).__name__ == "Input"]
        outputs = [n for n in names if type(g.nodes[n]).__name__ == "Output"]
        if not inputs or not outputs:
            raise NIRImportError("import_nir: the graph needs at least one Input and one Output")
        comps = _components(names, list(g.edges))
        root = nn.Module()
        fxg = fx.Graph()
        values: dict[str, fx.Node] = {}
        used: set[str] = set()

        def attr_name(base: str) -> str:
            # An ASCII identifier that is no attribute of nn.Module / fx.GraphModule (a node
            # called 'forward', 'graph' or 'training' must not shadow them) and not yet used.
            key = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in base)
            key = key or "node"
            if key[0].isdigit() or keyword.iskeyword(key) or key in _RESERVED_NAMES:
                key = "n_" + key
            while key in used or key in _RESERVED_NAMES:
                key += "_"
            used.add(key)
            return key

        def summed(srcs: list[str]) -> fx.Node:
            total = values[srcs[0]]
            for s in srcs[1:]:
                total = fxg.call_function(operator.add, (total, values[s]))
            return total

        for n in inputs:
            values[n] = fxg.placeholder(attr_name(n))
        for comp in comps:
            first = comp[0]
            node = g.nodes[first]
            kind = type(node).__name__
            cyclic = len(comp) > 1 or first in succs[first]
            if not cyclic:
                if kind == "Input":
                    continue
                if not preds[first]:
                    raise self.fail(first, node, "has no incoming edge")
                if kind == "Output":
                    values[first] = summed(preds[first])
                    continue
                key = attr_name(first)
                root.add_module(key, self.module_for(first, node))
                values[first] = fxg.call_module(key, (summed(preds[first]),))
                continue
            members = set(comp)
            for n in comp:
                if type(g.nodes[n]).__name__ in ("Input", "Output"):
                    raise self.fail(n, g.nodes[n], "Input/Output nodes cannot be part of a cycle")
            delayed = {
                (a, b)
                for b in comp
                for a in preds[b]
                if a in members and type(g.nodes[a]).__name__ in _NEURON_TYPES
            }
            order = _toposort_within(comp, preds, members, delayed)
            if order is None:
                raise NIRImportError(
                    "import_nir: the cycle through nodes "
                    + ", ".join(repr(c) for c in sorted(comp))
                    + " contains no neuron, so it is an algebraic loop without a state to delay; "
                    "NIR gives it no meaning. Put a neuron in the loop."
                )
            cells = []
            for n in order:
                cell = self.module_for(n, g.nodes[n])
                for sub in cell.modules():
                    if hasattr(sub, "step_mode") and "s" in getattr(
                        sub, "supported_step_mode", ("s",)
                    ):
                        sub.step_mode = "s"
                cells.append((n, cell))
            sources = {b: [(a, (a, b) in delayed) for a in preds[b] if a in members] for b in comp}
            ext_args: list[fx.Node] = []
            entries: list[str] = []
            for b in order:
                outside = [a for a in preds[b] if a not in members]
                if outside:
                    ext_args.append(summed(outside))
                    entries.append(b)
            if not entries:
                raise NIRImportError(
                    f"import_nir: the cycle through {sorted(comp)} receives no input from the rest "
                    "of the graph"
                )
            outs = [n for n in order if any(s not in members for s in succs[n])]
            shapes = {}
            for a, _ in delayed:
                out_t = g.nodes[a].output_type.get("output")
                if out_t is None:
                    raise self.fail(a, g.nodes[a], "needs a known output shape inside a cycle")
                shapes[a] = tuple(int(d) for d in np.asarray(out_t).reshape(-1))
            block = RecurrentBlock(cells, sources, entries, outs, shapes, step_mode="m")
            key = attr_name("recurrent_" + "_".join(order))
            root.add_module(key, block)
            res = fxg.call_module(key, tuple(ext_args))
            if len(outs) == 1:
                values[outs[0]] = res
            else:
                for i, n in enumerate(outs):
                    values[n] = fxg.call_function(operator.getitem, (res, i))
        result = [values[n] for n in outputs]
        fxg.output(result[0] if len(result) == 1 else tuple(result))
        gm = fx.GraphModule(root, fxg, class_name="NIRImported")
        gm.meta_nir = {"dt": self.dt, "inputs": inputs, "outputs": outputs}  # type: ignore[attr-defined]
        return gm


def _ints(value: Any, n: int) -> Any:
    a = np.asarray(value).reshape(-1)
    vals = tuple(int(v) for v in a)
    if len(vals) == 1:
        vals = vals * n
    return vals[0] if n == 1 else vals


def _components(names: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components in topological order (each in the graph's node order).

    Among components that are ready at the same time, the one whose first node comes first in
    ``names`` goes first, so the order is deterministic.
    """
    position = {n: k for k, n in enumerate(names)}
    g = nx.DiGraph()
    g.add_nodes_from(names)
    g.add_edges_from(edges)
    cond = nx.condensation(g)
    members = {c: sorted(cond.nodes[c]["members"], key=position.__getitem__) for c in cond}
    order = nx.lexicographical_topological_sort(cond, key=lambda c: position[members[c][0]])
    return [members[c] for c in order]


def _toposort_within(
    comp: list[str],
    preds: dict[str, list[str]],
    members: set[str],
    delayed: set[tuple[str, str]],
) -> list[str] | None:
    """Order the members along the non-delayed edges, or ``None`` if those still form a cycle."""
    position = {n: k for k, n in enumerate(comp)}
    g = nx.DiGraph()
    g.add_nodes_from(comp)
    g.add_edges_from(
        (a, b) for b in comp for a in preds[b] if a in members and (a, b) not in delayed
    )
    try:
        return list(nx.lexicographical_topological_sort(g, key=position.__getitem__))
    except nx.NetworkXUnfeasible:
        return None


def import_nir(
    graph_or_path: Any,
    *,
    dt: float | None = None,
    integrator: str = "euler",
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> nn.Module:
    """Build a multi-step snncompile model from a NIR graph (or a file written by ``nir.write``).

    The result is an ``fx.GraphModule`` of snncompile modules in ``step_mode='m'``: it takes
    ``[T, N, *input shape]`` (one tensor per NIR ``Input``, in graph order) and returns
    ``[T, N, *output shape]`` (a tuple for several ``Output`` nodes). Reset its state between
    sequences with ``snncompile.functional.reset_net``; compile it with
    ``snncompile.optimize(module, example_input)``.

    Args:
        graph_or_path: A ``nir.NIRGraph`` or the path of a NIR (HDF5) file.
        dt: Euler step in seconds (see the module docstring). ``None`` takes
            ``graph.metadata['snncompile.dt']`` when the graph was written by :func:`export_nir`,
            else :data:`DEFAULT_DT` (``1e-4``, the SpikingJelly/snnTorch default).
        integrator: How ``r`` of ``IF`` and ``I`` nodes is read: ``'euler'`` (default; the
            membrane gains ``r * dt * I`` per step, SpikingJelly's and our convention) or
            ``'unit'`` (gains ``r * I`` per step, snnTorch's and Sinabs' convention).
        max_bytes: For a file: the most bytes its datasets may declare in all (shape times item
            size, summed), checked before any data is read, because a small compressed file
            can declare gigabytes. Default :data:`DEFAULT_MAX_BYTES` (1 GiB); ``None``: no limit.

    Raises:
        NIRImportError: a node type or parameter set has no snncompile equivalent, a parameter
            is invalid (non-finite, ``tau <= dt``, a bias of the wrong length, ...), the file
            declares more than ``max_bytes`` or is malformed, or the graph's structure cannot
            be run; the message names the NIR node and the field.
        ImportError: the ``nir`` package is missing (``pip install snncompile[nir]``).
    """
    nir = require_nir()
    if integrator not in ("euler", "unit"):
        raise ValueError(f"import_nir: integrator must be 'euler' or 'unit', got {integrator!r}")
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
    ):
        raise ValueError(
            f"import_nir: max_bytes must be a non-negative int or None, got {max_bytes!r}"
        )
    graph = graph_or_path
    if isinstance(graph_or_path, (str, Path)):
        graph = read_nir_file(nir, graph_or_path, max_bytes)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(
            f"import_nir: expected a nir.NIRGraph or a file path, got {type(graph).__name__}"
        )
    if dt is None:
        md = _meta(graph)
        dt = DEFAULT_DT
        if "snncompile.dt" in md:
            try:
                dt = float(md["snncompile.dt"])
            except (TypeError, ValueError) as err:
                raise NIRImportError(
                    f"import_nir: graph metadata 'snncompile.dt'={md['snncompile.dt']!r} is not "
                    "a number; pass dt= explicitly"
                ) from err
    dt = check_dt(dt, "import_nir")
    return _Importer(graph, dt, integrator).build()
