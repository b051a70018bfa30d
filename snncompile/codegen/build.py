"""Build generated C sources into shared libraries and load them with ctypes, with a disk cache.

* Compiler: ``$SNNCOMPILE_CC``, else ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on
  ``PATH``. Flags: ``-O3 -fPIC -shared -fopenmp -ffp-contract=off -fno-math-errno
  -fno-trapping-math -std=c11`` (plus glibc's libmvec on x86-64 Linux for SIMD ``expf``). Never
  ``-ffast-math``: a library linked with it flips flush-to-zero for the whole process, and it
  would reorder float operations (fused kernels must be bit-exact with PyTorch);
  ``-ffp-contract=off`` forbids FMA contraction for the same reason.
* OpenMP: torch ships ``libgomp.so.1`` in ``torch/lib`` and loads it first. Our library is linked
  with ``-fopenmp`` against the same soname, so the dynamic loader resolves it to the copy torch
  already loaded: one OpenMP runtime, one thread pool (the tests check that our library's
  ``omp_get_max_threads`` is torch's). Kernels size their parallel region to
  ``torch.get_num_threads()`` (one thread for small calls), so the pool is never oversubscribed.
* Cache: ``$SNNCOMPILE_CACHE_DIR`` or ``~/.cache/snncompile``; the file name is a hash of the
  source, the flags and the compiler's ``--version`` output. A library is built under a unique
  temporary name and moved in place with ``os.replace`` (atomic), so concurrent processes never see
  a half-written file. A cached file that fails to load is deleted and rebuilt once.
* No compiler: :func:`find_compiler` returns None, and callers fall back to the torch renderer;
  :func:`warn_no_compiler` emits one warning per process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import uuid
import warnings
from functools import lru_cache
from pathlib import Path

CFLAGS: tuple[str, ...] = (
    "-O3",
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-ffp-contract=off",  # no FMA contraction: same roundings as PyTorch
    "-fno-math-errno",
    # Comparisons may then be if-converted, which lets the neuron loop vectorize; it changes no
    # result, only the (unobserved) floating-point exception flags.
    "-fno-trapping-math",
    "-std=c11",
)


def _mvec_flags() -> tuple[str, ...]:
    # glibc's libmvec has SIMD expf/logf/...: the backward (surrogate gradients) vectorizes with
    # them. Results stay within a few ulp of the scalar functions.
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        if platform.libc_ver()[0] == "glibc":
            return ("-DSNN_USE_MVEC",)
    return ()


# -march=native: AVX2/AVX-512 where present (about 2x on the backward here). The cache key
# includes a CPU signature, so a cache directory shared between machines never hands a library
# built for one CPU to another.
CFLAGS = CFLAGS + ("-march=native",) + _mvec_flags()
LDLIBS: tuple[str, ...] = ("-lmvec", "-lm") if "-DSNN_USE_MVEC" in CFLAGS else ("-lm",)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_path_locks: dict[str, threading.Lock] = {}
_warned = False


class CompilerNotFound(RuntimeError):
    """Raised when a C kernel is requested explicitly but no C compiler exists."""


def cache_dir() -> Path:
    """The kernel cache directory (created on demand)."""
    root = os.environ.get("SNNCOMPILE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "snncompile"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


_found: dict[tuple[str | None, ...], str | None] = {}


def find_compiler() -> str | None:
    """The C compiler to use, or None when none is installed (memoized per environment)."""
    env = (os.environ.get("SNNCOMPILE_CC"), os.environ.get("CC"), os.environ.get("PATH"))
    if env not in _found:
        _found[env] = _find_compiler()
    return _found[env]


def _find_compiler() -> str | None:
    for candidate in (os.environ.get("SNNCOMPILE_CC"), os.environ.get("CC")):
        if candidate:
            found = shutil.which(candidate)
            return found
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


@lru_cache(maxsize=8)
def compiler_version(compiler: str) -> str:
    """The compiler's ``--version`` text (part of the cache key)."""
    try:
        out = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        return out.stdout + out.stderr
    except OSError as exc:  # pragma: no cover - compiler vanished
        return f"unknown ({exc})"


def warn_no_compiler() -> None:
    """Warn once per process that fused CPU kernels fall back to PyTorch."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        "snncompile: no C compiler found (set SNNCOMPILE_CC or install gcc/cc); fused CPU "
        "neuron kernels fall back to the PyTorch renderer (same results, slower).",
        RuntimeWarning,
        stacklevel=3,
    )


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """CPU model and feature flags (part of the cache key, because of ``-march=native``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    first = text.split("\n\n", 1)[0]
    keep = [ln for ln in first.splitlines() if ln.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(keep) or f"{platform.machine()} {platform.processor()}"


def library_path(source: str, compiler: str, flags: tuple[str, ...] = CFLAGS) -> Path:
    """Where the library for ``source`` built by ``compiler`` with ``flags`` is cached."""
    h = hashlib.sha256()
    for part in (source, "\0".join(flags), compiler_version(compiler), cpu_signature()):
        h.update(part.encode())
        h.update(b"\0\0")
    return cache_dir() / f"snnk_{h.hexdigest()[:32]}.so"


def _compile(source: str, compiler: str, flags: tuple[str, ...], target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="snncompile_build_") as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        partial = target.with_name(f"{target.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        cmd = [compiler, *flags, str(src), "-o", str(partial), *LDLIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(
                "snncompile.codegen: compiling a generated neuron kernel failed "
                f"({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )
        os.replace(partial, target)  # atomic: readers see the old file or the whole new one


def load_library(source: str, flags: tuple[str, ...] = CFLAGS) -> ctypes.CDLL:
    """Compile ``source`` (or reuse the cached build) and return the loaded library.

    Raises :class:`CompilerNotFound` when no compiler exists.
    """
    compiler = find_compiler()
    if compiler is None:
        raise CompilerNotFound(
            "snncompile.codegen: no C compiler found; install gcc or set SNNCOMPILE_CC, or use "
            "the torch backend."
        )
    path = library_path(source, compiler, flags)
    key = str(path)
    with _lock:
        lib = _loaded.get(key)
        if lib is not None:
            return lib
        path_lock = _path_locks.setdefault(key, threading.Lock())
    # One lock per library: different kernels build in parallel (see prebuild).
    with path_lock:
        with _lock:
            lib = _loaded.get(key)
        if lib is not None:
            return lib
        if not path.exists():
            _compile(source, compiler, flags, path)
        try:
            lib = ctypes.CDLL(key)
        except OSError:
            # A corrupt or truncated cache entry (e.g. a crashed foreign writer): rebuild it.
            path.unlink(missing_ok=True)
            _compile(source, compiler, flags, path)
            lib = ctypes.CDLL(key)
        with _lock:
            _loaded[key] = lib
        return lib


def forget_loaded() -> None:
    """Drop the in-process table of loaded libraries (tests use it to force a cache lookup)."""
    with _lock:
        _loaded.clear()
