"""What KVM's dirty-page log costs a write-heavy guest: logging off, on, and on with a fetch per pass.

The guest runs in 64-bit CPL3 (native under PVM, as under VT-x) and writes one
qword into each of ``--pages`` 4 KiB pages, ``--passes`` times, with an ``out``
after each pass; then it ends (``hlt`` at CPL3 is a #GP, which the default stub
reports on the fault port).  Three ways, on the same guest, in the same run:

- ``off``: no ``KVM_MEM_LOG_DIRTY_PAGES`` on RAM: the baseline;
- ``on``: logging started (``dirty_log_start``), never fetched: what keeping the
  flag on all the time would cost;
- ``fetch``: logging on and ``dirty_log_fetch`` at every pass's ``out``: each
  fetch write-protects the pages again, so every page faults once per pass (what a
  live-migration pre-copy round costs the guest).

Each ``out`` is one port-I/O exit in every variant.  Reports the median of
``--repeat`` runs per variant as µs per guest pass and the ratio to ``off``.

    .venv/bin/python benchmarks/bench_kvm_dirty_log.py [--pages N] [--passes N] [--repeat R]

Writes benchmarks/results/kvm_dirty_log.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from labkit.kvm import KvmBackend  # noqa: E402
from labkit.kvm.system import kvm_flavour  # noqa: E402
from labkit.x86 import layout  # noqa: E402
from labkit.x86.boot import boot_state  # noqa: E402

MEMORY = 8 << 20
BUFFER = 2 << 20  # the pages written start here (identity-mapped, user-accessible)


def guest_code(pages: int, passes: int) -> bytes:
    """The passes, then ``hlt``.  CPL3 cannot do port I/O, so the pass marker is a byte written
    above RAM (below 1 GiB): an MMIO exit, the same cost in every variant."""
    return (
        b"\x41\xb8" + struct.pack("<I", passes)          # mov r8d, passes
        + b"\xbf" + struct.pack("<I", BUFFER)            # 2: mov edi, BUFFER
        + b"\xb9" + struct.pack("<I", pages)             # mov ecx, pages
        + bytes.fromhex("4c 89 07")                      # 1: mov [rdi], r8
        + bytes.fromhex("48 81 c7 00 10 00 00")          # add rdi, 0x1000
        + bytes.fromhex("ff c9")                         # dec ecx
        + bytes.fromhex("75 f2")                         # jnz 1b
        + bytes.fromhex("88 04 25") + struct.pack("<I", MEMORY)  # mov [MEMORY], al: the pass marker
        + bytes.fromhex("41 ff c8")                      # dec r8d
        + bytes.fromhex("75 dc")                         # jnz 2b
        + bytes.fromhex("f4")                            # hlt: #GP at CPL3, reported on the fault port
    )


class PassCounter:
    """Counts pass markers (MMIO writes); stops at the fault port; fetches the dirty log if asked."""

    def __init__(self, backend, fetch: bool):
        self.stop = False
        self.backend = backend
        self.fetch = fetch
        self.passes = 0
        self.dirty = 0

    def pio(self, port, size, is_write, value, rip):
        self.stop = port == layout.FAULT_PORT
        return 0

    def mmio(self, address, size, is_write, value, rip):
        self.passes += 1
        if self.fetch:
            self.dirty += len(self.backend.dirty_log_fetch())
        return 0


def run_once(variant: str, pages: int, passes: int) -> float:
    code = guest_code(pages, passes)
    with KvmBackend(MEMORY, 64) as backend:
        state = boot_state(64, layout.LOAD_ADDRESS, MEMORY, user=True)
        for address, data in state.memory:
            backend.memory[address:address + len(data)] = data
        backend.memory[layout.LOAD_ADDRESS:layout.LOAD_ADDRESS + len(code)] = code
        backend.set_sregs(state.sregs)
        backend.set_regs(state.regs)
        backend.set_msrs(state.msrs)
        if variant != "off":
            backend.dirty_log_start()
        counter = PassCounter(backend, fetch=variant == "fetch")
        start = time.perf_counter()
        result = backend.run(counter, timeout=120.0)
        elapsed = time.perf_counter() - start
        if counter.passes != passes or not counter.stop:
            raise RuntimeError(f"{variant}: the guest ended with {result} after {counter.passes} passes")
        if variant == "fetch" and counter.dirty < (passes - 1) * pages:
            raise RuntimeError(f"fetch: only {counter.dirty} dirty pages seen over {passes} passes of {pages}")
        return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=512, help="pages written per pass (default 512: 2 MiB)")
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "kvm_dirty_log.json")
    args = parser.parse_args(argv)
    if BUFFER + args.pages * layout.PAGE_SIZE > MEMORY:
        parser.error(f"--pages must be at most {(MEMORY - BUFFER) // layout.PAGE_SIZE}")

    variants = ("off", "on", "fetch")
    runs: dict[str, list[float]] = {variant: [] for variant in variants}
    run_once("on", args.pages, 2)  # warm-up
    for _ in range(args.repeat):  # interleaved, so load on the shared cores hits all alike
        for variant in variants:
            runs[variant].append(run_once(variant, args.pages, args.passes))
    us_per_pass = {variant: statistics.median(values) * 1e6 / args.passes for variant, values in runs.items()}
    ratios = {variant: us_per_pass[variant] / us_per_pass["off"] for variant in variants}

    result = {
        "benchmark": "kvm_dirty_log",
        "guest": f"64-bit CPL3: one qword into each of {args.pages} pages per pass, {args.passes} passes",
        "repeat": args.repeat,
        "us_per_pass": {variant: round(value, 2) for variant, value in us_per_pass.items()},
        "ratio_to_off": {variant: round(value, 3) for variant, value in ratios.items()},
        "runs_s": {variant: [round(value, 6) for value in values] for variant, values in runs.items()},
        "flavour": kvm_flavour(),
        "kernel": os.uname().release,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"{'':32}{'µs/pass':>10}{'ratio':>8}   {args.pages} pages per pass, median of {args.repeat}")
    for variant, label in (("off", "logging off (baseline)"), ("on", "logging on, no fetch"),
                           ("fetch", "logging on, fetch every pass")):
        print(f"{label:32}{us_per_pass[variant]:10.1f}{ratios[variant]:8.2f}")
    print(f"({kvm_flavour()}; µs per pass include one MMIO exit)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
