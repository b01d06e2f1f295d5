"""Decoding rings64's event reports from an exit trace built by hand."""

from __future__ import annotations

import pytest

from labkit.exits import ExitReason
from labkit.rings import EVENT_BASE, instruction_of, ring_events
from labkit.trace import ExitTrace

pytestmark = pytest.mark.unit


def report(trace: ExitTrace, rip: int, error: int, cr2: int, word: int, ns: int = 1000) -> None:
    for offset, value in ((0, rip), (4, error), (8, cr2), (12, word)):
        trace.add(int(ExitReason.MMIO), 0x8000, EVENT_BASE + offset, 4, True, value, ns)


def test_events_are_decoded_in_order_with_their_times():
    trace = ExitTrace()
    report(trace, 0x8000, 0, 0, 4 << 16)
    trace.add(int(ExitReason.IO), 0x8100, 0x3F8, 1, True, 0x41, 500)  # a UART exit in between
    report(trace, 0x83E3, 5, 0x30000, 1 << 16 | 3 << 8 | 14)
    report(trace, 0x83EB, 0, 0, 3 << 16)
    events = ring_events(trace)
    assert [event.kind for event in events] == ["start", "entry", "return"]
    fault = events[1]
    assert (fault.vector, fault.from_cpl, fault.error_code, fault.cr2) == (14, 3, 5, 0x30000)
    assert fault.label == "#PF (error 0x5, cr2 0x30000) from ring 3"
    assert fault.cpl_after == 0 and events[2].cpl_after == 3
    assert [event.host_ns for event in events] == [4000, 8500, 12500]
    assert fault.exit_seq == 8


def test_other_mmio_and_reads_are_not_events():
    trace = ExitTrace()
    trace.add(int(ExitReason.MMIO), 0x8000, EVENT_BASE + 12, 4, False, 1 << 16, 10)
    trace.add(int(ExitReason.MMIO), 0x8000, EVENT_BASE + 0x100, 4, True, 1 << 16, 10)
    assert ring_events(trace) == []


def test_a_return_followed_by_an_entry_from_ring_0_did_not_happen():
    """PVM's sysretq raises #GP in the kernel: the return reported before it never reached ring 3."""
    trace = ExitTrace()
    report(trace, 0x83C2, 0, 0, 2 << 16 | 3 << 8)        # syscall from ring 3
    report(trace, 0x83C2, 0, 0, 3 << 16)                 # return (reported before sysretq)
    report(trace, 0x832B, 0, 0, 1 << 16 | 0 << 8 | 13)   # #GP from ring 0 at the sysretq
    report(trace, 0x83C2, 0, 0, 3 << 16)                 # return (iretq)
    events = ring_events(trace)
    assert [event.completed for event in events] == [True, False, True, True]
    assert [event.cpl_after for event in events] == [0, 0, 0, 3]
    assert events[1].label == "return to ring 3 failed (next entry from ring 0)"
    assert events[2].label == "#GP (error 0x0) from ring 0"


def test_a_traps_instruction_is_the_one_before_the_saved_rip():
    load = 0x8000
    code = bytes.fromhex("b802000000" "0f05" "cd80" "fa" "90")  # mov eax, 2; syscall; int 0x80; cli; nop
    trace = ExitTrace()
    report(trace, load + 7, 0, 0, 2 << 16 | 3 << 8)             # syscall: saved RIP = the int 0x80
    report(trace, load + 9, 0, 0, 1 << 16 | 3 << 8 | 0x80)      # int 0x80: saved RIP = the cli
    report(trace, load + 9, 0, 0, 1 << 16 | 3 << 8 | 13)        # #GP at the cli: a fault, RIP = the cli
    report(trace, load + 10, 0, 0, 3 << 16)                     # return: resumes at the nop
    events = ring_events(trace)
    assert [event.is_trap for event in events] == [True, True, False, False]
    assert [instruction_of(event, code, load) for event in events] == [
        (load + 5, "syscall"), (load + 7, "int 0x80"), (load + 9, "cli"), (load + 10, "nop")]


def test_a_trap_whose_bytes_are_not_a_trap_instruction_names_none():
    load = 0x8000
    code = bytes.fromhex("9090" "90")
    trace = ExitTrace()
    report(trace, load + 2, 0, 0, 2 << 16 | 3 << 8)
    assert instruction_of(ring_events(trace)[0], code, load) is None
    report(trace, load + 1, 0, 0, 2 << 16 | 3 << 8)               # before the code starts: no slice wraps around
    assert instruction_of(ring_events(trace)[1], code, load) is None
