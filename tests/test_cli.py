"""The ``snncompile`` command line (:mod:`snncompile.cli`).

The main paths run as real subprocesses (``python -m snncompile.cli ...`` and the installed
console script); the error matrix calls :func:`snncompile.cli.main` in-process, which is what
the console script calls too, to keep the suite fast.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import snncompile
from snncompile import cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = str(ROOT / "examples" / "models.py")


def run_cli(*args: str, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m snncompile.cli ARGS`` and return the finished process (text output)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "snncompile.cli", *args],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------- subprocesses


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "snncompile"
    if not script.exists():
        pytest.skip(f"no console script at {script}; run `pip install -e . --no-deps`")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("inspect", "export", "bench", "demo"):
        assert command in out.stdout


def test_inspect_optimized_with_drawing(tmp_path: Path) -> None:
    png, dot = tmp_path / "g.png", tmp_path / "g.dot"
    has_plot = importlib.util.find_spec("matplotlib") is not None
    args = [f"{MODELS}:spiking_cnn", "--input-shape", "4,2,1,8,8", "--optimize"]
    args += ["--mode", "inference", "--dot", str(dot)] + (["--png", str(png)] if has_plot else [])
    out = run_cli("inspect", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "FUSED_NEURON" in out.stdout and "CONV2D" in out.stdout
    assert "BATCHNORM" not in out.stdout  # folded in inference mode
    assert "fold_batchnorm" in out.stdout and "pass" in out.stdout  # the report table
    assert dot.read_text().startswith("digraph snn {")
    if has_plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_onnx_loads_and_checks(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "mlp.onnx"
    out = run_cli(
        "export", "examples.models:spiking_mlp", "--input-shape", "4,2,64",
        "--format", "onnx", "--mode", "step", "-o", str(path),
    )
    assert out.returncode == 0, out.stderr
    assert f"wrote {path}" in out.stdout
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inputs = [i.name for i in model.graph.input]
    assert len(inputs) == 3  # x_t and one membrane per LIF layer (step mode)


def test_export_nir(tmp_path: Path) -> None:
    if getattr(snncompile, "export_nir", None) is None:
        pytest.skip("snncompile.export_nir is not available yet")
    nir = pytest.importorskip("nir")
    path = tmp_path / "mlp.nir"
    out = run_cli(
        "export", f"{MODELS}:spiking_mlp", "--input-shape", "4,2,64", "--format", "nir",
        "--dt", "1.0", "-o", str(path),
    )
    assert out.returncode == 0, out.stderr
    assert path.exists() and "NIR" in out.stdout
    graph = nir.read(str(path))
    assert len(graph.nodes) >= 4


def _fake_benchmarks(directory: Path) -> Path:
    directory.mkdir()
    (directory / "bench_alpha.py").write_text(textwrap.dedent('''
        import argparse, os
        p = argparse.ArgumentParser()
        p.add_argument("--quick", action="store_true")
        a = p.parse_args()
        print("alpha header 64x32x32 (a shape, not a ratio)")
        print(f"alpha speed-up: {'1.50' if a.quick else '9.99'}x vs eager")
        print("omp", os.environ.get("OMP_WAIT_POLICY"))
    '''))
    (directory / "bench_beta.py").write_text('print("beta: speedup x  3.0")\n')
    (directory / "bench_gamma.py").write_text('import sys\nprint("gamma 2x")\nsys.exit(3)\n')
    (directory / "helper.py").write_text("raise SystemExit('not a benchmark')\n")
    return directory


def test_bench_on_fake_benchmarks(tmp_path: Path) -> None:
    bench = _fake_benchmarks(tmp_path / "benchmarks")
    only = ["--only", "alpha", "bench_beta", "gamma.py"]
    out = run_cli("bench", "--quick", *only, "--benchmarks-dir", str(bench))
    assert out.returncode == 1  # bench_gamma exits with 3
    assert "failed: bench_gamma" in out.stderr
    text = out.stdout
    assert "omp PASSIVE" in text  # streamed output, environment set
    summary = text.split("summary", 1)[1]
    assert "alpha speed-up: 1.50x vs eager" in summary  # --quick was passed
    assert "beta: speedup x  3.0" in summary
    assert "64x32x32" not in summary and "helper" not in summary
    rows = {line.split()[0]: line for line in summary.splitlines() if line.startswith("bench_")}
    assert set(rows) == {"bench_alpha", "bench_beta", "bench_gamma"}
    assert " ok " in rows["bench_alpha"] and " ok " in rows["bench_beta"]
    assert "exit 3" in rows["bench_gamma"] and "gamma 2x" in rows["bench_gamma"]


@pytest.mark.slow
def test_demo_tiny_run() -> None:
    pytest.importorskip("sklearn")
    out = run_cli("demo", "--epochs", "1", "--T", "2", "--batch-size", "128", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "epoch 1/1" in out.stdout and "final test accuracy" in out.stdout


def test_usage_error_is_one_line_without_traceback() -> None:
    out = run_cli("inspect", "examples.models:no_such_factory", "--input-shape", "4,2,64")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "no_such_factory" in lines[0] and "spiking_mlp" in lines[0]  # lists candidates


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "examples.models", "--input-shape", "4,2,64"], "expected MODULE:FACTORY"),
        (["inspect", "no_such_pkg.mod:f", "--input-shape", "4,2"], "no module named"),
        (["inspect", "missing/file.py:f", "--input-shape", "4,2"], "not found"),
        (["inspect", "bad-name:f", "--input-shape", "4,2"], "neither a dotted module path"),
        (["inspect", f"{MODELS}:nope", "--input-shape", "4,2,64"], "has no attribute 'nope'"),
        (["inspect", f"{MODELS}:spiking_mlp", "--input-shape", "4,two"], "comma-separated"),
        (["inspect", f"{MODELS}:spiking_mlp", "--input-shape", "4"], "at least T and N"),
        (["inspect", f"{MODELS}:spiking_mlp", "--input-shape", "4,0,64"], "at least T and N"),
        (["inspect", f"{MODELS}:NUM", "--input-shape", "4,2"], "neither an nn.Module"),
        (["inspect", f"{MODELS}:helper", "--input-shape", "4,2"], "not an nn.Module"),
        (["export", f"{MODELS}:spiking_mlp", "--input-shape", "4,2,64", "--format", "nir",
          "--mode", "step", "-o", "x.nir"], "--mode applies to --format onnx only"),
        (["bench", "--only", "nope"], "no benchmark named 'nope'"),
    ],
)
def test_usage_errors(argv, message, capsys, monkeypatch, tmp_path) -> None:
    fake = tmp_path / "models.py"
    fake.write_text("NUM = 3\n\n\ndef helper():\n    return 1\n")
    argv = [a.replace(MODELS, str(fake)) if ":NUM" in a or ":helper" in a else a for a in argv]
    monkeypatch.chdir(ROOT)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_inspect_trace_in_process(capsys) -> None:
    assert cli.main(["inspect", f"{MODELS}:spiking_mlp", "--input-shape", "4x2x64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph(step_mode=m, mode=train")
    assert "LINEAR" in out and "NEURON" in out and "FUSED_NEURON" not in out  # not optimized


def test_export_nir_unavailable(capsys, monkeypatch) -> None:
    monkeypatch.setattr(snncompile, "export_nir", None, raising=False)
    argv = ["export", f"{MODELS}:spiking_mlp", "--input-shape", "4,2,64", "--format", "nir"]
    assert cli.main([*argv, "-o", "unused.nir"]) == 1
    assert "NIR export is not available" in capsys.readouterr().err


def test_demo_missing_examples(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    assert cli.main(["demo", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "digits_demo.py" in err and "pip install -e ." in err


def test_quick_args(tmp_path) -> None:
    bench = _fake_benchmarks(tmp_path / "b")
    assert cli.quick_args(bench / "bench_alpha.py") == ["--quick"]
    assert cli.quick_args(bench / "bench_beta.py") == []
    assert cli.quick_args(ROOT / "benchmarks" / "bench_optimize.py")[0] == "--T"


def test_help_and_no_command(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_trace_failure_names_the_shape(capsys) -> None:
    argv = ["inspect", f"{MODELS}:spiking_mlp", "--input-shape", "4,2,10"]  # expects 64 features
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot trace the model" in err and "(4, 2, 10)" in err and len(err.splitlines()) == 1


def test_python_dash_m_snncompile(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["snncompile", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("snncompile", run_name="__main__")
    assert exc.value.code == 0 and snncompile.__version__ in capsys.readouterr().out
