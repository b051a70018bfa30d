"""snncompile: a compiler and runtime for spiking neural networks on PyTorch.

SpikingJelly-compatible modules live in :mod:`snncompile.neuron`, :mod:`snncompile.layer`,
:mod:`snncompile.surrogate` and :mod:`snncompile.functional`. ``snncompile.optimize`` compiles a
model into a faster ``nn.Module`` with the same spikes and gradients.
"""

from snncompile import base, functional, ir, layer, learning, neuron, passes, surrogate
from snncompile.api import optimize, trace
from snncompile.export.onnx import export_onnx, onnx_initial_states

__version__ = "0.1.0"

__all__ = ["base", "functional", "layer", "learning", "neuron", "surrogate", "__version__"]
__all__ += ["export_onnx", "onnx_initial_states"]
__all__ += ["ir", "optimize", "passes", "trace"]
