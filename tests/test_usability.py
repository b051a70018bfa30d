"""Things a user trips over first: import cost, attribute access, warning locations, CLI errors.

* ``import snncompile`` loads neither torch nor onnx; ``snncompile --help`` does not either.
* Every public submodule (``snncompile.ann2snn``, ...) is reachable as an attribute.
* Warnings raised inside the public functions point at the caller's line, not at our wrappers.
* The command line turns a factory that needs arguments or raises, and an ``-o`` / ``--png`` into
  a missing directory, into one line on stderr and exit code 2 (no traceback).
* ``snncompile export --format nir`` and :func:`snncompile.export_nir` share one default ``dt``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = str(ROOT / "examples" / "models.py")


def _python(code: str) -> str:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_is_light_and_lazy() -> None:
    out = _python(
        "import sys, snncompile\n"
        "print(sorted(m for m in ('torch', 'onnx', 'nir') if m in sys.modules))\n"
        "snncompile.neuron.LIFNode\n"
        "print(sorted(m for m in ('torch', 'onnx', 'nir') if m in sys.modules))\n"
        "snncompile.export_onnx\n"
        "print('onnx' in sys.modules)\n"
    )
    assert out.split("\n")[:3] == ["[]", "['torch']", "True"]


def test_cli_help_imports_no_torch() -> None:
    out = _python(
        "import sys, contextlib, io\n"
        "from snncompile import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
        "    code = cli.main(['--help'])\n"
        "print(code, 'torch' in sys.modules, 'usage: snncompile' in buf.getvalue())\n"
    )
    assert out.strip() == "0 False True"


def test_submodules_are_attributes() -> None:
    import snncompile

    for name in ("ann2snn", "monitor", "online", "runtime", "export", "profiling", "neuron"):
        assert getattr(snncompile, name).__name__ == f"snncompile.{name}"
    assert callable(snncompile.profile) and callable(snncompile.optimize)
    assert snncompile.ann2snn.convert is not None
    assert "ann2snn" in dir(snncompile)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        snncompile.nope  # noqa: B018
    ns: dict = {}
    exec("from snncompile import *", ns)
    assert {"optimize", "ann2snn", "export_onnx", "profile"} <= set(ns)


def test_warnings_point_at_the_caller() -> None:
    pytest.importorskip("nir")
    import torch

    import snncompile
    from snncompile import layer, neuron

    net = torch.nn.Sequential(layer.Linear(4, 3), neuron.LIFNode(v_reset=None))
    snncompile.functional.set_step_mode(net, "m")
    x = torch.rand(3, 2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snncompile.export_nir(net.eval(), x)
        snncompile.export_onnx(net.train(), x)
    ours = [w for w in caught if "export_" in str(w.message)]
    assert len(ours) >= 2
    assert {Path(w.filename).name for w in ours} == {Path(__file__).name}, [
        (w.filename, w.lineno) for w in ours
    ]


def _cli(*args: str, cwd: Path) -> tuple[int, str]:
    from snncompile import cli

    saved = os.getcwd()
    os.chdir(cwd)
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(list(args))
        return code, err.getvalue()
    finally:
        os.chdir(saved)


def test_cli_factory_errors(tmp_path: Path) -> None:
    models = tmp_path / "my_models.py"
    models.write_text(
        textwrap.dedent(
            """
            def needs_args(width, depth=2):
                raise AssertionError("not reached")

            def broken():
                raise RuntimeError("weights file missing")
            """
        )
    )
    code, err = _cli("inspect", f"{models}:needs_args", "--input-shape", "2,1,4", cwd=tmp_path)
    assert code == 2 and "needs arguments (width)" in err and "Traceback" not in err
    code, err = _cli("inspect", f"{models}:broken", "--input-shape", "2,1,4", cwd=tmp_path)
    assert code == 2 and "raised RuntimeError: weights file missing" in err
    assert "Traceback" not in err


def test_cli_output_into_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "mlp.onnx"
    code, err = _cli(
        "export", f"{MODELS}:spiking_mlp", "--input-shape", "4,2,64", "-o", str(missing),
        cwd=tmp_path,
    )
    assert code == 2 and "does not exist" in err and str(missing.parent) in err
    code, err = _cli(
        "inspect", f"{MODELS}:spiking_mlp", "--input-shape", "4,2,64", "--png",
        str(missing.with_suffix(".png")), cwd=tmp_path,
    )
    assert code == 2 and "--png" in err and "does not exist" in err
    assert not missing.parent.exists()


def test_cli_and_python_share_the_nir_dt(tmp_path: Path) -> None:
    nir = pytest.importorskip("nir")
    import inspect as _inspect

    from snncompile.export.nir import DEFAULT_DT
    from snncompile.export.nir import export_nir as real_export_nir

    assert _inspect.signature(real_export_nir).parameters["dt"].default == DEFAULT_DT
    path = tmp_path / "mlp.nir"
    code, err = _cli(
        "export", f"{MODELS}:spiking_mlp", "--input-shape", "4,2,64", "--format", "nir",
        "-o", str(path), cwd=tmp_path,
    )
    assert code == 0, err
    assert nir.read(str(path)).metadata["snncompile.dt"] == pytest.approx(DEFAULT_DT)
