"""How closely labkit's 8254 timer keeps host time, and what it costs the host.

Baseline: the ideal tick count of each period (elapsed time / period), in the
same run; every figure is a ratio to it.  Two parts:

- device level (any machine): the PIT's thread pulsing IRQ 0 of an
  ``InterruptController`` while a consumer thread takes each interrupt
  (acknowledge + EOI), as a vCPU would, for 1 s per period: edges generated /
  ideal, interrupts taken / ideal, and the process's CPU seconds per wall
  second;
- end to end (once the core builds the PIC and PIT into every machine): the
  timer64 guest taking 1,000 ticks on each backend: ideal time / run time and
  the share of periods that coalesced.

The host's load average goes into the results: on a shared 2-core machine the
timer thread's wake-ups are late when the CPUs are busy, and late edges
coalesce (by design: see ``labkit.vmm.devices.timer``).

    python benchmarks/bench_timer.py
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

from labkit.vmm.devices.timer import MIN_COUNT, PIT_HZ, Pit8254
from labkit.vmm.interrupts import InterruptController

RESULTS = Path(__file__).parent / "results" / "timer.json"
COUNTS = (1193, 240, MIN_COUNT, 1)
"""1 ms, 200 us, the 100 us floor, and a count far below it (runs at the floor)."""


def device_level(count: int, seconds: float = 1.0) -> dict:
    pic = InterruptController()
    pic.write(0, 1, 0x11)
    for value in (0x20, 0x04, 0x01):
        pic.write(1, 1, value)
    pit = Pit8254(pic)
    taken = 0
    stop = threading.Event()

    def consume() -> None:
        nonlocal taken
        while not stop.is_set():
            if pic.wait(0.05):
                pic.acknowledge_interrupt(pic.pending_vector())
                pic.write(0, 1, 0x20)
                taken += 1

    consumer = threading.Thread(target=consume)
    consumer.start()
    cpu, started = time.process_time(), time.monotonic()
    pit.write(3, 1, 0x34)
    pit.write(0, 1, count & 0xFF)
    pit.write(0, 1, count >> 8)
    time.sleep(seconds)
    pit.write(3, 1, 0x34)
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    stop.set()
    consumer.join()
    pit.close()
    state = pit.save()
    ideal = elapsed / pit.period_s
    return {"count": count, "period_us": pit.period_s * 1e6, "clamped": pit.clamped,
            "edges_per_ideal": state.periods / ideal, "taken_per_ideal": taken / ideal,
            "coalesced_share": state.coalesced / max(state.periods, 1), "cpu_s_per_s": cpu / elapsed}


def end_to_end(backend: str, count: int, ticks: int = 1000) -> dict | None:
    from labkit import Guest, Machine

    if not hasattr(Machine, "device_state"):
        return None
    guest = Guest.named("timer64")
    code = bytearray(guest.code)
    struct.pack_into("<IH", code, 16, ticks, count)
    with Machine(Guest.from_bytes(bytes(code), 64, "timer64"), backend=backend) as machine:
        try:
            pit = machine.device_state("pit")
        except Exception:  # noqa: BLE001 - the core does not build the PIT in yet
            return None
        result = machine.run(timeout=60)
        pit = machine.device_state("pit")
    if result.console != f"ticks: {ticks}\n":
        raise SystemExit(f"timer64 on {backend}: {result.status}, console {result.console!r}")
    ideal_s = ticks * count / PIT_HZ
    return {"backend": backend, "count": count, "ticks": ticks, "run_s": result.elapsed_s,
            "ideal_per_run_time": ideal_s / result.elapsed_s,
            "coalesced_share": pit.coalesced / max(pit.periods, 1)}


def main() -> None:
    results: dict = {"load_average": os.getloadavg(), "cpus": os.cpu_count(),
                     "device_level": [device_level(count) for count in COUNTS], "end_to_end": []}
    backends = ["emu"] + (["kvm"] if os.path.exists("/dev/kvm") else [])
    for backend in backends:
        for count in (1193, 240):
            row = end_to_end(backend, count)
            if row is not None:
                results["end_to_end"].append(row)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"load average {results['load_average'][0]:.2f} on {results['cpus']} CPUs")
    print(f"{'count':>7}{'period':>10}{'edges/ideal':>13}{'taken/ideal':>13}{'coalesced':>11}{'CPU s/s':>9}")
    for row in results["device_level"]:
        print(f"{row['count']:>7}{row['period_us']:>8.0f}us{row['edges_per_ideal']:>13.3f}"
              f"{row['taken_per_ideal']:>13.3f}{row['coalesced_share']:>10.1%}{row['cpu_s_per_s']:>9.2f}")
    if not results["end_to_end"]:
        print("end to end: not measured (the core does not build the PIC and PIT into machines here)")
    for row in results["end_to_end"]:
        print(f"timer64 {row['backend']:<4} count {row['count']:>5}: "
              f"{row['ticks']} ticks in {row['run_s'] * 1e3:.0f} ms, "
              f"ideal/run {row['ideal_per_run_time']:.2f}, coalesced {row['coalesced_share']:.1%}")


if __name__ == "__main__":
    main()
