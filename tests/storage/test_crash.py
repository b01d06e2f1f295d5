"""kill -9 of a writer at random moments: the image it leaves is clean or leaks only (never corrupt), for
``qemu-img check`` and ``labkit disk check``, and every acknowledged write reads back.
(A fixed sample of 20 here; ``benchmarks/killsweep_qcow2.py`` runs 200.)"""

from __future__ import annotations

import random

import pytest
from crash_runs import kill_run

pytestmark = [pytest.mark.unit, pytest.mark.slow]


def test_kill_9_leaves_no_corruption_and_loses_no_acknowledged_write(tmp_path):
    rng = random.Random(2026)
    runs = [kill_run(tmp_path, seed, rng) for seed in range(20)]
    for run in runs:
        assert run.qemu_exit in (0, 3), run
        assert run.labkit_exit in (0, 3), run
        assert run.lost == 0, run
    assert sum(run.acknowledged for run in runs) > 20 * 5  # the writers really were writing when killed
