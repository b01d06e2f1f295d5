"""Shadow page tables: pagingkernel64 natively and under trap-and-emulate with its paging virtualized.

The kernel's console holds everything it observed (values read through
remapped pages, fault addresses and error codes, a hash of the random edits'
outcomes and of the accessed/dirty bits it read back), so "same console as
native" is the differential check; the monitor's counters are checked against
what the kernel says it did.
"""

from __future__ import annotations

import re

import pytest

from labkit import Guest
from labkit.errors import ConfigError
from labkit.monitor.shadow import ShadowPaging, ShadowReport, paging_kernel, run_shadowed
from labkit.monitor.trap_emulate import TrapAndEmulate, TrapEmulateReport, run_deprivileged, run_native
from labkit.vmm.status import StatusKind

EDITS_IN_TEST = 150
"""Random edits per run here; benchmarks/bench_shadow.py makes 1,000 per seed."""


def _number(console: str, label: str) -> int:
    match = re.search(re.escape(label) + r"(0x[0-9a-f]+)", console)
    assert match is not None, f"{label!r} not in the console:\n{console}"
    return int(match.group(1), 16)


def _shadow(result) -> ShadowReport:
    assert isinstance(result.monitor, TrapEmulateReport), result.status
    assert result.monitor.shadow is not None
    return result.monitor.shadow


@pytest.fixture(scope="module")
def native_console() -> str:
    return Guest.named("pagingkernel64").expected["console"]


def test_paging_kernel_console_equals_native_under_shadow_paging(backend_name, native_console):
    native = run_native("pagingkernel64", backend_name)[0]
    shadowed = run_shadowed("pagingkernel64", backend_name)
    assert native.status.kind == StatusKind.HALTED and native.console == native_console
    assert shadowed.status.kind == StatusKind.HALTED, str(shadowed.status)
    assert shadowed.console == native_console


def test_without_shadow_paging_the_kernel_cannot_run(backend_name, native_console):
    # The contrast: a monitor whose mov cr3 is a register write leaves the kernel on labkit's identity
    # map, where its window at 1 GiB does not exist.
    plain = run_deprivileged("pagingkernel64", backend_name, timeout=30)
    assert plain.console != native_console


def test_every_page_table_store_is_trapped(backend_name):
    result = run_shadowed("pagingkernel64", backend_name)
    shadow = _shadow(result)
    stores = _number(result.console, "page-table stores while paging: ")
    assert stores == 8 + 100  # remap, map back, unmap, read-only, 4 pages in; one per random edit
    assert shadow.pt_writes == stores
    assert [event.kind for event in shadow.events].count("pt-write") == stores


def test_no_stale_shadow_entry_survives_invlpg_or_a_cr3_load(backend_name):
    result = run_shadowed("pagingkernel64", backend_name)
    lines = result.console.splitlines()
    # 0x40001000 was read (its shadow entry filled) before each remap.
    assert "remap 0x40001000 to B's page, invlpg, read: 0xb2" in lines
    assert "map it back, reload CR3, read: 0xc3" in lines
    assert "unmap 0x40001000, invlpg, read: #PF cr2 0x40001000, error code 0x0" in lines
    shadow = _shadow(result)
    assert shadow.invlpgs == 7 + 100
    assert shadow.entries_zapped >= 3
    # Two address spaces plus the boot tables, each with its own shadow root; the CR3 switches reuse them.
    assert shadow.roots_built == 3 and shadow.cr3_loads == 6  # A, B, A, B, A, then a reload of A
    assert set(shadow.roots) == {0x4000, 0x100000, 0x105000}


def test_hidden_and_true_page_faults_are_counted_apart(backend_name):
    result = run_shadowed("pagingkernel64", backend_name)
    shadow = _shadow(result)
    probes = _number(result.console, ", faults ")
    paged_in = _number(result.console, "demand paging: pages brought in ")
    assert shadow.true_faults == probes + paged_in
    assert result.monitor.reflected[14] == shadow.true_faults
    assert shadow.hidden_faults > 0
    kinds = [event.kind for event in shadow.events]
    assert kinds.count("hidden") == shadow.hidden_faults and kinds.count("true") == shadow.true_faults


@pytest.mark.parametrize("seed", [7, 2024, 0xDEADBEEF])
def test_random_page_table_edits_fault_or_succeed_as_natively_on_the_emulator(backend_name, seed):
    kernel = paging_kernel(edits=EDITS_IN_TEST, seed=seed)
    native = run_native(kernel, "emu")[0]
    shadowed = run_shadowed(kernel, backend_name)
    assert native.status.kind == StatusKind.HALTED
    assert _number(native.console, "random edits ") == EDITS_IN_TEST
    assert 0 < _number(native.console, ", faults ") < EDITS_IN_TEST  # both outcomes occur
    assert shadowed.console == native.console
    assert _shadow(shadowed).pt_writes == _number(native.console, "page-table stores while paging: ")


def test_a_kernel_touching_the_monitors_memory_is_stopped(backend_name):
    kernel = Guest.from_asm("mov rax, [0x1000]\nhlt\n", mode=64, name="touches-gdt")
    result = run_shadowed(kernel, backend_name, timeout=10)
    assert result.status.kind == StatusKind.ERROR
    assert "which the monitor keeps for itself" in result.status.message


def test_a_pool_that_reaches_the_kernels_stack_is_refused(backend_name):
    result = run_shadowed("pagingkernel64", backend_name, pool_size=2 << 20, timeout=10)
    assert result.status.kind == StatusKind.ERROR
    assert "give the Machine more memory" in result.status.message


def test_shadow_paging_arguments_are_checked():
    with pytest.raises(ConfigError, match="pool_size"):
        ShadowPaging(pool_size=12345)
    with pytest.raises(ConfigError, match="edits"):
        paging_kernel(edits=-1)
    with pytest.raises(ConfigError, match="seed"):
        paging_kernel(seed=1 << 64)


def test_the_minikernel_runs_the_same_with_and_without_shadow_paging(backend_name):
    plain = run_deprivileged("minikernel64", backend_name)
    shadowed = run_deprivileged("minikernel64", backend_name, monitor=TrapAndEmulate(shadow=ShadowPaging()))
    assert shadowed.console == plain.console
    shadow = _shadow(shadowed)
    assert shadow.true_faults == 1  # its read of 0x80000000, beyond the boot tables' 1 GiB
    assert shadow.pt_writes == 0


def test_a_kernel_mapping_the_monitors_pool_is_stopped(backend_name):
    # With 2 MiB of RAM the pool is its top 256 KiB: map virtual 0x100000 onto its first page, then read.
    kernel = Guest.from_asm("mov rax, 0x1C0003\nmov [0x7800], rax\ninvlpg [0x100000]\nmov rax, [0x100000]\nhlt\n",
                            mode=64, name="maps-the-pool")
    result = run_shadowed(kernel, backend_name, timeout=10)
    assert result.status.kind == StatusKind.ERROR
    assert "the kernel maps virtual 0x100000 to 0x1c0000, memory the monitor keeps for itself" in result.status.message
    assert _shadow(result).pt_writes == 1
