"""Reading NIR (HDF5) files that may be untrusted: declared sizes first, then the data.

The total size the file's datasets declare (shape times item size) is checked against a
limit before any data is read (a tiny compressed file can declare gigabytes); soft and
external HDF5 links and deep nesting are refused; every node is rebuilt with errors that
name it (:class:`~snncompile.export.nir_format.NIRImportError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from snncompile.export.nir_format import (
    NIRImportError,
)

#: Default limit on the total declared size of the datasets of a NIR file (1 GiB).
DEFAULT_MAX_BYTES = 2**30
_MAX_DEPTH = 64
# The node types nir.read knows (NIR 1.0).
_NIR_NODE_TYPES = (
    "Input",
    "Output",
    "NIRGraph",
    "Affine",
    "Linear",
    "Scale",
    "Conv1d",
    "Conv2d",
    "SumPool2d",
    "AvgPool2d",
    "Flatten",
    "Delay",
    "Threshold",
    "I",
    "IF",
    "LI",
    "LIF",
    "CubaLI",
    "CubaLIF",
)


def _describe_bytes(n: int) -> str:
    return f"{n} bytes ({n / 2**30:.2f} GiB)" if n >= 2**20 else f"{n} bytes"


def _declared_bytes(group: Any, where: str, depth: int, found: list[tuple[int, str, str]]) -> None:
    """Collect ``(declared bytes, path, what)`` of every dataset under ``group`` (no data read).

    The walk is the one ``nir.read`` makes (every member of every group); soft and external
    links are refused (``nir.write`` writes none, and an external link reads another file), and
    a nesting deeper than :data:`_MAX_DEPTH` (a hard-link cycle) is refused.
    """
    import h5py

    if depth > _MAX_DEPTH:
        raise NIRImportError(
            f"import_nir: {where!r} is nested more than {_MAX_DEPTH} groups deep (a cycle of "
            "HDF5 links?); a file written by nir.write is not"
        )
    for key in group.keys():
        path = f"{where}/{key}"
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise NIRImportError(
                f"import_nir: {path!r} is an HDF5 {type(link).__name__}; NIR files written by "
                "nir.write contain only groups and datasets, and links could read other files"
            )
        item = group[key]
        if isinstance(item, h5py.Group):
            _declared_bytes(item, path, depth + 1, found)
        elif isinstance(item, h5py.Dataset):
            shape = item.shape or ()
            count = 1
            for d in shape:
                count *= int(d)
            found.append((count * int(item.dtype.itemsize), path, f"shape {shape}, {item.dtype}"))
        else:  # pragma: no cover - h5py exposes only groups and datasets through hard links
            raise NIRImportError(f"import_nir: {path!r} is neither a group nor a dataset")


def _read_tree(group: Any) -> dict[str, Any]:
    """The nested dict ``nir.read`` builds from the ``node`` group (after the size check)."""
    import h5py

    out: dict[str, Any] = {}
    for key, item in group.items():
        key = key.decode("utf8") if isinstance(key, bytes) else key
        if isinstance(item, h5py.Group):
            out[key] = _read_tree(item)
        else:
            value = item[()]
            out[key] = value.decode("utf8") if isinstance(value, bytes) else value
    return out


def _node_from_tree(nir: Any, name: str, tree: Any) -> Any:
    """One NIR node from its dict, with errors that name the node (and the field)."""
    if not isinstance(tree, dict):
        raise NIRImportError(f"import_nir: NIR node {name!r}: stored as a dataset, not a group")
    kind = tree.get("type")
    if isinstance(kind, np.ndarray) and kind.shape == ():
        kind = kind.item()
    if isinstance(kind, bytes):
        kind = kind.decode("utf8", "replace")
    known = [n for n in _NIR_NODE_TYPES if hasattr(nir, n)]
    if kind not in known:
        raise NIRImportError(
            f"import_nir: NIR node {name!r}: field 'type' is {kind!r}, not a NIR node type "
            f"({', '.join(known)})"
        )
    if kind == "NIRGraph":
        return _graph_from_tree(nir, tree, f"subgraph {name!r}")
    fields = dict(tree)
    fields["type"] = kind
    try:
        return nir.dict2NIRNode(fields)
    except Exception as err:  # noqa: BLE001 - any failure of the nir constructors
        raise NIRImportError(
            f"import_nir: NIR node {name!r} ({kind}): its fields cannot be read: "
            f"{type(err).__name__}: {err}"
        ) from err


def _graph_from_tree(nir: Any, tree: dict[str, Any], what: str = "the graph") -> Any:
    for key in ("nodes", "edges"):
        if key not in tree:
            raise NIRImportError(f"import_nir: {what} has no {key!r} entry")
    nodes_tree = tree["nodes"]
    if not isinstance(nodes_tree, dict):
        raise NIRImportError(f"import_nir: {what}: 'nodes' must be a group of nodes")
    nodes = {str(k): _node_from_tree(nir, str(k), v) for k, v in nodes_tree.items()}
    raw = np.asarray(tree["edges"], dtype=object)
    if raw.size and (raw.ndim != 2 or raw.shape[1] != 2):
        raise NIRImportError(
            f"import_nir: {what}: 'edges' must be a list of (source, target) pairs, got an array "
            f"of shape {raw.shape}"
        )
    edges = []
    for a, b in raw.reshape(-1, 2):
        a = a.decode("utf8", "replace") if isinstance(a, bytes) else str(a)
        b = b.decode("utf8", "replace") if isinstance(b, bytes) else str(b)
        edges.append((a, b))
    metadata = tree.get("metadata", {})
    if not isinstance(metadata, dict):
        raise NIRImportError(f"import_nir: {what}: 'metadata' must be a group")
    try:
        return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata, type_check=True)
    except Exception as err:  # noqa: BLE001 - nir's structure and type checks
        raise NIRImportError(
            f"import_nir: {what} fails NIR's structure/type check: {type(err).__name__}: {err}"
        ) from err


def read_nir_file(nir: Any, path: str | Path, max_bytes: int | None) -> Any:
    """Read a NIR file like ``nir.read``, after checking its declared dataset sizes."""
    import h5py

    try:
        f = h5py.File(str(path), "r")
    except (OSError, ValueError) as err:
        raise NIRImportError(
            f"import_nir: cannot open {str(path)!r} as a NIR (HDF5) file: {err}"
        ) from err
    with f:
        if "node" not in f or not isinstance(f.get("node", getlink=True), h5py.HardLink):
            raise NIRImportError(
                f"import_nir: {str(path)!r} has no 'node' group; it is not a file written by "
                "nir.write"
            )
        found: list[tuple[int, str, str]] = []
        _declared_bytes(f["node"], "node", 0, found)
        total = sum(n for n, _, _ in found)
        if max_bytes is not None and total > max_bytes:
            size, where, what = max(found)
            raise NIRImportError(
                f"import_nir: {str(path)!r} declares {_describe_bytes(total)} of data in "
                f"{len(found)} datasets, more than max_bytes={max_bytes}; the largest is "
                f"{where!r} ({what}, {_describe_bytes(size)}). Nothing was read. A small file "
                "can declare huge compressed arrays; if you trust this one, pass a larger "
                "import_nir(..., max_bytes=...)."
            )
        tree = _read_tree(f["node"])
    return _graph_from_tree(nir, tree)
