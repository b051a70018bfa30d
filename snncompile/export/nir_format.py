"""The NIR conventions shared by :mod:`~snncompile.export.nir_export` and
:mod:`~snncompile.export.nir_import`: the Euler step, tolerances, snncompile's metadata
keys and the errors (see :mod:`snncompile.export.nir` for what they mean).
"""

from __future__ import annotations

import math
from typing import Any

#: The Euler step used when none is given (what SpikingJelly's and snnTorch's exporters use).
DEFAULT_DT = 1e-4
#: Relative tolerance when recognising ``r == 1``, ``r == tau/dt`` or a gain of 1 in a file:
#: float32 storage plus a few float32 operations in the writer give errors around 1e-6.
RTOL = 1e-5

#: Node metadata key of a soft reset (``'subtract'``); NIR's own neurons reset hard.
RESET_KEY = "snncompile.reset"
#: Node metadata key of the surrogate class (``snncompile.surrogate_<param>`` for its arguments).
SURROGATE_KEY = "snncompile.surrogate"
#: Node metadata key of an initial membrane that is not the reset value (ann2snn).
V_INIT_KEY = "snncompile.v_init"


class NIRExportError(ValueError):
    """The model cannot be written as NIR; the message names the IR node and what to do."""


class NIRImportError(ValueError):
    """The NIR graph cannot be imported; the message names the NIR node and what to do."""


def require_nir() -> Any:
    try:
        import nir
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "snncompile's NIR interop needs the 'nir' package: pip install snncompile[nir]"
        ) from err
    return nir


def check_dt(dt: Any, who: str) -> float:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"{who}: dt must be a positive number of seconds, got {dt!r}")
    if not math.isfinite(float(dt)):
        raise ValueError(f"{who}: dt must be finite, got {dt!r}")
    return float(dt)
