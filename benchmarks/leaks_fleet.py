"""1,000 create/run/destroy cycles per backend through labkit.fleet.run_many: nothing may leak.

Counts this process's open fds, mappings (all, and KVM's own), threads and child processes
from /proc before and after (tests/machine/fleet_resources.py, as the test with its fixed
sample of 100 does: tests/machine/test_fleet_leaks.py).  Each cycle makes one VM, runs a
guest that halts, triple-faults, faults, exits or (every fifth) times out after 50 ms,
and closes it.

    .venv/bin/python benchmarks/leaks_fleet.py [--cycles N]

Writes benchmarks/results/leaks_fleet.json; exit status 1 when something leaked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "machine"))

from fleet_resources import check_no_growth, quiet, settled  # noqa: E402

from labkit.backend import choose_backend  # noqa: E402
from labkit.errors import BackendUnavailable  # noqa: E402
from labkit.fleet import VmSpec, run_many  # noqa: E402
from labkit.vmm.status import StatusKind  # noqa: E402

GUESTS = ["hello64", "triplefault64", "fault64", "exit64"]


def cycle(backend: str, index: int) -> None:
    guest = "forever64" if index % 5 == 4 else GUESTS[index % len(GUESTS)]
    [outcome] = run_many([VmSpec(f"vm{index}", guest, backend=backend)], timeout=0.05)
    if outcome.status is StatusKind.ERROR:
        raise SystemExit(f"cycle {index} on {backend}: {outcome.reason}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "leaks_fleet.json")
    args = parser.parse_args(argv)
    backends = ["emu"]
    try:
        choose_backend("kvm")
        backends.insert(0, "kvm")
    except BackendUnavailable as why:
        print(f"no KVM here ({why}): only the emulator is checked")
    result: dict = {"benchmark": "leaks_fleet", "cycles": args.cycles}
    leaked = False
    for backend in backends:
        for index in range(5):
            cycle(backend, index)
        list(run_many([VmSpec(f"warm{i}", "hello64", backend=backend) for i in range(16)]))
        before = quiet()
        started = time.monotonic()
        for index in range(args.cycles):
            cycle(backend, index)
        seconds = time.monotonic() - started
        after = settled(before)
        try:
            growth = check_no_growth(before, after, args.cycles)
            verdict = "nothing leaked"
        except AssertionError:
            growth = before.growth(after)
            verdict = "LEAK"
            leaked = True
        result[backend] = {"growth": growth, "verdict": verdict, "seconds": round(seconds, 2),
                           "before": before.__dict__ | {"children": list(before.children)},
                           "after": after.__dict__ | {"children": list(after.children)}}
        print(f"{backend}: {args.cycles} cycles in {seconds:.1f} s: {verdict}; growth {growth}")
    result.update({"load_average": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
