"""The lowering of the fusion decisions: what the ``'fusion'`` passes recorded, applied to the
runtime modules.

:mod:`snncompile.passes.fuse_neurons` is IR -> IR: it turns a ``NEURON`` node into a
``FUSED_NEURON`` node and records its decision as attributes (``fused_backend``, ``kernel``),
without touching the module the node runs. :func:`apply_fusion_decisions` is the one step that
makes those decisions real -- the node's neuron module (inside a
:class:`~snncompile.runtime.scaled_neuron.ScaledNeuron` when scales were merged) gets
``backend = attrs['fused_backend']`` -- and ``snncompile.optimize`` runs it right before
lowering the graph to ``torch.fx``. Exporters read the IR, which says the same thing.
"""

from __future__ import annotations

from snncompile.ir.graph import Graph
from snncompile.ir.ops import Op


def apply_fusion_decisions(graph: Graph) -> int:
    """Set each fused node's neuron module to its recorded backend; returns how many."""
    done = 0
    for node in graph.find(Op.FUSED_NEURON):
        backend = node.attrs.get("fused_backend")
        module = getattr(node.module, "neuron", node.module)  # a ScaledNeuron wraps the neuron
        if backend is None or module is None or not hasattr(module, "backend"):
            continue
        if module.backend != backend:
            module.backend = backend
        done += 1
    return done
