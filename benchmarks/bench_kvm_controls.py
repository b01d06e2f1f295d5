"""What KVM's exit controls save per write: the same guest without and with each control, on KVM.

Three ring-0 guests, N writes each, then ``hlt``:

- ``uart``: N bytes to the UART's transmit register (COM1 + 0), one ``out`` each: without controls
  every byte is a port exit; with a coalesced PIO zone on the register they go into KVM's ring and
  labkit drains it at the next exit (the console must be the same);
- ``notify``: N writes of 0 to the virtqueue notify port 0xF6: port exits, or an ioeventfd;
- ``msr``: N ``wrmsr`` of IA32_KERNEL_GS_BASE: handled in the kernel, or sent to labkit
  (user-space MSR + filter): the control that *adds* exits.

Reports thread CPU time (user + kernel: the load of other processes does not inflate it) per
write, medians of interleaved runs, and the ratio with/without.  No target: the numbers say what
each control is worth on this host (``kvm_pvm``: every ring-0 instruction is emulated, ~1 µs each,
which both sides pay).

    .venv/bin/python benchmarks/bench_kvm_controls.py [--writes N] [--repeat R]

Writes benchmarks/results/kvm_controls.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from labkit import Guest, Machine  # noqa: E402
from labkit.kvm import CoalescedZone, IoEventFd, KvmExitControls, UserMsr  # noqa: E402
from labkit.x86 import layout  # noqa: E402

NOTIFY_PORT = 0xF6
MSR = 0xC000_0102

SOURCES = {
    "uart": "mov ecx, {n}\n1: mov al, 0x2e\nmov dx, 0x3f8\nout dx, al\ndec ecx\njnz 1b\nhlt\n",
    "notify": "mov ecx, {n}\nxor eax, eax\n1: out 0xf6, al\ndec ecx\njnz 1b\nhlt\n",
    "msr": "mov ebx, {n}\nmov ecx, 0xc0000102\n1: mov eax, ebx\nxor edx, edx\nwrmsr\ndec ebx\njnz 1b\nhlt\n",
}
CONTROLS = {
    "uart": KvmExitControls(coalesced=(CoalescedZone(layout.COM1_PORT, 1, pio=True),)),
    "notify": KvmExitControls(ioeventfds=(IoEventFd(NOTIFY_PORT, 1, datamatch=0),)),
    "msr": KvmExitControls(msrs=(UserMsr(MSR),)),
}


class Doorbell:
    """Counts notifications (the notify port's device)."""

    def __init__(self, context: object = None):
        self.count = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.count += 1

    def reset(self) -> None:
        self.count = 0

    def save(self) -> dict:
        return {"count": self.count}

    def restore(self, state: dict) -> None:
        self.count = state["count"]


def run(case: str, writes: int, controlled: bool) -> tuple[float, dict]:
    from labkit.vmm.devices import DeviceSpec

    guest = Guest.from_asm(SOURCES[case].format(n=writes), mode=64, name=case)
    devices = [DeviceSpec("doorbell", "pio", NOTIFY_PORT, 1, Doorbell)]
    with Machine(guest, backend="kvm", devices=devices, kvm_controls=CONTROLS[case] if controlled else None) as machine:
        start = time.thread_time()
        result = machine.run(timeout=120.0)
        cpu = time.thread_time() - start
        doorbell = machine.device_state("doorbell")["count"]
    if result.status.kind != "halted":
        raise RuntimeError(f"{case} ended {result.status}")
    if case == "uart" and result.console != "." * writes:
        raise RuntimeError(f"uart: the console has {len(result.console)} of {writes} bytes")
    if case == "notify" and doorbell != writes:
        raise RuntimeError(f"notify: the device saw {doorbell} of {writes} notifications")
    stats = result.kvm_stats
    return cpu, {"userspace_exits": stats.userspace_total, "kvm_exits": stats.counters.get("exits", 0),
                 "delivered": sum(stats.delivered.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "kvm_controls.json")
    args = parser.parse_args(argv)
    from labkit.kvm.system import kvm_flavour

    times: dict[tuple[str, bool], list[float]] = {(case, on): [] for case in SOURCES for on in (False, True)}
    counts: dict[tuple[str, bool], dict] = {}
    for case in SOURCES:
        run(case, 100, False)
        run(case, 100, True)
    for _ in range(args.repeat):  # interleaved
        for case, on in times:
            cpu, counts[(case, on)] = run(case, args.writes, on)
            times[(case, on)].append(cpu)
    rows = {}
    print(f"{'':8}{'µs/write without':>18}{'with':>10}{'ratio':>8}   exits to labkit without -> with "
          f"({args.repeat} runs of {args.writes} writes, thread CPU time, {kvm_flavour()})")
    for case in SOURCES:
        without = statistics.median(times[(case, False)]) * 1e6 / args.writes
        with_ = statistics.median(times[(case, True)]) * 1e6 / args.writes
        rows[case] = {"us_per_write_without": round(without, 3), "us_per_write_with": round(with_, 3),
                      "ratio_with_over_without": round(with_ / without, 3),
                      "without": counts[(case, False)], "with": counts[(case, True)]}
        print(f"{case:8}{without:18.2f}{with_:10.2f}{with_ / without:8.2f}   "
              f"{counts[(case, False)]['userspace_exits']} -> {counts[(case, True)]['userspace_exits']}")
    result = {
        "benchmark": "kvm_controls", "writes_per_run": args.writes, "repeat": args.repeat,
        "clock": "thread CPU time (user + kernel), median", "cases": rows, "flavour": kvm_flavour(),
        "kernel": os.uname().release, "load_average": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
