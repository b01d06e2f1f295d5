"""Live migration by pre-copy: move a running guest to a new machine (same or the other backend).

The algorithm is QEMU's and Xen's pre-copy (Clark et al., NSDI 2005), with the network
modelled by a bandwidth so that the lesson does not depend on a second host:

1. Round 0 copies every page while the guest goes on running on the source for as long as
   that copy takes at ``bandwidth`` (``pages * 4096 / bandwidth`` seconds of guest time).
2. Each later round copies the pages the guest wrote during the previous one (a diff
   snapshot: KVM's dirty log or the emulator's write tracking, plus the host's writes),
   again while the guest runs for as long as that copy takes.
3. When a round has at most ``stop_pages`` pages (the dirty set converged), or after
   ``max_rounds`` rounds (it did not: the guest writes faster than the copy goes), the
   source is stopped and the rest is copied with it: the last diff, the vCPU and the
   devices (stop-and-copy).  The target resumes from there.

*Downtime* is the time the guest runs nowhere: from the source's stop to the target being
ready.  It is reported in two parts, each labelled: what this host measured (taking the
last diff and building the target) and what the modelled link adds (the last round's bytes
at ``bandwidth``).  The pages really move (through the same snapshot states a file would
hold), so the migrated guest's output equals an unmigrated run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from labkit.errors import ConfigError
from labkit.snapshot.state import PAGE, write_pages
from labkit.vmm.status import StatusKind

if TYPE_CHECKING:
    from labkit.vmm.devices.spec import DeviceSpec
    from labkit.vmm.machine import Machine

MIN_SLICE_S = 0.0005
"""The shortest time the source guest is run between two rounds."""


@dataclass(frozen=True)
class MigrationRound:
    """One pre-copy round: the pages copied, and how long the guest ran on the source meanwhile."""

    index: int
    pages: int
    bytes: int
    guest_ran_s: float
    """Guest time on the source while this round's bytes crossed the modelled link."""
    capture_s: float
    """Measured here: taking this round's snapshot (all pages, or the diff)."""


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate` did, and the new machine the guest now runs on."""

    target: Machine
    rounds: tuple[MigrationRound, ...]
    converged: bool
    """The dirty set shrank to ``stop_pages`` or fewer before the round limit."""
    finished_on_source: bool
    """The guest stopped (halted, exited, ...) during pre-copy: the target holds its final state."""
    reason: str
    stop_copy_pages: int
    downtime_measured_s: float
    """Measured on this host: from the source's stop to the target ready (last diff, restore)."""
    downtime_link_s: float
    """Modelled: the stop-and-copy's bytes at the link's bandwidth."""
    bandwidth: float
    source: str
    destination: str

    @property
    def downtime_s(self) -> float:
        return self.downtime_measured_s + self.downtime_link_s

    @property
    def total_bytes(self) -> int:
        return sum(round_.bytes for round_ in self.rounds) + self.stop_copy_pages * PAGE


def migrate(source: Machine, backend: str = "auto", *, bandwidth: float = 256e6, max_rounds: int = 8,
            stop_pages: int = 64, devices: Sequence[DeviceSpec] = ()) -> Migration:
    """Move ``source``'s guest to a new machine on ``backend`` by pre-copy (see the module docstring).

    ``source`` must be stopped between runs (never run, paused, or after a timeout).  It is
    left stopped after the move (run it no more: the guest lives in ``Migration.target``).
    ``bandwidth`` is the modelled link in bytes per second.
    """
    from labkit.snapshot import Snapshot
    from labkit.vmm.machine import Machine

    if not 1e3 <= bandwidth <= 1e12:
        raise ConfigError(f"bandwidth must be in [1e3, 1e12] bytes per second, not {bandwidth!r}")
    if not 1 <= max_rounds <= 1000 or stop_pages < 0:
        raise ConfigError("max_rounds must be in [1, 1000] and stop_pages at least 0")
    last = source.last_result
    if last is not None and not last.status.kind.resumable:
        raise ConfigError(f"the guest has already stopped ({last.status}): there is nothing left to migrate")

    rounds: list[MigrationRound] = []
    started = time.perf_counter()
    snapshot: Snapshot = source.snapshot()
    # The target exists before the source stops (QEMU starts it with -incoming): its creation is no downtime.
    target = Machine(snapshot.guest(), backend, snapshot.state.memory_size, devices=devices)
    received = [bytearray(region.data) for region in snapshot.state.regions]  # what the target has so far
    pages = sum(region.size for region in snapshot.state.regions) // PAGE
    reason = f"reached the round limit ({max_rounds})"
    converged = False
    finished = False
    while True:
        capture_s = time.perf_counter() - started
        ran = max(pages * PAGE / bandwidth, MIN_SLICE_S)
        result = source.run(timeout=ran)
        rounds.append(MigrationRound(len(rounds), pages, pages * PAGE, ran, capture_s))
        if result.status.kind not in (StatusKind.TIMEOUT, StatusKind.PAUSED):
            finished, reason = True, f"the guest stopped on the source during round {len(rounds) - 1} ({result.status})"
        stopped = started = time.perf_counter()  # the source is stopped: stop-and-copy, or the next round
        snapshot = source.snapshot(parent=snapshot)
        diff = snapshot.diff
        pages = len(diff.pages) if diff is not None else 0
        if diff is not None:
            write_pages(received, snapshot.captured.regions, diff)
        if finished:
            break
        if pages <= stop_pages:
            converged, reason = True, f"{pages} pages left after round {len(rounds) - 1} (at most {stop_pages})"
            break
        if len(rounds) >= max_rounds:
            break
    final = snapshot.captured.with_regions(received)
    try:
        target.restore(Snapshot(final))
    except BaseException:
        target.close()
        raise
    downtime = time.perf_counter() - stopped
    source.stop_page_tracking()
    return Migration(target=target, rounds=tuple(rounds), converged=converged, finished_on_source=finished,
                     reason=reason,
                     stop_copy_pages=pages, downtime_measured_s=downtime, downtime_link_s=pages * PAGE / bandwidth,
                     bandwidth=bandwidth, source=source.backend, destination=target.backend)
