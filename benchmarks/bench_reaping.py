"""Ctrl-C while an emulated Machine closes: how many workers are left unreaped (zombies) or running.

SIGINTs rain on the process (0-2 ms apart) while it closes emulated machines;
each one raises ``KeyboardInterrupt`` wherever it lands inside labkit's close
path (``labkit/vmm/worker.py``, ``labkit/vmm/machine.py``).  Two seconds after
the last close, every worker must be gone and reaped.  Baseline, in the same
run: the worker module of commit a61b9f3 (``git show``), which reaped with
``os.waitpid`` in the interrupted thread (the issue counted 2 zombies in 800).
Results go to benchmarks/results/reaping.json.

    python benchmarks/bench_reaping.py [--closes 800]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "reaping.json"
BASELINE_COMMIT = "a61b9f3"
BASELINE_FILE = f"labkit/vmm/worker.py@{BASELINE_COMMIT}"

sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "machine")]
from test_lifetimes import CLOSE_PATH, interrupt_storm  # noqa: E402

import labkit.vmm.machine as machine_module  # noqa: E402


def baseline_worker() -> type | None:
    """The ``Worker`` class of a61b9f3, or None outside a git checkout that has it."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:labkit/vmm/worker.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("worker_baseline")
    exec(compile(source, BASELINE_FILE, "exec"), module.__dict__)
    return module.Worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--closes", type=int, default=800)
    args = parser.parse_args()
    results = {}
    started = time.monotonic()
    results["labkit"] = interrupt_storm(args.closes)
    results["labkit"]["seconds"] = round(time.monotonic() - started, 1)
    old = baseline_worker()
    if old is not None:
        current = machine_module.Worker
        machine_module.Worker = old
        try:
            started = time.monotonic()
            results[BASELINE_COMMIT] = interrupt_storm(args.closes, close_path=CLOSE_PATH + (BASELINE_FILE,))
            results[BASELINE_COMMIT]["seconds"] = round(time.monotonic() - started, 1)
        finally:
            machine_module.Worker = current
    report = {"closes": args.closes, "host": platform.node(), "results": results,
              "notes": "zombies/alive: workers not reaped / still running 2 s after the last close"}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for name, counts in results.items():
        print(f"{name:>8}: {counts['interrupted']} of {counts['closes']} closes interrupted, "
              f"{counts['zombies']} zombies, {counts['alive']} workers still running ({counts['seconds']} s)")


if __name__ == "__main__":
    main()
