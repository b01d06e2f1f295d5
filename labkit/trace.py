"""The exit trace: every VM exit of a run, in order, with what it cost the host.

The run loop appends one plain tuple per exit (cheap enough for the hot path);
reading the trace turns them into :class:`ExitRecord` objects.  Records are
kept up to ``limit``; past it only the per-reason counters go on, so a guest
that exits millions of times cannot exhaust host memory.

Each record carries two host times (``perf_counter_ns``; on the emulation
backend they are emulator time, not hardware time):

- ``host_ns``, *since the previous record*: from the end of the previous
  record's handling to the end of this one's, so the guest's own execution,
  the exit (or delivery) itself and its handling.  Summed over a run it is the
  run's time.  It is not the cost of an exit: a guest that computes for a
  second before one ``out`` gives that exit a second.
- ``handling_ns``, *labkit's handling*: from the moment the backend handed the
  exit to labkit's dispatcher until the answer (the device's reply, the
  decision to stop) was ready.  It leaves out the kernel's part of the exit
  and re-entry (KVM) and the emulator's own stop and restart.

Not every record is a VM exit.  labkit also records, under its own reason
numbers (:data:`LABKIT_EVENTS`), an interrupt it delivered (``INTERRUPT``: an
injection happens on the way *into* the guest, it is no exit), the end of a
run's time budget (``TIMEOUT``: labkit stopped the guest) and an emulator
failure (``EMULATOR_ERROR``).  The exit table counts them apart from the exits.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from labkit.exits import ExitReason, reason_name

DEFAULT_LIMIT = 200_000

LABKIT_EVENTS = frozenset({int(ExitReason.INTERRUPT), int(ExitReason.TIMEOUT), int(ExitReason.EMULATOR_ERROR)})
"""Reasons labkit records that are not VM exits: an interrupt delivered, the time budget spent, an emulator failure."""

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
    """Host time since the previous record: guest execution, the exit and its handling."""
    handling_ns: int | None = None
    """labkit's handling of this exit (backend hand-over to answer); None where not measured."""


@dataclass(frozen=True, slots=True)
class ReasonSummary:
    """One row of the exit table, in the spirit of ``kvm_stat`` and ``perf kvm stat``.

    ``share`` is of the rows of the same kind (VM exits, or labkit's events).
    The handling times are of the kept records (the trace limit drops later
    ones); ``handling_total_ns`` and ``since_previous_total_ns`` include the
    dropped ones.
    """

    reason: str
    count: int
    share: float
    is_exit: bool
    handling_min_ns: int
    handling_median_ns: float
    handling_max_ns: int
    handling_total_ns: int
    since_previous_total_ns: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _direction(reason: int, is_write: bool | None) -> str | None:
    if is_write is None:
        return None
    if reason == ExitReason.IO:
        return "out" if is_write else "in"
    return "write" if is_write else "read"


class ExitTrace:
    __slots__ = ("records", "handling", "limit", "overflow_counts", "overflow_host_ns", "overflow_handling_ns")

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self.records: list[tuple] = []
        """Raw tuples ``(reason, rip, address, size, is_write, data, host_ns)``, up to ``limit``."""
        self.overflow_counts: dict[int, int] = {}
        """Exits past ``limit``, counted (and timed) by reason but not kept."""
        self.overflow_host_ns: dict[int, int] = {}
        self.handling: list[int] = []
        """labkit's handling time (ns) of each kept record, in step with ``records``."""
        self.overflow_handling_ns: dict[int, int] = {}

    def add(self, reason: int, rip: int | None, address: int | None, size: int | None,
            is_write: bool | None, data: int | None, host_ns: int, handling_ns: int = 0) -> None:
        """Record one exit (the run loop's hot path inlines the same steps)."""
        if len(self.records) < self.limit:
            self.records.append((reason, rip, address, size, is_write, data, host_ns))
            self.handling.append(handling_ns)
        else:
            self.overflow_counts[reason] = self.overflow_counts.get(reason, 0) + 1
            self.overflow_host_ns[reason] = self.overflow_host_ns.get(reason, 0) + host_ns
            self.overflow_handling_ns[reason] = self.overflow_handling_ns.get(reason, 0) + handling_ns

    def copy(self) -> ExitTrace:
        """A copy that later exits of the same machine do not change (the records themselves are immutable).

        Kept records are only ever appended, up to ``limit``: a trace at its limit shares its lists (they no
        longer change), so the copy costs nothing more once a long run has filled the trace.
        """
        copy = ExitTrace(self.limit)
        if len(self.records) >= self.limit:
            copy.records, copy.handling = self.records, self.handling
        else:
            copy.records, copy.handling = list(self.records), list(self.handling)
        copy.overflow_counts, copy.overflow_host_ns = dict(self.overflow_counts), dict(self.overflow_host_ns)
        copy.overflow_handling_ns = dict(self.overflow_handling_ns)
        return copy

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
        handling = self.handling[seq] if seq < len(self.handling) else None
        return self.record_of(seq, *self.records[seq], handling_ns=handling)

    @staticmethod
    def record_of(seq: int, reason: int, rip: int | None, address: int | None, size: int | None,
                  is_write: bool | None, data: int | None, host_ns: int, *,
                  handling_ns: int | None = None) -> ExitRecord:
        """The :class:`ExitRecord` of one raw record, numbered ``seq``."""
        return ExitRecord(seq, reason_name(reason), rip, address, size, _direction(reason, is_write), data, host_ns,
                          handling_ns)

    def count(self, reason: int | str) -> int:
        """How many exits of one reason (``ExitReason.IO`` or ``"IO"``)."""
        if isinstance(reason, str):
            reason = ExitReason[reason]
        return self.counts.get(int(reason), 0)

    def by_reason(self) -> dict[str, int]:
        """Exit counts by reason name, most frequent first."""
        ordered = sorted(self.counts.items(), key=lambda item: -item[1])
        return {reason_name(reason): count for reason, count in ordered}

    def by_kind(self) -> tuple[dict[str, int], dict[str, int]]:
        """Counts by reason name, most frequent first: (VM exits, labkit's own events)."""
        ordered = sorted(self.counts.items(), key=lambda item: -item[1])
        return ({reason_name(reason): count for reason, count in ordered if reason not in LABKIT_EVENTS},
                {reason_name(reason): count for reason, count in ordered if reason in LABKIT_EVENTS})

    def summary(self) -> list[ReasonSummary]:
        """The exit table's rows: VM exits first (most frequent first), then labkit's own events.

        Per reason: count, share of its kind, labkit's handling time (min,
        median, max over kept records; total over all) and the total host time
        since the previous record (guest execution included).
        """
        counts, host_ns = self.counts, self.host_ns
        handled: dict[int, list[int]] = {}
        for record, handling in zip(self.records, self.handling):
            handled.setdefault(record[0], []).append(handling)
        kinds = {True: 0, False: 0}
        for reason, count in counts.items():
            kinds[reason not in LABKIT_EVENTS] += count
        rows = []
        for reason, count in sorted(counts.items(), key=lambda item: (item[0] in LABKIT_EVENTS, -item[1])):
            times = handled.get(reason) or [0]
            is_exit = reason not in LABKIT_EVENTS
            rows.append(ReasonSummary(
                reason_name(reason), count, count / kinds[is_exit], is_exit,
                min(times), statistics.median(times), max(times),
                sum(handled.get(reason, ())) + self.overflow_handling_ns.get(reason, 0), host_ns[reason]))
        return rows

    def exit_count(self) -> int:
        """VM exits only (labkit's own events left out)."""
        return sum(count for reason, count in self.counts.items() if reason not in LABKIT_EVENTS)

    def total_host_ns(self) -> int:
        return sum(self.host_ns.values())

    def total_handling_ns(self) -> int:
        """labkit's handling time summed over every record, kept and dropped."""
        return sum(self.handling) + sum(self.overflow_handling_ns.values())

    def as_dicts(self) -> list[dict]:
        """The kept records as plain dicts (for pandas, JSON or CSV)."""
        return [asdict(record) for record in self]

    def table_json(self) -> dict[str, Any]:
        """The exit table's numbers as plain data: what ``labkit run --json`` prints."""
        return {
            "columns": TABLE_COLUMNS,
            "exits": [row.as_dict() for row in self.summary() if row.is_exit],
            "labkit_events": [row.as_dict() for row in self.summary() if not row.is_exit],
            "exit_count": self.exit_count(),
            "handling_total_ns": self.total_handling_ns(),
            "host_total_ns": self.total_host_ns(),
            "dropped": self.dropped,
        }

    def to_json(self) -> str:
        return json.dumps({
            "exits": self.by_reason(),
            "table": self.table_json(),
            "dropped": self.dropped,
            "records": self.as_dicts(),
        })

    def format_table(self) -> str:
        """The exit table as text, as ``labkit run`` prints it."""
        header = (f"{'reason':<16}{'count':>8}{'share':>8}{'min':>11}{'median':>11}{'max':>11}{'total':>11}"
                  f"{'since prev.':>13}")
        lines = [f"{'':<32}{'labkit handling time per exit':^44}{'(total)':>13}", header]
        rows = self.summary()
        for kind, title in ((True, "VM exits"), (False, "labkit events (not VM exits)")):
            chosen = [row for row in rows if row.is_exit is kind]
            if not chosen:
                continue
            lines.append(f"-- {title}")
            for row in chosen:
                lines.append(f"{row.reason:<16}{row.count:>8}{row.share:>8.1%}{format_ns(row.handling_min_ns):>11}"
                             f"{format_ns(row.handling_median_ns):>11}{format_ns(row.handling_max_ns):>11}"
                             f"{format_ns(row.handling_total_ns):>11}{format_ns(row.since_previous_total_ns):>13}")
        lines.append(f"{'total':<16}{len(self):>8}{'':>41}{format_ns(self.total_handling_ns()):>11}"
                     f"{format_ns(self.total_host_ns()):>13}")
        lines.extend(TABLE_NOTES)
        if self.dropped:
            lines.append(f"({self.dropped} exits counted but not kept: trace limit {self.limit}; "
                         "min/median/max are of the kept ones)")
        return "\n".join(lines)


TABLE_COLUMNS = {
    "handling": "labkit's handling of the exit: from the backend handing it to labkit's dispatcher until "
                "the answer was ready (device model, trace); not the kernel's exit and re-entry",
    "since_previous": "host time since the previous record: the guest running, the exit itself and its handling; "
                      "summed over a run it is the run's time",
}
TABLE_NOTES = (
    f"handling: {TABLE_COLUMNS['handling']}.",
    f"since prev.: {TABLE_COLUMNS['since_previous']}.",
)


def format_ns(ns: float) -> str:
    """A host time for a table: whole ns below 1 µs, else µs or ms to two decimals."""
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"
