"""labkit.progress: loops longer than its delay show a bar; every item passes through, in order."""

from __future__ import annotations

import pytest

from labkit.progress import DELAY_S, tracked

pytestmark = pytest.mark.unit


class StepClock:
    """tqdm's clock, advanced by the test: each loop step "takes" ``step`` seconds, whatever the host's load."""

    def __init__(self, step: float):
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """Drive tqdm by a clock the test advances (its bar is decided by elapsed time) and stop its monitor thread."""
    tqdm_std = pytest.importorskip("tqdm.std")
    step = StepClock(DELAY_S / 2)
    monkeypatch.setattr(tqdm_std, "time", step)
    monkeypatch.setattr(tqdm_std.tqdm, "monitor_interval", 0)
    return step


def test_a_long_loop_shows_its_bar_after_the_delay_and_keeps_every_item(capsys, clock):
    items = []
    for item in tracked(range(4), "probes on emu"):
        clock.now += clock.step  # each run takes half the delay
        items.append(item)
    assert items == [0, 1, 2, 3]
    shown = capsys.readouterr().err
    assert "probes on emu" in shown and "4/4" in shown, shown
    assert "1/4" not in shown, shown  # after one step only half the delay had passed: no bar yet


def test_a_short_loop_shows_nothing(capsys, clock):
    items = []
    for item in tracked(iter("abc"), "quick", total=3):
        clock.now += DELAY_S / 4  # three steps: three quarters of the delay
        items.append(item)
    assert items == ["a", "b", "c"]
    assert capsys.readouterr().err == ""
