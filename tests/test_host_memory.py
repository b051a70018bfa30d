"""snncompile.runtime.reuse_host_memory: freed large blocks are reused instead of faulted in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from snncompile.runtime import host_memory

# Each script runs in a fresh interpreter: the setting is one-way for the whole process.
_FAULTS_PER_ALLOCATION = textwrap.dedent(
    """
    import sys
    import torch
    from snncompile.runtime.host_memory import minor_page_faults, reuse_host_memory

    def faults_per_allocation(numel):
        # The heap takes a few allocations to settle (glibc extends it before a freed block
        # fits), so only the last five of sixteen count.
        counts = []
        for _ in range(16):
            before = minor_page_faults()
            torch.ones(numel)  # allocated, written, freed
            counts.append(minor_page_faults() - before)
        return sum(counts[-5:]) / 5

    numel = 40 * 2**20 // 4  # 40 MiB: above glibc's dynamic mmap threshold ceiling (32 MiB)
    default = faults_per_allocation(numel)
    setting = reuse_host_memory()
    print(default, faults_per_allocation(numel), setting.mmap_threshold, setting.trim_threshold)
    """
)


def _glibc_malloc() -> bool:
    try:
        host_memory._glibc()
    except host_memory.HostMemoryError:
        return False
    return True


_THRESHOLD_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@pytest.mark.skipif(not _glibc_malloc(), reason="needs glibc's malloc")
def test_large_blocks_are_reused_instead_of_faulted_in() -> None:
    env = {k: v for k, v in os.environ.items() if k not in _THRESHOLD_ENV}  # glibc's defaults
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_ALLOCATION],
        capture_output=True, text=True, check=True, timeout=120, env=env,
    ).stdout.split()  # fmt: skip
    default, reused = float(out[0]), float(out[1])
    # By default each 40 MiB tensor is a fresh mapping: all of it faults in again (10 240 pages
    # of 4 KiB; 20 where the kernel backs it with 2 MiB pages).
    assert default >= 20
    # Kept in the heap, the freed block serves the next tensor without (almost any) fault.
    assert reused <= default / 20
    assert (int(out[2]), int(out[3])) == (1 << 30, 2**31 - 1)


@pytest.mark.parametrize("bad", [0, -1, 1 << 20, 2.5, 2**62, "1G", True])
def test_bad_block_size_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="max_block_bytes"):
        host_memory.reuse_host_memory(bad)  # type: ignore[arg-type]


@pytest.mark.skipif(
    not _glibc_malloc() or any(k in os.environ for k in _THRESHOLD_ENV),
    reason="needs glibc's malloc with its default thresholds",
)
def test_minor_page_faults_count_fresh_pages() -> None:
    import torch

    before = host_memory.minor_page_faults()
    torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB: above the mmap ceiling, a fresh mapping
    assert host_memory.minor_page_faults() - before >= 32  # one a page, even for 2 MiB pages


@pytest.fixture
def _dynamic_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's dynamic mmap threshold as at process start: no env override, nothing applied."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(host_memory, "_applied", None)


@pytest.mark.skipif(not _glibc_malloc(), reason="needs glibc's malloc")
@pytest.mark.usefixtures("_dynamic_threshold")
def test_large_tensor_note_only_when_blocks_are_mapped_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert host_memory.large_tensor_note(8 * 2**20) is None
    note = host_memory.large_tensor_note(32 * 2**20)  # a 32 MiB tensor's chunk is mapped
    assert note is not None and "32 MiB" in note and "reuse_host_memory()" in note
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824")
    assert host_memory.large_tensor_note(64 * 2**20) is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert host_memory.large_tensor_note(64 * 2**20) is None
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(host_memory, "_applied", host_memory.HostMemorySetting(1, 2, "2.36"))
    assert host_memory.large_tensor_note(64 * 2**20) is None


@pytest.mark.skipif(not _glibc_malloc(), reason="needs glibc's malloc")
@pytest.mark.usefixtures("_dynamic_threshold")
def test_report_names_the_largest_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import snncompile
    from snncompile import layer, neuron

    net = torch.nn.Sequential(layer.Linear(16, 64), neuron.LIFNode())
    x = torch.rand(4, 8, 16)
    compiled = snncompile.optimize(net, x)
    assert compiled._largest_tensor_bytes() == 4 * 8 * 64 * 4  # the [T, N, 64] float32 output
    assert "host memory" not in compiled.report()
    # The same rule with a ceiling below this model's tensors.
    monkeypatch.setattr(host_memory, "_GLIBC_MMAP_THRESHOLD_MAX", 4096 + 1024)
    assert "host memory: the step's largest tensor is" in compiled.report()
