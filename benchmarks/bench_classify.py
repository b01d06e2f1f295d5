"""What one classification and Robin & Irvine's whole table cost, per backend.

Baseline, measured in the same run: one ``Machine("exit64").run()`` (create a
VM, run a few instructions, tear it down), since a classification is four to
ten such runs (each ring twice, the altered state, the second GDT layout where
the rings differ, the run without the instruction on KVM) plus assembling the
guest once or twice (GNU as/ld, cached per instruction).  The table's runs are
counted too, so a change in cost shows whether it came from more runs or from
dearer ones.  Reported as seconds and as multiples of the baseline; the
target is notebook 01's share of the 60 s budget for notebooks 01-03 (the
whole table under 10 s per backend).  Results go to
benchmarks/results/classify.json.

    python benchmarks/bench_classify.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from labkit import Machine
from labkit.backend import kvm_problem
from labkit.classify import classify, robin_irvine_table
from labkit.classify.guest import assemble_guest

RESULTS = Path(__file__).parent / "results" / "classify.json"
TARGET_TABLE_S = 10.0


def median_time(action, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    backends = ["emu"] + (["kvm"] if kvm_problem() is None else [])
    report = {"target_table_s": TARGET_TABLE_S, "backends": {}}

    assemble_guest.cache_clear()
    started = time.perf_counter()
    classify("smsw eax", backend="emu")
    report["first_classification_with_assembly_s"] = round(time.perf_counter() - started, 4)

    for backend in backends:
        def one_machine():
            with Machine("exit64", backend=backend) as machine:
                machine.run(timeout=5)

        baseline = median_time(one_machine, args.repeat)
        one = median_time(lambda: classify("smsw eax", backend=backend, umip=True), args.repeat)
        table = median_time(lambda: robin_irvine_table(backend), max(1, args.repeat // 2))
        rows = robin_irvine_table(backend)
        runs = sum(len(row.runs) for row in rows)
        report["backends"][backend] = {
            "baseline_one_machine_s": round(baseline, 4),
            "classify_smsw_with_umip_s": round(one, 4),
            "classify_over_baseline": round(one / baseline, 1),
            "robin_irvine_table_s": round(table, 3),
            "table_runs": runs,
            "table_over_baseline": round(table / baseline, 1),
            "table_over_runs_times_baseline": round(table / (runs * baseline), 2),
            "rows_from_the_host": sum(1 for row in rows if row.host),
            "table_within_target": table <= TARGET_TABLE_S,
        }
        print(f"{backend}: one Machine {baseline * 1e3:.1f} ms; classify('smsw eax', umip) {one * 1e3:.1f} ms "
              f"({one / baseline:.1f}x); Robin & Irvine table {table:.2f} s ({table / baseline:.0f}x, {runs} runs, "
              f"{table / (runs * baseline):.2f}x their baseline cost; target {TARGET_TABLE_S:g} s)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
