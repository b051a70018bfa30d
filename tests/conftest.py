"""Shared test fixtures.

``sj`` gives SpikingJelly 2.0.0's ``activation_based`` package, the differential-test oracle.
``scripts/setup.sh`` installs it; when it is missing the dependent tests skip with a message.

SpikingJelly's model zoo (``spikingjelly.activation_based.model``) imports torchvision only for
``load_state_dict_from_url`` (pretrained weights). torchvision does not install beside this
torch, so when it is missing :func:`snncompile.zoo_compat.install_torchvision_stand_in` puts a
stand-in package into ``sys.modules`` whose loader raises: the zoo imports, nothing downloads.
"""

from __future__ import annotations

import os

import pytest
import torch

from snncompile.zoo_compat import install_torchvision_stand_in

install_torchvision_stand_in()

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
