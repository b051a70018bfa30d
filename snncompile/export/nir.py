r"""NIR interop: :func:`export_nir` (snncompile IR -> ``nir.NIRGraph``) and :func:`import_nir`.

`NIR <https://neuroir.org>`_ describes neurons as continuous-time ODEs; snncompile (like
SpikingJelly) runs discrete steps. The bridge is the forward-Euler step ``dt`` (seconds), an
explicit argument of both functions (default ``1e-4``, the value SpikingJelly and snnTorch use).
The exported graph stores it in ``graph.metadata['snncompile.dt']``; :func:`import_nir` reads it
back when ``dt`` is not given.

**LIF.** NIR: ``tau dv/dt = (v_leak - v) + r I``. One Euler step of length ``dt`` gives
``v' = v + (dt/tau) (v_leak - v) + (r dt / tau) I``: membrane retention ``beta = 1 - dt/tau``
and input gain ``r dt / tau``. SpikingJelly's ``decay_input=True`` step
``H = V + (X - (V - v_reset)) / tau_sj`` is that update with ``dt/tau = 1/tau_sj`` and gain
``1/tau_sj``, so it exports as ``tau = tau_sj * dt``, ``r = 1``, ``v_leak = v_reset``.
``decay_input=False`` (``H = V - (V - v_reset)/tau_sj + X``, gain 1) exports as
``r = tau / dt = tau_sj``. ``ParametricLIFNode`` exports as a LIF with its current
``tau_sj = 1 / sigmoid(w)``. Soft reset leaks towards 0, so ``v_leak = 0`` there.

**IF.** NIR: ``C dv/dt = r I`` (``C = 1``); an Euler step adds ``r dt I``. We export ``IF``
with ``r = 1/dt`` (gain 1), as SpikingJelly's exporter does. snnTorch and Sinabs read and write
IF/I nodes with ``r = 1`` meaning "add ``r * I`` per step" (``dt`` ignored); import those with
``import_nir(..., integrator='unit')``. The default ``integrator='euler'`` uses gain ``r * dt``.

**Firing ties.** SpikingJelly (and snncompile) fire at ``H >= v_threshold``; the NIR text,
snnTorch and Norse fire at ``H > v_threshold``. Both directions keep *our* rule: an imported
graph fires on an exact tie where its source library would not. With continuous-valued inputs
ties have probability zero; with spike inputs and thresholds that are sums of weights they do
occur, and then results differ at those steps.

**Soft reset.** NIR's neurons reset hard to ``v_reset``. Soft reset (``v_reset=None``,
``V = H - S * v_threshold``) is written as ``v_reset = 0`` plus node metadata
``{'snncompile.reset': 'subtract'}``, which ``nir.write`` / ``nir.read`` round-trip; we read it
back and never turn soft into hard reset. A tool that ignores the metadata will run the node with
a hard reset, so :func:`export_nir` warns (or refuses, ``soft_reset='error'``). A foreign node
without the key is a hard reset, as the NIR spec says. Other ``v_reset`` values (e.g. ``-0.3``)
travel in NIR's own ``v_reset`` field. Further metadata keys (``snncompile.neuron``,
``snncompile.tau``, ``snncompile.plif_w``, ``snncompile.decay_input``, ``snncompile.surrogate``,
``snncompile.detach_reset``) restore the exact module; they are checked against the NIR fields.

**Converted SNNs.** ``ann2snn.convert`` wraps each IF neuron in ``VoltageScale`` layers; they
export as NIR ``Scale`` nodes (the scale broadcast to the feature shape). Its half-threshold
neurons start (and are reset by ``reset_net``) at ``v_init = v_threshold / 2``; NIR has no
initial-state field, so the value travels as metadata ``{'snncompile.v_init': 0.5}``, which
:func:`import_nir` reads back (an ``ann2snn.HalfThresholdIFNode``). A tool that ignores it
starts the membrane at ``v_reset`` (0 for soft reset), like the zero-init conversion, so
:func:`export_nir` warns.

**Untrusted files.** :func:`import_nir` sums the sizes the file's datasets declare (shape times
item size) before reading any data and refuses more than ``max_bytes`` (default 1 GiB; a tiny
compressed file can declare gigabytes), refuses HDF5 soft/external links, and validates every
field as snncompile's modules validate their arguments (finite values, ``tau > dt`` so that
``beta = 1 - dt/tau`` lies in ``(0, 1)``, bias lengths, integer strides); each error is a
:class:`NIRImportError` naming the NIR node and the field or metadata key. Surrogates travel as
``snncompile.surrogate`` plus ``snncompile.surrogate_<param>`` keys, written only for snncompile's
(and SpikingJelly's) own classes, matched by identity.

**Recurrence.** A cycle in an imported graph becomes a
:class:`snncompile.nir_modules.RecurrentBlock`: its nodes are stepped together, and the edges
that leave a neuron inside the cycle carry that neuron's output of the *previous* step (zeros
at the first step). A cycle without a neuron (an algebraic loop) is refused. See
``docs/nir.md``.
"""

from __future__ import annotations

from snncompile.export.nir_export import export_nir
from snncompile.export.nir_format import (
    DEFAULT_DT,
    RTOL,
    NIRExportError,
    NIRImportError,
)
from snncompile.export.nir_import import import_nir
from snncompile.export.nir_read import DEFAULT_MAX_BYTES

__all__ = [
    "DEFAULT_DT",
    "DEFAULT_MAX_BYTES",
    "RTOL",
    "NIRExportError",
    "NIRImportError",
    "export_nir",
    "import_nir",
]
