"""Snapshots of running guests: restore-and-continue equals an uninterrupted run, on each backend and across.

Every deterministic shipped guest is stopped after its first exit, its third, and half-way, snapshotted,
saved to a file, loaded, and resumed in a new machine; the finished guest must equal an uninterrupted run
(console, status, every register, every byte of RAM, and the exit counts before plus after the
snapshot).  Across backends the two runs may differ only where the backends already differ
(``KNOWN_DIFFERENCES`` of test_guests.py), plus the one emulator quirk documented below.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from backends import HAS_KVM, NO_KVM_REASON
from labkit import Machine, Snapshot
from labkit.errors import LabkitError, SnapshotError
from labkit.snapshot.file import ENTRY, HEADER, SnapshotFile
from labkit.vmm.devices import DeviceSpec
from labkit.vmm.status import StatusKind
from test_guests import (DETERMINISTIC, GUESTS, HOST_TIMED, KNOWN_DIFFERENCES, MEASURED_FLAVOUR, comparable,
                         differences)

PAIRS = [("emu", "emu")] + ([("kvm", "kvm"), ("kvm", "emu"), ("emu", "kvm")] if HAS_KVM else [])

CROSS_BACKEND_QUIRKS = {
    # rings64's ring-3 `int 0x80` is a #UD fault under PVM: its frame carries RF = 1 (a fault's image
    # does, SDM vol. 3, 6.13) and the kernel's iretq loads it.  The CPU clears RF when the next
    # instruction completes; Unicorn (QEMU) clears it only at the end of the translated block, so a
    # `syscall` in that block saves RF in R11.  Continuing KVM's state on the emulator shows it.
    ("rings64", "kvm", "emu"): {"regs.r11": (0x202, 0x10202)},
}


def final_state(machine: Machine, result):
    return result, machine.sregs(), machine.read_memory(0, machine.memory_size)


_REFERENCES: dict[tuple[str, str], tuple] = {}


def reference(name: str, backend: str):
    if (name, backend) not in _REFERENCES:
        with Machine(name, backend=backend) as machine:
            result = machine.run(timeout=10)
            _REFERENCES[name, backend] = final_state(machine, result)
    return _REFERENCES[name, backend]


def stop_after(machine: Machine, exits: int) -> Counter:
    """Step ``machine`` through at least ``exits`` exits; the counts by reason of all it recorded."""
    steps = machine.steps(timeout=10)
    for seen, _ in enumerate(steps, start=1):
        if seen >= exits:
            break
    steps.close()
    return Counter(record.reason for record in machine.last_result.trace)


def stop_points(name: str) -> list[int]:
    total = len(reference(name, "emu")[0].trace)
    return sorted({1, 3, max(1, total // 2)})


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_restore_and_continue_equals_an_uninterrupted_run(name, source, target, tmp_path):
    for point in stop_points(name):
        with Machine(name, backend=source) as machine:
            before = stop_after(machine, point)
            if machine.last_result.status.kind is not StatusKind.RUNNING:
                continue  # the guest finished within `point` exits: nothing left to continue
            machine.snapshot().save(tmp_path / "vm.snap")
        with Machine.from_snapshot(Snapshot.load(tmp_path / "vm.snap"), backend=target) as restored:
            result = restored.run(timeout=10)
            got = final_state(restored, result)
        expected = reference(name, target)
        found = differences(expected, got, name)
        counts = {key: value for key, value in found.items() if key.startswith("exits.")}
        found = {key: value for key, value in found.items() if not key.startswith("exits.")}
        assert got[0].console == reference(name, source)[0].console, (point, got[0].console)
        if source == target:
            assert found == {}, point
            whole = Counter(record.reason for record in comparable(name, list(expected[0].trace)))
            after = Counter(record.reason for record in comparable(name, list(got[0].trace)))
            kept = Counter({reason: n for reason, n in before.items()
                            if name not in HOST_TIMED or reason not in {"HLT", "INTR"}})
            assert kept + after == whole, (point, counts)
        else:
            from labkit.kvm.system import kvm_flavour

            known = KNOWN_DIFFERENCES.get(kvm_flavour() or "", KNOWN_DIFFERENCES[MEASURED_FLAVOUR])
            allowed = set(known.get(name, {})) | set(CROSS_BACKEND_QUIRKS.get((name, source, target), {}))
            assert set(found) <= allowed, (point, {k: v for k, v in found.items() if k not in allowed})


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("name", sorted(HOST_TIMED))
def test_a_guest_paused_from_another_thread_continues_after_a_restore(name, source, target):
    """The timer guests, paused at a host-chosen moment while their PIT ticks, then resumed elsewhere."""
    expected = GUESTS[name].expected["console"]
    for delay in (0.001, 0.003, 0.005, 0.007, 0.009):
        with Machine(name, backend=source) as machine:
            timer = threading.Timer(delay, machine.pause)
            timer.start()
            result = machine.run(timeout=10)
            timer.join()
            if result.status.kind is not StatusKind.PAUSED:
                assert result.console == expected  # finished before the pause landed
                continue
            snapshot = machine.snapshot()
        with Machine.from_snapshot(snapshot, backend=target) as restored:
            finished = restored.run(timeout=10)
        assert finished.status.kind is StatusKind.EXITED and finished.console == expected, str(finished.status)


def same_moment(a, b, name: str) -> bool:
    """Two captures of one stopped machine: equal, but for what host time moves between them
    (the TSC; the PIT and PIC of the timer guests, whose counter runs on host time)."""
    if a.regions != b.regions or (a.regs, a.sregs, a.fpu, a.debug) != (b.regs, b.sregs, b.fpu, b.debug):
        return False
    if {k: v for k, v in a.msrs.items() if k != 0x10} != {k: v for k, v in b.msrs.items() if k != 0x10}:
        return False
    return name in HOST_TIMED or a.devices == b.devices


def changed_pages(old: bytes, new: bytes) -> set[int]:
    return {page for page in range(len(old) // 4096) if old[page * 4096:(page + 1) * 4096] != new[page * 4096:(page + 1) * 4096]}


@pytest.mark.parametrize("name", ["minikernel64", "rings64", "timer64"])
def test_a_diff_holds_every_page_that_changed_and_a_chain_restores_the_same_state(name, backend_name, tmp_path):
    """Each diff's pages include every page whose bytes changed (the guest's stores, exception frames
    pushed by the CPU or the emulator's delivery, and the host's writes); full + diffs loaded from
    files rebuild exactly the state a full snapshot at the same moment holds."""
    with Machine(name, backend=backend_name) as machine:
        stop_after(machine, 1)
        chain = [machine.snapshot()]
        fulls = [chain[0].state]
        for exits in (4, 20):
            stop_after(machine, exits)
            if machine.last_result.status.kind is not StatusKind.RUNNING:
                break
            diff = machine.snapshot(parent=chain[-1])
            full = machine._call("capture_state", True)  # the same moment, whole, tracking left alone
            assert changed_pages(fulls[-1].regions[0].data, full.regions[0].data) <= set(diff.diff.pages)
            assert same_moment(diff.state, full, name)
            assert diff.size().pages == len(diff.diff.pages) < len(full.regions[0].data) // 4096
            chain.append(diff)
            fulls.append(full)
    for index, snapshot in enumerate(chain):
        snapshot.save(tmp_path / f"{index}.snap")
    loaded = Snapshot.load(tmp_path / "0.snap")
    for index in range(1, len(chain)):
        loaded = Snapshot.load(tmp_path / f"{index}.snap", parent=loaded)
        assert loaded.is_diff and same_moment(loaded.state, fulls[index], name)


def test_bad_chains_and_unsavable_machines_are_refused_clearly(backend_name, tmp_path):
    with Machine("minikernel64", backend=backend_name) as machine:
        stop_after(machine, 1)
        first = machine.snapshot()
        second = machine.snapshot(parent=first)
        with pytest.raises(SnapshotError, match="latest snapshot"):
            machine.snapshot(parent=first)
        first.save(tmp_path / "first.snap")
        second.save(tmp_path / "second.snap")
    with Machine("hello64", backend=backend_name) as other:
        stranger = other.snapshot()
    with pytest.raises(SnapshotError, match="is a diff snapshot: load its parent"):
        Snapshot.load(tmp_path / "second.snap")
    with pytest.raises(SnapshotError, match="mismatched parent"):
        Snapshot.load(tmp_path / "second.snap", parent=stranger)
    with pytest.raises(SnapshotError, match="is a full snapshot; it has no parent"):
        Snapshot.load(tmp_path / "first.snap", parent=stranger)
    with pytest.raises(SnapshotError, match="devices this machine lacks: counter"):
        counted = DeviceSpec("counter", "pio", 0x500, 1, lambda context: Counting())
        with Machine("hello64", backend=backend_name, devices=[counted]) as machine:
            snapshot = machine.snapshot()
        Machine.from_snapshot(snapshot, backend=backend_name)


class Counting:
    """A device with the state interface: counts writes."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return self.writes

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1

    def reset(self) -> None:
        self.writes = 0

    def save(self) -> dict:
        return {"writes": self.writes}

    def restore(self, state: dict) -> None:
        self.writes = int(state["writes"])


def test_a_machine_with_a_monitor_is_refused_with_the_reason(backend_name):
    from labkit.monitor.trap_emulate import TrapAndEmulate, minikernel

    with Machine(minikernel(), backend=backend_name, monitor=TrapAndEmulate()) as machine:
        with pytest.raises(SnapshotError, match="monitor .* state lives outside the VM"):
            machine.snapshot()


@pytest.mark.kvm
@pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)
def test_fpu_debug_registers_and_msrs_move_across_backends():
    """A state set on one backend reads back the same after a restore on the other."""
    import dataclasses

    with Machine("hello64", backend="kvm") as machine:
        core = machine._core
        fpu = dataclasses.replace(core.backend.get_fpu(), fcw=0x27F, mxcsr=0x1FA0, fsw=0x3800,
                                  st=(0x4000C90FDAA22168C235,) + (0,) * 7, ftw=0x80, xmm=tuple(range(16)))
        core.backend.set_fpu(fpu)
        core.backend.set_msrs({0xC0000102: 0x1234_5000, 0xC0000082: 0xFFFF_8000_0000_1000})
        snapshot = machine.snapshot()
    with Machine.from_snapshot(snapshot, backend="emu") as restored:
        state = restored.snapshot().state
    assert state.fpu == fpu
    assert state.msrs[0xC0000102] == 0x1234_5000 and state.msrs[0xC0000082] == 0xFFFF_8000_0000_1000
    assert state.regs == snapshot.state.regs and state.sregs == snapshot.state.sregs


def test_snapshot_of_a_finished_guest_restores_finished(backend_name):
    with Machine("hello64", backend=backend_name) as machine:
        machine.run()
        snapshot = machine.snapshot()
    with Machine.from_snapshot(snapshot, backend=backend_name) as restored:
        with pytest.raises(LabkitError, match="already stopped"):
            restored.run()


def test_a_real_machine_snapshot_rejects_flips_and_truncations(tmp_path) -> None:
    """A snapshot of hello64 stopped at its first exit: every byte of the header and the section table and
    1,000 other offsets flipped, every cut near a section boundary and 200 other cuts: each refused with a
    SnapshotError, never loaded as other data.  (tests/unit/test_snapshot_file.py sweeps every offset and
    every cut of a small file of the same format.)"""
    import random


    with Machine("hello64", backend="emu", memory=1 << 20) as machine:
        steps = machine.steps()
        next(steps)
        steps.close()
        machine.snapshot().save(tmp_path / "hello.snap")
    good = (tmp_path / "hello.snap").read_bytes()
    with SnapshotFile(tmp_path / "hello.snap") as snapshot:
        sections = {section.name: section for section in snapshot.header.sections}
    rng = random.Random(7)
    table_end = HEADER.size + ENTRY.size * len(sections)
    offsets = list(range(table_end)) + rng.sample(range(table_end, len(good)), 1000)
    damaged = tmp_path / "damaged.snap"
    for offset in offsets:
        data = bytearray(good)
        data[offset] ^= 1 << rng.randrange(8)
        damaged.write_bytes(data)
        with pytest.raises(SnapshotError):
            Snapshot.load(damaged)
    boundaries = {s.offset + delta for s in sections.values() for delta in (-1, 0, 1)} | {HEADER.size - 1}
    cuts = sorted({cut for cut in boundaries if 0 <= cut < len(good)} | set(rng.sample(range(len(good)), 200)))
    for cut in cuts:
        damaged.write_bytes(good[:cut])
        with pytest.raises(SnapshotError):
            Snapshot.load(damaged)
    assert Snapshot.load(tmp_path / "hello.snap").state.guest.name == "hello64"


@pytest.mark.parametrize("isolate", [None, False], ids=["default", "in-process"])
def test_a_snapshot_kept_in_memory_stays_as_taken_and_a_restored_guest_snapshots_again(backend_name, isolate):
    """A snapshot kept in memory is restored by mapping its sealed image copy-on-write over the new
    machine's RAM (KVM, an emulator in this process) or by copying it into the worker's RAM file: the
    restored guest's writes never reach the snapshot; a full and a diff snapshot of the restored guest hold
    its writes over the image; and the guest restored from the full one finishes as an uninterrupted run."""
    name = "minikernel64"
    expected = reference(name, backend_name)
    with Machine(name, backend=backend_name, isolate=isolate) as machine:
        stop_after(machine, 2)
        first = machine.snapshot()
    taken = bytes(first.state.regions[0].data)
    with Machine.from_snapshot(first, backend=backend_name, isolate=isolate) as restored:
        stop_after(restored, 3)
        assert restored.last_result.status.kind is StatusKind.RUNNING
        second = restored.snapshot()
        assert second.state.regions[0].data == restored.read_memory(0, restored.memory_size) != taken
        stop_after(restored, 3)  # a diff over the mapped image: the dirty log of a copy-on-write mapping
        third = restored.snapshot(parent=second)
        assert third.state.regions[0].data == restored.read_memory(0, restored.memory_size)
    assert bytes(first.state.regions[0].data) == taken
    with Machine.from_snapshot(second, backend=backend_name, isolate=isolate) as last:
        got = final_state(last, last.run(timeout=10))
    found = {key: value for key, value in differences(expected, got, name).items() if not key.startswith("exits.")}
    assert got[0].console == expected[0].console and found == {}
