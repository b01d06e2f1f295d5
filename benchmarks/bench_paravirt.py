"""The three kernels on the same routines: run time, entries into the hypervisor, host µs per entry.

Baseline, measured in the same run on each backend: trap-and-emulate on
``minikernel64`` (the same routines as ``pvkernel64``'s), and the native
ring-0 run for scale.  Reported per backend: median wall time of a whole run
(Machine creation included), entries (VM exits, traps, hypercalls + bounced
exceptions), median host µs per entry (a trap-port exit record's ``host_ns``:
guest execution since the previous exit, the exit, the monitor), and the
ratios paravirtual / trap-and-emulate and paravirtual / native.  Target: the
paravirtual run takes at most the trap-and-emulate run's time (it makes ~30x
fewer entries).  Results go to benchmarks/results/paravirt.json.

    python benchmarks/bench_paravirt.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "paravirt.json"
TARGET_RATIO = 1.0


def timed(function, repeat: int):
    samples, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), result


def median_us(records) -> float:
    values = [record.host_ns for record in records]
    return statistics.median(values) / 1e3 if values else float("nan")


def main() -> None:
    from labkit import Machine
    from labkit.monitor.paravirt import PV_ROUTINES, _load_decoder, run_paravirtual
    from labkit.monitor.trap_emulate import minikernel, run_deprivileged
    from labkit.x86 import layout

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernel = minikernel(PV_ROUTINES)
    _load_decoder()
    results: dict = {"notes": f"{platform.node()}, median of {args.repeat}; routines {', '.join(PV_ROUTINES)}"}
    for backend in ["emu"] + (["kvm"] if os.path.exists("/dev/kvm") else []):
        def native_run():
            with Machine(kernel, backend=backend) as machine:
                return machine.run(timeout=20)

        native_s, native = timed(native_run, args.repeat)
        te_s, te = timed(lambda: run_deprivileged(kernel, backend=backend), args.repeat)
        pv_s, pv = timed(lambda: run_paravirtual(PV_ROUTINES, backend=backend), args.repeat)
        trap_port = [r for r in pv.result.trace if r.reason == "IO" and r.address == layout.TRAP_PORT]
        te_port = [r for r in te.trace if r.reason == "IO" and r.address == layout.TRAP_PORT]
        row = {
            "native_s": native_s, "native_exits": native.trace.exit_count(),
            "native_us_per_exit": median_us([r for r in native.trace if r.reason == "IO"]),
            "trap_emulate_s": te_s, "trap_emulate_traps": te.monitor.trap_count,
            "trap_emulate_us_per_trap": median_us(te_port),
            "paravirtual_s": pv_s, "paravirtual_entries": pv.entries, "paravirtual_traps": pv.traps,
            "paravirtual_us_per_entry": median_us(trap_port),
            "ratio_pv_to_te": pv_s / te_s, "ratio_pv_to_native": pv_s / native_s,
        }
        row["target_met"] = row["ratio_pv_to_te"] <= TARGET_RATIO
        results[backend] = row
        print(f"{backend:>4}: native {native_s * 1e3:6.1f} ms ({row['native_exits']} exits, "
              f"{row['native_us_per_exit']:.1f} µs each) | trap-and-emulate {te_s * 1e3:6.1f} ms "
              f"({row['trap_emulate_traps']} traps, {row['trap_emulate_us_per_trap']:.0f} µs each) | paravirtual "
              f"{pv_s * 1e3:6.1f} ms ({pv.entries} entries, {row['paravirtual_us_per_entry']:.0f} µs each) | "
              f"PV/T&E {row['ratio_pv_to_te']:.2f} (target <= {TARGET_RATIO}), PV/native {row['ratio_pv_to_native']:.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
