"""Snapshot time and size against RAM size, 16 MiB to 1 GiB, and how far notebook 08's extrapolation is off.

Notebook 08 measures a full snapshot, its restore and a 256-page diff at 16/64/256 MiB on KVM and
16/64 MiB on the emulator (what fits its minute) and extrapolates 1 GiB with a straight line
(``labkit.viz.snapshots.extrapolate``).  This script measures every size up to 1 GiB with the same
function (``labkit.viz.snapshots.snapshot_cost``) and reports the measured 1 GiB against the line
through the notebook's sizes.  Baseline: the measured value; no target (it says how much the
notebook's "extrapolated" label hides).  Writes ``benchmarks/results/snapshot_sizes.json``.

    python benchmarks/bench_snapshot_sizes.py [--rounds 1] [--emu-max 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkit.backend import kvm_problem  # noqa: E402
from labkit.viz.snapshots import extrapolate, snapshot_cost  # noqa: E402

MIB = 1 << 20
SIZES = (16, 64, 256, 1024)
NOTEBOOK_SIZES = {"kvm": (16, 64, 256), "emu": (16, 64)}
RESULTS = ROOT / "benchmarks" / "results" / "snapshot_sizes.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="repeats per size (the median is kept)")
    parser.add_argument("--emu-max", type=int, default=1024, help="largest RAM in MiB measured on the emulator")
    args = parser.parse_args()
    report: dict = {"machine": platform.platform(), "python": platform.python_version(), "rounds": args.rounds}
    backends = ["kvm", "emu"] if kvm_problem() is None else ["emu"]
    if "kvm" not in backends:
        report["kvm"] = f"skipped: {kvm_problem()}"
    for backend in backends:
        sizes = [size for size in SIZES if backend == "kvm" or size <= args.emu_max]
        costs = []
        for size in sizes:
            cost = snapshot_cost(backend, size * MIB, repeats=args.rounds)
            costs.append(cost)
            print(f"{backend} {size:5d} MiB: full {cost.full_s:7.3f} s, restore {cost.restore_s:7.3f} s, "
                  f"diff of {cost.diff_pages} pages {cost.diff_s * 1e3:6.1f} ms", flush=True)
        notebook = [cost for cost in costs if cost.memory // MIB in NOTEBOOK_SIZES[backend]]
        entry: dict = {"costs": [asdict(cost) for cost in costs]}
        largest = costs[-1]
        if largest.memory // MIB not in NOTEBOOK_SIZES[backend]:
            for field in ("full_s", "restore_s"):
                line = extrapolate(notebook, largest.memory, field)
                measured = getattr(largest, field)
                entry[f"{field}_at_{largest.memory // MIB}_mib"] = {
                    "measured": measured, "notebook_extrapolation": line.seconds,
                    "extrapolation_over_measured": line.seconds / measured}
        report[backend] = entry
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({b: {k: v for k, v in e.items() if k != "costs"} for b, e in report.items()
                      if isinstance(e, dict)}, indent=2))


if __name__ == "__main__":
    main()
