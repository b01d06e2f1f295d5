"""labkit.progress: loops longer than its delay show a bar; every item passes through, in order."""

from __future__ import annotations

import time

import pytest

from labkit.progress import tracked

pytestmark = pytest.mark.unit


def test_a_long_loop_shows_its_bar_and_keeps_every_item(capsys):
    items = []
    for item in tracked(range(3), "probes on emu", delay_s=0.05):
        time.sleep(0.04)
        items.append(item)
    assert items == [0, 1, 2]
    shown = capsys.readouterr().err
    assert "probes on emu" in shown and "3/3" in shown, shown


def test_a_short_loop_shows_nothing(capsys):
    assert list(tracked(iter("abc"), "quick", total=3)) == ["a", "b", "c"]
    assert capsys.readouterr().err == ""
