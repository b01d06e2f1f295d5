"""Many VMs at once (labkit.fleet): parallel against one-after-another, and one KVM VM's life against C.

1. **Fleet speed-up**, per backend: 16 VMs of compute64 (ring 3 Collatz; native under PVM, emulated by
   Unicorn) run by ``run_many`` all at once, against the same 16 run one after another
   (``max_parallel=1``), wall time of the whole fleet (making, running, closing every VM), the two
   interleaved.  compute64's amount of work is its parameter block (``limit``: the Collatz step counts of
   1..limit): a compute-bound benchmark must compute, so each backend gets a limit that makes one VM
   compute for a few hundred ms alone (``--kvm-limit``, ``--emu-limit``), far more than a VM's creation and
   teardown.  Target: at once <= 0.75x one after another, on 2 cores.  Beside it, interleaved, the
   host's own ceiling (``collatz_threads.c``): the same work in 16 plain host threads, at once against one
   after another.  On a shared host the scheduler decides how much of the cores this process gets (with
   autogroup scheduling a session's threads together get one session's share), so no VMM's fleet can
   beat that ratio there; the CPU share the fleet got is reported too.
2. **A KVM VM's life**: ``Machine("hello64", backend="kvm").run()`` then ``close()``, against
   ``kvm_vm_cycle.c`` doing the same on the raw KVM API (create VM, 2 MiB RAM, vCPU, long mode, run to HLT
   answering the UART, destroy), in ``--rounds`` rounds of ``--lives`` lives per side (the C program serves
   counts from a pipe, so C and labkit alternate every few milliseconds), each life timed on its own.  The headline is the median life's thread CPU time, labkit over C
   (wall time on a shared machine mostly measures the other processes; a median is not moved by the
   odd life a garbage collection or a preemption lands in); the means, wall times and the ratio of each
   round are reported too.  Target: labkit <= 3x C.

    .venv/bin/python benchmarks/bench_fleet.py [--rounds R] [--lives N] [--repeat R] [--quick]

Builds the C program with gcc into a temporary directory; writes benchmarks/results/fleet.json.
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

from labkit import Machine  # noqa: E402
from labkit.backend import choose_backend  # noqa: E402
from labkit.errors import BackendUnavailable  # noqa: E402
from labkit.fleet import VmSpec, run_many  # noqa: E402
from labkit.guest import guests_dir  # noqa: E402
from labkit.vmm.status import StatusKind  # noqa: E402

VMS = 16
LIMITS = {"kvm": 500_000, "emu": 50_000}
"""compute64's limit per backend: one VM computes for ~0.2 s (KVM, native ring 3 under PVM) or ~0.15 s
(Unicorn) alone on this host, against ~3 ms (KVM) or ~30 ms (emulator) to create and close a VM."""
CEILING_LIMIT = LIMITS["kvm"]
"""The host ceiling's work per thread: natively ~0.17 s here, as long as one VM's on either backend."""
HELLO = "Hello from 64-bit mode!\n"


def fleet_wall(backend: str, max_parallel: int, limit: int) -> tuple[float, float]:
    """Wall seconds of 16 compute64 VMs (limit ``limit``) run by ``run_many``, ``max_parallel`` at a time, and
    the cores this process and its workers used meanwhile (their CPU time over the wall time)."""
    parameters = struct.pack("<Q", limit)
    specs = [VmSpec(f"compute{i}", "compute64", backend=backend, parameters=parameters) for i in range(VMS)]
    started, cpu = time.perf_counter(), os.times()
    outcomes = list(run_many(specs, max_parallel=max_parallel, timeout=300.0))
    wall = time.perf_counter() - started
    used = sum(after - before for after, before in zip(os.times()[:4], cpu[:4]))
    bad = [outcome.reason for outcome in outcomes if outcome.status is not StatusKind.EXITED]
    if bad:
        raise SystemExit(f"compute64 did not exit cleanly on {backend}: {bad[:3]}")
    consoles = {outcome.console for outcome in outcomes}
    if len(consoles) != 1 or not consoles.pop().startswith(f"collatz steps 1..{limit}: "):
        raise SystemExit(f"compute64's 16 VMs on {backend} did not all print the same sum for 1..{limit}")
    return wall, used / wall


def ceiling_wall(binary: Path, limit: int, together: bool) -> float:
    """Wall seconds of compute64's work in 16 host threads (no VM), at once or one after another."""
    answer = json.loads(subprocess.run([str(binary), str(limit), str(VMS), "at-once" if together else "one-by-one"],
                                       check=True, capture_output=True, text=True).stdout)
    return answer["seconds"]


def labkit_lives(lives: int) -> tuple[list[float], list[float]]:
    """Thread CPU and wall microseconds of each of ``lives`` KVM VM lives through labkit."""
    cpu, wall = [], []
    for _ in range(lives):
        started_wall, started_cpu = time.perf_counter(), time.thread_time()
        machine = Machine("hello64", backend="kvm")
        result = machine.run(5.0)
        machine.close()
        cpu.append((time.thread_time() - started_cpu) * 1e6)
        wall.append((time.perf_counter() - started_wall) * 1e6)
        if result.console != HELLO:
            raise SystemExit(f"hello64 printed {result.console!r}")
    return cpu, wall


class CLives:
    """``kvm_vm_cycle.c`` serving: each :meth:`measure` has it run ``lives`` VM lives now and answer their times."""

    def __init__(self, binary: Path):
        self.process = subprocess.Popen([str(binary), str(guests_dir() / "hello64.bin"), "-"], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def measure(self, lives: int) -> tuple[list[float], list[float]]:
        """Thread CPU and wall microseconds of each of ``lives`` lives in C."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{lives}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the C VMM ended (exit status {self.process.wait()})")
        answer = json.loads(line)
        if answer["console"] != HELLO:
            raise SystemExit(f"the C VMM's hello64 printed {answer['console']!r}")
        return answer["life_cpu_us"], answer["life_wall_us"]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # EOF: it closes /dev/kvm and exits
        self.process.wait(timeout=10)


def vm_life(binary: Path, rounds: int, lives: int) -> dict:
    """``rounds`` rounds of ``lives`` lives per side, C then labkit, a few milliseconds apart, so load that
    comes and goes hits both alike; per-life medians over all of them."""
    c = CLives(binary)
    try:
        c.measure(20)  # warm-up: page cache, the kernel's slabs, labkit's imports and caches
        labkit_lives(20)
        sides: dict[str, dict[str, list[float]]] = {side: {"cpu": [], "wall": []} for side in ("c", "labkit")}
        for _ in range(rounds):
            for side, (cpu, wall) in (("c", c.measure(lives)), ("labkit", labkit_lives(lives))):
                sides[side]["cpu"] += cpu
                sides[side]["wall"] += wall
    finally:
        c.close()
    median = {side: {clock: statistics.median(values) for clock, values in clocks.items()}
              for side, clocks in sides.items()}
    mean = {side: {clock: statistics.fmean(values) for clock, values in clocks.items()}
            for side, clocks in sides.items()}
    # The ratio in each tenth of the run (its lives' medians): how steady the headline is.
    tenth = max(len(sides["c"]["cpu"]) // 10, 1)
    parts = [statistics.median(sides["labkit"]["cpu"][i:i + tenth]) / statistics.median(sides["c"]["cpu"][i:i + tenth])
             for i in range(0, len(sides["c"]["cpu"]) - tenth + 1, tenth)]
    from labkit.kvm.system import kvm_flavour

    return {
        "rounds": rounds, "lives_per_round": lives,
        "c_cpu_us": round(median["c"]["cpu"], 1), "labkit_cpu_us": round(median["labkit"]["cpu"], 1),
        "c_wall_us": round(median["c"]["wall"], 1), "labkit_wall_us": round(median["labkit"]["wall"], 1),
        "ratio": round(median["labkit"]["cpu"] / median["c"]["cpu"], 3),
        "ratio_wall": round(median["labkit"]["wall"] / median["c"]["wall"], 3),
        "ratio_of_means": round(mean["labkit"]["cpu"] / mean["c"]["cpu"], 3),
        "c_cpu_mean_us": round(mean["c"]["cpu"], 1), "labkit_cpu_mean_us": round(mean["labkit"]["cpu"], 1),
        "ratio_by_tenth": [round(ratio, 3) for ratio in parts],
        "ratio_definition": "labkit / C, median thread CPU time of one create + run hello64 + destroy, over "
                            "every life (rounds of a few lives per side, C then labkit, interleaved)",
        "target_ratio": 3.0, "flavour": kvm_flavour()}


def fleet(backend: str, limit: int, repeat: int, ceiling: Path | None) -> dict:
    """``repeat`` interleaved rounds of: 16 VMs at once, the 16 one after another (and the host's ceiling,
    whose threads compute natively as long as a KVM VM does: :data:`CEILING_LIMIT`)."""
    fleet_wall(backend, VMS, limit)  # warm-up
    together, apart, host_together, host_apart = [], [], [], []
    for _ in range(repeat):  # interleaved: load on the shared cores hits both alike
        if ceiling is not None:
            host_together.append(ceiling_wall(ceiling, CEILING_LIMIT, True))
            host_apart.append(ceiling_wall(ceiling, CEILING_LIMIT, False))
        together.append(fleet_wall(backend, VMS, limit))
        apart.append(fleet_wall(backend, 1, limit))
    median = statistics.median
    ratio = median(wall for wall, _ in together) / median(wall for wall, _ in apart)
    entry = {"limit": limit, "vm_alone_s": round(median(wall for wall, _ in apart) / VMS, 4),
             "at_once_s": [round(wall, 3) for wall, _ in together],
             "one_by_one_s": [round(wall, 3) for wall, _ in apart],
             "cores_used_at_once": [round(cores, 2) for _, cores in together],
             "cores_used_one_by_one": [round(cores, 2) for _, cores in apart],
             "ratio": round(ratio, 3), "target_ratio": 0.75,
             "ratio_definition": "median wall of 16 at once / median wall of the 16 one after another"}
    line = (f"{backend}: 16 x compute64 (1..{limit}) at once {median(wall for wall, _ in together):6.2f} s, "
            f"one after another {median(wall for wall, _ in apart):6.2f} s: ratio {ratio:.2f} (target <= 0.75)")
    if host_together:
        entry["host_ceiling"] = {"limit": CEILING_LIMIT, "at_once_s": [round(x, 3) for x in host_together],
                                 "one_by_one_s": [round(x, 3) for x in host_apart],
                                 "ratio": round(median(host_together) / median(host_apart), 3),
                                 "what": "the same work in 16 host threads without a VM (collatz_threads.c)"}
        line += f"; the host's own ceiling (16 threads, no VM) {entry['host_ceiling']['ratio']:.2f}"
    print(line)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fleet runs per way (interleaved); medians reported")
    parser.add_argument("--kvm-limit", type=int, default=LIMITS["kvm"], help="compute64's limit on KVM")
    parser.add_argument("--emu-limit", type=int, default=LIMITS["emu"], help="compute64's limit on the emulator")
    parser.add_argument("--rounds", type=int, default=100, help="interleaved rounds of VM lives (default 100)")
    parser.add_argument("--lives", type=int, default=5, help="VM lives per side and round (default 5)")
    parser.add_argument("--quick", action="store_true", help="one fleet run per way, 20 rounds of lives")
    parser.add_argument("--skip-fleet", action="store_true", help="measure only the KVM VM's life")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "fleet.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.rounds = 1, 20
    limits = {"kvm": args.kvm_limit, "emu": args.emu_limit}

    backends = ["emu"]
    try:
        choose_backend("kvm")
        backends.insert(0, "kvm")
    except BackendUnavailable as why:
        print(f"no KVM here ({why}): only the emulator's fleet is measured")
    result: dict = {"benchmark": "fleet", "vms": VMS, "guest": "compute64", "repeat": args.repeat,
                    "load_average_before": os.getloadavg()}
    gcc = shutil.which("gcc")
    with tempfile.TemporaryDirectory() as directory:
        built = {}
        for name, flags in (("collatz_threads", ["-pthread"]), ("kvm_vm_cycle", [])):
            if gcc is not None:
                built[name] = Path(directory) / name
                subprocess.run([gcc, "-O2", *flags, "-o", str(built[name]), str(HERE / f"{name}.c")], check=True)
        for backend in backends if not args.skip_fleet else ():
            result[backend] = fleet(backend, limits[backend], args.repeat, built.get("collatz_threads"))
        if "kvm" in backends:
            if gcc is None:
                print("gcc is needed to build the C baseline", file=sys.stderr)
                return 2
            life = result["kvm_vm_life"] = vm_life(built["kvm_vm_cycle"], args.rounds, args.lives)
            print(f"KVM VM life (create, hello64, destroy), medians of {args.rounds} x {args.lives} lives: labkit "
                  f"{life['labkit_cpu_us'] / 1e3:.2f} ms CPU ({life['labkit_wall_us'] / 1e3:.2f} wall), C "
                  f"{life['c_cpu_us'] / 1e3:.2f} ms CPU ({life['c_wall_us'] / 1e3:.2f} wall): ratio "
                  f"{life['ratio']:.2f} CPU, {life['ratio_wall']:.2f} wall, {life['ratio_of_means']:.2f} of the "
                  f"means; by tenth of the run {min(life['ratio_by_tenth']):.2f}-{max(life['ratio_by_tenth']):.2f} "
                  "(target <= 3)")
    result.update({"kernel": os.uname().release, "python": platform.python_version(), "cpus": os.cpu_count(),
                   "load_average": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
