"""Built-in neurons beyond IF/LIF/PLIF, one file each (SpikingJelly 2.0.0-compatible where
SpikingJelly has the class).

Every file defines one :class:`snncompile.neuron.BaseNode` subclass whose ``define_dynamics``
is the whole neuron: charge, extra states, threshold and reset as expressions. From that one
definition the eager forward, the fused C/CUDA kernels and their backward, ONNX and the
SpikingJelly mapping of ``optimize`` follow; nothing else names the class. They are also
importable from :mod:`snncompile.neuron`.
"""

from snncompile.neurons.alif import ALIFNode
from snncompile.neurons.cubalif import CUBALIFNode
from snncompile.neurons.eif import EIFNode
from snncompile.neurons.izhikevich import IzhikevichNode
from snncompile.neurons.qif import QIFNode

__all__ = ["ALIFNode", "CUBALIFNode", "EIFNode", "IzhikevichNode", "QIFNode"]
