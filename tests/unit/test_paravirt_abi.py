"""The paravirtual ABI is written down three times (hypervisor, guest, docstring): they must agree."""

from __future__ import annotations

import re

import pytest

import labkit.monitor.paravirt as paravirt
from labkit.guest import guests_dir
from labkit.monitor.paravirt import (ARGUMENTS, CATEGORIES, MAX_MULTICALL, MULTICALL_ENTRY, REPLACES, Hypercall,
                                     category, error_result, is_error)

pytestmark = pytest.mark.unit

XEN = {"set_trap_table": 0, "set_gdt": 2, "fpu_taskswitch": 5, "multicall": 13, "version": 17, "console_io": 18,
       "iret": 23, "mmuext_op": 26, "sched_op": 29}
"""Xen's numbers (xen/include/public/xen.h, __HYPERVISOR_*; xen_version is 17) for the calls Xen has."""


def test_numbers_are_xens_where_xen_has_the_call_and_the_rest_in_its_arch_range():
    for call in Hypercall:
        if call.label in XEN:
            assert call == XEN[call.label], call
        else:
            assert 48 <= call <= 55, f"{call.label} is labkit's own: it belongs in Xen's arch-specific range 48-55"


def test_every_call_says_what_it_replaces_and_how_many_arguments_it_takes():
    assert set(REPLACES) == set(Hypercall) == set(ARGUMENTS)
    assert all(0 <= count <= 5 for count in ARGUMENTS.values())


def test_the_guest_uses_the_hypervisors_numbers():
    source = (guests_dir() / "pvkernel64.S").read_text()
    defined = {name.lower(): int(value, 0) for name, value in re.findall(r"\.equ HC_(\w+), (\w+)", source)}
    assert defined == {call.label: int(call) for call in Hypercall}
    assert int(re.search(r"\.equ PV_ABI_VERSION, (\w+)", source).group(1), 0) == paravirt.PV_ABI_VERSION


def test_the_docstring_table_lists_every_call_with_its_number():
    rows = dict(re.findall(r"^    (\d+)\s+([a-z_]+)\s", paravirt.__doc__, re.M))
    assert {int(number): name for number, name in rows.items()} == {int(call): call.label for call in Hypercall}


def test_results_in_the_errno_range_are_errors_and_nothing_else_is():
    assert is_error(error_result(22)) and is_error(error_result(4095))
    assert not is_error(0) and not is_error(0x80010031) and not is_error(error_result(4096))
    assert error_result(14) == 2**64 - 14


def test_multicall_entries_have_xens_layout():
    assert MULTICALL_ENTRY.size == 64 and MAX_MULTICALL == 32


@pytest.mark.parametrize("kind, expected", [
    ("port exit: out 0x3f8", "console output"), ("port exit: in 0x3fd", "console output"),
    ("port exit: out 0xf4", "other"), ("trap: in", "console output"),
    ("hypercall: console_io", "console output"), ("trap: popfq", "interrupt flag"),
    ("hypercall: irq_restore", "interrupt flag"), ("trap: mov", "descriptor tables, CRs"),
    ("hypercall: read_cr", "descriptor tables, CRs"), ("trap: reflected #UD", "the kernel's own exceptions"),
    ("bounce: #PF", "the kernel's own exceptions"), ("hypercall: iret", "the kernel's own exceptions"),
    ("exit: HLT", "halt"), ("hypercall: sched_op", "halt"), ("hypercall: multicall", "batch (multicall)"),
    ("hypercall: version", "other"), ("hypercall: unknown", "other"),
])
def test_each_entry_kind_has_its_category(kind, expected):
    assert category(kind) == expected and expected in CATEGORIES
