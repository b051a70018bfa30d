"""The ``snncompile.*`` metadata of exported ONNX models, written and read back.

``snncompile.states`` is a JSON list, one record per neuron state in input order (see
:mod:`snncompile.export.onnx`); :func:`read_states` validates it and
:func:`onnx_initial_states` builds the initial state arrays a step-mode model streams from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

STATES_KEY = "snncompile.states"
DTYPES = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}


class OnnxMetadataError(ValueError):
    """A model's ``snncompile.*`` metadata is missing or malformed; the message names the model
    and the field."""


def describe_model(path_or_model: str | Path | onnx.ModelProto) -> str:
    """How error messages name a model: its path, or its graph's name for a ``ModelProto``."""
    if isinstance(path_or_model, onnx.ModelProto):
        return f"ONNX model (graph {path_or_model.graph.name!r})"
    return f"ONNX model {str(path_or_model)!r}"


def load_metadata(path_or_model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """A model's ``metadata_props`` as a dict (the file is read without external data)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        model = onnx.load(str(path_or_model), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def read_states(
    path_or_model: str | Path | onnx.ModelProto, meta: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The validated ``snncompile.states`` records of a model (see the module docstring).

    Raises:
        OnnxMetadataError: the key is missing, is not JSON, or a record lacks a field or has a
            field of the wrong type; the message names the model, the record and the field.
    """
    meta = load_metadata(path_or_model) if meta is None else meta
    who = describe_model(path_or_model)
    if STATES_KEY not in meta:
        raise OnnxMetadataError(
            f"{who} has no {STATES_KEY!r} metadata; was it written by snncompile.export_onnx?"
        )
    try:
        records = json.loads(meta[STATES_KEY])
    except json.JSONDecodeError as err:
        raise OnnxMetadataError(
            f"{who}: metadata {STATES_KEY!r} is not valid JSON ({err}); it must be a JSON list "
            "of state records written by snncompile.export_onnx."
        ) from None
    if not isinstance(records, list):
        raise OnnxMetadataError(
            f"{who}: metadata {STATES_KEY!r} must be a JSON list of state records, got "
            f"{type(records).__name__}"
        )

    def bad(k: int, field: str, want: str, got: Any) -> OnnxMetadataError:
        return OnnxMetadataError(
            f"{who}: metadata {STATES_KEY!r} record {k}, field {field!r}: expected {want}, "
            f"got {got!r}"
        )

    out = []
    for k, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise bad(k, "(record)", "a JSON object", rec)
        for field in ("node", "input", "output"):
            if not isinstance(rec.get(field), str) or not rec[field]:
                raise bad(k, field, "a non-empty string", rec.get(field, "<missing>"))
        shape = rec.get("shape", "<missing>")
        if (
            not isinstance(shape, list)
            or not shape
            or shape[0] != -1
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or any(d < 1 for d in shape[1:])
        ):
            raise bad(k, "shape", "a list [-1, d1, d2, ...] of ints (-1: the batch axis)", shape)
        dtype = rec.get("dtype", "float32")
        if dtype not in DTYPES:
            raise bad(k, "dtype", f"one of {sorted(DTYPES)}", dtype)
        init = rec.get("init", "<missing>")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not np.isfinite(init):
            raise bad(k, "init", "a finite number", init)
        out.append({**rec, "dtype": dtype, "init": float(init)})
    return out


def step_states(
    path_or_model: str | Path | onnx.ModelProto, who: str, why: str
) -> list[dict[str, Any]]:
    """The state records of a step-mode export (:func:`read_states`).

    Raises:
        ValueError: the model is a sequence-mode export; the message is ``who``, the model, and
            ``why`` it cannot be used (what to do instead).
    """
    meta = load_metadata(path_or_model)
    states = read_states(path_or_model, meta)
    if meta.get("snncompile.mode") != "step":
        raise ValueError(f"{who}: {describe_model(path_or_model)} is a sequence-mode {why}")
    return states


def onnx_initial_states(
    path_or_model: str | Path | onnx.ModelProto, batch_size: int
) -> dict[str, np.ndarray]:
    """The initial neuron states of a step-mode export: ``{state input name: array}``.

    Each array is ``[batch_size, *feature shape]`` filled with the neuron's initial membrane
    potential (its ``v_init`` if it has one, e.g. ``v_threshold / 2`` for ann2snn's
    ``HalfThresholdIFNode``; else ``v_reset``, or 0 for soft reset), read from the model's
    metadata (:func:`read_states`).
    """
    states = step_states(
        path_or_model,
        "onnx_initial_states",
        "model; it builds its initial states inside the graph and takes no state inputs. Export "
        "with mode='step' to stream.",
    )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"onnx_initial_states: batch_size must be an int >= 1, got {batch_size}")
    out: dict[str, np.ndarray] = {}
    for s in states:
        shape = [batch_size if d == -1 else int(d) for d in s["shape"]]
        out[s["input"]] = np.full(shape, s["init"], dtype=np.dtype(s["dtype"]))
    return out


def onnx_state_outputs(path_or_model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """``{state input name: next-state output name}`` of a step-mode export (from metadata)."""
    return {s["input"]: s["output"] for s in read_states(path_or_model)}
