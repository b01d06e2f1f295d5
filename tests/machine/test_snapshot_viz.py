"""Notebook 08's measurements, figures and control panel, on every backend this machine has."""

from __future__ import annotations

import pytest

from labkit import Machine
from labkit.errors import ConfigError
from labkit.viz.labels import measured_on
from labkit.viz.snapshots import (MIB, WORKLOADS, SnapshotCost, dirty_heatmap, dirty_page_map, extrapolate,
                                  file_sections_table, snapshot_cost, snapshot_cost_figure, state_comparison)


def test_a_small_working_set_dirties_exactly_its_pages_in_every_slice(backend_name):
    """Each later slice holds working-set pages only; a slice in which the guest made a whole pass holds
    all 64 (a loaded host may hardly run the vCPU in some slice: that slice holds fewer, never others)."""
    dirty = dirty_page_map(WORKLOADS["small"], backend_name, 4 * MIB, slices=6, slice_s=0.03)
    first_page = 0x100000 // 4096
    working_set = set(range(first_page, first_page + 64))
    assert dirty.status == "timeout" and len(dirty.pages) == 6 and dirty.backend == backend_name
    for pages in dirty.pages[1:]:
        assert set(pages) <= working_set, sorted(set(pages) - working_set)[:8]
    whole = [index for index, pages in enumerate(dirty.pages) if index and set(pages) == working_set]
    assert whole, dirty.counts
    assert dirty.touched >= 64 and dirty.total_pages == 1024
    grid, per_row = dirty.matrix(64)
    assert per_row == 16 and len(grid) == 64
    assert all(grid[first_page // 16 + row][whole[0]] == 1.0 for row in range(4))
    assert grid[40][1:] == [0.0] * 5


def test_a_compute_bound_guest_dirties_almost_nothing(backend_name):
    dirty = dirty_page_map(WORKLOADS["compute"], backend_name, 2 * MIB, slices=3, slice_s=0.005)
    assert all(count <= 4 for count in dirty.counts[1:]), dirty.counts


def test_the_heat_map_says_what_measured_it_and_is_readable(backend_name):
    dirty = dirty_page_map(WORKLOADS["small"], backend_name, 2 * MIB, slices=3, slice_s=0.005)
    figure = dirty_heatmap([dirty])
    assert figure.dpi >= 150
    assert dirty.label in figure._suptitle.get_text()
    assert min(text.get_fontsize() for axis in figure.axes for text in
               [axis.title, axis.xaxis.label, axis.yaxis.label] if text.get_text()) >= 11


def test_snapshot_cost_counts_every_page_of_a_pass_and_sizes_the_files(backend_name):
    cost = snapshot_cost(backend_name, 4 * MIB, dirty_pages=128)
    assert cost.memory == 4 * MIB and cost.backend == backend_name
    assert 128 <= cost.diff_pages <= 130, cost.diff_pages
    assert 4 * MIB < cost.full_bytes < 4 * MIB + 16384
    assert 128 * 4096 <= cost.diff_bytes < 131 * 4096 + 16384
    assert cost.full_s > 0 and cost.restore_s > 0 and cost.diff_s > 0


def test_extrapolation_is_a_least_squares_line_and_needs_two_sizes():
    costs = [SnapshotCost("emu", None, size * MIB, 0.01 + size * 0.001, 0.005, size * MIB, 0.001, 1, 4096)
             for size in (16, 64, 256)]
    line = extrapolate(costs, 1024 * MIB)
    assert line.seconds == pytest.approx(0.01 + 1.024) and line.per_gib_s == pytest.approx(1.024)
    assert line.measured_up_to == 256 * MIB
    with pytest.raises(ConfigError, match="two RAM sizes"):
        extrapolate(costs[:1])
    figure = snapshot_cost_figure({"emu": costs})
    assert measured_on("emu") in figure._suptitle.get_text()
    assert any("extrapolated" in text.get_text() for text in figure.axes[0].texts)


def test_workloads_refuse_a_ram_too_small_for_their_working_set():
    with pytest.raises(ConfigError, match="needs at least 6 MiB"):
        WORKLOADS["large"].machine("emu", 2 * MIB)


def test_state_comparison_and_file_table_show_what_the_snapshot_holds(backend_name):
    with Machine("hello64", backend=backend_name) as machine:
        result = machine.run()
        snapshot = machine.snapshot()
    table = state_comparison({"snapshot": snapshot, "run": result})
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["rip"][0] == rows["rip"][1] == f"{result.regs.rip:#x}"
    assert rows["console"] == [result.console.strip()] * 2
    info = {"kind": "full", "version": 1, "size": 100, "snapshot_id": "ab", "parent_id": None,
            "sections": [{"name": "ram", "offset": 64, "length": 36, "crc32": "00000000"}]}
    assert file_sections_table(info).rows == [["ram", "64", "36", "00000000"]]


def test_the_dirty_pages_panel_reruns_with_the_chosen_workload_and_ram(backend_name):
    from labkit.widgets import DirtyPages

    panel = DirtyPages(workload="small", memory_mib=16, backend=backend_name, slices=3, slice_s=0.005)
    first = panel._made()
    assert "memtouch64, 64 pages on" in first[0].data and "16 MiB RAM" in first[0].data
    panel.memory.value = 64
    assert panel.last.memory == 64 * MIB and panel.runs == 2
    panel.workload.value = "compute"
    assert panel.last.workload.guest == "compute64" and panel.runs == 3
