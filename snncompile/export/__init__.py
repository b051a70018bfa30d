"""Writers and readers of interchange formats: :mod:`snncompile.export.onnx` (ONNX) and
:mod:`snncompile.export.nir` (NIR).

The submodules are imported on first use (``snncompile.export.onnx`` loads ``onnx``, which takes
a while), so ``import snncompile.export`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = frozenset(
    {
        "nir",
        "nir_export",
        "nir_format",
        "nir_import",
        "nir_patterns",
        "nir_read",
        "onnx",
        "onnx_builder",
        "onnx_emitter",
        "onnx_metadata",
        "onnx_ops",
        "onnx_scan",
        "onnx_versions",
    }
)


def __getattr__(name: str) -> Any:
    """Import ``snncompile.export.<name>`` the first time it is used as an attribute."""
    if name in _SUBMODULES:
        return importlib.import_module(f"snncompile.export.{name}")
    raise AttributeError(f"module 'snncompile.export' has no attribute {name!r}")
