"""Random hypercalls with hostile arguments against the paravirtual hypervisor (the full count).

``tests/machine/test_paravirt.py`` runs a fixed sample of 150; this runs
``--calls`` (default 10,000) in guests of 500 calls each, on every backend here,
and checks for each guest: the host process is alive, the run ends by the
guest's own shutdown (or a random multicall entry's block or crash shutdown),
every refused call is counted in ``errors`` and carries its reason, no
privileged trap and no exception happened, and labkit's own structures in
guest RAM (forwarding stubs, GDT, IDT, TSS, page tables) are unchanged.

    python benchmarks/fuzz_hypercalls.py [--calls N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
from random import Random

PER_GUEST = 500


def guest_source(random: Random, calls: int) -> str:
    from labkit.monitor.paravirt import Hypercall
    from labkit.x86 import layout

    ram = layout.DEFAULT_MEMORY
    values = [0, 1, 2, 3, 4, 5, 6, 0x17, 0x30F, 0x2000, 0x40000, 0x40008, 0x6FFC0, ram - 8, ram, 0x300000,
              2**63, 2**64 - 1]
    numbers = [call for call in Hypercall if call not in (Hypercall.IRET, Hypercall.SCHED_OP)] + [1, 77, 2**32 + 18]
    lines = []
    for _ in range(calls):
        for register in ("rdi", "rsi", "rdx", "r10", "r8"):
            value = random.choice(values) if random.random() < 0.8 else random.getrandbits(64)
            lines.append(f"mov {register}, {value:#x}")
        lines += [f"mov rax, {int(random.choice(numbers)):#x}", "int 4"]
    lines += ["mov edi, 2", "xor esi, esi", f"mov eax, {int(Hypercall.SCHED_OP)}", "int 4"]
    return "\n".join(lines)


def main() -> int:
    from labkit import Guest, Machine
    from labkit.monitor.paravirt import HYPERVISOR_MEMORY, Paravirtual, is_error
    from labkit.vmm.status import StatusKind

    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random = Random(args.seed)
    guests = max(1, args.calls // PER_GUEST)
    sources = [guest_source(random, PER_GUEST) for _ in range(guests)]
    failures = 0
    for backend in ["emu"] + (["kvm"] if os.path.exists("/dev/kvm") else []):
        refused = total = 0
        for index, source in enumerate(sources):
            kernel = Guest.from_asm(source, name=f"fuzz-{index}", user=True)
            with Machine(kernel, backend=backend, monitor=Paravirtual()) as machine:
                before = [machine.read_memory(start, end - start) for start, end in HYPERVISOR_MEMORY]
                result = machine.run(timeout=60)
                after = [machine.read_memory(start, end - start) for start, end in HYPERVISOR_MEMORY]
            summary = result.monitor
            bad = [event for event in summary.events if event.result is not None and is_error(event.result)]
            problems = []
            if result.status.kind not in (StatusKind.EXITED, StatusKind.HALTED) and \
                    "sched_op(shutdown, crash)" not in result.status.message:
                problems.append(f"ended {result.status}")
            if len(bad) != sum(summary.errors.values()) or not all(event.error for event in bad):
                problems.append("refused calls and the errors counter disagree")
            if summary.traps or summary.bounced:
                problems.append(f"traps {summary.traps}, bounced {summary.bounced}")
            if before[0] != after[0]:  # the stack range changes with every trap; the structures must not
                problems.append("labkit's structures below LOAD_ADDRESS changed")
            if problems:
                failures += 1
                print(f"{backend} guest {index}: " + "; ".join(problems))
            refused += len(bad)
            total += sum(summary.hypercalls.values()) + sum(summary.batched.values())
        print(f"{backend:>4}: {guests} guests, {total} hypercalls (batched entries included), {refused} refused; "
              f"{failures} guest(s) with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
