"""The exit trace: every VM exit of a run, in order, with what it cost the host.

The run loop appends one plain tuple per exit (cheap enough for the hot path);
reading the trace turns them into :class:`ExitRecord` objects.  Records are
kept up to ``limit``; past it only the per-reason counters go on, so a guest
that exits millions of times cannot exhaust host memory.

``host_ns`` of an exit is the host time from the end of the previous exit's
handling to the end of this one's: guest execution, the exit itself and its
handling.  Summed over a run it is the run's time; it is a host measurement,
and on the emulation backend it is emulator time, not hardware time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterator

from labkit.exits import ExitReason, reason_name

DEFAULT_LIMIT = 200_000

# One raw record: (reason, rip, address, size, is_write, data, host_ns).
# address is the port for IO, the guest-physical address for MMIO, else None.


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """One exit as the trace shows it."""

    seq: int
    reason: str
    rip: int | None
    address: int | None
    size: int | None
    direction: str | None
    """``"in"``/``"out"`` for port I/O, ``"read"``/``"write"`` for MMIO."""
    data: int | None
    host_ns: int


@dataclass(frozen=True, slots=True)
class ReasonSummary:
    """One row of the exit table, in the spirit of ``kvm_stat`` and ``perf kvm stat``."""

    reason: str
    count: int
    share: float
    mean_host_ns: float


def _direction(reason: int, is_write: bool | None) -> str | None:
    if is_write is None:
        return None
    if reason == ExitReason.IO:
        return "out" if is_write else "in"
    return "write" if is_write else "read"


class ExitTrace:
    __slots__ = ("records", "limit", "overflow_counts", "overflow_host_ns")

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self.records: list[tuple] = []
        """Raw tuples ``(reason, rip, address, size, is_write, data, host_ns)``, up to ``limit``."""
        self.overflow_counts: dict[int, int] = {}
        """Exits past ``limit``, counted (and timed) by reason but not kept."""
        self.overflow_host_ns: dict[int, int] = {}

    def add(self, reason: int, rip: int | None, address: int | None, size: int | None,
            is_write: bool | None, data: int | None, host_ns: int) -> None:
        """Record one exit (the run loop's hot path inlines the same steps)."""
        if len(self.records) < self.limit:
            self.records.append((reason, rip, address, size, is_write, data, host_ns))
        else:
            self.overflow_counts[reason] = self.overflow_counts.get(reason, 0) + 1
            self.overflow_host_ns[reason] = self.overflow_host_ns.get(reason, 0) + host_ns

    @property
    def dropped(self) -> int:
        """Exits counted but not kept."""
        return sum(self.overflow_counts.values())

    @property
    def counts(self) -> dict[int, int]:
        """Exits by reason number, kept and dropped."""
        counts = dict(self.overflow_counts)
        for record in self.records:
            counts[record[0]] = counts.get(record[0], 0) + 1
        return counts

    @property
    def host_ns(self) -> dict[int, int]:
        """Host time by reason number, kept and dropped exits."""
        totals = dict(self.overflow_host_ns)
        for record in self.records:
            totals[record[0]] = totals.get(record[0], 0) + record[6]
        return totals

    def __len__(self) -> int:
        return len(self.records) + self.dropped

    def __iter__(self) -> Iterator[ExitRecord]:
        for seq in range(len(self.records)):
            yield self[seq]

    def __getitem__(self, seq: int) -> ExitRecord:
        if seq < 0:
            seq += len(self.records)
        return self.record_of(seq, *self.records[seq])

    @staticmethod
    def record_of(seq: int, reason: int, rip: int | None, address: int | None, size: int | None,
                  is_write: bool | None, data: int | None, host_ns: int) -> ExitRecord:
        """The :class:`ExitRecord` of one raw record, numbered ``seq``."""
        return ExitRecord(seq, reason_name(reason), rip, address, size, _direction(reason, is_write), data, host_ns)

    def count(self, reason: int | str) -> int:
        """How many exits of one reason (``ExitReason.IO`` or ``"IO"``)."""
        if isinstance(reason, str):
            reason = ExitReason[reason]
        return self.counts.get(int(reason), 0)

    def by_reason(self) -> dict[str, int]:
        """Exit counts by reason name, most frequent first."""
        ordered = sorted(self.counts.items(), key=lambda item: -item[1])
        return {reason_name(reason): count for reason, count in ordered}

    def summary(self) -> list[ReasonSummary]:
        """The exit table: reason, count, share of all exits, mean host time per exit."""
        counts, host_ns = self.counts, self.host_ns
        total = sum(counts.values()) or 1
        return [
            ReasonSummary(reason_name(reason), count, count / total, host_ns[reason] / count)
            for reason, count in sorted(counts.items(), key=lambda item: -item[1])
        ]

    def total_host_ns(self) -> int:
        return sum(self.host_ns.values())

    def as_dicts(self) -> list[dict]:
        """The kept records as plain dicts (for pandas, JSON or CSV)."""
        return [asdict(record) for record in self]

    def to_json(self) -> str:
        return json.dumps({
            "exits": self.by_reason(),
            "dropped": self.dropped,
            "records": self.as_dicts(),
        })

    def format_table(self) -> str:
        """The exit table as text, as ``labkit run`` prints it."""
        lines = [f"{'reason':<16}{'count':>10}{'share':>9}{'mean host time':>17}"]
        for row in self.summary():
            lines.append(f"{row.reason:<16}{row.count:>10}{row.share:>8.1%}{_format_ns(row.mean_host_ns):>17}")
        if self.dropped:
            lines.append(f"({self.dropped} exits counted but not kept: trace limit {self.limit})")
        return "\n".join(lines)


def _format_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"
