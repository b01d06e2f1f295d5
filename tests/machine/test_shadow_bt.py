"""Shadow page tables under binary translation: pagingkernel64 translated, its paging virtualized.

As in test_shadow.py (trap-and-emulate), the kernel's console is the differential check: it holds every
value read through a remapped page, every fault's address and error code and a hash of the random edits'
outcomes.  Here the kernel's code never runs: the translator reads it through the kernel's own page tables
and translated code takes the page faults.  One run per backend is shared by the tests that only read it.
"""

from __future__ import annotations

import re
from typing import Callable

import pytest

from labkit import Guest
from labkit.monitor.binary_translation import TranslationSummary
from labkit.monitor.shadow import ShadowReport, paging_kernel, run_shadowed
from labkit.monitor.trap_emulate import run_native
from labkit.vmm.status import RunResult, StatusKind

from shadow_guests import REMAPPED_CODE

BT = "binary translation"
EDITS_IN_TEST = 150
"""Random edits in the sampled run; benchmarks/bench_shadow.py makes 1,000 per seed under both monitors."""
SEED = 2024


def _number(console: str, label: str) -> int:
    match = re.search(re.escape(label) + r"(0x[0-9a-f]+)", console)
    assert match is not None, f"{label!r} not in the console:\n{console}"
    return int(match.group(1), 16)


def _summary(result: RunResult) -> TranslationSummary:
    assert isinstance(result.monitor, TranslationSummary), result.status
    return result.monitor


def _shadow(result: RunResult) -> ShadowReport:
    shadow = _summary(result).shadow
    assert shadow is not None
    return shadow


@pytest.fixture(scope="module")
def runs() -> Callable[..., RunResult]:
    """Each run made once per module: ``runs(key, make)``."""
    made: dict[tuple, RunResult] = {}

    def run(key: tuple, make: Callable[[], RunResult]) -> RunResult:
        if key not in made:
            made[key] = make()
        return made[key]

    return run


def _paging(runs, backend: str) -> RunResult:
    return runs(("paging", backend), lambda: run_shadowed("pagingkernel64", backend, monitor=BT))


def test_paging_kernel_console_equals_native_under_binary_translation(backend_name, runs):
    native_console = Guest.named("pagingkernel64").expected["console"]
    result = _paging(runs, backend_name)
    assert result.status.kind == StatusKind.HALTED, str(result.status)
    assert result.console == native_console
    summary = _summary(result)
    assert summary.blocks_translated > 0 and summary.protected_pages > 0
    # Every #PF of translated code went to shadow paging first: the ones it absorbed are counted as its entries.
    assert summary.entries["shadow: hidden #PF"] == _shadow(result).hidden_faults > 0


def test_every_page_table_store_is_trapped_under_binary_translation(backend_name, runs):
    result = _paging(runs, backend_name)
    shadow = _shadow(result)
    stores = _number(result.console, "page-table stores while paging: ")
    assert stores == 8 + 100  # remap, map back, unmap, read-only, 4 pages in; one per random edit
    assert shadow.pt_writes == stores == _summary(result).entries["shadow: page-table write"]
    assert [event.kind for event in shadow.events].count("pt-write") == stores


def test_no_stale_shadow_entry_survives_invlpg_or_a_cr3_load_under_binary_translation(backend_name, runs):
    result = _paging(runs, backend_name)
    lines = result.console.splitlines()
    assert "remap 0x40001000 to B's page, invlpg, read: 0xb2" in lines
    assert "map it back, reload CR3, read: 0xc3" in lines
    assert "unmap 0x40001000, invlpg, read: #PF cr2 0x40001000, error code 0x0" in lines
    shadow = _shadow(result)
    assert shadow.invlpgs == 7 + 100 == _summary(result).entries["emulate: invlpg"]
    assert shadow.entries_zapped >= 3
    assert shadow.roots_built == 3 and shadow.cr3_loads == 6  # A, B, A, B, A, then a reload of A
    assert set(shadow.roots) == {0x4000, 0x100000, 0x105000}


def test_hidden_and_true_page_faults_are_counted_apart_under_binary_translation(backend_name, runs):
    result = _paging(runs, backend_name)
    shadow = _shadow(result)
    probes = _number(result.console, ", faults ")
    paged_in = _number(result.console, "demand paging: pages brought in ")
    assert shadow.true_faults == probes + paged_in
    summary = _summary(result)
    assert summary.entries["fault: #PF"] == shadow.true_faults  # each one reflected to the kernel's handler
    kinds = [event.kind for event in shadow.events]
    assert kinds.count("hidden") == shadow.hidden_faults and kinds.count("true") == shadow.true_faults


def test_random_page_table_edits_fault_or_succeed_as_natively_under_binary_translation(backend_name, runs):
    kernel = paging_kernel(edits=EDITS_IN_TEST, seed=SEED)
    native = runs(("native edits", "emu"), lambda: run_native(kernel, "emu")[0])
    translated = runs(("edits", backend_name), lambda: run_shadowed(kernel, backend_name, monitor=BT))
    assert native.status.kind == StatusKind.HALTED
    assert 0 < _number(native.console, ", faults ") < EDITS_IN_TEST  # both outcomes occur
    assert translated.status.kind == StatusKind.HALTED, str(translated.status)
    assert translated.console == native.console
    assert _shadow(translated).pt_writes == _number(native.console, "page-table stores while paging: ")


def test_translations_follow_the_code_pages_mapping_and_contents(backend_name):
    # Code at one virtual address: remapped (invlpg), rewritten twice through another address, remapped (CR3
    # reload), unmapped (the fetch is a true #PF); then an instruction running into an unmapped page (#PF, not
    # #UD). A translation kept past any change prints a stale digit.
    kernel = Guest.from_asm(REMAPPED_CODE, mode=64, name="remapped-code")
    native = run_native(kernel, backend_name)[0]
    trapped = run_shadowed(kernel, backend_name, timeout=10)
    translated = run_shadowed(kernel, backend_name, timeout=10, monitor=BT)
    assert native.console == trapped.console == translated.console == "12341F01F11"
    summary = _summary(translated)
    assert summary.invalidated == 5  # one translation of the code at 0x120000 per change
    # The rewrites went through the monitor (the page is protected): the mov carried out, the inc run once.
    assert summary.entries["write: store"] > 0 and summary.entries["write: one-shot"] > 0
    assert trapped.monitor.shadow is not None
    assert _shadow(translated).true_faults == trapped.monitor.shadow.true_faults == 2


def test_a_translated_kernel_touching_the_monitors_memory_is_stopped(backend_name):
    # 2 MiB of RAM: the translation cache is its top 256 KiB, the shadow pool the 256 KiB below.
    for address, kind in ((0x1D0000, "translation cache"), (0x180000, "shadow pool")):
        kernel = Guest.from_asm(f"mov qword ptr [{address:#x}], 1\nhlt\n", mode=64, name=f"writes-the-{kind}")
        result = run_shadowed(kernel, backend_name, timeout=10, monitor=BT)
        assert result.status.kind == StatusKind.ERROR, kind
        assert f"the kernel uses virtual address {address:#x}, which the monitor keeps for itself" \
            in result.status.message, kind


@pytest.mark.parametrize("monitor", ["trap-and-emulate", BT])
def test_a_store_to_a_top_level_entry_keeps_the_monitors_own_mappings(backend_name, monitor):
    # PML4[0] of the boot tables covers the kernel and the monitor's stubs, stack, pool and cache. Storing
    # it (even unchanged) drops every shadow entry built from it; the monitor's own pages must come back
    # with the next resume, or the next trap finds no forwarding stub and the machine triple-faults.
    kernel = Guest.from_asm("mov rax, [0x4000]\nmov [0x4000], rax\nmov dx, 0x3F8\nmov al, 'o'\nout dx, al\n"
                            "mov rax, [0x8000]\nmov al, 'k'\nout dx, al\nhlt\n", mode=64, name="stores-pml4-0")
    result = run_shadowed(kernel, backend_name, timeout=10, monitor=monitor)
    assert result.status.kind == StatusKind.HALTED, str(result.status)
    assert result.console == "ok"
    assert result.monitor.shadow.pt_writes == 1 and result.monitor.shadow.entries_zapped >= 1


@pytest.mark.parametrize("monitor", ["trap-and-emulate", BT])
def test_the_monitor_does_not_store_into_its_own_memory_for_the_kernel(backend_name, monitor):
    # The kernel's stack in the shadow pool (2 MiB of RAM: its top 256 KiB under trap-and-emulate, the 256 KiB
    # below the translation cache under binary translation): the #UD frame the monitor would push lands there.
    stack = 0x1E0000 if monitor == "trap-and-emulate" else 0x1A0000
    kernel = Guest.from_asm(f"mov rsp, {stack:#x}\nud2\n", mode=64, name="stack-in-the-pool")
    result = run_shadowed(kernel, backend_name, timeout=10, monitor=monitor)
    assert result.status.kind == StatusKind.SHUTDOWN, str(result.status)  # the frame cannot be delivered
    assert f"the guest's stack at {stack:#x} cannot take the frame: the kernel uses virtual address " \
           f"{stack - 8:#x}, which the monitor keeps for itself" in result.status.message


def test_the_translator_does_the_same_with_and_without_shadow_paging(backend_name):
    # The minikernel's every routine (segments, int n, the virtual timer, its page fault) and a kernel that
    # patches its own translated code (a plain store, a one-shot, the running block, an emulated store): the
    # same console and registers, the same monitor entries but for shadow paging's own.
    from labkit.monitor.binary_translation import run_translated
    from labkit.monitor.shadow import ShadowPaging
    from labkit.monitor.trap_emulate import ROUTINES, minikernel

    from test_binary_translation import PATCHING

    for kernel, timer in ((minikernel([name for name in ROUTINES if name != "student"]), True),
                          (Guest.from_asm(PATCHING, mode=64, name="patching"), False)):
        plain = run_translated(kernel, backend_name, timer=timer)
        shadowed = run_translated(kernel, backend_name, timer=timer, shadow=ShadowPaging())
        assert shadowed.status.kind == plain.status.kind == StatusKind.HALTED, str(shadowed.status)
        assert shadowed.console == plain.console and shadowed.regs.gprs() == plain.regs.gprs(), kernel.name
        entries = {reason: count for reason, count in _summary(shadowed).entries.items()
                   if not reason.startswith("shadow:")}
        assert entries == _summary(plain).entries, kernel.name
        assert _summary(shadowed).invalidated == _summary(plain).invalidated
