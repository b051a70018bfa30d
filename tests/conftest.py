"""Shared test fixtures.

``sj`` gives SpikingJelly 2.0.0's ``activation_based`` package, the differential-test oracle.
``scripts/setup.sh`` installs it; when it is missing the dependent tests skip with a message.

SpikingJelly's model zoo (``spikingjelly.activation_based.model``) imports torchvision only for
``load_state_dict_from_url`` (pretrained weights). torchvision does not install beside this
torch, so when it is missing a stand-in package is put into ``sys.modules`` whose
``load_state_dict_from_url`` raises: the zoo modules import, and nothing can download.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

import pytest
import torch


def _install_torchvision_stand_in() -> None:
    """Register a minimal ``torchvision`` whose only function refuses to download."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:  # pragma: no cover - depends on the environment
        return

    def load_state_dict_from_url(url: str, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"tests: the torchvision stand-in refuses to download {url!r} (pretrained weights "
            "are never fetched in the test suite)"
        )

    names = (
        "torchvision",
        "torchvision.models",
        "torchvision.models.utils",
        "torchvision._internally_replaced_utils",
    )
    mods = {name: types.ModuleType(name) for name in names}
    for name, mod in mods.items():  # a spec, so importlib.util.find_spec() answers for them
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name.count(".") < 2)
    mods["torchvision"].__path__ = []  # a package, so submodule imports resolve here
    mods["torchvision.models"].__path__ = []
    mods["torchvision"].models = mods["torchvision.models"]
    mods["torchvision"]._internally_replaced_utils = mods["torchvision._internally_replaced_utils"]
    mods["torchvision.models"].utils = mods["torchvision.models.utils"]
    for name in ("torchvision.models.utils", "torchvision._internally_replaced_utils"):
        mods[name].load_state_dict_from_url = load_state_dict_from_url
    mods["torchvision"].__snncompile_stand_in__ = True
    sys.modules.update(mods)


_install_torchvision_stand_in()

# Keep the suite fast and deterministic on small machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _import_spikingjelly():
    try:
        import spikingjelly.activation_based as sj_ab
        from spikingjelly.activation_based import (  # noqa: F401
            base,
            functional,
            layer,
            neuron,
            surrogate,
        )
    except Exception as exc:  # pragma: no cover - depends on the environment
        return None, exc
    return sj_ab, None


@pytest.fixture(scope="session")
def sj():
    """SpikingJelly 2.0.0 ``activation_based``; skips when it is not installed."""
    module, exc = _import_spikingjelly()
    if module is None:
        pytest.skip(
            f"SpikingJelly 2.0.0 oracle not importable ({exc!r}); install it with "
            "`pip install --no-deps spikingjelly==2.0.0` (scripts/setup.sh does)."
        )
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
