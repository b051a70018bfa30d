"""Build generated C sources into shared libraries and load them with ctypes, with a disk cache.

* Compiler: ``$SNNCOMPILE_CC``, else ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on
  ``PATH``. Flags: :data:`CFLAGS` (``-O3 -fPIC -shared -fopenmp -ffp-contract=off
  -fno-math-errno -fno-trapping-math -std=c11``) plus ``-march=$SNNCOMPILE_MARCH`` (default
  ``native``; e.g. ``x86-64-v2`` builds for a baseline ISA). Never ``-ffast-math``: a library
  linked with it flips flush-to-zero for the whole process, and it would reorder float
  operations; ``-ffp-contract=off`` forbids FMA contraction. The kernels call no libm/libmvec
  transcendental function (:mod:`snncompile.codegen.kernels` defines its own, from correctly
  rounded IEEE operations only), so the vector body, the remainder loop and a build for any
  other ISA give the same bits.
* OpenMP: torch ships ``libgomp.so.1`` in ``torch/lib`` and loads it first. Our library is linked
  with ``-fopenmp`` against the same soname, so the dynamic loader resolves it to the copy torch
  already loaded: one OpenMP runtime, one thread pool. Kernels size their parallel region to
  ``torch.get_num_threads()`` (one thread for small calls), so the pool is never oversubscribed.
* Cache: ``$SNNCOMPILE_CACHE_DIR`` or ``~/.cache/snncompile``. An entry is ``snnk_<key>.so`` plus
  a sidecar ``snnk_<key>.json`` with the full key, the size and the sha256 of the library; the
  key hashes the source, the flags, the compiler's ``--version`` output and the CPU's model and
  flags. Builds run in a private temporary directory; the library is published with a unique
  temporary name and ``os.replace`` (atomic), then the sidecar the same way. Processes building
  the same entry take an advisory file lock, so one compiles and the others load its result.
* Loading: the entry's bytes are read once and checked against the sidecar (a missing or
  mismatching sidecar, a truncated or foreign library, or missing symbols mean: rebuild), and the
  checked bytes are loaded from a private copy, so a file damaged after the check is never
  mapped. A cache directory that cannot be used (a regular file, not creatable, read-only) means
  building in a private temporary directory, with one warning naming ``SNNCOMPILE_CACHE_DIR``.
* No compiler: :func:`find_compiler` returns None, and callers fall back to the torch renderer;
  :func:`warn_no_compiler` emits one warning per process.

This module uses only the standard library (tests load it alone in child processes).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

try:  # advisory inter-process lock (POSIX); without it concurrent builds are still safe
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

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
LDLIBS: tuple[str, ...] = ("-lm",)

MARCH_ENV = "SNNCOMPILE_MARCH"
CACHE_ENV = "SNNCOMPILE_CACHE_DIR"
_MARCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_SIDECAR_FORMAT = 1

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_path_locks: dict[str, threading.Lock] = {}
_warned = False
_warned_cache: set[str] = set()
_private_dirs: dict[str, Path] = {}


class CompilerNotFound(RuntimeError):
    """Raised when a C kernel is requested explicitly but no C compiler exists."""


def march() -> str:
    """The ``-march=`` value kernels are built for: ``$SNNCOMPILE_MARCH``, default ``native``.

    Raises ``ValueError`` for a value that is not a plain architecture name.
    """
    value = os.environ.get(MARCH_ENV, "").strip() or "native"
    if not _MARCH_RE.fullmatch(value):
        raise ValueError(
            f"snncompile: {MARCH_ENV}={value!r} is not an architecture name; use e.g. 'native', "
            "'x86-64-v2' or 'x86-64' (the value is passed to the compiler as -march=...)."
        )
    return value


def compile_flags(arch: str | None = None) -> tuple[str, ...]:
    """:data:`CFLAGS` plus ``-march=`` for ``arch`` (default: :func:`march`)."""
    if arch is not None and not _MARCH_RE.fullmatch(arch):
        raise ValueError(f"snncompile: {arch!r} is not an architecture name for -march=.")
    return (*CFLAGS, f"-march={arch or march()}")


# -- the cache directory ------------------------------------------------------------------------
def _configured_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "snncompile"
    )
    return Path(root)


def _private_dir(kind: str) -> Path:
    """A per-process temporary directory (removed at exit)."""
    with _lock:
        path = _private_dirs.get(kind)
        if path is None or not path.is_dir():
            path = Path(tempfile.mkdtemp(prefix=f"snncompile_{kind}_"))
            _private_dirs[kind] = path
            atexit.register(shutil.rmtree, path, True)
        return path


def _warn_cache_unusable(path: Path, reason: str) -> None:
    key = str(path)
    with _lock:
        if key in _warned_cache:
            return
        _warned_cache.add(key)
    warnings.warn(
        f"snncompile: the kernel cache directory {str(path)!r} cannot be used ({reason}); "
        f"kernels are built in a private temporary directory for this process (slower start). "
        f"Set {CACHE_ENV} to a writable directory.",
        RuntimeWarning,
        stacklevel=4,
    )


def _usable(path: Path) -> str | None:
    """None when ``path`` is (made) a writable directory, else the reason it is not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it exists and is not a directory"
    except OSError as exc:
        return f"it cannot be created: {exc.strerror or exc}"
    if not path.is_dir():
        return "it is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


def cache_dir() -> Path:
    """The kernel cache directory (created on demand).

    When the configured directory cannot be used, this warns once (naming
    ``SNNCOMPILE_CACHE_DIR``) and returns a private temporary directory instead.
    """
    path = _configured_cache_dir()
    reason = _usable(path)
    if reason is None:
        return path
    _warn_cache_unusable(path, reason)
    return _private_dir("cache")


# -- the compiler -------------------------------------------------------------------------------
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


def cache_key(source: str, compiler: str, flags: tuple[str, ...]) -> str:
    """The full hex key of the library for ``source`` built by ``compiler`` with ``flags``."""
    h = hashlib.sha256()
    for part in (
        source,
        "\0".join(flags),
        "\0".join(LDLIBS),
        compiler_version(compiler),
        cpu_signature(),
    ):
        h.update(part.encode())
        h.update(b"\0\0")
    return h.hexdigest()


def library_path(source: str, compiler: str, flags: tuple[str, ...] | None = None) -> Path:
    """Where the library for ``source`` built by ``compiler`` with ``flags`` is cached."""
    key = cache_key(source, compiler, flags or compile_flags())
    return cache_dir() / f"snnk_{key[:32]}.so"


def sidecar_path(library: Path) -> Path:
    """The sidecar (key, size, sha256) of a cached library."""
    return library.with_suffix(".json")


def _compile(source: str, compiler: str, flags: tuple[str, ...]) -> bytes:
    """Compile ``source`` in a private temporary directory and return the library's bytes."""
    with tempfile.TemporaryDirectory(prefix="snncompile_build_") as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        out = Path(tmp) / "kernel.so"
        cmd = [compiler, *flags, str(src), "-o", str(out), *LDLIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                "snncompile.codegen: compiling a generated neuron kernel failed "
                f"({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )
        return out.read_bytes()


# -- entries: publish, verify, load ----------------------------------------------------------------
def _atomic_write(target: Path, data: bytes) -> None:
    partial = target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)  # atomic: readers see the old file or the whole new one
    finally:
        partial.unlink(missing_ok=True)


def _publish(path: Path, key: str, data: bytes) -> None:
    """Write the library, then its sidecar (each atomically). Raises OSError when unwritable."""
    meta = {
        "format": _SIDECAR_FORMAT,
        "key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    _atomic_write(path, data)
    _atomic_write(sidecar_path(path), json.dumps(meta).encode())


def _verified_bytes(path: Path, key: str) -> bytes | None:
    """The entry's library bytes when the sidecar vouches for them, else None."""
    try:
        meta = json.loads(sidecar_path(path).read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _SIDECAR_FORMAT:
        return None
    if meta.get("key") != key or meta.get("size") != len(data):
        return None
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    return data


def _open_bytes(data: bytes, symbols: Iterable[str]) -> ctypes.CDLL | None:
    """Load ``data`` from a private copy; None when it does not load or lacks a symbol."""
    copy = _private_dir("load") / f"lib_{uuid.uuid4().hex}.so"
    copy.write_bytes(data)
    try:
        lib = ctypes.CDLL(str(copy))
    except OSError:
        return None
    finally:
        copy.unlink(missing_ok=True)  # the mapping stays valid; nothing else can touch it
    for sym in symbols:
        try:
            getattr(lib, sym)
        except AttributeError:
            return None
    return lib


def _discard(path: Path) -> None:
    for p in (sidecar_path(path), path):
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on ``path``'s lock file (no-op when it cannot be created)."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _load_or_build(
    path: Path,
    key: str,
    source: str,
    compiler: str,
    flags: tuple[str, ...],
    symbols: tuple[str, ...],
) -> ctypes.CDLL:
    data = _verified_bytes(path, key)
    if data is not None:
        lib = _open_bytes(data, symbols)
        if lib is not None:
            return lib
    with _file_lock(path):
        # Another process may have built it while this one waited for the lock.
        data = _verified_bytes(path, key)
        lib = _open_bytes(data, symbols) if data is not None else None
        if lib is not None:
            return lib
        _discard(path)
        data = _compile(source, compiler, flags)
        try:
            _publish(path, key, data)
        except OSError as exc:
            _discard(path)
            _warn_cache_unusable(path.parent, f"writing {path.name} failed: {exc.strerror or exc}")
    lib = _open_bytes(data, symbols)
    if lib is None:
        raise RuntimeError(
            "snncompile.codegen: a freshly built kernel library does not load or does not "
            f"export all of {list(symbols)}; the generated source is inconsistent."
        )
    return lib


def load_library(
    source: str,
    flags: tuple[str, ...] | None = None,
    symbols: Iterable[str] = (),
    arch: str | None = None,
) -> ctypes.CDLL:
    """Compile ``source`` (or reuse the verified cached build) and return the loaded library.

    ``flags`` defaults to :func:`compile_flags` for ``arch`` (default ``$SNNCOMPILE_MARCH`` or
    ``native``). ``symbols`` are the names the library must export; a cached entry without them
    is rebuilt. Raises :class:`CompilerNotFound` when no compiler exists.
    """
    compiler = find_compiler()
    if compiler is None:
        raise CompilerNotFound(
            "snncompile.codegen: no C compiler found; install gcc or set SNNCOMPILE_CC, or use "
            "the torch backend."
        )
    flags = flags if flags is not None else compile_flags(arch)
    symbols = tuple(symbols)
    key = cache_key(source, compiler, flags)
    path = cache_dir() / f"snnk_{key[:32]}.so"
    memo = f"{path}\0{','.join(symbols)}"
    with _lock:
        lib = _loaded.get(memo)
        if lib is not None:
            return lib
        path_lock = _path_locks.setdefault(str(path), threading.Lock())
    # One lock per library: different kernels build in parallel (see prebuild).
    with path_lock:
        with _lock:
            lib = _loaded.get(memo)
        if lib is not None:
            return lib
        lib = _load_or_build(path, key, source, compiler, flags, symbols)
        with _lock:
            _loaded[memo] = lib
        return lib


def forget_loaded() -> None:
    """Drop the in-process table of loaded libraries (tests use it to force a cache lookup)."""
    with _lock:
        _loaded.clear()
