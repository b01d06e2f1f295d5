"""Shadow page tables: 1,000 random page-table edits per seed, as natively on the emulator, and what they cost.

For each seed, ``pagingkernel64`` makes ``--edits`` random page-table edits
(random entry, frame, present and writable bits), each followed by a random
read or write and a read of the entry back.  Reference, same run: the kernel
natively (ring 0) on the emulator; its console holds the outcome of every
access and the accessed/dirty bits it read back (hashed).  Each backend then
runs it deprivileged with shadow paging (``labkit.monitor.shadow.run_shadowed``)
under each monitor: trap-and-emulate, and binary translation (the kernel's code
read through its own tables and translated; translated code takes the faults).
The console must be the same, and the page-table writes the monitor trapped
must equal the stores the kernel counted.  Reported: mismatches (target 0),
run time shadowed / native on the same backend, hidden and true page faults,
trapped page-table writes, stub runs.  Results go to benchmarks/results/shadow.json.

    python benchmarks/bench_shadow.py [--edits 1000] [--seeds 1 2 3] [--monitors "trap-and-emulate" "binary translation"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "shadow.json"


def main() -> int:
    from labkit.monitor.shadow import MONITORS, paging_kernel, run_shadowed
    from labkit.monitor.trap_emulate import run_native

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--monitors", nargs="+", choices=MONITORS, default=list(MONITORS))
    args = parser.parse_args()
    backends = ["emu"] + (["kvm"] if os.path.exists("/dev/kvm") else [])
    rows, mismatches = [], 0
    for seed in args.seeds:
        kernel = paging_kernel(args.edits, seed)
        reference = run_native(kernel, "emu", timeout=120)[0]
        stores = int(re.search(r"page-table stores while paging: (0x[0-9a-f]+)", reference.console).group(1), 16)
        for backend in backends:
            started = time.perf_counter()
            native = run_native(kernel, backend, timeout=120)[0]
            native_s = time.perf_counter() - started
            for monitor in args.monitors:
                started = time.perf_counter()
                shadowed = run_shadowed(kernel, backend, timeout=300, monitor=monitor)
                shadowed_s = time.perf_counter() - started
                report = shadowed.monitor.shadow
                same = shadowed.console == reference.console and native.console == reference.console
                trapped = report.pt_writes == stores
                mismatches += (not same) + (not trapped)
                rows.append({"seed": seed, "backend": backend, "monitor": monitor, "same_console": same,
                             "pt_stores": stores, "pt_writes_trapped": report.pt_writes,
                             "hidden_faults": report.hidden_faults, "true_faults": report.true_faults,
                             "stub_runs": report.stub_runs, "native_s": round(native_s, 3),
                             "shadowed_s": round(shadowed_s, 3), "ratio": round(shadowed_s / native_s, 2)})
                print(f"seed {seed} {backend} {monitor}: same console {same}, page-table stores {stores}, trapped "
                      f"{report.pt_writes}, hidden {report.hidden_faults}, true {report.true_faults}, "
                      f"{shadowed_s:.2f} s shadowed / {native_s:.2f} s native = {shadowed_s / native_s:.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                                   "load": os.getloadavg(), "edits": args.edits, "rows": rows,
                                   "mismatches": mismatches}, indent=2) + "\n")
    print(f"{mismatches} mismatches; results in {RESULTS}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
