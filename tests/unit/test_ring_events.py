"""Decoding rings64's event reports from an exit trace built by hand."""

from __future__ import annotations

import pytest

from labkit.exits import ExitReason
from labkit.rings import EVENT_BASE, ring_events
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
