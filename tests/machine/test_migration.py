"""Live migration by pre-copy: the migrated guest's output equals an unmigrated run, converging or not."""

from __future__ import annotations

import struct

import pytest

from backends import HAS_KVM
from labkit import Machine
from labkit.errors import ConfigError
from labkit.migration import migrate

PAIRS = [("emu", "emu")] + ([("kvm", "kvm"), ("kvm", "emu"), ("emu", "kvm")] if HAS_KVM else [])

SMALL_WORKING_SET = {"kvm": (16, 5000, 1000), "emu": (16, 2000, 1000)}
"""memtouch64's (pages, passes, spin) per source backend: it rewrites only 16 pages, so after the
first round the dirty set is at most those and a stack page, whatever the timing: pre-copy
converges at round 1.  With a 1 GB/s link round 0 lasts 2 ms of guest time; the guest needs about
240 M (KVM) or 100 M (emulator) instructions, far more than any host runs in that time, so it is
still running when the source stops."""
FAST_WRITER = {"kvm": ((256, 1_000_000, 0), 20e6), "emu": ((256, 40_000, 0), 5e6)}
"""memtouch64's parameters and the link's bandwidth: it rewrites all 256 pages in far less time
than a round takes (a round copies at least 256 pages: 52 ms at 20 MB/s, 210 ms at 5 MB/s), so
pre-copy does not converge; it needs far longer than the three rounds (about 260 ms and 840 ms
of guest time) on an idle host, so it outlasts them.  On a loaded host a round's slice can end
before the vCPU thread is scheduled at all (the guest then dirties nothing and pre-copy converges),
so the test runs the source through :class:`WholePasses`."""


class WholePasses:
    """The source machine, each of whose runs lasts until memtouch64 has made a whole pass in it.

    memtouch64 counts its passes in R9; a run that ends with R9 less than two above where it began
    may not have rewritten every page, so the slice is run again (at most 1,000 times).  Each
    pre-copy round then sees the guest rewrite all its pages however the host schedules its thread:
    the guest writing faster than the copy is a fact of the test, not a hope about the host's load.
    Everything but ``run`` is the machine's own.
    """

    def __init__(self, machine: Machine):
        self.machine = machine
        self.slices: list[int] = []
        """How many runs each round took (1 when the slice was long enough)."""

    def run(self, timeout: float):
        start = self.machine.regs().r9
        for slices in range(1, 1001):
            result = self.machine.run(timeout=timeout)
            if not result.status.kind.resumable or result.regs.r9 >= start + 2:
                self.slices.append(slices)
                return result
        raise AssertionError(f"memtouch64 made no whole pass in 1,000 slices of {timeout} s")

    def __getattr__(self, name: str):
        return getattr(self.machine, name)


def memtouch(backend: str, pages: int, passes: int, spin: int) -> Machine:
    machine = Machine("memtouch64", backend=backend)
    machine.write_memory(0x80000, struct.pack("<QQQ", pages, passes, spin))
    return machine


def unmigrated(backend: str, parameters: tuple[int, int, int]):
    with memtouch(backend, *parameters) as machine:
        return machine.run(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_a_converging_migration_gives_the_output_of_an_unmigrated_run(source, target):
    parameters = SMALL_WORKING_SET[source]
    expected = unmigrated(target, parameters)
    with memtouch(source, *parameters) as machine:
        migration = migrate(machine, target, bandwidth=1e9, stop_pages=64)
    with migration.target as moved:
        result = moved.run(timeout=60)
    assert migration.converged and not migration.finished_on_source, migration.reason
    assert [r.pages for r in migration.rounds] == [512] and migration.stop_copy_pages <= 64
    assert migration.total_bytes == 4096 * (sum(r.pages for r in migration.rounds) + migration.stop_copy_pages)
    assert (migration.source, migration.destination) == (source, target)
    assert result.console == expected.console and result.status.code == 0
    assert result.regs.gprs() == expected.regs.gprs()


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pair[0] for pair in PAIRS if pair[0] == pair[1]])
def test_a_guest_that_dirties_faster_than_the_copy_does_not_converge_and_the_round_limit_ends_it(backend):
    parameters, bandwidth = FAST_WRITER[backend]
    expected = unmigrated(backend, parameters)
    with memtouch(backend, *parameters) as machine:
        source = WholePasses(machine)
        migration = migrate(source, backend, bandwidth=bandwidth, max_rounds=3, stop_pages=64)
    with migration.target as moved:
        result = moved.run(timeout=60)
    assert len(source.slices) == 3
    assert not migration.converged and migration.reason == "reached the round limit (3)", migration.reason
    assert len(migration.rounds) == 3 and all(r.pages >= 256 for r in migration.rounds[1:])
    assert migration.stop_copy_pages > 64 and migration.downtime_link_s == migration.stop_copy_pages * 4096 / bandwidth
    assert result.console == expected.console and result.regs.gprs() == expected.regs.gprs()


def test_bad_arguments_and_a_finished_guest_are_refused(backend_name):
    with Machine("hello64", backend=backend_name) as machine:
        with pytest.raises(ConfigError, match="bandwidth"):
            migrate(machine, backend_name, bandwidth=0)
        with pytest.raises(ConfigError, match="max_rounds"):
            migrate(machine, backend_name, max_rounds=0)
        machine.run()
        with pytest.raises(ConfigError, match="nothing left to migrate"):
            migrate(machine, backend_name)
