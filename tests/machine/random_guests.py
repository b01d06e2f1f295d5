"""Random guest bytes, run one Machine each: shared by test_robustness.py (a fixed sample) and
benchmarks/random_guests.py (the full count)."""

from __future__ import annotations

import random
import time

from labkit import Guest, Machine
from labkit.vmm.status import KINDS

SEED = 20261126
BUDGET_S = 0.2


def run_random_guests(backend_name: str, count: int) -> tuple[dict[str, int], float]:
    """Run ``count`` random 64-byte guests (16-, 32- and 64-bit in turn, the same bytes on every backend) with a
    budget of :data:`BUDGET_S` each; assert each ends classified within a second past its budget.
    Returns the count per end status and the slowest run in seconds."""
    rng = random.Random(SEED)
    statuses: dict[str, int] = {}
    worst = 0.0
    for index in range(count):
        mode = (16, 32, 64)[index % 3]
        code = bytes(rng.getrandbits(8) for _ in range(64))
        guest = Guest.from_bytes(code, mode=mode, name=f"random-{index}")
        with Machine(guest, backend=backend_name) as machine:
            started = time.monotonic()
            result = machine.run(timeout=BUDGET_S)
            took = time.monotonic() - started
        worst = max(worst, took)
        assert result.status.kind in KINDS and result.status.kind != "running", (index, result.status)
        assert took <= BUDGET_S + 1.0, f"random guest {index} ran {took:.2f} s past a {BUDGET_S} s budget"
        statuses[result.status.kind] = statuses.get(result.status.kind, 0) + 1
    return statuses, worst
