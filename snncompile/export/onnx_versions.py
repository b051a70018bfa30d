"""Which ONNX opset and IR version to write for the installed onnxruntime.

The opset defaults to :data:`DEFAULT_OPSET` (capped by what the installed onnxruntime
implements); the IR version is the smallest one that declares that opset
(``onnx.helper.find_min_ir_version_for``), capped by the onnxruntime limit table
:data:`ORT_LIMITS` -- never onnx's own (newer) default, which onnxruntime may reject.
"""

from __future__ import annotations

import onnx
from onnx import helper

from snncompile.export.onnx_builder import OnnxExportError

#: The opset written by default: old enough for every onnxruntime of the last years, new enough
#: for everything we emit (GreaterOrEqual: 12, Scan with axes: 11, Clip with inputs: 11).
DEFAULT_OPSET = 17
#: The oldest opset we can emit (Scan/Clip/Reshape forms we use exist since 13).
MIN_OPSET = 13

#: ``(onnxruntime major, minor) -> (max IR version, max ai.onnx opset)`` it loads, from ORT's
#: version matrix; 1.31 was measured here (IR 14 is rejected, opset 26 is the last official).
#: A newer ORT than the last row gets the last row (ORT stays backward compatible).
ORT_LIMITS: list[tuple[tuple[int, int], tuple[int, int]]] = [
    ((1, 6), (7, 13)),
    ((1, 8), (7, 14)),
    ((1, 10), (8, 15)),
    ((1, 12), (8, 17)),
    ((1, 14), (8, 18)),
    ((1, 15), (9, 19)),
    ((1, 17), (9, 20)),
    ((1, 18), (10, 21)),
    ((1, 20), (10, 21)),
    ((1, 31), (13, 26)),
]


# -- versions -------------------------------------------------------------------------------------
def ort_limits(version: str | None = None) -> tuple[int, int]:
    """``(max IR version, max opset)`` that onnxruntime ``version`` (default: installed) loads."""
    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    parts = version.split(".")
    key = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    if key < ORT_LIMITS[0][0]:
        raise OnnxExportError(
            f"onnxruntime {version} is too old for snncompile's ONNX export (needs >= "
            f"{ORT_LIMITS[0][0][0]}.{ORT_LIMITS[0][0][1]}); upgrade onnxruntime."
        )
    limits = ORT_LIMITS[0][1]
    for ver, lim in ORT_LIMITS:
        if key >= ver:
            limits = lim
    return limits


def _min_ir(opset: int) -> int:
    return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


def pick_versions(opset: int | None = None, ort_version: str | None = None) -> tuple[int, int]:
    """Return ``(opset, ir_version)`` to write for the installed (or given) onnxruntime.

    ``opset=None`` picks ``min(DEFAULT_OPSET, ORT max)``; the IR version is the smallest that
    declares the opset (what ``onnx.helper.find_min_ir_version_for`` says), capped by ORT's limit.
    """
    max_ir, max_opset = ort_limits(ort_version)
    onnx_max = onnx.defs.onnx_opset_version()
    if opset is None:
        opset = min(DEFAULT_OPSET, max_opset, onnx_max)
        # Step down until the opset's IR version is one the runtime loads.
        while opset > MIN_OPSET and _min_ir(opset) > max_ir:
            opset -= 1
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise OnnxExportError(f"export_onnx: opset must be an int or None, got {opset!r}")
    if opset < MIN_OPSET or opset > min(max_opset, onnx_max):
        raise OnnxExportError(
            f"export_onnx: opset {opset} is outside what can be written and loaded here "
            f"([{MIN_OPSET}, {min(max_opset, onnx_max)}] for onnxruntime/onnx installed); "
            "pass opset=None for the default."
        )
    ir = _min_ir(opset)
    if ir > max_ir:
        raise OnnxExportError(
            f"export_onnx: opset {opset} needs ONNX IR version {ir}, but the installed "
            f"onnxruntime loads IR <= {max_ir}; pick a lower opset."
        )
    return opset, ir
