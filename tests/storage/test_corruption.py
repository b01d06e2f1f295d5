"""Single-byte flips in the header and tables, and truncations, of reference overlays (one labkit wrote, one
qemu-io wrote): each is refused on open, reported by ``labkit disk check`` (exit 2), or reads the same data;
never wrong data. A sample here; benchmarks/corruption_sweep_qcow2.py flips and truncates at every byte."""

from __future__ import annotations

import os
import random

import pytest
from corruption import describe, flip, make_references, table_offsets, truncate

pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return make_references(tmp_path_factory.mktemp("references"))


def test_byte_flips_are_refused_or_harmless(references, tmp_path):
    rng = random.Random(13)
    outcomes: dict[str, int] = {}
    for reference in references:
        offsets = table_offsets(reference)
        sample = [o for o in offsets if o < 512] + rng.sample(offsets, 600)  # every header byte, then tables
        for offset in sample:
            outcome = flip(reference, tmp_path / "work.qcow2", offset)
            assert not outcome.startswith("WRONG"), f"{describe(reference, offset)} flipped: {outcome}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) > 300  # most flips of live metadata are caught
    assert set(outcomes) <= {"refused", "check", "same", "size"}


def test_truncations_are_refused(references, tmp_path):
    """Every cut inside the first KiB (the header: QEMU's is 112 bytes long, labkit's 104), then a sample."""
    rng = random.Random(14)
    for reference in references:
        length = os.path.getsize(reference.path)
        cuts = list(range(0, 1024)) + list(range(1024, length, 4096)) + rng.sample(range(length), 100)
        for cut in cuts:
            outcome = truncate(reference, tmp_path / "work.qcow2", cut)
            assert outcome in ("refused", "check"), f"{reference.path.name} cut to {cut} bytes: {outcome}"
