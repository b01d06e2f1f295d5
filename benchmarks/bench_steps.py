"""The cost of ``Machine.steps()`` per exit, for a short and a long stepped run (issue 7).

A guest makes N port writes (one exit each) and halts; ``steps()`` yields every
exit.  Each step transfers only its new records and the status, so the time
per exit must not grow with the run's length: the figure is the ratio of the
time per exit at 100,000 exits to the time per exit at 1,000 (target <= 2x),
on each backend (the emulator through its worker process, as users run it).
The baseline in the same run is ``run()`` of the same guest (no stepping).
Each figure is the best of ``--repeat`` runs, short and long interleaved (the
short run is short enough for a busy machine to disturb one sample).

    python benchmarks/bench_steps.py [--short 1000] [--long 100000]

Before this change a step returned the whole trace and console: 1,000 exits
took 0.6 s to step and 4,000 took 5.8 s (quadratic).  Results go to
benchmarks/results/steps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from labkit import Guest, Machine
from labkit.vmm.status import StatusKind

RESULTS = Path(__file__).parent / "results" / "steps.json"
TARGET_RATIO = 2.0


def guest(exits: int) -> Guest:
    return Guest.from_asm(f"""
        mov ecx, {exits - 1}
    again:
        out 0x80, al
        dec ecx
        jnz again
        hlt
    """, mode=64, name=f"out x{exits}")


def per_exit_s(backend: str, exits: int, stepped: bool) -> float:
    with Machine(guest(exits), backend=backend, trace_limit=max(exits + 10, 1000)) as machine:
        started = time.perf_counter()
        if stepped:
            count = sum(1 for _ in machine.steps(timeout=600))
        else:
            count = len(machine.run(timeout=600).trace)
        elapsed = time.perf_counter() - started
        assert machine.last_result.status.kind is StatusKind.HALTED, machine.last_result.status
    assert count == exits, (count, exits)  # exits - 1 outs, then the HLT
    return elapsed / exits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", type=int, default=1_000)
    parser.add_argument("--long", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    backends = (["kvm"] if os.path.exists("/dev/kvm") else []) + ["emu"]
    results: dict = {"host": platform.node(), "short_exits": args.short, "long_exits": args.long,
                     "repeat": args.repeat, "target_ratio": TARGET_RATIO}
    print(f"{'backend':<8}{'run µs/exit':>13}{'step µs/exit':>14}{'at ' + str(args.short):>10}"
          f"{'at ' + str(args.long):>12}{'ratio':>8}")
    for backend in backends:
        run_long = min(per_exit_s(backend, args.long, stepped=False) for _ in range(args.repeat))
        shorts, longs = [], []
        for _ in range(args.repeat):  # interleaved, so that both see the same machine load
            shorts += [per_exit_s(backend, args.short, stepped=True) for _ in range(3)]
            longs.append(per_exit_s(backend, args.long, stepped=True))
        short, long = min(shorts), min(longs)
        ratio = long / short
        results[backend] = {"run_us_per_exit": run_long * 1e6, "step_us_per_exit_short": short * 1e6,
                            "step_us_per_exit_long": long * 1e6, "long_to_short_ratio": ratio,
                            "step_to_run_ratio": long / run_long}
        print(f"{backend:<8}{run_long * 1e6:>13.2f}{'':>14}{short * 1e6:>10.2f}{long * 1e6:>12.2f}{ratio:>8.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    worst = max(results[backend]["long_to_short_ratio"] for backend in backends)
    print(f"worst long/short ratio {worst:.2f} (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
