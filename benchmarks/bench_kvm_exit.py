"""Port-I/O exit cost: labkit's KvmBackend.run against a minimal C VMM on the raw KVM API.

Both run the same real-mode CPL0 guest (see kvm_exit_loop.c): ``out 0x10, al``
in a loop of N iterations, then ``hlt``.  labkit's side uses a dispatcher that
does what labkit's real one (``labkit.vmm.core.MachineCore``) does per exit:
look the port up in a dict of handlers, call the handler, and append a trace
tuple with ``perf_counter_ns`` host timing.  Reports µs per exit for both, and
the ratio (target: labkit <= 1.3x C).  Under PVM every guest instruction is
emulated (~1 µs each, 3 per iteration here), and both sides pay that equally.

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

from labkit import exits  # noqa: E402
from labkit.kvm import KvmBackend  # noqa: E402
from labkit.x86.state import Regs, Segment  # noqa: E402

ENTRY = 0x8000
PORT = 0x10


def guest_code(iterations: int) -> bytes:
    """The loop of kvm_exit_loop.c: mov ecx, N; 1: out 0x10, al; dec ecx; jnz 1b; hlt."""
    return b"\x66\xb9" + struct.pack("<I", iterations) + bytes.fromhex("e610 6649 75fa f4")


class TracingDispatcher:
    """What labkit's MachineCore does per exit: a dict of port handlers and a timed trace tuple."""

    def __init__(self):
        self.stop = False
        self.records: list[tuple] = []
        self.counts: dict[int, int] = {}
        self.handlers = {PORT: self._sink}
        self.bytes_seen = 0
        self._resumed_ns = time.perf_counter_ns()

    def _sink(self, size: int, value: int) -> None:
        self.bytes_seen += 1

    def pio(self, port, size, is_write, value, rip):
        handler = self.handlers.get(port)
        if handler is not None:
            handler(size, value)
        now = time.perf_counter_ns()
        self.records.append((2, rip, port, size, is_write, value, now - self._resumed_ns))
        self.counts[2] = self.counts.get(2, 0) + 1
        self._resumed_ns = now
        return 0

    def mmio(self, address, size, is_write, value, rip):
        return 0


def run_labkit(iterations: int) -> float:
    """Seconds for one guest run of ``iterations`` exits through KvmBackend.run."""
    with KvmBackend(2 << 20, 16) as backend:
        backend.memory[ENTRY:ENTRY + 13] = guest_code(iterations)
        sregs = backend.get_sregs()
        sregs.cs = Segment(base=0, limit=0xFFFF, selector=0, type=0xB)
        backend.set_sregs(sregs)
        backend.set_regs(Regs(rip=ENTRY, rsp=0x7000))
        dispatcher = TracingDispatcher()
        start = time.perf_counter()
        result = backend.run(dispatcher, timeout=60.0)
        seconds = time.perf_counter() - start
    if result != exits.Hlt() or len(dispatcher.records) != iterations:
        raise RuntimeError(f"labkit run ended with {result} after {len(dispatcher.records)} exits")
    return seconds


def run_c(binary: Path, iterations: int) -> float:
    output = subprocess.run([str(binary), str(iterations)], check=True, capture_output=True, text=True).stdout
    answer = json.loads(output)
    if answer["exits"] != iterations:
        raise RuntimeError(f"C run saw {answer['exits']} exits, expected {iterations}")
    return answer["seconds"]


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
        c_runs, labkit_runs = [], []
        for _ in range(args.repeat):  # interleaved, so load on the shared cores hits both alike
            c_runs.append(run_c(binary, args.exits))
            labkit_runs.append(run_labkit(args.exits))

    c_us = statistics.median(c_runs) * 1e6 / args.exits
    labkit_us = statistics.median(labkit_runs) * 1e6 / args.exits
    ratio = labkit_us / c_us
    best_ratio = min(labkit_runs) / min(c_runs)
    from labkit.kvm.system import kvm_flavour

    result = {
        "benchmark": "kvm_exit",
        "guest": "real mode CPL0: out 0x10, al; dec ecx; jnz (3 instructions per exit)",
        "exits_per_run": args.exits,
        "repeat": args.repeat,
        "c_us_per_exit": round(c_us, 3),
        "labkit_us_per_exit": round(labkit_us, 3),
        "ratio": round(ratio, 3),
        "ratio_of_best_runs": round(best_ratio, 3),
        "target_ratio": 1.3,
        "c_runs_s": [round(value, 6) for value in c_runs],
        "labkit_runs_s": [round(value, 6) for value in labkit_runs],
        "flavour": kvm_flavour(),
        "kernel": os.uname().release,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"{'':24}{'median':>10}{'best':>10}   µs per exit, {args.repeat} runs of {args.exits} exits")
    print(f"{'C, raw KVM API':24}{c_us:10.2f}{min(c_runs) * 1e6 / args.exits:10.2f}")
    print(f"{'labkit KvmBackend.run':24}{labkit_us:10.2f}{min(labkit_runs) * 1e6 / args.exits:10.2f}")
    print(f"{'ratio labkit / C':24}{ratio:10.2f}{best_ratio:10.2f}   (target <= 1.30; {kvm_flavour()})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
