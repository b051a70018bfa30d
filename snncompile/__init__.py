"""snncompile: a compiler and runtime for spiking neural networks on PyTorch.

SpikingJelly-compatible modules live in :mod:`snncompile.neuron`, :mod:`snncompile.layer`,
:mod:`snncompile.surrogate` and :mod:`snncompile.functional`. ``snncompile.optimize`` compiles a
model into a faster ``nn.Module`` with the same spikes and gradients.
"""

from typing import Any

from snncompile import base, functional, ir, layer, learning, neuron, passes, surrogate
from snncompile.api import optimize, trace
from snncompile.export.onnx import export_onnx, onnx_initial_states

__version__ = "0.1.0"


def export_nir(
    model_or_compiled: Any,
    example_input: Any,
    *,
    dt: float = 1e-4,
    path: Any = None,
    soft_reset: str = "warn",
) -> Any:
    """Export a model or compiled module to a ``nir.NIRGraph``; see
    :func:`snncompile.export.nir.export_nir` (needs ``pip install snncompile[nir]``)."""
    from snncompile.export.nir import export_nir as _export_nir

    return _export_nir(model_or_compiled, example_input, dt=dt, path=path, soft_reset=soft_reset)


def import_nir(
    graph_or_path: Any,
    *,
    dt: float | None = None,
    integrator: str = "euler",
    max_bytes: int | None = 2**30,
) -> Any:
    """Build a multi-step model from a NIR graph or file; see
    :func:`snncompile.export.nir.import_nir` (needs ``pip install snncompile[nir]``).
    ``max_bytes`` (default 1 GiB) bounds what a file's datasets may declare in all."""
    from snncompile.export.nir import import_nir as _import_nir

    return _import_nir(graph_or_path, dt=dt, integrator=integrator, max_bytes=max_bytes)


__all__ = ["base", "functional", "layer", "learning", "neuron", "surrogate", "__version__"]
__all__ += ["export_nir", "export_onnx", "import_nir", "onnx_initial_states"]
__all__ += ["ir", "optimize", "passes", "trace"]
