"""ANN-to-SNN conversion and memory-bounded large-``T`` inference.

- :func:`convert` turns a trained ReLU ANN into a multi-step IF-neuron SNN (fx tracing, BN folding,
  activation-scale calibration with ``'max'`` / percentile / fraction normalisation);
- :mod:`snncompile.ann2snn.encoders` generates inputs on the fly (:class:`ConstantEncoder`,
  :class:`PoissonEncoder`);
- :func:`simulate` runs a converted SNN for ``T`` steps in chunks and returns the mean output.

See ``docs/ann2snn.md`` for usage and measurements.
"""

from snncompile.ann2snn.calibration import ActivationObserver, parse_mode
from snncompile.ann2snn.convert import convert, find_activations, fold_batchnorm
from snncompile.ann2snn.encoders import (
    BernoulliEncoder,
    ConstantEncoder,
    Encoder,
    PoissonEncoder,
)
from snncompile.ann2snn.modules import HalfThresholdIFNode, VoltageScale
from snncompile.ann2snn.simulate import simulate

__all__ = [
    "ActivationObserver",
    "BernoulliEncoder",
    "ConstantEncoder",
    "Encoder",
    "HalfThresholdIFNode",
    "PoissonEncoder",
    "VoltageScale",
    "convert",
    "find_activations",
    "fold_batchnorm",
    "parse_mode",
    "simulate",
]
