"""Start-up costs a student feels: ``import labkit`` and ``labkit run hello64`` end to end.

Baselines, measured in the same run: a bare ``python -c pass`` (interpreter
start-up) for the import, and the targets of issue 2 (import <= 150 ms, a
whole ``labkit run hello64`` <= 0.5 s on each backend).  Each figure is the
median of several runs; results go to benchmarks/results/startup.json.

    python benchmarks/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "startup.json"
TARGETS = {"import_labkit_s": 0.150, "run_hello_s": 0.5}


def timed(command: list[str], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    python = sys.executable
    bare = timed([python, "-c", "pass"], args.repeat)
    with_import = timed([python, "-c", "import labkit, labkit.vmm.machine"], args.repeat)
    results = {
        "python_start_s": bare,
        "import_labkit_s": with_import - bare,
        "import_target_s": TARGETS["import_labkit_s"],
    }
    backends = ["emu"] + (["kvm"] if os.path.exists("/dev/kvm") else [])
    for backend in backends:
        run = timed([python, "-m", "labkit.cli", "run", "hello64", "--backend", backend], args.repeat)
        results[f"run_hello64_{backend}_s"] = run
        results[f"run_hello64_{backend}_ratio_to_target"] = run / TARGETS["run_hello_s"]
    results["import_ratio_to_target"] = results["import_labkit_s"] / TARGETS["import_labkit_s"]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'measure':<34}{'value':>12}{'target':>10}{'ratio':>8}")
    print(f"{'import labkit (minus bare python)':<34}{results['import_labkit_s'] * 1e3:>10.1f}ms"
          f"{150:>8}ms{results['import_ratio_to_target']:>8.2f}")
    for backend in backends:
        value = results[f"run_hello64_{backend}_s"]
        print(f"{'labkit run hello64 --backend ' + backend:<34}{value * 1e3:>10.1f}ms{500:>8}ms"
              f"{results[f'run_hello64_{backend}_ratio_to_target']:>8.2f}")


if __name__ == "__main__":
    main()
