"""Pause from another thread, then resume: the guest ends as if it had never stopped.

Every deterministic shipped guest, on both backends, paused before its run and
repeatedly while it runs; after every ``paused`` result another ``run()`` goes
on, and the console, the status and every register equal an uninterrupted run.
"""

from __future__ import annotations

import threading

import pytest

from labkit import Machine, list_guests
from labkit.errors import LabkitError
from labkit.vmm.status import StatusKind

GUESTS = {guest.name: guest for guest in list_guests()}
DETERMINISTIC = sorted(name for name, guest in GUESTS.items() if guest.expected.get("status") != "timeout")
PAUSE_EVERY_S = (0.0002, 0.001, 0.003)
"""Pause intervals: several pause points per run, at different places in each guest."""


def final(machine: Machine):
    return machine.last_result, machine.sregs()


def machine_for(name: str, backend: str) -> Machine:
    return Machine(name, backend=backend)  # emulated machines in their worker, as users run them


def run_to_the_end(machine: Machine) -> list[StatusKind]:
    kinds = []
    while True:
        kind = machine.run(timeout=10).status.kind
        kinds.append(kind)
        if kind is not StatusKind.PAUSED:
            return kinds


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_pause_then_resume_equals_an_uninterrupted_run(name, backend_name):
    with machine_for(name, backend_name) as machine:
        machine.run(timeout=10)
        reference, reference_sregs = final(machine)

    with machine_for(name, backend_name) as machine:  # paused before it starts: no guest code runs
        machine.pause()
        first = machine.run(timeout=10)
        assert first.status.kind is StatusKind.PAUSED and first.console == "" and len(first.trace) == 0
        assert run_to_the_end(machine)[-1] == reference.status.kind
        result, sregs = final(machine)
        assert (result.console, str(result.status), result.regs, sregs) == \
               (reference.console, str(reference.status), reference.regs, reference_sregs)

    exits = len(reference.trace)
    points_tested = 0
    for point in sorted({1, exits // 3, 2 * exits // 3} & set(range(1, exits))):  # paused after that many exits
        with machine_for(name, backend_name) as machine:
            stepped = machine.steps(timeout=10)
            for _ in range(point):
                next(stepped)
            stepped.close()
            if machine.last_result.status.kind is not StatusKind.RUNNING:
                continue  # the step went past MMIO exits to the guest's end: nothing left to pause
            reached = len(machine.last_result.trace)  # a step may go past an MMIO exit to the next one
            assert reached >= point
            points_tested += 1
            pauser = threading.Thread(target=machine.pause)
            pauser.start()
            pauser.join()
            paused = machine.run(timeout=10)
            assert paused.status.kind is StatusKind.PAUSED and len(paused.trace) == reached, "no guest code ran"
            assert run_to_the_end(machine)[-1] == reference.status.kind
            result, sregs = final(machine)
            assert (result.console, str(result.status), result.regs, sregs) == \
                   (reference.console, str(reference.status), reference.regs, reference_sregs), f"paused at {point}"

    # a step never ends inside an MMIO access: a guest whose exits before its last are all MMIO (a virtio
    # driver finding no device) has no point to pause at
    assert points_tested >= 1 or all(record.reason == "MMIO" for record in list(reference.trace)[:-1])
    for interval in PAUSE_EVERY_S:  # and at whatever points a thread pausing every few ms hits
        with machine_for(name, backend_name) as machine:
            done = threading.Event()

            def pauser():
                while not done.wait(interval):
                    machine.pause()

            thread = threading.Thread(target=pauser)
            thread.start()
            try:
                kinds = run_to_the_end(machine)
            finally:
                done.set()
                thread.join()
            result, sregs = final(machine)
            assert kinds[-1] == reference.status.kind, kinds
            assert result.console == reference.console
            assert str(result.status) == str(reference.status)
            assert result.regs == reference.regs, f"registers differ from the uninterrupted run after {kinds}"
            assert sregs == reference_sregs


def test_a_paused_run_continues_but_a_finished_one_does_not(backend_name):
    with machine_for("hello64", backend_name) as machine:
        machine.pause()
        assert machine.run(timeout=10).status.kind is StatusKind.PAUSED
        assert machine.run(timeout=10).status.kind is StatusKind.HALTED
        with pytest.raises(LabkitError, match="cannot run again"):
            machine.run(timeout=10)


def test_a_timed_out_guest_continues_with_another_run(backend_name):
    with machine_for("forever64", backend_name) as machine:
        first = machine.run(timeout=0.2)
        assert first.status.kind is StatusKind.TIMEOUT
        second = machine.run(timeout=0.2)
        assert second.status.kind is StatusKind.TIMEOUT
        assert [record.reason for record in second.trace].count("TIMEOUT") == 2


def test_each_run_moves_only_what_is_new_yet_the_result_is_whole(backend_name):
    """The emulator's worker sends each run's new trace records and console bytes only; the result
    the caller gets still holds the whole trace and console, as an uninterrupted run's does."""
    def keys(result):
        return [(record.reason, record.rip, record.address, record.data) for record in result.trace]

    with machine_for("hello64", backend_name) as machine:
        reference = machine.run(timeout=10)
    with machine_for("hello64", backend_name) as machine:
        stepped = machine.steps(timeout=10)
        for _ in range(3):
            next(stepped)
        stepped.close()
        assert len(machine.last_result.trace) >= 3
        assert reference.console.startswith(machine.last_result.console)
        machine.pause()
        assert machine.run(timeout=10).status.kind is StatusKind.PAUSED
        result = machine.run(timeout=10)
    assert result.status.kind is StatusKind.HALTED
    assert result.console == reference.console
    assert keys(result) == keys(reference)
    assert result.trace.by_reason() == reference.trace.by_reason()
    assert len(result.trace.handling) == len(result.trace.records) and all(ns > 0 for ns in result.trace.handling)
