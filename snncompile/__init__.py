"""snncompile: a compiler and runtime for spiking neural networks on PyTorch.

SpikingJelly-compatible modules live in :mod:`snncompile.neuron`, :mod:`snncompile.layer`,
:mod:`snncompile.surrogate` and :mod:`snncompile.functional`. ``snncompile.optimize`` compiles a
model into a faster ``nn.Module`` with the same spikes and gradients; ``snncompile.profile``
counts spikes, synaptic operations and energy per layer.

Everything here is imported on first use (PEP 562 module ``__getattr__``): ``import snncompile``
itself loads neither torch nor onnx, so the command line starts fast. The first access to a
name (``snncompile.neuron``, ``snncompile.optimize``, ...) imports the module that defines it;
ONNX (``export_onnx``) and NIR (``export_nir``) are loaded only when they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Submodules reachable as attributes (``snncompile.ann2snn``, ``snncompile.layer``, ...).
_SUBMODULES = frozenset(
    {
        "ann2snn",
        "api",
        "base",
        "codegen",
        "dynamics",
        "export",
        "frontend",
        "functional",
        "ir",
        "layer",
        "learning",
        "monitor",
        "neuron",
        "online",
        "passes",
        "plot",
        "profiling",
        "runtime",
        "surrogate",
    }
)

#: Functions re-exported at the top level: name -> the module that defines it.
_FUNCTIONS = {
    "optimize": "snncompile.api",
    "trace": "snncompile.api",
    "export_onnx": "snncompile.export.onnx",
    "onnx_initial_states": "snncompile.export.onnx",
    "export_nir": "snncompile.export.nir",
    "import_nir": "snncompile.export.nir",
    "profile": "snncompile.profiling",
}

def __getattr__(name: str) -> Any:
    """Import a submodule or a re-exported function the first time it is used."""
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"snncompile.{name}")
    else:
        raise AttributeError(f"module 'snncompile' has no attribute {name!r}")
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_FUNCTIONS))


__all__ = ["ann2snn", "base", "functional", "layer", "learning", "neuron", "surrogate"]
__all__ += ["export_nir", "export_onnx", "import_nir", "onnx_initial_states", "__version__"]
__all__ += ["ir", "monitor", "online", "optimize", "passes", "profile", "runtime", "trace"]
