"""Use SpikingJelly's model zoo where torchvision cannot be installed.

SpikingJelly 2.0.0's ``spikingjelly.activation_based.model`` modules (spiking_resnet,
sew_resnet, spiking_vgg, ...) import torchvision at import time, and only for
``load_state_dict_from_url`` (the pretrained ImageNet weights). Where torchvision does not
install beside the torch in use (a CPU torch build without a matching torchvision wheel),
:func:`install_torchvision_stand_in` registers a minimal ``torchvision`` package in
``sys.modules`` whose loader refuses to download: the zoo's constructors work with
``pretrained=False``, and asking for pretrained weights raises a clear error instead of
downloading. A real torchvision, when it imports, is always used instead.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

#: The modules of the stand-in (the zoo imports the loader from one of the last two).
STAND_IN_MODULES = (
    "torchvision",
    "torchvision.models",
    "torchvision.models.utils",
    "torchvision._internally_replaced_utils",
)


def _refuse_download(url: Any = None, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        f"torchvision is not installed, and snncompile's stand-in for it refuses to download "
        f"pretrained weights ({url!r}): build the zoo model with pretrained=False, or install "
        "a torchvision that matches your torch."
    )


def install_torchvision_stand_in() -> bool:
    """Register the stand-in unless a real torchvision imports; return True if it was registered.

    Safe to call more than once. The stand-in's modules carry module specs, so
    ``importlib.util.find_spec('torchvision')`` answers for them, and ``torchvision``'s
    attribute ``__snncompile_stand_in__`` is True.
    """
    existing = sys.modules.get("torchvision")
    if existing is not None:
        return bool(getattr(existing, "__snncompile_stand_in__", False))
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a torchvision built for another torch (RuntimeError)
        sys.modules.pop("torchvision", None)
    else:
        return False
    mods = {name: types.ModuleType(name) for name in STAND_IN_MODULES}
    for name, mod in mods.items():
        is_package = name in ("torchvision", "torchvision.models")
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
        if is_package:
            mod.__path__ = []  # submodule imports resolve to the registered modules
    mods["torchvision"].models = mods["torchvision.models"]
    mods["torchvision"]._internally_replaced_utils = mods["torchvision._internally_replaced_utils"]
    mods["torchvision.models"].utils = mods["torchvision.models.utils"]
    for name in ("torchvision.models.utils", "torchvision._internally_replaced_utils"):
        mods[name].load_state_dict_from_url = _refuse_download
    mods["torchvision"].__snncompile_stand_in__ = True
    for name, mod in mods.items():
        sys.modules.setdefault(name, mod)
    return True


def zoo_modules() -> dict[str, types.ModuleType]:
    """SpikingJelly 2.0.0's zoo model modules by short name, imported behind the stand-in.

    Keys: ``spiking_resnet``, ``sew_resnet``, ``spiking_vgg``, ``plif``
    (``parametric_lif_net``), ``ms_resnet``, ``masnn``, ``sdt`` (``spike_driven_transformer``),
    ``qkformer``, ``maxformer``, ``spikformer``, ``ottt`` (``spiking_vggws_ottt``).
    """
    install_torchvision_stand_in()
    from spikingjelly.activation_based.model import (
        masnn,
        maxformer,
        ms_resnet,
        parametric_lif_net,
        qkformer,
        sew_resnet,
        spike_driven_transformer,
        spikformer,
        spiking_resnet,
        spiking_vgg,
        spiking_vggws_ottt,
    )

    return {
        "spiking_resnet": spiking_resnet,
        "sew_resnet": sew_resnet,
        "spiking_vgg": spiking_vgg,
        "plif": parametric_lif_net,
        "ms_resnet": ms_resnet,
        "masnn": masnn,
        "sdt": spike_driven_transformer,
        "qkformer": qkformer,
        "maxformer": maxformer,
        "spikformer": spikformer,
        "ottt": spiking_vggws_ottt,
    }
