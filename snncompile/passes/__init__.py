"""snncompile.passes: graph-to-graph passes over the SNN IR and the pipeline that orders them.

A pass is ``graph -> PassResult(graph, modified)`` (see :mod:`snncompile.passes.base`), one per
file, each with its math in the docstring:

* :func:`remove_dead_ops` -- eval-mode Dropout / Identity removal (inference);
* :func:`lower_step_mode` -- single-step graph -> sequence graph (stateless ops over
  ``[T*N, *]``, neurons as multi-step ops);
* :func:`simplify_time_layout` -- cancel merge/split round trips;
* :func:`fold_batchnorm` -- conv/linear + BN folding (inference);
* ``fuse_neurons`` / ``fuse_elementwise`` (``'fusion'`` stage, listed in ``PIPELINE``) -- neurons
  into generated kernels, then scalar ``VoltageScale`` neighbours into those kernels.

The order lives in one list, :data:`~snncompile.passes.pipeline.PIPELINE`, with a comment per
entry saying why it sits there.

Extension hook (kernel fusion, chunking)
----------------------------------------
The pipeline has named *stages*: ``'fusion'`` (after BN folding, when neurons are ``seq`` ops
and stateless chains are ``flat``) and ``'chunking'`` (last). A later pass plugs in with::

    from snncompile.passes import register_pass, PassResult

    def fuse_neurons(graph):
        '''Mark NEURON nodes to run fused kernels. (State the math here.)'''
        changed = False
        for node in graph.find(Op.NEURON):
            ...  # e.g. node.op = Op.FUSED_NEURON; node.module.backend = graph.meta["backend"]
        return PassResult(graph, changed)

    register_pass("fusion", fuse_neurons)          # both modes; modes=("inference",) to limit

``graph.meta['backend']`` is the ``backend=`` given to :func:`snncompile.optimize`. A neuron
node's ``attrs['_spec']`` is the module's ``NeuronSpec`` (SpikingJelly neurons rebuilt as ours
have one too and carry ``attrs['source'] == 'spikingjelly'``; neurons run as an original
SpikingJelly copy have no spec) and ``node.module`` is the
compiled module's own copy of the neuron (safe to reconfigure). The runtime runs ``NEURON`` and
``FUSED_NEURON`` nodes by calling ``node.module`` on the ``[T, N, *]`` input (multi-step), so a
fusion pass either reconfigures that copy (``node.module.backend = ...``) or replaces it with any
module of the same signature; ``node.op`` tells later passes and exporters what happened, and
``PassResult.notes`` end up in ``CompiledModule.report()``. Every pass output is verified;
a pass that breaks the IR raises :class:`PassVerificationError` naming it and the passes before.
"""

from snncompile.passes.base import (
    Pass,
    PassManager,
    PassRecord,
    PassResult,
    PassVerificationError,
    pass_name,
)
from snncompile.passes.fold_batchnorm import fold_batchnorm, fold_conv_bn
from snncompile.passes.lower_step_mode import LoweringError, lower_step_mode
from snncompile.passes.pipeline import (
    PIPELINE,
    STAGES,
    PipelineEntry,
    Stage,
    build_pipeline,
    register_pass,
    registered_passes,
    unregister_pass,
)
from snncompile.passes.remove_dead_ops import remove_dead_ops
from snncompile.passes.simplify_time_layout import simplify_time_layout

__all__ = [
    "PIPELINE",
    "STAGES",
    "LoweringError",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PassVerificationError",
    "PipelineEntry",
    "Stage",
    "build_pipeline",
    "fold_batchnorm",
    "fold_conv_bn",
    "lower_step_mode",
    "pass_name",
    "register_pass",
    "registered_passes",
    "remove_dead_ops",
    "simplify_time_layout",
    "unregister_pass",
]
