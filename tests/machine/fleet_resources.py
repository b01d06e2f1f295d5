"""What a process holds, counted from /proc: for the fleet's leak tests and benchmarks/leaks_fleet.py."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

_KVM_MAPPING = re.compile(r"anon_inode:kvm-")


@dataclass(frozen=True)
class Held:
    """Open fds, mappings (count, total KiB, KVM's own), threads and child processes of this process."""

    fds: int
    mappings: int
    mapped_kib: int
    kvm_mappings: int
    threads: int
    children: tuple[int, ...]

    def growth(self, later: Held) -> dict[str, int]:
        return {"fds": later.fds - self.fds, "mappings": later.mappings - self.mappings,
                "mapped_kib": later.mapped_kib - self.mapped_kib, "kvm_mappings": later.kvm_mappings - self.kvm_mappings,
                "threads": later.threads - self.threads, "children": len(later.children) - len(self.children)}


def held() -> Held:
    mappings = kib = kvm = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            mappings += 1
            start, end = line.split(None, 1)[0].split("-")
            kib += (int(end, 16) - int(start, 16)) >> 10
            kvm += bool(_KVM_MAPPING.search(line))
    children: list[int] = []
    tasks = os.listdir("/proc/self/task")
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as found:
                children += [int(pid) for pid in found.read().split()]
        except FileNotFoundError:
            continue
    return Held(len(os.listdir("/proc/self/fd")), mappings, kib, kvm, len(tasks), tuple(sorted(children)))


def quiet(wait_s: float = 5.0) -> Held:
    """A baseline: what this process holds once no worker is left and the thread count stopped moving."""
    deadline = time.monotonic() + wait_s
    last = held()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = held()
        if now.children == () and (now.threads, now.fds) == (last.threads, last.fds):
            return now
        last = now
    return last


def settled(before: Held, wait_s: float = 5.0) -> Held:
    """What this process holds once threads that are ending have ended (a worker's reaping thread exits just
    after it reaped; the watchdog thread starts on first use): polled until fds, threads and children are
    back to ``before`` or ``wait_s`` passed.  A leak never settles."""
    deadline = time.monotonic() + wait_s
    while True:
        now = held()
        if (now.fds, now.threads, now.children, now.kvm_mappings) == (before.fds, before.threads, (),
                                                                        before.kvm_mappings) \
                or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def check_no_growth(before: Held, after: Held, cycles: int) -> dict[str, int]:
    """The growth, after asserting none that a leak of one thing per cycle would cause.

    fds, KVM mappings, threads and children must come back exactly; the number of
    mappings may move a little with the C library's allocator (each thread's malloc
    arena is a mapping, made on first use and kept, at most 8 per core), never by one
    per cycle.  The mapped size is reported, not checked: those arenas reserve 64 MiB
    each.  (A KVM guest's RAM is a mapping of its own, so a leaked one is counted.)
    """
    growth = before.growth(after)
    assert growth["fds"] == 0, growth
    assert growth["kvm_mappings"] == 0, growth
    assert growth["threads"] == 0, growth
    assert after.children == (), (growth, after.children)
    assert growth["mappings"] <= max(8, cycles // 20), growth
    return growth
