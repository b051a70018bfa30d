"""The ``snncompile`` command line: ``inspect``, ``export``, ``bench`` and ``demo``.

* ``snncompile inspect MODULE:FACTORY --input-shape T,N,...`` traces the model on a random input
  and prints its SNN IR (``--optimize``: the optimized graph and the pass report), optionally
  drawn to a PNG/SVG/PDF (``--png``) or written as Graphviz dot text (``--dot``).
* ``snncompile export MODULE:FACTORY [--weights CKPT.pt] --input-shape T,N,... --format onnx|nir
  -o PATH`` loads a state dict into the factory's model (``torch.load(weights_only=True)``) and
  writes an ONNX model (:func:`snncompile.export_onnx`, ``--mode sequence|step``) or an NIR graph
  (``snncompile.export_nir``, time step ``--dt``).
* ``snncompile bench [--quick] [--only NAME ...]`` runs the scripts in ``benchmarks/`` one after
  the other in subprocesses and ends with a table of the ratio lines they printed.
* ``snncompile demo [ARGS ...]`` runs ``examples/digits_demo.py`` (a spiking CNN trained on
  scikit-learn's digits) with ``ARGS``.

``MODULE`` is a dotted module path (``examples.models``; the current directory is searched
first) or a path to a ``.py`` file (``examples/models.py``); ``FACTORY`` is a function returning
an ``nn.Module`` (called without arguments) or a module-level ``nn.Module``. Usage errors (a bad
``MODULE:FACTORY``, a missing factory, a bad shape) print one line on stderr and exit with code
2; a failure of the work itself (export, drawing, a benchmark) exits with code 1. See
``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import snncompile  # light: torch and onnx load on first use

PROG = "snncompile"

#: ``bench --quick`` arguments for benchmarks that have no ``--quick`` flag of their own; every
#: other script gets ``--quick`` when its source defines that flag, and nothing otherwise.
QUICK_ARGS: dict[str, list[str]] = {
    "bench_chain_fusion.py": ["--T", "4", "--reps", "1", "--no-torch-compile"],
    "bench_optimize.py": ["--T", "4", "--batch", "8", "--reps", "1"],
    "bench_stdp.py": ["--repeat", "1"],
}

#: A ratio written ``2.5x`` / ``12x`` or ``x 2.5`` / ``(x  1.5)``, but not the ``64x32x32`` of a
#: shape (no letter or digit on the far side of the ``x``, none glued to the number).
RATIO_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?x(?!\w)|(?<![\w.])x\s*\d+(?:\.\d+)?(?![\w.])")


class CliError(Exception):
    """A problem the user can fix from the command line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- helpers


def _repo_root() -> Path:
    """The directory that holds the ``snncompile`` package (the checkout in editable installs)."""
    return Path(snncompile.__file__).resolve().parents[1]


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``'4,2,1,8,8'`` (or ``'4x2x1x8x8'``) into a shape of at least two positive ints."""
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise CliError(
            f"--input-shape must be comma-separated integers T,N,... such as 4,2,1,8,8; "
            f"got {text!r}"
        ) from None
    if len(shape) < 2 or min(shape) < 1:
        raise CliError(
            f"--input-shape needs at least T and N, all >= 1 (e.g. 4,2,64 for [T, N, 64]); "
            f"got {text!r}"
        )
    return shape


def _import_module(spec: str) -> ModuleType:
    """Import ``spec``: a ``.py`` file path or a dotted module path (cwd searched first)."""
    path = Path(spec)
    if spec.endswith(".py") or os.sep in spec or (os.altsep and os.altsep in spec):
        if not path.is_file():
            raise CliError(f"module file {spec!r} not found (give an existing .py file path)")
        path = path.resolve()
        name = f"_snncompile_cli_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise CliError(f"cannot import {spec!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.parent))  # let the file import its neighbours
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", spec):
        raise CliError(
            f"{spec!r} is neither a dotted module path (e.g. examples.models) nor a .py file"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a console script does not search the cwd by itself
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        if err.name is not None and (spec == err.name or spec.startswith(err.name + ".")):
            raise CliError(
                f"no module named {spec!r} (run from the directory that contains it, set "
                f"PYTHONPATH, or give a file path such as path/to/models.py:factory)"
            ) from None
        raise


def load_model(target: str) -> Any:
    """Return the ``nn.Module`` named by ``MODULE:FACTORY`` (the factory is called if callable)."""
    from torch import nn

    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise CliError(
            f"expected MODULE:FACTORY such as examples.models:spiking_cnn or "
            f"examples/models.py:spiking_cnn, got {target!r}"
        )
    module = _import_module(module_part)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(
                k for k, v in vars(module).items()
                if not k.startswith("_") and (isinstance(v, nn.Module) or _is_factory(v, module))
            )
            hint = f"; candidates: {', '.join(names)}" if names else ""
            raise CliError(f"{module_part!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise CliError(f"{target!r} is neither an nn.Module nor a callable returning one")
        obj = _call_factory(obj, target)
    if not isinstance(obj, nn.Module):
        raise CliError(
            f"{target!r} returned {type(obj).__name__}, not an nn.Module; the factory must "
            f"return the model"
        )
    return obj


def _call_factory(factory: Any, target: str) -> Any:
    """Call ``factory()``; a factory that needs arguments, or that raises, is a usage error."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: no signature to check
        signature = None
    if signature is not None:
        try:
            signature.bind()
        except TypeError:
            required = [
                p.name
                for p in signature.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            raise CliError(
                f"the factory {target!r} needs arguments ({', '.join(required)}), but the "
                f"command line calls it without any; give the required parameters defaults or "
                f"add a factory that takes none, e.g. def small(): return {target.split(':')[-1]}"
                f"(...)"
            ) from None
    try:
        return factory()
    except Exception as err:  # the user's code failed: say where, without our traceback
        raise CliError(
            f"the factory {target!r} raised {type(err).__name__}: {err} (call it in Python "
            f"to see the full traceback)"
        ) from None


def check_output_path(path: str, option: str) -> Path:
    """Return ``path`` as a ``Path`` after checking that its directory exists."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(
            f"{option} {path!r}: the directory {str(parent)!r} does not exist; create it first "
            f"(mkdir -p {parent}) or write somewhere else"
        )
    if out.is_dir():
        raise CliError(f"{option} {path!r} is a directory; give a file path")
    return out


def _is_factory(value: Any, module: ModuleType) -> bool:
    return callable(value) and getattr(value, "__module__", None) == module.__name__


def _example_input(shape: tuple[int, ...], seed: int) -> Any:
    import torch

    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the traced (or optimized) IR of a model; draw it if asked."""
    shape = parse_shape(args.input_shape)
    model = load_model(args.model)
    if args.mode == "inference":
        model.eval()
    elif args.mode == "train":
        model.train()
    for path, option in ((args.dot, "--dot"), (args.png, "--png")):
        if path:
            check_output_path(path, option)
    x = _example_input(shape, args.seed)
    from snncompile.frontend import FrontendError

    try:
        if args.optimize:
            compiled = snncompile.optimize(model, x, mode=args.mode, backend=args.backend)
            graph = compiled.graph
            report = compiled.report()
        else:
            graph, report = snncompile.trace(model, x), None
    except FrontendError as err:  # its message says where it failed and what to check
        raise CliError(f"cannot trace the model: {err}", code=1) from None
    print(graph)
    if report is not None:
        print()
        print(report)
    if args.dot:
        Path(args.dot).write_text(snncompile.ir.to_dot(graph))
        print(f"wrote {args.dot}", file=sys.stderr)
    if args.png:
        try:
            snncompile.ir.draw(graph, args.png)
        except ImportError as err:
            raise CliError(
                f"drawing needs matplotlib or the Graphviz 'dot' program ({err}); install one "
                f"with `pip install matplotlib` or `apt-get install graphviz`",
                code=1,
            ) from None
        except ValueError as err:
            raise CliError(str(err)) from None
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- export


def load_weights(model: Any, path: str, key: str | None = None) -> None:
    """Load the state dict in ``path`` into ``model`` (strictly), never unpickling code.

    The file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers only, so a crafted file cannot run code. It must hold a state dict (what
    ``torch.save(model.state_dict(), path)`` or ``torch.save(compiled.state_dict(), path)``
    writes), or a dict that holds one under ``key`` (``--weights-key``).
    """
    import torch

    file = Path(path)
    if not file.is_file():
        raise CliError(f"--weights: no such file {path!r}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled objects, RuntimeError for non-zip files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(
            f"--weights {path!r} is not a plain state dict that torch.load(weights_only=True) "
            f"can read ({first}). Save the weights with torch.save(model.state_dict(), path); "
            f"snncompile never unpickles objects from a file."
        ) from None
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else []
            raise CliError(f"--weights-key {key!r} is not in {path!r} (its keys: {keys})")
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        hint = ""
        if isinstance(obj, dict):
            nested = [str(k) for k, v in obj.items() if isinstance(v, dict)]
            hint = f"; it holds dicts under {nested}: pick one with --weights-key" if nested else ""
        raise CliError(
            f"--weights {path!r} holds a {kind} that is not a state dict (a dict of parameter "
            f"name -> tensor){hint}"
        )
    try:
        model.load_state_dict(obj)
    except RuntimeError as err:
        raise CliError(
            f"--weights {path!r} does not fit the factory's model: {err}".replace("\n\t", " ")
        ) from None


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model (with the weights of a checkpoint, ``--weights``) to ONNX or NIR."""
    shape = parse_shape(args.input_shape)
    if args.format == "nir" and args.mode is not None:
        raise CliError("--mode applies to --format onnx only (NIR holds the whole graph)")
    if args.weights_key is not None and args.weights is None:
        raise CliError("--weights-key needs --weights CKPT.pt")
    export_nir = getattr(snncompile, "export_nir", None)
    if args.format == "nir" and export_nir is None:
        raise CliError(
            "NIR export is not available in this snncompile (snncompile.export_nir is missing); "
            "update snncompile or use --format onnx",
            code=1,
        )
    check_output_path(args.output, "-o")
    model = load_model(args.model)
    if args.weights is not None:
        load_weights(model, args.weights, args.weights_key)
    model.eval()
    x = _example_input(shape, args.seed)
    weights = f", weights from {args.weights}" if args.weights else ", initial (untrained) weights"
    if args.format == "onnx":
        from snncompile.export.onnx import OnnxExportError, node_count

        mode = args.mode or "sequence"
        try:
            m = snncompile.export_onnx(model, x, args.output, mode=mode, opset=args.opset)
        except (OnnxExportError, ValueError, TypeError, NotImplementedError) as err:
            raise CliError(f"ONNX export failed: {err}", code=1) from None
        print(
            f"wrote {args.output}: ONNX, mode={mode}, opset={m.opset_import[0].version}, "
            f"IR version {m.ir_version}, {node_count(m)} nodes{weights}"
        )
        return 0
    try:
        from snncompile.export.nir import DEFAULT_DT

        dt = DEFAULT_DT if args.dt is None else args.dt
        g = export_nir(model, x, dt=dt, path=args.output)
    except ImportError as err:
        raise CliError(
            f"NIR export needs the 'nir' package ({err}); install it with `pip install nir`",
            code=1,
        ) from None
    except (ValueError, TypeError, NotImplementedError) as err:
        raise CliError(f"NIR export failed: {err}", code=1) from None
    count = len(getattr(g, "nodes", {}) or {})
    print(f"wrote {args.output}: NIR, dt={dt:g}, {count} nodes{weights}")
    return 0


# ----------------------------------------------------------------------------- bench


def _benchmark_scripts(directory: Path, only: Sequence[str] | None) -> list[Path]:
    if not directory.is_dir():
        raise CliError(
            f"benchmarks directory {str(directory)!r} not found; the benchmarks ship with the "
            f"source checkout (pass --benchmarks-dir DIR)",
            code=1,
        )
    scripts = sorted(directory.glob("bench_*.py"))
    if not scripts:
        raise CliError(f"no bench_*.py scripts in {str(directory)!r}", code=1)
    if not only:
        return scripts
    by_name: dict[str, Path] = {}
    for s in scripts:
        for key in (s.name, s.stem, s.name.removeprefix("bench_"), s.stem.removeprefix("bench_")):
            by_name[key] = s
    chosen: list[Path] = []
    for name in only:
        if name not in by_name:
            available = ", ".join(s.stem.removeprefix("bench_") for s in scripts)
            raise CliError(f"no benchmark named {name!r}; available: {available}")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    return chosen


def quick_args(script: Path) -> list[str]:
    """The arguments that make ``script`` a short smoke run (see :data:`QUICK_ARGS`)."""
    if script.name in QUICK_ARGS:
        return list(QUICK_ARGS[script.name])
    try:
        return ["--quick"] if '"--quick"' in script.read_text() else []
    except OSError:
        return []


def _echo(line: str) -> None:
    """Print one line of a benchmark's output above the progress bar (if one is shown)."""
    from tqdm import tqdm

    tqdm.write(line.rstrip("\n"), file=sys.stdout)
    sys.stdout.flush()


def _run_benchmark(
    script: Path, argv: list[str], echo: Any = _echo
) -> tuple[int, float, list[str]]:
    """Run one script, stream its output; return ``(exit code, seconds, ratio lines)``."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(script), *argv]
    echo(f"=== {script.name} {' '.join(argv)}".rstrip())
    start = time.perf_counter()
    ratios: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=str(script.parent.parent),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line)
            if RATIO_RE.search(line):
                ratios.append(line.strip())
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    return code, time.perf_counter() - start, ratios


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark scripts and print a summary of their ratio lines."""
    directory = Path(args.benchmarks_dir) if args.benchmarks_dir else _repo_root() / "benchmarks"
    scripts = _benchmark_scripts(directory, args.only)
    results = []
    from snncompile.progress import progress_bar

    bar = progress_bar(
        scripts, desc="bench", unit="script", progress=not args.no_progress, leave=True
    )
    for script in bar:
        bar.set_postfix_str(script.stem)
        argv = quick_args(script) if args.quick else []
        results.append((script.stem, *_run_benchmark(script, argv)))
    bar.close()
    print()
    print("summary (lines with an Nx ratio, as each benchmark printed them)")
    name_w = max(len("benchmark"), *(len(r[0]) for r in results))
    head = f"{'benchmark'.ljust(name_w)}  {'status':8}  {'time':>8}  ratio line"
    print(head)
    print("-" * len(head))
    for name, code, seconds, ratios in results:
        status = "ok" if code == 0 else f"exit {code}"
        lines = ratios or ["(no ratio lines)"]
        for k, line in enumerate(lines):
            cells = (name, status, f"{seconds:.1f} s") if k == 0 else ("", "", "")
            print(f"{cells[0].ljust(name_w)}  {cells[1]:8}  {cells[2]:>8}  {line}")
    failed = [r[0] for r in results if r[1] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- demo


def cmd_demo(argv: Sequence[str]) -> int:
    """Run ``examples/digits_demo.py``'s ``main`` with ``argv``."""
    script = _repo_root() / "examples" / "digits_demo.py"
    if not script.is_file():
        raise CliError(
            f"the demo script {str(script)!r} was not found: the examples ship with the source "
            f"checkout, not with a wheel; clone the repository and install it with "
            f"`pip install -e .`, or run `python examples/digits_demo.py` there",
            code=1,
        )
    spec = importlib.util.spec_from_file_location("digits_demo", script)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot import {str(script)!r}", code=1)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        raise CliError(
            f"the demo needs {err.name or err} (`pip install scikit-learn` for the digits data)",
            code=1,
        ) from None
    saved = sys.argv[0]
    sys.argv[0] = f"{PROG} demo"  # the demo's usage and error lines name this command
    try:
        module.main(list(argv))
    finally:
        sys.argv[0] = saved
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """Return the ``snncompile`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="snncompile: compile, inspect, export and benchmark spiking neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {snncompile.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    model_help = (
        "MODULE:FACTORY, e.g. examples.models:spiking_cnn or examples/models.py:spiking_cnn "
        "(FACTORY returns an nn.Module, or is one)"
    )
    shape_help = "example input shape T,N,... (random values), e.g. 4,2,1,8,8"

    p = sub.add_parser("inspect", help="print (and draw) the SNN IR of a model")
    p.add_argument("model", help=model_help)
    p.add_argument("--input-shape", required=True, help=shape_help)
    p.add_argument("--optimize", action="store_true", help="show the optimized graph + report")
    p.add_argument(
        "--mode",
        choices=("train", "inference"),
        default=None,
        help="train or inference semantics (default: the model's own train()/eval() flag)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "cpu", "cuda"),
        default="auto",
        help="neuron backend for --optimize (default auto)",
    )
    p.add_argument("--png", metavar="PATH", help="draw the graph (.png, .svg or .pdf)")
    p.add_argument("--dot", metavar="PATH", help="write the graph as Graphviz dot text")
    p.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="export a model (and its trained weights) to ONNX or NIR")
    p.add_argument("model", help=model_help)
    p.add_argument(
        "--weights",
        metavar="CKPT.pt",
        default=None,
        help="state dict to load into the factory's model first (torch.save(model.state_dict()) "
        "or compiled.state_dict(); read with torch.load(weights_only=True))",
    )
    p.add_argument(
        "--weights-key",
        metavar="KEY",
        default=None,
        help="the state dict is the entry KEY of the checkpoint dict (e.g. 'model')",
    )
    p.add_argument("--input-shape", required=True, help=shape_help)
    p.add_argument("--format", choices=("onnx", "nir"), default="onnx", help="default onnx")
    p.add_argument(
        "--mode",
        choices=("sequence", "step"),
        default=None,
        help="ONNX only: whole sequence (one Scan, default) or one step with explicit state",
    )
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the newest "
                   "one the installed onnxruntime runs)")
    p.add_argument(
        "--dt",
        type=float,
        default=None,
        help="NIR only: the Euler time step in seconds (default 1e-4, as snncompile.export_nir)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run the benchmarks and summarize their ratios")
    p.add_argument("--quick", action="store_true", help="small sizes / few repeats (smoke run)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these benchmarks (onnx, bench_onnx or bench_onnx.py)",
    )
    p.add_argument(
        "--benchmarks-dir",
        metavar="DIR",
        help="directory of bench_*.py scripts (default: benchmarks/ of the source checkout)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is shown only when stderr is a terminal anyway)",
    )
    p.set_defaults(func=cmd_bench)

    sub.add_parser(
        "demo",
        help="train the digits demo (examples/digits_demo.py); `demo --help` lists its flags",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``snncompile`` command line on ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 2 for usage errors, 1 when the work failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "demo":
            # Everything after 'demo' belongs to the demo's own parser (including --help).
            return cmd_demo(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version or an argparse usage error
            return exc.code if isinstance(exc.code, int) else 2
        return int(args.func(args))
    except CliError as err:
        command = f"{PROG} {argv[0]}" if argv else PROG
        print(f"{command}: error: {err}", file=sys.stderr)
        return err.code
    except SystemExit as exc:  # e.g. the demo's own parser rejected a flag
        return exc.code if isinstance(exc.code, int) else 1


if __name__ == "__main__":
    raise SystemExit(main())
