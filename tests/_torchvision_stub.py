"""A stand-in for torchvision, which SpikingJelly's model zoo imports only for a weight loader.

``spikingjelly.activation_based.model`` imports ``load_state_dict_from_url`` from torchvision at
import time. torchvision from PyPI does not import beside the torch used here, so when it is
missing :func:`install` puts a tiny module into ``sys.modules`` whose loader raises: the zoo's
constructors work, downloading pretrained weights does not (nothing may download in tests).
"""

from __future__ import annotations

import sys
import types
from typing import Any


def _no_download(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "torchvision is not installed (a test stand-in is): pretrained weights cannot be "
        "downloaded; build zoo models with pretrained=False"
    )


def install() -> None:
    """Install the stand-in unless a real torchvision imports."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        return
    root = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.models.utils")
    replaced = types.ModuleType("torchvision._internally_replaced_utils")
    utils.load_state_dict_from_url = _no_download  # type: ignore[attr-defined]
    replaced.load_state_dict_from_url = _no_download  # type: ignore[attr-defined]
    root.models = models  # type: ignore[attr-defined]
    models.utils = utils  # type: ignore[attr-defined]
    root._internally_replaced_utils = replaced  # type: ignore[attr-defined]
    for name, mod in (
        ("torchvision", root),
        ("torchvision.models", models),
        ("torchvision.models.utils", utils),
        ("torchvision._internally_replaced_utils", replaced),
    ):
        sys.modules.setdefault(name, mod)
