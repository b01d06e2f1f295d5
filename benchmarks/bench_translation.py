"""Binary translation against trap-and-emulate on the same kernel: run time and host µs per monitor entry.

Baseline, measured in the same run: trap-and-emulate (``run_deprivileged``)
on ``minikernel64`` with its default routines, on each backend; also the
native ring-0 run for scale.  Reported per backend: median wall time of a
whole run (Machine creation included), monitor entries, µs per entry, and the
ratio BT / T&E.  Target: BT within 1.5x of T&E's run time on the same kernel.
Since translated pages are write-protected (self-modifying code), BT makes
about 40% more entries than T&E: minikernel64's IDT shares a page with its
code, so each of its boot-time gate stores traps once (``write: store``), and
the first translation on a page resumes through the ring-0 page-table stub
(``page_table_flushes``).  ``idt_on_its_own_page`` runs the same kernel with its IDT
page-aligned (and its student routine, empty), under both monitors: the ratio without
that false sharing.  Results go to benchmarks/results/translation.json.

    python benchmarks/bench_translation.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "translation.json"
TARGET_RATIO = 1.5


def timed(function, repeat: int):
    samples, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), result


def main() -> None:
    from labkit import Machine
    from labkit.monitor.binary_translation import run_translated
    from labkit.monitor.robin_irvine import IDT_ON_ITS_OWN_PAGE
    from labkit.monitor.trap_emulate import DEFAULT_ROUTINES, minikernel, run_deprivileged

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernel = minikernel()
    results: dict = {"notes": f"{platform.node()}, median of {args.repeat}; minikernel64 default routines; "
                              f"load average {os.getloadavg()[0]:.1f} at the start"}
    for backend in ["emu"] + (["kvm"] if os.path.exists("/dev/kvm") else []):
        native_s, _ = timed(lambda: Machine(kernel, backend=backend).run(timeout=20), args.repeat)
        te_s, te = timed(lambda: run_deprivileged(kernel, backend=backend), args.repeat)
        bt_s, bt = timed(lambda: run_translated(kernel, backend=backend), args.repeat)
        te_entries, bt_entries = te.monitor.trap_count, bt.monitor.monitor_entries
        results[backend] = {
            "native_s": round(native_s, 4),
            "trap_emulate_s": round(te_s, 4), "trap_emulate_entries": te_entries,
            "trap_emulate_us_per_entry": round(te_s * 1e6 / te_entries, 1),
            "translation_s": round(bt_s, 4), "translation_entries": bt_entries,
            "translation_us_per_entry": round(bt_s * 1e6 / bt_entries, 1),
            "blocks_translated": bt.monitor.blocks_translated, "cache_hits": bt.monitor.cache_hits,
            "writes_to_translated_pages": sum(count for reason, count in bt.monitor.entries.items()
                                              if reason.startswith("write")),
            "invalidated": bt.monitor.invalidated, "page_table_flushes": bt.monitor.flushes,
            "ratio_bt_to_te": round(bt_s / te_s, 2), "target_ratio": TARGET_RATIO,
        }
        # The same kernel with its IDT on a page of its own: what the stores into translated code cost.
        apart = minikernel(DEFAULT_ROUTINES, student=IDT_ON_ITS_OWN_PAGE)
        apart_te_s, _ = timed(lambda: run_deprivileged(apart, backend=backend), args.repeat)
        apart_bt_s, apart_bt = timed(lambda: run_translated(apart, backend=backend), args.repeat)
        results[backend]["idt_on_its_own_page"] = {
            "trap_emulate_s": round(apart_te_s, 4), "translation_s": round(apart_bt_s, 4),
            "translation_entries": apart_bt.monitor.monitor_entries,
            "ratio_bt_to_te": round(apart_bt_s / apart_te_s, 2)}
        print(backend, json.dumps(results[backend]))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
