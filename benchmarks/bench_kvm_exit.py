"""Port-I/O exit cost: a labkit Machine on KVM against a minimal C VMM on the raw KVM API.

Both run the same real-mode CPL0 guest (see kvm_exit_loop.c): ``out 0x10, al``
in a loop of N iterations, then ``hlt``.  labkit's side is the whole Machine:
``labkit.vmm.core.MachineCore`` dispatching each exit to the port bus and
recording it in the trace with ``perf_counter_ns`` host timing; the time is the
run's own (``RunResult.elapsed_s``, not the VM's creation).  Reports µs per exit for both, and
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

from labkit import Guest, Machine  # noqa: E402

ENTRY = 0x8000
PORT = 0x10


def guest_code(iterations: int) -> bytes:
    """The loop of kvm_exit_loop.c: mov ecx, N; 1: out 0x10, al; dec ecx; jnz 1b; hlt."""
    return b"\x66\xb9" + struct.pack("<I", iterations) + bytes.fromhex("e610 6649 75fa f4")


def run_labkit(iterations: int) -> float:
    """Seconds for one run of ``iterations`` exits through labkit's Machine: KvmBackend.run, the
    MachineCore dispatcher, the port bus (port 0x10 is unclaimed: counted and ignored) and the trace."""
    guest = Guest.from_bytes(guest_code(iterations), mode=16, name="exit-loop")
    with Machine(guest, backend="kvm") as machine:
        result = machine.run(timeout=60.0)
    if result.status.kind != "halted" or result.trace.count("IO") != iterations:
        raise RuntimeError(f"labkit run ended {result.status} after {result.trace.count('IO')} exits")
    return result.elapsed_s


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
    print(f"{'labkit Machine.run':24}{labkit_us:10.2f}{min(labkit_runs) * 1e6 / args.exits:10.2f}")
    print(f"{'ratio labkit / C':24}{ratio:10.2f}{best_ratio:10.2f}   (target <= 1.30; {kvm_flavour()})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
