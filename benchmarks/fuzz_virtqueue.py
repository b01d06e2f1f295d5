"""10,000 random virtqueues against the virtio console: the host survives, RAM outside the used ring is
unchanged, every bad ring is rejected with DEVICE_NEEDS_RESET and every good one fully consumed.

The rings come from ``labkit.virtio.hostile.random_ring`` (a quarter valid, the rest with one fault of
24 kinds: indexes past the ring, loops, lengths past RAM, addresses wrapping past 2**64, WRITE on the
transmit queue, INDIRECT misused, bad queue sizes and areas, ...).  Each goes twice to a fresh device
through its virtio-mmio registers over 2 MiB of RAM in a host bytearray, once into a Console (the C
drain of ``labkit.virtio.native``, then Python from the first chain it leaves) and once into a plain
function (Python alone), and each is checked by ``check_outcome`` against the answer the generator
knows.  ``--machines N`` also sends N rings per backend through real machines (a guest driver sets
the queue up and notifies; the device runs where the guest runs: in the emulator's worker process,
or in this process beside KVM).
``tests/unit/test_virtio_hostile.py`` runs a fixed sample of 500.

    python benchmarks/fuzz_virtqueue.py [--count 10000] [--seed S] [--machines 200]

Writes benchmarks/results/fuzz_virtqueue.json; exits 1 if any ring was mishandled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from labkit.virtio import native  # noqa: E402
from labkit.virtio.hostile import (HOSTILE_DRIVER, RAM_SIZE, check_outcome, random_ring,  # noqa: E402
                                   run_on_device, run_on_machine, write_ring)

RESULTS = HERE / "results" / "fuzz_virtqueue.json"


def fuzz_device(count: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds: Counter[str] = Counter()
    failures: list[str] = []
    started = time.perf_counter()
    for number in range(count):
        case = random_ring(rng)
        kinds[case.fault] += 1
        for native in (True, False):  # the C drain where it is built (then Python), and Python alone
            ram = bytearray(RAM_SIZE)
            write_ring(ram, case)
            before = bytes(ram)
            try:
                device, console = run_on_device(ram, case, native=native)
            except Exception as error:  # noqa: BLE001 - the point: any raise is a failure, counted and named
                failures.append(f"case {number} ({case.fault}, native={native}): raised {type(error).__name__}: "
                                f"{error}")
                continue
            problems = check_outcome(case, device, console, before, ram)
            if problems:
                failures.append(f"case {number} ({case.fault}, native={native}): {'; '.join(problems)}")
    return {"count": count, "seed": seed, "seconds": round(time.perf_counter() - started, 2),
            "each_ring_through": ["the C drain, then Python" if native.load() else "Python (no C drain here)",
                                  "Python alone"],
            "bad_rings": count - kinds["valid"], "valid_rings": kinds["valid"], "by_fault": dict(sorted(kinds.items())),
            "failures": len(failures), "first_failures": failures[:20]}


def fuzz_machines(backend: str, count: int, seed: int) -> dict:
    from labkit import Guest

    driver = Guest.from_asm(HOSTILE_DRIVER, name="hostile_driver")
    rng = random.Random(seed)
    failures: list[str] = []
    started = time.perf_counter()
    for number in range(count):
        case = random_ring(rng, start_at_zero=True)
        problems = run_on_machine(case, backend, driver)
        if problems:
            failures.append(f"case {number} ({case.fault}): {'; '.join(problems)}")
    return {"count": count, "seconds": round(time.perf_counter() - started, 2), "failures": len(failures),
            "first_failures": failures[:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--machines", type=int, default=200, help="rings per backend through real machines")
    args = parser.parse_args()
    results: dict = {"notes": f"{platform.node()}, {time.strftime('%Y-%m-%d')}",
                     "device": fuzz_device(args.count, args.seed)}
    print("device:", json.dumps({key: value for key, value in results["device"].items() if key != "by_fault"}))
    for backend in ["emu"] + (["kvm"] if os.path.exists("/dev/kvm") else []):
        if args.machines:
            results[f"machines_{backend}"] = fuzz_machines(backend, args.machines, args.seed)
            print(f"machines on {backend}:", json.dumps(results[f"machines_{backend}"]))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    failed = results["device"]["failures"] + sum(results.get(f"machines_{b}", {}).get("failures", 0)
                                                   for b in ("emu", "kvm"))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
