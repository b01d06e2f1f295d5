"""1,000 random guests per backend (random 64-byte code, 16-, 32- and 64-bit in turn): each must end classified
within a second past its 0.2 s budget, and the caller must live.

The test (tests/machine/test_robustness.py) runs the first 300 of the same guests per backend; this runs the
full count.  Backends without KVM are skipped and say so.

    .venv/bin/python benchmarks/random_guests.py [--count N]

Writes benchmarks/results/random_guests.json; exit status 1 when a guest ended unclassified or overran.
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

from random_guests import run_random_guests  # noqa: E402

from labkit.backend import choose_backend  # noqa: E402
from labkit.errors import BackendUnavailable  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    report: dict = {"count": args.count, "load_average_before": os.getloadavg()}
    failed = False
    for backend in ("kvm", "emu"):
        try:
            choose_backend(backend)
        except BackendUnavailable as why:
            report[backend] = {"skipped": str(why)}
            continue
        started = time.monotonic()
        try:
            statuses, worst = run_random_guests(backend, args.count)
        except AssertionError as error:
            report[backend] = {"failed": str(error)}
            failed = True
            continue
        statuses = {getattr(kind, "value", kind): count for kind, count in sorted(statuses.items())}
        report[backend] = {"statuses": statuses, "slowest_s": round(worst, 3),
                           "seconds": round(time.monotonic() - started, 1)}
        print(f"{backend}: {statuses}, slowest {worst:.3f} s, {report[backend]['seconds']} s")
    (HERE / "results" / "random_guests.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
