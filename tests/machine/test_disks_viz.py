"""Notebook 09's measurements, figures and control panel: deltas that grow, chain reads, VMs filling a datastore."""

from __future__ import annotations

import pytest

from labkit.errors import ConfigError
from labkit.virtio.blk import SECTOR_SIZE, blk64_sectors
from labkit.viz.disks import (CLUSTER, KIB, chain_figure, chain_reads, delta_growth, empty_overlay_bytes,
                              fill_datastore, fill_figure, growth_figure, qemu_delta_bytes)
from labkit.viz.labels import measured_on
from labkit.viz.style import readability_problems

DISK = 64 * KIB


@pytest.fixture(scope="module", params=["kvm", "emu"])
def fill(request):
    """One fill run per backend, shared: two VMs, random writes, 16 KiB free and 16 KiB in a forgotten snapshot
    (each VM's delta needs more than that alone, so both must pause)."""
    from backends import HAS_KVM

    if request.param == "kvm" and not HAS_KVM:
        pytest.skip("/dev/kvm is not usable here")
    return fill_datastore(2, 16 * KIB, "random", request.param, requests=24, sectors=1, disk=DISK, forgotten=16 * KIB)


def test_every_vm_pauses_on_the_full_datastore_resumes_and_loses_nothing(fill):
    assert [vm.name for vm in fill.vms] == ["vm1", "vm2"]
    for vm in fill.vms:
        assert (vm.status, vm.verified, vm.lost_sectors, vm.clean) == ("exited", True, 0, True), vm
        assert vm.pauses >= 1, vm
        kinds = [e.kind for e in fill.events if e.vm == vm.name]
        assert kinds[-1] == "finished" and kinds.count("paused") == kinds.count("resumed") == vm.pauses, kinds
        assert all(a == "paused" and b == "resumed" for a, b in zip(kinds[:-1:2], kinds[1:-1:2])), kinds
    actions = [e.kind for e in fill.actions()]
    assert actions[:2] == ["committed", "raised"], actions  # 16 + 16 KiB are not enough for 2 x 24 clusters
    committed = fill.actions()[0]
    assert "freeing 20 KiB" in committed.detail  # 16 KiB of data and its L2 table, trimmed off the file
    assert all(used <= capacity for _t, used, capacity in fill.samples)
    assert fill.samples[0][2] == fill.capacity_start and fill.samples[-1][2] > fill.capacity_start


def test_the_fill_figure_says_what_measured_it_and_is_readable(fill):
    figure = fill_figure(fill)
    top, bottom = figure.axes
    assert fill.label in top.get_title() and fill.label == measured_on(fill.backend, fill.flavour)
    assert [t.get_text() for t in bottom.get_yticklabels()] == ["vm1", "vm2"]
    assert readability_problems(figure) == []


def test_delta_growth_counts_the_clusters_each_pattern_touches(backend_name):
    points = delta_growth(backend_name, steps=(24,), disk=DISK)
    assert [p.pattern for p in points] == ["sequential", "random", "rewrite"]
    empty = empty_overlay_bytes(DISK)
    for point in points:
        touched = {first * SECTOR_SIZE // CLUSTER for first in blk64_sectors(point.pattern, 1, 24, 1, DISK // SECTOR_SIZE)}
        assert point.verified and point.written == 24 * SECTOR_SIZE, point
        assert point.data_clusters == len(touched), (point, touched)
        # the file: the empty overlay (its L1 table ends it) to a whole cluster, the data clusters, one L2 table
        assert point.delta_bytes == -(-empty // CLUSTER) * CLUSTER + (len(touched) + 1) * CLUSTER, point
        assert qemu_delta_bytes(point) == point.delta_bytes, point  # QEMU's overlay for the same writes
    assert points[0].label == measured_on(backend_name, points[0].flavour)
    assert readability_problems(growth_figure(points, empty)) == []


@pytest.mark.unit
def test_chain_reads_measure_each_depth_both_ways_and_the_figure_is_readable():
    rows = chain_reads((0, 3), disk=256 * KIB, repeats=1)
    assert [(r.depth, r.where) for r in rows] == [(0, "base"), (3, "base"), (3, "top")]
    assert all(r.seconds > 0 and r.disk == 256 * KIB for r in rows)
    figure = chain_figure(rows)
    assert len(figure.axes[0].get_lines()) == 2 and "measured on this host (no VM)" in figure.axes[0].get_title()
    assert readability_problems(figure) == []


@pytest.mark.unit
@pytest.mark.parametrize("arguments, message", [
    ({"vms": 0}, "1 to 8 VMs"), ({"vms": 9}, "1 to 8 VMs"), ({"room": -1}, "bytes >= 0"),
    ({"pattern": "zigzag"}, "write pattern is one of"),
])
def test_fill_datastore_rejects_bad_settings_before_it_starts(arguments, message):
    with pytest.raises(ConfigError, match=message):
        fill_datastore(**{"vms": 2, "room": 0, "pattern": "random", "backend": "emu", **arguments})


@pytest.mark.emu
def test_the_panel_shows_its_first_run_and_runs_again_on_a_change():
    from labkit.widgets import DatastoreFill

    panel = DatastoreFill(vms=1, room_kib=64, pattern="rewrite", backend="emu")
    first = panel._made()
    assert "1 VMs, rewrite writes, 64 KiB free on" in first[0].data and "0 pause(s)" in first[0].data
    assert "1 of 1 VMs read back everything they wrote, 0 acknowledged sectors lost" in first[0].data
    panel.pattern.value = "random"  # a change runs it again (no display here: nothing to update)
    assert panel.runs == 2 and panel.last.pattern == "random" and panel.last.pauses >= 1
