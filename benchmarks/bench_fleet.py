"""Many VMs at once (labkit.fleet): parallel against one-after-another, and one KVM VM's life against C.

1. **Fleet speed-up**, per backend: 16 VMs of compute64 (ring 3 Collatz; native under PVM, emulated by
   Unicorn) run by ``run_many`` all at once, against the same 16 run one after another
   (``max_parallel=1``), wall time of the whole fleet (making, running, closing every VM).
   Target: at once <= 0.75x one after another, on 2 cores.
2. **A KVM VM's life**: ``Machine("hello64", backend="kvm").run()`` then ``close()``, N times, against
   ``kvm_vm_cycle.c`` doing the same on the raw KVM API (create VM, 2 MiB RAM, vCPU, long mode, run to HLT
   answering the UART, destroy).  Thread CPU time is the headline (wall time on a shared machine mostly
   measures the other processes); both clocks are reported.  Target: labkit <= 3x C.

    .venv/bin/python benchmarks/bench_fleet.py [--cycles N] [--repeat R]

Builds the C program with gcc into a temporary directory; writes benchmarks/results/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from labkit import Machine  # noqa: E402
from labkit.backend import choose_backend  # noqa: E402
from labkit.errors import BackendUnavailable  # noqa: E402
from labkit.fleet import VmSpec, run_many  # noqa: E402
from labkit.guest import guests_dir  # noqa: E402
from labkit.vmm.status import StatusKind  # noqa: E402

VMS = 16


def fleet_wall(backend: str, max_parallel: int) -> float:
    specs = [VmSpec(f"compute{i}", "compute64", backend=backend) for i in range(VMS)]
    started = time.perf_counter()
    outcomes = list(run_many(specs, max_parallel=max_parallel, timeout=120.0))
    wall = time.perf_counter() - started
    bad = [outcome.reason for outcome in outcomes if outcome.status is not StatusKind.EXITED]
    if bad:
        raise SystemExit(f"compute64 did not exit cleanly on {backend}: {bad[:3]}")
    return wall


def labkit_cycles(cycles: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(cycles):
        machine = Machine("hello64", backend="kvm")
        result = machine.run(5.0)
        machine.close()
        if result.console != "Hello from 64-bit mode!\n":
            raise SystemExit(f"hello64 printed {result.console!r}")
    return time.perf_counter() - wall, time.thread_time() - cpu


def c_cycles(binary: Path, cycles: int) -> tuple[float, float]:
    answer = json.loads(subprocess.run([str(binary), str(guests_dir() / "hello64.bin"), str(cycles)],
                                       check=True, capture_output=True, text=True).stdout)
    if answer["console"] != "Hello from 64-bit mode!\n":
        raise SystemExit(f"the C VMM's hello64 printed {answer['console']!r}")
    return answer["seconds"], answer["cpu_seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100, help="VM lives per side and repeat (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per measurement; medians are reported")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "fleet.json")
    args = parser.parse_args(argv)

    backends = ["emu"]
    try:
        choose_backend("kvm")
        backends.insert(0, "kvm")
    except BackendUnavailable as why:
        print(f"no KVM here ({why}): only the emulator's fleet is measured")
    result: dict = {"benchmark": "fleet", "vms": VMS, "guest": "compute64", "repeat": args.repeat}
    for backend in backends:
        fleet_wall(backend, VMS)  # warm-up
        together, apart = [], []
        for _ in range(args.repeat):  # interleaved: load on the shared cores hits both alike
            together.append(fleet_wall(backend, VMS))
            apart.append(fleet_wall(backend, 1))
        ratio = statistics.median(together) / statistics.median(apart)
        result[backend] = {"at_once_s": [round(x, 3) for x in together], "one_by_one_s": [round(x, 3) for x in apart],
                           "ratio": round(ratio, 3), "target_ratio": 0.75,
                           "ratio_definition": "median wall of 16 at once / median wall of the 16 one after another"}
        print(f"{backend}: 16 x compute64 at once {statistics.median(together):6.2f} s, one after another "
              f"{statistics.median(apart):6.2f} s: ratio {ratio:.2f} (target <= 0.75)")
    if "kvm" in backends:
        gcc = shutil.which("gcc")
        if gcc is None:
            print("gcc is needed to build the C baseline", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as directory:
            binary = Path(directory) / "kvm_vm_cycle"
            subprocess.run([gcc, "-O2", "-o", str(binary), str(HERE / "kvm_vm_cycle.c")], check=True)
            c_cycles(binary, 10)
            labkit_cycles(10)
            runs: dict[str, list[tuple[float, float]]] = {"c": [], "labkit": []}
            for _ in range(args.repeat):
                runs["c"].append(c_cycles(binary, args.cycles))
                runs["labkit"].append(labkit_cycles(args.cycles))
        per = {side: [statistics.median(run[clock] for run in values) * 1e3 / args.cycles for clock in (0, 1)]
               for side, values in runs.items()}
        from labkit.kvm.system import kvm_flavour

        result["kvm_vm_life"] = {
            "cycles": args.cycles,
            "c_ms": round(per["c"][0], 3), "labkit_ms": round(per["labkit"][0], 3),
            "c_cpu_ms": round(per["c"][1], 3), "labkit_cpu_ms": round(per["labkit"][1], 3),
            "ratio": round(per["labkit"][1] / per["c"][1], 3),
            "ratio_wall": round(per["labkit"][0] / per["c"][0], 3),
            "ratio_definition": "labkit / C, median thread CPU time per create + run hello64 + destroy",
            "target_ratio": 3.0, "flavour": kvm_flavour()}
        life = result["kvm_vm_life"]
        print(f"KVM VM life (create, hello64, destroy): labkit {life['labkit_cpu_ms']:.2f} ms CPU "
              f"({life['labkit_ms']:.2f} wall), C {life['c_cpu_ms']:.2f} ms CPU ({life['c_ms']:.2f} wall): "
              f"ratio {life['ratio']:.2f} CPU, {life['ratio_wall']:.2f} wall (target <= 3)")
    result.update({"kernel": os.uname().release, "python": platform.python_version(), "cpus": os.cpu_count(),
                   "load_average": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
