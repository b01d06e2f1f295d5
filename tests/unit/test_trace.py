import json

import pytest

from labkit.exits import ExitReason
from labkit.trace import ExitTrace

pytestmark = pytest.mark.unit


def test_records_counts_and_table():
    trace = ExitTrace()
    for i in range(3):
        trace.add(ExitReason.IO, 0x8000 + i, 0x3F8, 1, True, 65 + i, 1000)
    trace.add(ExitReason.MMIO, 0x8010, 0x1000_0000, 4, False, 0xFFFFFFFF, 4000)
    trace.add(ExitReason.HLT, 0x8020, None, None, None, None, 500)
    assert len(trace) == 5
    assert trace.by_reason() == {"IO": 3, "MMIO": 1, "HLT": 1}
    first = trace[0]
    assert (first.seq, first.reason, first.direction, first.data) == (0, "IO", "out", 65)
    assert trace[3].direction == "read" and trace[4].direction is None
    rows = {row.reason: row for row in trace.summary()}
    assert rows["IO"].share == pytest.approx(0.6) and rows["IO"].since_previous_total_ns == 3000
    assert "IO" in trace.format_table() and "60.0%" in trace.format_table()
    assert json.loads(trace.to_json())["exits"]["IO"] == 3


def test_summary_gives_handling_min_median_max_total_and_leaves_labkit_events_out_of_the_exits():
    trace = ExitTrace()
    for handling in (300, 100, 200, 1000):
        trace.add(ExitReason.IO, 0x8000, 0x3F8, 1, True, 0, 50_000, handling)
    trace.add(ExitReason.INTERRUPT, None, None, None, None, 0x20, 9_000, 40)
    trace.add(ExitReason.TIMEOUT, 0x8010, None, None, None, None, 2_000_000_000, 60)
    rows = trace.summary()
    assert [(row.reason, row.is_exit) for row in rows] == [("IO", True), ("INTERRUPT", False), ("TIMEOUT", False)]
    io = rows[0]
    assert (io.count, io.share) == (4, 1.0)  # the share of the VM exits alone
    handling = (io.handling_min_ns, io.handling_median_ns, io.handling_max_ns, io.handling_total_ns)
    assert handling == (100, 250, 1000, 1600)
    assert io.since_previous_total_ns == 200_000
    assert trace.exit_count() == 4 and trace.total_handling_ns() == 1700
    assert trace.by_kind() == ({"IO": 4}, {"INTERRUPT": 1, "TIMEOUT": 1})
    assert trace[0].handling_ns == 300 and trace[0].host_ns == 50_000
    table = trace.table_json()
    assert [row["reason"] for row in table["exits"]] == ["IO"]
    assert [row["reason"] for row in table["labkit_events"]] == ["INTERRUPT", "TIMEOUT"]
    assert table["exits"][0]["handling_median_ns"] == 250 and table["handling_total_ns"] == 1700
    assert set(table["columns"]) == {"handling", "since_previous"}
    text = trace.format_table()
    vm_part, events_part = text.split("-- labkit events (not VM exits)")
    assert "TIMEOUT" not in vm_part and "TIMEOUT" in events_part
    assert "250 ns" in vm_part and "1.00 µs" in vm_part  # the IO row's median and max
    assert "handling: labkit's handling of the exit" in text


def test_limit_keeps_counting():
    trace = ExitTrace(limit=2)
    for _ in range(5):
        trace.add(ExitReason.IO, 0, 0xF4, 1, True, 0, 10, 4)
    assert len(trace.records) == 2 and trace.dropped == 3 and len(trace) == 5
    assert "not kept" in trace.format_table()
    assert len(trace.handling) == 2 and trace.total_handling_ns() == 20  # dropped exits' handling still counts


def test_a_copy_keeps_what_the_trace_held_when_it_was_made():
    trace = ExitTrace(limit=3)
    trace.add(2, 0x8000, 0x3F8, 1, True, 65, 100, 10)
    copy = trace.copy()
    for _ in range(4):
        trace.add(2, 0x8002, 0x3F8, 1, True, 66, 100, 10)
    assert copy.by_reason() == {"IO": 1} and trace.by_reason() == {"IO": 5}
    full = trace.copy()  # at the limit: further exits only go to the (copied) overflow counts
    trace.add(2, 0x8004, 0x3F8, 1, True, 67, 100, 10)
    assert full.by_reason() == {"IO": 5} and trace.by_reason() == {"IO": 6}
