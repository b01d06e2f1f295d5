"""How long ``Machine.pause()`` from another thread takes to stop a running guest (issue 7: "within 10 ms").

For each backend and each guest, a machine runs; a second thread waits a random
0-20 ms, calls ``machine.pause()`` and notes the time; the latency is from that
call to the moment ``run()`` returns ``paused`` in the first thread.  The guest is
then continued, so every sample pauses a guest already in its loop.  Guests:

- ``forever64``: ring 0 ``jmp $`` (on PVM run by KVM's instruction emulator),
- ``forever_user64``: ring 3 ``jmp $`` (on PVM native),
- ``out loop``: ring 0 port writes, one exit each (pauses land between exits).  Run with
  ``trace_limit=1000``: past that the trace only counts exits, so the figure is the stop itself.
  With the full trace the emulator's run also moves every record made since the previous run
  from the worker (about 0.7 µs each: some 14,000 for 20 ms of this loop, ~10 ms more).

On the emulator the machine runs in its worker process, as users run it, so
the figure includes the round trip to the worker.  The target is the issue's
10 ms; the share of samples within it is reported with the percentiles.

    python benchmarks/bench_pause.py [--samples 200]

Results go to benchmarks/results/pause.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import threading
import time
from pathlib import Path

from labkit import Guest, Machine
from labkit.backend import kvm_problem
from labkit.vmm.status import StatusKind

RESULTS = Path(__file__).parent / "results" / "pause.json"
TARGET_S = 0.010

OUT_LOOP = Guest.from_asm("""
    again:
        out 0x80, al
        jmp again
""", mode=64, name="out loop")


def pause_latencies(backend: str, guest: Guest | str, samples: int) -> list[float]:
    latencies = []
    with Machine(guest, backend=backend, trace_limit=1000) as machine:
        for _ in range(samples):
            called = []

            def pauser() -> None:
                time.sleep(random.uniform(0.0, 0.02))
                called.append(time.perf_counter())
                machine.pause()

            thread = threading.Thread(target=pauser)
            thread.start()
            result = machine.run(timeout=60)
            returned = time.perf_counter()
            thread.join()
            if result.status.kind is not StatusKind.PAUSED:
                raise SystemExit(f"{backend} {guest}: expected paused, got {result.status}")
            latencies.append(returned - called[0])
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "within_10ms": sum(v <= TARGET_S for v in values) / len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    backends = ["emu"] + ([] if kvm_problem() else ["kvm"])
    results: dict[str, object] = {"host": platform.node(), "load_average": os.getloadavg(),
                                  "samples": args.samples, "target_ms": TARGET_S * 1e3, "runs": {}}
    runs: dict[str, dict[str, float]] = {}
    for backend in backends:
        for guest in ("forever64", "forever_user64", OUT_LOOP):
            name = guest if isinstance(guest, str) else guest.name
            stats = summary(pause_latencies(backend, guest, args.samples))
            runs[f"{backend} {name}"] = stats
            print(f"{backend:4} {name:15} median {stats['median_ms']:6.2f} ms  p90 {stats['p90_ms']:6.2f}  "
                  f"p99 {stats['p99_ms']:6.2f}  max {stats['max_ms']:6.2f}  "
                  f"<= 10 ms: {stats['within_10ms']:.1%}")
    results["runs"] = runs
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
