"""Neuron-kernel fusion: ``NEURON`` nodes become ``FUSED_NEURON`` nodes running generated kernels.

Math: a multi-step neuron computes, for t = 1..T, ``h_t = H(v_{t-1}, x_t)``,
``s_t = heaviside(h_t - v_th)``, ``v_t = reset(h_t, s_t)`` with T small PyTorch ops per step (and
their autograd records). The fused node computes the same recurrence in one generated kernel per
neuron configuration (:mod:`snncompile.dynamics` -> :mod:`snncompile.codegen`): identical spikes
and membrane on float32 (same operations, same order), the BPTT backward derived symbolically
from the same expressions, and only ``h`` saved for backward.

Cases handled: snncompile ``IFNode`` / ``LIFNode`` / ``ParametricLIFNode`` in sequence layout
(after step-mode lowering) whose surrogate has an expression form (Sigmoid, ATan,
PiecewiseQuadratic, PiecewiseExp, SoftSign, SuperSpike, Erf), and the subclasses registered
with :func:`snncompile.frontend.rules.register_neuron_subclass` (ann2snn's
``HalfThresholdIFNode``), which keep those dynamics and change only the initial membrane
(``NeuronSpec.v_init``): the fused kernel starts from the module's own state ``v``, which the
module's ``reset()`` sets to ``v_init``, so no kernel change is needed. The pass is IR -> IR:
it records ``fused_backend = graph.meta['backend']`` (``'cpu'``, ``'cuda'`` or ``'auto'``, where
``'auto'`` picks the fused kernel or the torch loop per call by size and device) and the kernel
id on the node; :func:`snncompile.runtime.lower_fusion.apply_fusion_decisions` sets the node's
module (the compiled model's own copy) to that backend when the graph is lowered. Left as they
are: ``backend='torch'``; SpikingJelly neurons the frontend could not rebuild as snncompile
neurons (a custom surrogate, ``store_v_seq=True``: they run as the original module; the classes
with a snncompile equivalent are rebuilt, so they are fused); neurons run per step
(``attrs['per_step']``); subclasses with their own fire/reset, or whose ``neuronal_charge``
cannot be captured (:mod:`snncompile.dynamics.capture`); other surrogates (surrogates are
matched by class identity, so a user's class named ``ATan`` or a subclass of ours is "other"; the
report's note for the node says why it was left). Adjacent scalar
``VoltageScale`` ops are merged into the kernel afterwards by
:mod:`snncompile.passes.fuse_elementwise`.

Listed first in the ``'fusion'`` stage of :data:`snncompile.passes.pipeline.PIPELINE` (both modes).
"""

from __future__ import annotations

from snncompile.ir.graph import Graph
from snncompile.ir.ops import Layout, Op
from snncompile.passes.base import PassResult

FUSED_BACKENDS = ("cpu", "cuda", "auto")


def fuse_neurons(graph: Graph) -> PassResult:
    """Turn fusable ``NEURON`` nodes into ``FUSED_NEURON`` nodes (see the module docstring)."""
    from snncompile.runtime.fused import register_dynamics
    from snncompile.runtime.fused_backends import dynamics_for, fusion_blocker

    backend = graph.meta.get("backend", "auto")
    if backend not in FUSED_BACKENDS:
        return PassResult(graph, False, [f"backend={backend!r}: neurons left unfused"])
    fused: list[str] = []
    skipped: list[str] = []
    for node in graph.find(Op.NEURON):
        module = node.module
        why = None
        if node.layout is not Layout.SEQ or node.attrs.get("per_step"):
            why = "not a multi-step neuron"
        elif module is None or not callable(getattr(module, "neuron_dynamics", None)):
            why = "no snncompile neuron dynamics (e.g. a SpikingJelly module)"
        elif backend not in getattr(module, "supported_backends", ()):
            why = f"{type(module).__name__} has no {backend!r} backend"
        else:
            dynamics = dynamics_for(module)
            if dynamics is None:
                why = fusion_blocker(module) or "no expression form for its dynamics"
                why += "; it runs the torch loop"
        if why is not None:
            skipped.append(f"%{node.name}: {why}")
            continue
        node.op = Op.FUSED_NEURON
        node.attrs["kernel"] = register_dynamics(dynamics)
        node.attrs["fused_backend"] = backend
        fused.append(node.name)
    notes = [f"fused {len(fused)} neuron(s) with backend={backend!r}"] + skipped
    return PassResult(graph, bool(fused), notes)
