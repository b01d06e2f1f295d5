"""What the emulation backend's dirty log costs a write-heavy guest (Unicorn 2.1.4).

The guest sweeps 1 MiB of RAM (256 pages) with 8-byte stores, ``SWEEPS`` times
per pass, then writes the debug-exit port.  Each pass is timed through
``EmuBackend.run`` in three settings, in interleaved rounds (the machine is
shared; the median over rounds is reported):

- ``off``: no dirty log (the baseline);
- ``on, fetch every pass``: ``dirty_log_fetch`` after each pass;
- ``on, no fetch``: the log is on, nothing fetched.

The log is a UC_HOOK_MEM_WRITE (the C library's ``dirty_write_hook``) that translates each
store's linear address through the guest's page tables and sets a bit: its cost is per store,
the same whether or not the page was logged before, so both "on" rows cost alike.  (The first
design write-protected watched pages instead: nearly free per store, but each first write to a
page split Unicorn's memory region, 1.3 ms per page with 2 MiB of RAM and 9 ms with 64 MiB.)

Reported: the time ratios against ``off`` and the extra cost per pass divided by its 256 pages.  On KVM the same log is kept by the hardware
(or by PVM's shadow MMU); these are emulator timings on this machine.

Run: ``python benchmarks/bench_dirty_log.py``; writes ``benchmarks/results/dirty_log.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import unicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkit.emu import EmuBackend  # noqa: E402
from labkit.x86 import layout  # noqa: E402
from labkit.x86.boot import boot_state  # noqa: E402

from bench_emu import ENTRY, NoDevices, assemble  # noqa: E402

MEMORY = 4 << 20
AREA, AREA_SIZE = 0x10_0000, 0x10_0000
PAGES = AREA_SIZE // layout.PAGE_SIZE
SWEEPS = 8
RESULTS = ROOT / "benchmarks" / "results" / "dirty_log.json"

SOURCE = f"""
    again:
        mov ecx, {SWEEPS}
    sweep:
        mov rdi, {AREA}
    store:
        mov [rdi], rcx
        add rdi, 8
        cmp rdi, {AREA + AREA_SIZE}
        jb store
        dec ecx
        jnz sweep
        out 0xf4, al
        jmp again
"""


def boot(code: bytes) -> EmuBackend:
    backend = EmuBackend(MEMORY, 64)
    state = boot_state(64, ENTRY, MEMORY)
    for address, data in (*state.memory, (ENTRY, code)):
        backend.memory[address:address + len(data)] = data
    backend.set_sregs(state.sregs)
    backend.set_regs(state.regs)
    backend.set_msrs(state.msrs)
    return backend


def one_pass(backend: EmuBackend, fetch: bool) -> float:
    start = time.perf_counter()
    backend.run(NoDevices(), 10.0)
    elapsed = time.perf_counter() - start
    if fetch:
        pages = backend.dirty_log_fetch()
        if len(pages) != PAGES:
            raise RuntimeError(f"the dirty log gave {len(pages)} pages, not {PAGES}")
    return elapsed


def bench(rounds: int = 15) -> dict:
    code = assemble(SOURCE)
    off, fetched, steady = boot(code), boot(code), boot(code)
    fetched.dirty_log_start()
    steady.dirty_log_start()
    for backend in (off, fetched, steady):  # translate once, and make every steady page logged
        one_pass(backend, False)
    samples: dict[str, list[float]] = {"off": [], "fetch": [], "steady": []}
    for _ in range(rounds):
        samples["off"].append(one_pass(off, False))
        samples["fetch"].append(one_pass(fetched, True))
        samples["steady"].append(one_pass(steady, False))
    if steady.dirty_log_fetch() != list(range(AREA >> 12, (AREA + AREA_SIZE) >> 12)):
        raise RuntimeError("the steady backend's log lost pages")
    median = {name: statistics.median(values) for name, values in samples.items()}
    stores = SWEEPS * AREA_SIZE // 8
    return {
        "stores_per_pass": stores, "pages_per_pass": PAGES, "rounds": rounds,
        "off_ms": median["off"] * 1e3, "fetch_every_pass_ms": median["fetch"] * 1e3,
        "on_no_fetch_ms": median["steady"] * 1e3,
        "ratio_fetch_every_pass": median["fetch"] / median["off"],
        "ratio_on_no_fetch": median["steady"] / median["off"],
        "us_per_logged_page": (median["fetch"] - median["off"]) / PAGES * 1e6,
        "min_max_ms": {name: (min(v) * 1e3, max(v) * 1e3) for name, v in samples.items()},
    }


def main() -> None:
    result = bench()
    print(f"{'setting':<28} {'ms per pass':>12} {'vs off':>8}")
    print(f"{'off':<28} {result['off_ms']:>12.2f} {1.0:>8.2f}")
    print(f"{'on, fetch every pass':<28} {result['fetch_every_pass_ms']:>12.2f} "
          f"{result['ratio_fetch_every_pass']:>8.2f}")
    print(f"{'on, no fetch':<28} {result['on_no_fetch_ms']:>12.2f} {result['ratio_on_no_fetch']:>8.2f}")
    print(f"cost per logged page: {result['us_per_logged_page']:.1f} us "
          f"({result['stores_per_pass']} stores, {result['pages_per_pass']} pages per pass)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                   "unicorn": unicorn.__version__, "dirty_log": result}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
