"""Notebook 06's widget and figures on a real shadowed run of pagingkernel64."""

from __future__ import annotations

import pytest

from labkit.monitor.shadow import run_shadowed_with_memory, switch_costs
from labkit.widgets.memory import ADDRESSES, AddressWalk


@pytest.fixture(scope="module")
def shadowed():
    return run_shadowed_with_memory("pagingkernel64", "emu")


def test_the_walk_shows_one_reference_per_step_and_follows_every_control(shadowed):
    walk = AddressWalk(shadowed, step=2)
    rows = walk.rows()
    assert [row[1] for row in rows] == ["shadow PML4", "shadow PDPT", "shadow PD", "shadow PT", "result"]
    assert rows[-1][4] == "page 0x110000"
    shown = walk.results()[1]
    assert len(shown.rows) == 2 and shown.rows[-1][0] == "▶ 2"
    walk.scheme.value = "nested paging"
    nested = walk.rows()
    assert len(nested) - 1 == 24 and nested[-1][4] == f"host-physical {walk.nested.guest_base + 0x110000:#x}"
    walk.address.value = ADDRESSES[1][1]  # B's page at the same address
    assert walk.rows()[-1][4] == f"host-physical {walk.nested.guest_base + 0x111000:#x}"
    walk.address.value = ADDRESSES[4][1]  # unmapped: the guest's own fault, no EPT exit
    walk.scheme.value = "shadow paging"
    assert "a true #PF (PT entry not present)" in walk.rows()[-1][4]
    walk.step.value = 24
    assert "takes 4 memory references" in walk.results()[0].data


def test_the_figures_draw_and_say_what_measured_them(shadowed):
    from labkit.viz.memory import fault_timeline, tables_side_by_side, walk_costs

    report = shadowed.report
    for figure in (tables_side_by_side(shadowed, 0x100000, 0x40000000), fault_timeline(shadowed.result, report),
                   walk_costs(shadowed.result, 4, 24, 1.0)):
        assert figure.dpi >= 150
        titles = [figure._suptitle.get_text() if figure._suptitle else "", *(ax.get_title() for ax in figure.axes)]
        assert any("measured on the emulator (Unicorn)" in title for title in titles), titles


def test_switch_costs_count_hidden_faults_per_cr3_load(shadowed):
    rows = switch_costs(shadowed.report)
    assert [cr3 for _, cr3, _, _ in rows] == [0x100000, 0x105000, 0x100000, 0x105000, 0x100000, 0x100000]
    assert [new for *_, new in rows] == [True, True, False, False, False, False]
    assert rows[1][2] > 0 and rows[2][2] == 0  # B's first touch refills; back in A, nothing to refill
