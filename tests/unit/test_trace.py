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
    assert rows["IO"].share == pytest.approx(0.6) and rows["IO"].mean_host_ns == 1000
    assert "IO" in trace.format_table() and "60.0%" in trace.format_table()
    assert json.loads(trace.to_json())["exits"]["IO"] == 3


def test_limit_keeps_counting():
    trace = ExitTrace(limit=2)
    for _ in range(5):
        trace.add(ExitReason.IO, 0, 0xF4, 1, True, 0, 10)
    assert len(trace.records) == 2 and trace.dropped == 3 and len(trace) == 5
    assert "not kept" in trace.format_table()
