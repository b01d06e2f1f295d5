"""Random bytes as ring-0 code on both backends: does each seed end the same way (the full count)?

``tests/machine/test_isolation.py`` runs a fixed sample; this runs seeds ``--first`` .. ``--first +
--count - 1`` (default 0-499) of :func:`labkit.isolation.random_bytes_guest`, each alone on KVM and
then on the emulator (:func:`labkit.isolation.compare_backends`), and counts the agreements:

- ``same``: the same end status (kind, exit code, fault vector, RIP, error code, CR2);
- ``KVM cannot run it``: KVM stopped with KVM_EXIT_INTERNAL_ERROR (under PVM, ring-0 code goes through
  KVM's instruction emulator, which lacks x87, most SSE, ``int3``/``int n`` at CPL 0): nothing to compare;
- ``different``: listed seed by seed, grouped by what differs.

Writes benchmarks/results/sweep_random_bytes.json.  Needs /dev/kvm.

    python benchmarks/sweep_random_bytes.py [--first 0] [--count 500] [--timeout 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sweep_random_bytes.json"


def difference(kvm, emu) -> str:
    """A short name for how two end statuses differ (for grouping; the statuses themselves are kept)."""
    from labkit.vmm.status import StatusKind

    if kvm.kind is not emu.kind:
        return f"{kvm.kind} on KVM, {emu.kind} on the emulator"
    if kvm.kind is StatusKind.FAULT:
        a, b = kvm.fault, emu.fault
        if (a.vector, a.rip, a.cr2) == (b.vector, b.rip, b.cr2) and (a.error_code or 0) ^ (b.error_code or 0) == 2:
            writes = "KVM" if (a.error_code or 0) & 2 else "the emulator"
            return f"#PF error code differs in W/R only (a write on {writes})"
        if a.vector != b.vector:
            return f"fault vector {a.vector} on KVM, {b.vector} on the emulator"
        return f"vector {a.vector} at a different RIP or error code"
    return f"{kvm.kind} on both, different code"


def main() -> int:
    from labkit.isolation import Agreement, compare_backends, random_bytes_guest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--no-save", action="store_true", help="do not write the results JSON")
    args = parser.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("needs /dev/kvm: the sweep compares KVM with the emulator")
        return 2
    started = time.monotonic()
    agreements: Counter[str] = Counter()
    differences: dict[str, list[dict]] = {}
    cannot_run: list[int] = []
    origin = None
    for seed in range(args.first, args.first + args.count):
        comparison = compare_backends(random_bytes_guest(seed), timeout=args.timeout)
        origin = origin or comparison.kvm.origin
        agreement = comparison.agreement
        agreements[str(agreement)] += 1
        if agreement is Agreement.KVM_CANNOT_RUN:
            cannot_run.append(seed)
        elif agreement is Agreement.DIFFERENT:
            kind = difference(comparison.kvm.status, comparison.emu.status)
            differences.setdefault(kind, []).append(
                {"seed": seed, "kvm": str(comparison.kvm.status), "emu": str(comparison.emu.status)})
    wall = time.monotonic() - started
    print(f"seeds {args.first}-{args.first + args.count - 1}, budget {args.timeout:g} s, {wall:.0f} s "
          f"({origin})")
    for name in (str(a) for a in Agreement):
        print(f"  {name:18s} {agreements[name]:4d}")
    for kind, rows in sorted(differences.items(), key=lambda item: -len(item[1])):
        print(f"  different: {len(rows):3d}  {kind}: seeds {', '.join(str(r['seed']) for r in rows[:20])}"
              + (" ..." if len(rows) > 20 else ""))
    if not args.no_save:
        RESULTS.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "load": os.getloadavg()[0],
            "kvm": str(origin), "seeds": [args.first, args.first + args.count - 1], "timeout_s": args.timeout,
            "wall_s": round(wall, 1), "agreements": dict(agreements), "kvm_cannot_run": cannot_run,
            "different": differences}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
