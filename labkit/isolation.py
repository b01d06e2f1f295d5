"""Isolation experiments (notebook 07): VMs that cannot see each other's memory, and faults that stay contained.

    >>> from labkit.isolation import memory_isolation, containment_specs, run_containment
    >>> memory_isolation(backend="emu").scan.ram_matches
    0
    >>> run = run_containment(["triple fault", "endless loop"], vms=4, backend="emu")
    >>> [row.healthy_matches_solo for row in run.rows if not row.faulty]
    [True, True]

- :func:`memory_isolation`: VM A (``secret64``) fills its RAM with the qword "TOPSECRT";
  VM B (``scan64``) looks for it in every qword of its own RAM, then above its RAM (every
  ``stride`` bytes: each read an MMIO exit, answered with all ones), then reads 1 GiB,
  which its page tables do not map (#PF).  A is still alive (its RAM still holds the
  secret) while B scans.  The result carries both VMs' host mappings
  (:meth:`labkit.Machine.host_mappings`): separate host ranges, in one process on KVM,
  in two worker processes on the emulator.
- :data:`FAULTS`: the fault-injecting guests of the containment run: a triple fault, an
  endless loop, a console flood, hammering unclaimed ports, wild writes over the guest's
  whole address space, random bytes executed as code.
- :func:`compare_backends`: one guest run alone on KVM and on the emulator, and whether they ended
  alike (:class:`Agreement`); ``benchmarks/sweep_random_bytes.py`` does it for random-bytes seeds 0-499.
- :func:`run_containment`: N VMs at once (:func:`labkit.fleet.run_many`), the chosen
  faulty ones and healthy ones filling up the rest; each healthy VM's console and final
  registers are compared with its solo run.
"""

from __future__ import annotations

import random
import re
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable, Sequence

from labkit.errors import ConfigError
from labkit.exits import ExitReason
from labkit.fleet import VmOutcome, VmSpec, run_many
from labkit.table import Table
from labkit.vmm.status import Origin, RunResult, Status, StatusKind
from labkit.x86 import layout

if TYPE_CHECKING:
    from labkit.guest import Guest
    from labkit.vmm.host_memory import HostMapping

SECRET = b"TOPSECRT"
"""The qword secret64 stores in every slot of its RAM from 1 MiB up."""
SECRET_QWORD = struct.unpack("<Q", SECRET)[0]
SCAN_STRIDE = 0x100000
"""scan64's default stride above RAM: 1 MiB, so about a thousand MMIO exits for a 2 MiB VM."""
PARAMETERS = 0x80000


@dataclass(frozen=True)
class ScanReport:
    """What scan64 printed: the qwords of its RAM it read and matched, its reads above RAM, the first match."""

    ram_size: int
    ram_qwords: int
    ram_matches: int
    limit: int
    stride: int
    mmio_reads: int
    mmio_all_ones: int
    mmio_matches: int
    first_match: int | None
    unmapped: int

    @property
    def matches(self) -> int:
        return self.ram_matches + self.mmio_matches

    @classmethod
    def parse(cls, console: str) -> ScanReport:
        """Read scan64's console; a ConfigError when it is not scan64's report."""
        ram = re.search(r"scan: RAM \[0x0, (0x[0-9a-f]+)\): (\d+) qwords, (\d+) matches", console)
        above = re.search(r"scan: above RAM \[0x[0-9a-f]+, (0x[0-9a-f]+)\) every (0x[0-9a-f]+): (\d+) reads "
                          r"\(MMIO exits\), (\d+) all ones, (\d+) matches", console)
        first = re.search(r"scan: first match at (0x[0-9a-f]+)", console)
        unmapped = re.search(r"scan: reading (0x[0-9a-f]+), which", console)
        if ram is None or above is None or unmapped is None:
            raise ConfigError(f"not a complete scan64 report: {console[:120]!r}")
        return cls(int(ram[1], 16), int(ram[2]), int(ram[3]), int(above[1], 16), int(above[2], 16),
                   int(above[3]), int(above[4]), int(above[5]), int(first[1], 16) if first else None,
                   int(unmapped[1], 16))


@dataclass(frozen=True)
class MemoryIsolation:
    """The two VMs of the memory experiment, what B found, and where each one's RAM lives on the host."""

    filler: RunResult
    scanner: RunResult
    scan: ScanReport
    secret_qwords_in_a: int
    """How many qwords of A's RAM hold the secret, counted by the host from A's memory."""
    secret_qwords_in_b: int
    """The same count over B's RAM, read by the host after B's scan (0: the secret never got there)."""
    mappings: dict[str, tuple[HostMapping, ...]]
    """``{"A": ..., "B": ...}``: :meth:`labkit.Machine.host_mappings` of each VM while both were alive."""
    mmio_exits: int
    """MMIO exits in B's trace (KVM: one per 8-byte read; Unicorn 2.1.4 splits it in two 4-byte accesses)."""
    memory: int
    backend: str

    @property
    def origin(self) -> Origin | None:
        return self.scanner.origin

    @property
    def mappings_overlap(self) -> bool:
        return any(a.overlaps(b) for a in self.mappings["A"] for b in self.mappings["B"])

    def table(self) -> Table:
        s = self.scan
        rows = [
            ["A (secret64)", "its RAM from 1 MiB", f"{self.secret_qwords_in_a} qwords hold the secret", "-",
             str(self.filler.status)],
            ["B (scan64)", f"RAM [0, {s.ram_size:#x})", f"{s.ram_qwords} qwords read", str(s.ram_matches),
             ""],
            ["B (scan64)", f"above RAM [{s.ram_size:#x}, {s.limit:#x}) every {s.stride:#x}",
             f"{s.mmio_reads} reads, {s.mmio_all_ones} answered all ones ({self.mmio_exits} MMIO exits traced)",
             str(s.mmio_matches), ""],
            ["B (scan64)", f"{s.unmapped:#x} (not in its page tables)", "1 read", "-", str(self.scanner.status)],
        ]
        return Table(f"VM B looks for VM A's secret ({self.scanner.origin or self.backend})",
                     ["VM", "where", "what", "matches", "how it ended"], rows)

    def mapping_table(self) -> Table:
        rows = []
        for vm, mappings in self.mappings.items():
            for m in mappings:
                rows.append([vm, str(m.pid), f"[{m.guest_address:#x}, {m.guest_address + m.size:#x})",
                             f"{m.host_address:#x}-{m.host_end:#x}", m.maps_line or "(not found)"])
        return Table("Where each VM's guest RAM lives on the host (/proc/<pid>/maps)",
                     ["VM", "host pid", "guest-physical", "host virtual addresses", "the kernel's VMA line"], rows,
                     note="A VMA line can be wider than one VM's range: Linux merges neighbouring anonymous "
                          "mappings with the same flags. The ranges themselves never overlap.")


def memory_isolation(backend: str = "auto", memory: int = layout.DEFAULT_MEMORY, stride: int = SCAN_STRIDE,
                     timeout: float = 20.0) -> MemoryIsolation:
    """Run secret64 (A) and then scan64 (B) while A is still alive; see the module docstring."""
    from labkit.vmm.machine import Machine

    memory = layout.check_memory_size(memory)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 8 or stride % 8:
        raise ConfigError(f"stride must be a positive multiple of 8 bytes, not {stride!r}")
    if (layout.MAPPED_LIMIT - memory) // stride > 1 << 16:
        raise ConfigError(f"a stride of {stride:#x} makes more than 65536 MMIO exits above {memory:#x}: "
                          "use a stride of at least " f"{(layout.MAPPED_LIMIT - memory) >> 16:#x}")
    not_secret = ~SECRET_QWORD & (2**64 - 1)
    with Machine("secret64", backend=backend, memory=memory) as a, \
            Machine("scan64", backend=backend, memory=memory) as b:
        a.write_memory(PARAMETERS, struct.pack("<Q", memory))
        filled = a.run(timeout=timeout)
        b.write_memory(PARAMETERS, struct.pack("<4Q", not_secret, memory, stride, layout.MAPPED_LIMIT))
        scanned = b.run(timeout=timeout)
        in_a = a.read_memory(0, memory)
        in_b = b.read_memory(0, memory)
        mappings = {"A": a.host_mappings(), "B": b.host_mappings()}
    return MemoryIsolation(filled, scanned, ScanReport.parse(scanned.console), _count_secret(in_a),
                           _count_secret(in_b), mappings, scanned.trace.by_reason().get("MMIO", 0), memory,
                           scanned.backend)


def _count_secret(ram: bytes) -> int:
    """How many aligned qwords of a copy of guest RAM (whole pages) hold the secret."""
    return memoryview(ram).cast("Q").tolist().count(SECRET_QWORD)


# --- fault containment ------------------------------------------------------------------------


def random_bytes_guest(seed: int, size: int = 4096) -> Guest:
    """``size`` random bytes (``random.Random(seed)``) run as 64-bit ring-0 code: the "executes random bytes" VM."""
    from labkit.guest import Guest

    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 0x10000:
        raise ConfigError(f"size must be 1 to 65536 bytes, not {size!r}")
    code = random.Random(seed).randbytes(size)
    return Guest.from_bytes(code, 64, f"random{seed}", description=f"{size} random bytes (seed {seed}) as code")


class Agreement(str, Enum):
    """How a guest's runs on the two backends compare (:func:`compare_backends`)."""

    SAME = "same"
    """The same end status: kind, exit code and, for a fault, vector, RIP, error code and CR2."""
    KVM_CANNOT_RUN = "KVM cannot run it"
    """KVM stopped with ``KVM_EXIT_INTERNAL_ERROR``: it could not handle the guest (under PVM every ring-0
    instruction goes through KVM's instruction emulator, which lacks x87, most SSE, ``int3``/``int n`` at
    CPL 0, ...), so there is no KVM ending to compare with.  On VT-x/AMD-V such code runs natively."""
    DIFFERENT = "different"
    """Different end statuses: a difference between the backends to explain or fix."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BackendComparison:
    """One guest run alone on KVM and on the emulator (:func:`compare_backends`)."""

    guest: str
    kvm: RunResult
    emu: RunResult
    timeout: float
    """The budget both runs had (raised once when only one backend timed out with the first one)."""

    @property
    def agreement(self) -> Agreement:
        if same_ending(self.kvm.status, self.emu.status):
            return Agreement.SAME
        # An internal error ends a KVM run, so one counted (kept or past the trace's bound) was the last exit.
        if self.kvm.status.kind is StatusKind.ERROR and self.kvm.trace.count(ExitReason.INTERNAL_ERROR):
            return Agreement.KVM_CANNOT_RUN
        return Agreement.DIFFERENT


def same_ending(a: Status, b: Status) -> bool:
    """Whether two runs ended alike: kind, exit code and fault (vector, RIP, error code, CR2).

    Messages are not compared (each backend words its own errors), nor registers: a random guest's
    flags can hold values the SDM leaves undefined (``imul``'s ZF), which differ between CPUs too.
    """
    return a.kind is b.kind and a.code == b.code and a.fault == b.fault


def compare_backends(guest: Guest | str, timeout: float = 1.0, retry_timeout: float = 10.0) -> BackendComparison:
    """Run ``guest`` alone on KVM, then on the emulator, each in a fresh machine, and keep both results.

    A guest that times out on one backend only is run again on both with ``retry_timeout``: ring-0
    code runs at about 1 us per instruction under PVM and faster on the emulator, so a long but finite
    loop can end within the budget on one and not the other.  Needs /dev/kvm (a BackendError without).
    """
    from labkit.vmm.machine import Machine

    def both(budget: float) -> tuple[RunResult, RunResult]:
        results = []
        for backend in ("kvm", "emu"):
            with Machine(guest, backend=backend) as machine:
                results.append(machine.run(timeout=budget))
        return results[0], results[1]

    kvm, emu = both(timeout)
    if (kvm.status.kind is StatusKind.TIMEOUT) != (emu.status.kind is StatusKind.TIMEOUT) and retry_timeout > timeout:
        timeout = retry_timeout
        kvm, emu = both(timeout)
    name = guest if isinstance(guest, str) else guest.name
    return BackendComparison(name, kvm, emu, timeout)


@dataclass(frozen=True)
class FaultKind:
    """One kind of fault to inject: the guest that does it and what a student should expect."""

    name: str
    guest: Callable[[int], Guest | str]
    """The guest for the ``n``-th VM of this kind (a shipped guest's name, or a generated Guest)."""
    expect: str


FAULTS: dict[str, FaultKind] = {kind.name: kind for kind in (
    FaultKind("triple fault", lambda n: "triplefault64", "shutdown: the CPU cannot deliver a fault"),
    FaultKind("endless loop", lambda n: "forever64", "timeout: jmp $ in ring 0 never exits"),
    FaultKind("console flood", lambda n: "flood64", "timeout, console bounded (the rest counted as dropped)"),
    FaultKind("port hammer", lambda n: "porthammer64", "timeout: every unclaimed port reads all ones"),
    FaultKind("wild writes", lambda n: "wildwrite64", "a #PF once it breaks its own page tables (a timeout if "
                                                     "its budget ends first)"),
    FaultKind("random bytes", lambda n: random_bytes_guest(n), "anything but a hang of the host: a fault, "
                                                               "shutdown, an error or a timeout"),
)}
HEALTHY_TIMEOUT_S = 10.0
"""A healthy VM's budget in a containment run: alone each finishes well within a second, but beside
exit-heavy neighbours (a flood, a port hammer) its own exits wait their turn (on KVM every VM's exits are
handled in this one Python process), so it gets a budget the faulty ones do not need."""
HEALTHY = ("hello64", "compute64", "secret64", "usertasks64", "memtouch64", "exit64")
"""Well-behaved, deterministic guests that fill up a containment run."""


@dataclass(frozen=True)
class ContainmentRow:
    name: str
    guest: str
    faulty: bool
    kind: str
    """The fault's name, or "healthy"."""
    outcome: VmOutcome
    healthy_matches_solo: bool | None
    """For a healthy VM: console, status and final registers equal to its solo run; ``None`` for a faulty one."""
    solo_s: float | None = None
    """For a healthy VM: how long its solo run took (host seconds)."""

    @property
    def extra_s(self) -> float | None:
        """How much longer a healthy VM's run took beside the others than alone (seconds; ``None`` if faulty)."""
        return None if self.solo_s is None else self.outcome.run_s - self.solo_s


@dataclass(frozen=True)
class ContainmentRun:
    rows: tuple[ContainmentRow, ...]
    backend: str
    timeout: float
    wall_s: float
    origin: Origin | None = field(default=None)

    @property
    def healthy_all_match(self) -> bool:
        return all(row.healthy_matches_solo for row in self.rows if not row.faulty)

    def slowest(self) -> ContainmentRow | None:
        """The healthy VM whose run took the most extra time beside its neighbours (``None`` without healthy VMs)."""
        healthy = [row for row in self.rows if row.extra_s is not None]
        return max(healthy, key=lambda row: row.extra_s or 0.0) if healthy else None

    def table(self) -> Table:
        rows = []
        for row in sorted(self.rows, key=lambda r: r.outcome.ended_s):
            o = row.outcome
            same = "-" if row.healthy_matches_solo is None else ("yes" if row.healthy_matches_solo else "NO")
            alone = "-" if row.solo_s is None else f"{row.solo_s:.2f}"
            dropped = f", {o.console_dropped} console bytes dropped" if o.console_dropped else ""
            rows.append([row.name, row.kind, row.guest, str(o.status), f"{o.started_s:.2f}-{o.ended_s:.2f}",
                         alone, o.reason[:90] + dropped, same])
        return Table(f"{len(self.rows)} VMs at once, in the order they ended ({self.origin or self.backend})",
                     ["VM", "injected", "guest", "status", "ran (s)", "alone (s)", "reason", "same as solo run"],
                     rows, note=f"budget: {self.timeout:g} s for a faulty VM, {HEALTHY_TIMEOUT_S:g} s for a "
                                "healthy one")


def containment_specs(faults: Sequence[str], vms: int, backend: str = "auto",
                      timeout: float = 2.0) -> list[tuple[VmSpec, str]]:
    """``vms`` VmSpecs: one per chosen fault (in order, budget ``timeout``), then healthy guests (:data:`HEALTHY`,
    cycled, budget at least :data:`HEALTHY_TIMEOUT_S`); with each one's kind."""
    unknown = [name for name in faults if name not in FAULTS]
    if unknown:
        raise ConfigError(f"unknown fault(s) {unknown}; choose from {sorted(FAULTS)}")
    if isinstance(vms, bool) or not isinstance(vms, int) or not len(faults) <= vms <= 64:
        raise ConfigError(f"vms must be a count from the number of faults ({len(faults)}) to 64, not {vms!r}")
    specs: list[tuple[VmSpec, str]] = []
    for index, name in enumerate(faults):
        specs.append((VmSpec(f"vm{len(specs):02d}", FAULTS[name].guest(index), backend=backend,
                             timeout=timeout), name))
    for index in range(vms - len(faults)):
        specs.append((VmSpec(f"vm{len(specs):02d}", HEALTHY[index % len(HEALTHY)], backend=backend,
                             timeout=max(timeout, HEALTHY_TIMEOUT_S)), "healthy"))
    return specs


def _same(a: RunResult, b: RunResult) -> bool:
    return a.console == b.console and str(a.status) == str(b.status) and a.regs == b.regs


def run_containment(faults: Sequence[str], vms: int = 16, backend: str = "auto", timeout: float = 2.0,
                    solo: dict[str, RunResult] | None = None) -> ContainmentRun:
    """Run the VMs of :func:`containment_specs` at once and compare each healthy one with its solo run.

    ``solo`` caches solo runs by guest name (filled in here; pass the same dict to reuse them).
    """
    import time

    from labkit.backend import choose_backend
    from labkit.vmm.machine import Machine

    chosen = choose_backend(backend).name
    specs = containment_specs(faults, vms, chosen, timeout)
    solo = {} if solo is None else solo
    for spec, kind in specs:
        name = spec.guest if isinstance(spec.guest, str) else spec.guest.name
        key = f"{chosen}:{name}"
        if kind == "healthy" and key not in solo:
            with Machine(spec.guest, backend=chosen) as machine:
                solo[key] = machine.run(timeout=10.0)
    kinds = {spec.name: kind for spec, kind in specs}
    guests = {spec.name: spec.guest if isinstance(spec.guest, str) else spec.guest.name for spec, _ in specs}
    started = time.monotonic()
    outcomes = list(run_many([spec for spec, _ in specs], timeout=timeout))
    wall = time.monotonic() - started
    rows = []
    origin = None
    for outcome in outcomes:
        kind = kinds[outcome.name]
        guest = guests[outcome.name]
        match, solo_s = None, None
        if kind == "healthy":
            alone = solo[f"{chosen}:{guest}"]
            match = outcome.result is not None and _same(outcome.result, alone)
            solo_s = alone.elapsed_s
        if outcome.result is not None and origin is None:
            origin = outcome.result.origin
        rows.append(ContainmentRow(outcome.name, guest, kind != "healthy", kind, outcome, match, solo_s))
    return ContainmentRun(tuple(sorted(rows, key=lambda r: r.name)), chosen, timeout, wall, origin)

