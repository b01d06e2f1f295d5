"""Port-I/O exit cost: a labkit Machine on KVM against a minimal C VMM on the raw KVM API.

Both run the same real-mode CPL0 guest (see kvm_exit_loop.c): ``out 0x10, al``
in a loop of N iterations, then ``hlt``.  labkit's side is the whole Machine:
``labkit.vmm.core.MachineCore`` dispatching each exit to the port bus and
recording it in the trace with ``perf_counter_ns`` host timing; the time is the
run's own (``RunResult.elapsed_s``, not the VM's creation).  Reports µs per exit for both, and
the ratio (target: labkit <= 1.3x C).  Under PVM every guest instruction is
emulated (~1 µs each, 3 per iteration here), and both sides pay that equally.

Two clocks: wall time, and the thread's CPU time (user + kernel; under PVM the
guest's emulation runs in the vCPU thread's kernel time).  On a shared, loaded
machine wall time mostly measures the other processes; CPU time does not, so
the CPU-time ratio is the headline.  A third side, the *Python floor*, is the
smallest possible ``KVM_RUN`` loop in Python (ctypes ioctl, read the exit
reason, nothing else) on a labkit ``KvmBackend``: what any Python VMM pays here
before it does anything with an exit (DECISIONS.md: why it is ~1.4x C on PVM).

    .venv/bin/python benchmarks/bench_kvm_exit.py [--exits N] [--repeat R]

Builds the C program with gcc into a temporary directory and writes
benchmarks/results/kvm_exit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from labkit import Guest, Machine  # noqa: E402

ENTRY = 0x8000
PORT = 0x10


def guest_code(iterations: int) -> bytes:
    """The loop of kvm_exit_loop.c: mov ecx, N; 1: out 0x10, al; dec ecx; jnz 1b; hlt."""
    return b"\x66\xb9" + struct.pack("<I", iterations) + bytes.fromhex("e610 6649 75fa f4")


def run_labkit(iterations: int) -> tuple[float, float]:
    """(wall, CPU) seconds for one run of ``iterations`` exits through labkit's Machine: KvmBackend.run,
    the MachineCore dispatcher, the port bus (port 0x10 is unclaimed: counted and ignored) and the trace."""
    guest = Guest.from_bytes(guest_code(iterations), mode=16, name="exit-loop")
    with Machine(guest, backend="kvm") as machine:
        cpu_start = time.thread_time()
        result = machine.run(timeout=60.0)
        cpu = time.thread_time() - cpu_start
    if result.status.kind != "halted" or result.trace.count("IO") != iterations:
        raise RuntimeError(f"labkit run ended {result.status} after {result.trace.count('IO')} exits")
    return result.elapsed_s, cpu


def run_python_floor(iterations: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the smallest Python KVM_RUN loop on a labkit KvmBackend with the same guest:
    ``ioctl(KVM_RUN)`` through ctypes and one read of ``exit_reason`` per exit, no dispatcher, no trace."""
    from labkit.kvm import KvmBackend
    from labkit.kvm import bindings as kb
    from labkit.kvm.ioctl import kvm_run_ioctl
    from labkit.x86.boot import boot_state, load_boot_state

    code = guest_code(iterations)
    with KvmBackend(2 << 20, 16) as backend:
        load_boot_state(backend, boot_state(16, ENTRY, 2 << 20), code, ENTRY)
        fd, page, request, ioctl = backend._vcpu.fd, backend._vcpu._run_map, kb.KVM_RUN, kvm_run_ioctl
        reason_of = struct.Struct("<I").unpack_from
        reason_offset, exit_io = kb.kvm_run.exit_reason.offset, kb.KVM_EXIT_IO
        exits = 0
        cpu_start, start = time.thread_time(), time.perf_counter()
        while True:
            if ioctl(fd, request, 0) < 0:
                continue
            if reason_of(page, reason_offset)[0] != exit_io:
                break
            exits += 1
        wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
        if exits != iterations or reason_of(page, reason_offset)[0] != kb.KVM_EXIT_HLT:
            raise RuntimeError(f"the Python floor loop saw {exits} exits, expected {iterations}, then HLT")
    return wall, cpu


def run_c(binary: Path, iterations: int) -> tuple[float, float]:
    output = subprocess.run([str(binary), str(iterations)], check=True, capture_output=True, text=True).stdout
    answer = json.loads(output)
    if answer["exits"] != iterations:
        raise RuntimeError(f"C run saw {answer['exits']} exits, expected {iterations}")
    return answer["seconds"], answer["cpu_seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=20000, help="port-I/O exits per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=9, help="runs per side; the median is reported")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "kvm_exit.json")
    args = parser.parse_args(argv)

    gcc = shutil.which("gcc")
    if gcc is None:
        print("gcc is needed to build the C baseline", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as directory:
        binary = Path(directory) / "kvm_exit_loop"
        subprocess.run([gcc, "-O2", "-o", str(binary), str(HERE / "kvm_exit_loop.c")], check=True)
        run_c(binary, 1000)  # warm-up
        run_labkit(1000)
        run_python_floor(1000)
        runs: dict[str, list[tuple[float, float]]] = {"c": [], "floor": [], "labkit": []}
        for _ in range(args.repeat):  # interleaved, so load on the shared cores hits all alike
            runs["c"].append(run_c(binary, args.exits))
            runs["floor"].append(run_python_floor(args.exits))
            runs["labkit"].append(run_labkit(args.exits))

    def per_exit(side: str, clock: int) -> float:
        return statistics.median(run[clock] for run in runs[side]) * 1e6 / args.exits

    wall = {side: per_exit(side, 0) for side in runs}
    cpu = {side: per_exit(side, 1) for side in runs}
    ratio = cpu["labkit"] / cpu["c"]
    from labkit.kvm.system import kvm_flavour

    result = {
        "benchmark": "kvm_exit",
        "guest": "real mode CPL0: out 0x10, al; dec ecx; jnz (3 instructions per exit)",
        "exits_per_run": args.exits,
        "repeat": args.repeat,
        "c_us_per_exit": round(wall["c"], 3),
        "labkit_us_per_exit": round(wall["labkit"], 3),
        "python_floor_us_per_exit": round(wall["floor"], 3),
        "ratio_wall": round(wall["labkit"] / wall["c"], 3),
        "c_cpu_us_per_exit": round(cpu["c"], 3),
        "labkit_cpu_us_per_exit": round(cpu["labkit"], 3),
        "python_floor_cpu_us_per_exit": round(cpu["floor"], 3),
        "ratio": round(ratio, 3),
        "ratio_definition": "labkit / C, median thread CPU time per exit (user + kernel)",
        "python_floor_ratio": round(cpu["floor"] / cpu["c"], 3),
        "target_ratio": 1.3,
        "runs_s": {side: [[round(wall_s, 6), round(cpu_s, 6)] for wall_s, cpu_s in values]
                   for side, values in runs.items()},
        "flavour": kvm_flavour(),
        "kernel": os.uname().release,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"{'':30}{'CPU':>8}{'wall':>8}   µs per exit (medians), {args.repeat} runs of {args.exits} exits")
    for side, label in (("c", "C, raw KVM API"), ("floor", "Python floor (bare KVM_RUN)"),
                        ("labkit", "labkit Machine.run")):
        print(f"{label:30}{cpu[side]:8.2f}{wall[side]:8.2f}")
    print(f"{'ratio labkit / C':30}{ratio:8.2f}{wall['labkit'] / wall['c']:8.2f}   (target <= 1.30; {kvm_flavour()})")
    print(f"{'ratio Python floor / C':30}{cpu['floor'] / cpu['c']:8.2f}{wall['floor'] / wall['c']:8.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
