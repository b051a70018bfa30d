"""Fault injection for the on-disk kernel cache: every damaged or unusable cache still gives a
working kernel (rebuilt, or built in a private directory with one warning), never a crash.

Each test has its own ``SNNCOMPILE_CACHE_DIR``. Cases that used to kill the process (a truncated
library mapped by ``ctypes.CDLL`` raises SIGBUS) run in child processes that load
``codegen/build.py`` alone (standard library only, so they start without torch).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from snncompile.codegen import build
from snncompile.codegen.cpu import CpuKernel
from snncompile.codegen.kernels import generate
from snncompile.codegen.torch_backend import torch_multi_step
from snncompile.dynamics import lif_dynamics

pytestmark = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler installed")

T, N = 3, 5


def _child_script(source_file: Path, symbol: str) -> str:
    """A child that builds/loads the kernel in ``source_file`` and prints its spike count."""
    return textwrap.dedent(
        f"""
        import ctypes, importlib.util, warnings
        warnings.simplefilter("always")
        spec = importlib.util.spec_from_file_location("b", {str(Path(build.__file__))!r})
        b = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(b)
        lib = b.load_library(open({str(source_file)!r}).read())
        fn = getattr(lib, {symbol!r})
        T, N = {T}, {N}
        F = ctypes.c_float
        x = (F * (T * N))(*([0.7] * (T * N)))
        v0 = (F * N)()
        s = (F * (T * N))()
        v = (F * N)()
        P = ctypes.c_void_p
        fn.argtypes = [P] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
        fn(x, v0, None, s, None, None, v, T, N, 1)
        print(sum(s))
        """
    )


def _dyn(tau: float = 5.0):
    return lif_dynamics(tau=tau, v_reset=-0.1)


def _expected_spikes(tau: float = 5.0) -> float:
    s, _, _ = torch_multi_step(_dyn(tau), torch.full((T, N), 0.7), torch.zeros(N))
    return s.sum().item()


def _run_child(
    tmp_path: Path, cache: Path, tau: float = 5.0, extra_env: dict | None = None, preexec=None
):
    src = generate(_dyn(tau), "c")
    source_file = tmp_path / f"kernel_{tau}.c"
    source_file.write_text(src.source)
    env = {**os.environ, "SNNCOMPILE_CACHE_DIR": str(cache), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-c", _child_script(source_file, src.name + "_forward")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def _entry(cache: Path, tau: float = 5.0) -> Path:
    src = generate(_dyn(tau), "c").source
    key = build.cache_key(src, build.find_compiler(), build.compile_flags())
    return cache / f"snnk_{key[:32]}.so"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SNNCOMPILE_CACHE_DIR", str(path))
    monkeypatch.setattr(build, "_warned_cache", set())
    build.forget_loaded()
    yield path
    build.forget_loaded()


def _check_kernel_works(k: CpuKernel, tau: float) -> None:
    x = torch.randn(4, 10)
    out = k.forward(x, torch.zeros(10), torch.zeros(0), True, False)
    ref = torch_multi_step(_dyn(tau), x, torch.zeros(10))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[3], ref[1])


def test_truncated_library_is_rebuilt_not_a_crash(cache, tmp_path):
    first = _run_child(tmp_path, cache)
    assert first.returncode == 0, first.stderr[-2000:]
    lib = _entry(cache)
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])  # a disk-full or killed foreign writer
    for _ in range(2):  # the first later process repairs it, the next one reuses the repair
        p = _run_child(tmp_path, cache)
        assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
        assert float(p.stdout) == _expected_spikes()
    assert len(lib.read_bytes()) > len(data) // 2
    meta = json.loads(build.sidecar_path(lib).read_text())
    assert meta["size"] == lib.stat().st_size


def test_foreign_library_under_the_entrys_name_is_rebuilt(cache):
    k_other = CpuKernel(_dyn(7.0))
    other = _entry(cache, 7.0)
    mine = _entry(cache, 5.0)
    # A valid library of another kernel, with its own (consistent) sidecar, under my name.
    mine.write_bytes(other.read_bytes())
    build.sidecar_path(mine).write_text(build.sidecar_path(other).read_text())
    build.forget_loaded()
    _check_kernel_works(CpuKernel(_dyn(5.0)), 5.0)
    # ... and without a sidecar (a cache written before sidecars existed, or copied by hand).
    mine.write_bytes(other.read_bytes())
    build.sidecar_path(mine).unlink()
    build.forget_loaded()
    _check_kernel_works(CpuKernel(_dyn(5.0)), 5.0)
    assert (
        json.loads(build.sidecar_path(mine).read_text())["sha256"]
        != json.loads(build.sidecar_path(other).read_text())["sha256"]
    )
    del k_other


def test_same_size_corruption_is_caught_by_the_checksum(cache):
    CpuKernel(_dyn())
    lib = _entry(cache)
    data = bytearray(lib.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])  # same size, damaged
    lib.write_bytes(bytes(data))
    build.forget_loaded()
    _check_kernel_works(CpuKernel(_dyn()), 5.0)
    assert lib.read_bytes() != bytes(data)


def _assert_one_cache_warning(rec) -> None:
    msgs = [str(w.message) for w in rec if "SNNCOMPILE_CACHE_DIR" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in rec]


@pytest.mark.parametrize("kind", ["regular_file", "under_a_file"])
def test_unusable_cache_dir_builds_privately_with_one_warning(tmp_path, monkeypatch, kind):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    path = blocker if kind == "regular_file" else blocker / "cache"
    monkeypatch.setenv("SNNCOMPILE_CACHE_DIR", str(path))
    monkeypatch.setattr(build, "_warned_cache", set())
    build.forget_loaded()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _check_kernel_works(CpuKernel(_dyn(5.0)), 5.0)
        _check_kernel_works(CpuKernel(_dyn(6.0)), 6.0)
    _assert_one_cache_warning(rec)
    assert blocker.read_text() == "x"
    build.forget_loaded()


@pytest.mark.parametrize("when", ["detected", "at_publish"])
def test_unwritable_cache_dir_falls_back_with_one_warning(cache, monkeypatch, when):
    """A cache directory that refuses writes: seen by its mode (``detected``), or only when the
    library is written (a read-only mount as root, a full disk: ``at_publish``)."""
    cache.mkdir(parents=True)

    def refuse(target: Path, data: bytes) -> None:
        raise OSError(30, "Read-only file system", str(target))

    if when == "at_publish":
        monkeypatch.setattr(build, "_atomic_write", refuse)
    else:
        real_access = os.access
        monkeypatch.setattr(
            build.os, "access", lambda p, m: False if Path(p) == cache else real_access(p, m)
        )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _check_kernel_works(CpuKernel(_dyn(5.0)), 5.0)
        _check_kernel_works(CpuKernel(_dyn(6.0)), 6.0)
    _assert_one_cache_warning(rec)
    assert not list(cache.iterdir()) or all(p.suffix == ".lock" for p in cache.iterdir())


def _nobody():
    try:
        import pwd

        return pwd.getpwnam("nobody").pw_uid
    except (ImportError, KeyError):
        return None


def test_read_only_cache_dir_in_a_child_process(tmp_path):
    """``chmod 555`` on the cache directory; as root (which ignores modes) the child drops to
    ``nobody`` so the mode is enforced."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="snncompile_ro_"))
    try:
        os.chmod(base, 0o755)
        ro = base / "cache"
        ro.mkdir()
        os.chmod(
            ro,
            stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH,
        )
        preexec = None
        if os.geteuid() == 0:
            uid = _nobody()
            if uid is None:
                pytest.skip("running as root and there is no 'nobody' user to drop to")

            def preexec():
                os.setgid(uid)
                os.setuid(uid)

        src_dir = base / "src"
        src_dir.mkdir()
        os.chmod(src_dir, 0o755)
        try:
            p = _run_child(src_dir, ro, extra_env={"HOME": str(base)}, preexec=preexec)
        except PermissionError:
            pytest.skip("running as root and the interpreter is not usable by 'nobody'")
        assert p.returncode == 0, p.stderr[-2000:]
        assert float(p.stdout) == _expected_spikes()
        assert p.stderr.count("SNNCOMPILE_CACHE_DIR") == 1, p.stderr[-2000:]
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(base / "cache", 0o755)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_concurrent_processes_compile_once(cache, tmp_path):
    """Four processes ask for the same missing kernel at once: one compiles (a counting compiler
    wrapper proves it), all load a verified library and agree."""
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\ncase "$*" in *--version*) ;; *) echo x >> {log} ;; esac\n'
        f'exec {build.find_compiler()} "$@"\n'
    )
    wrapper.chmod(0o755)
    src = generate(_dyn(), "c")
    source_file = tmp_path / "kernel.c"
    source_file.write_text(src.source)
    env = {**os.environ, "SNNCOMPILE_CACHE_DIR": str(cache), "SNNCOMPILE_CC": str(wrapper)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _child_script(source_file, src.name + "_forward")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert {float(o) for o, _ in outs} == {_expected_spikes()}
    assert log.read_text().count("x") == 1
    libs = list(cache.glob("snnk_*.so"))
    assert len(libs) == 1 and not list(cache.glob("*.tmp"))
    meta = json.loads(build.sidecar_path(libs[0]).read_text())
    assert meta["size"] == libs[0].stat().st_size


def test_march_env_is_validated_and_keys_the_cache(monkeypatch):
    monkeypatch.setenv("SNNCOMPILE_MARCH", "x86-64-v2")
    assert build.compile_flags()[-1] == "-march=x86-64-v2"
    monkeypatch.setenv("SNNCOMPILE_MARCH", "native; rm -rf /")
    with pytest.raises(ValueError, match="SNNCOMPILE_MARCH"):
        build.compile_flags()
    monkeypatch.delenv("SNNCOMPILE_MARCH")
    assert build.compile_flags()[-1] == "-march=native"
    cc = build.find_compiler()
    assert build.cache_key("x", cc, build.compile_flags("x86-64-v2")) != build.cache_key(
        "x", cc, build.compile_flags("native")
    )
