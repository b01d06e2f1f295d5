"""Notebook 07's figures, drawn from real runs: labelled with what measured them, readable, no overlapping labels."""

from __future__ import annotations

import pytest

from labkit.isolation import FAULTS, memory_isolation, run_containment
from labkit.viz.isolation import STATUS_COLOURS, memory_maps, scan_figure, status_grid


@pytest.fixture(scope="module")
def runs():
    from backends import HAS_KVM

    backend = "kvm" if HAS_KVM else "emu"
    return run_containment(list(FAULTS), 16, backend=backend, timeout=1.0), memory_isolation(backend=backend)


def texts(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    return [text for text in figure.findobj(lambda artist: hasattr(artist, "get_fontsize") and
                                            hasattr(artist, "get_text")) if text.get_text().strip()]


def no_overlap(labels, renderer):
    boxes = [label.get_window_extent(renderer) for label in labels if label.get_text().strip()]
    for index, box in enumerate(boxes):
        for other in boxes[index + 1:]:
            assert not box.overlaps(other), f"labels overlap: {box} and {other}"


def test_every_figure_says_what_measured_it_and_is_readable(runs):
    run, isolation = runs
    measured = "measured on KVM" if run.backend == "kvm" else "measured on the emulator"
    for figure in (status_grid(run), memory_maps(run), scan_figure(isolation)):
        assert figure.dpi >= 150
        assert measured in figure.get_suptitle()
        assert min(text.get_fontsize() for text in texts(figure)) >= 11
        renderer = figure.canvas.get_renderer()
        for axes in figure.axes:
            no_overlap(axes.get_xticklabels(), renderer)
            no_overlap(axes.get_yticklabels(), renderer)


def test_the_grid_has_a_cell_per_vm_coloured_by_its_status(runs):
    run, _ = runs
    figure = status_grid(run)
    grid, timeline = figure.axes
    cells = grid.patches
    assert len(cells) == 16
    for cell, row in zip(cells, run.rows):
        assert cell.get_facecolor()[:3] == pytest.approx(
            tuple(int(STATUS_COLOURS[row.outcome.status][i:i + 2], 16) / 255 for i in (1, 3, 5)))
    labels = [text.get_text() for text in grid.texts]
    assert any("triple fault\nshutdown" in label for label in labels)
    assert len(timeline.get_yticklabels()) == 16


def test_the_memory_maps_mark_the_wild_writer_at_its_cr2(runs):
    run, _ = runs
    figure = memory_maps(run)
    axes = figure.axes[0]
    wild = next(row for row in run.rows if row.kind == "wild writes")
    if wild.outcome.result.status.fault is not None:
        offsets = [tuple(collection.get_offsets()[0]) for collection in axes.collections]
        index = [row.name for row in run.rows].index(wild.name)
        # one row per VM: the address runs along x, the VM's row is y
        assert (wild.outcome.result.status.fault.cr2, index) in [(int(x), int(y)) for x, y in offsets]


def test_the_device_state_figure_marks_the_handler_byte_the_guest_overwrote(backend_name):
    from labkit import Machine
    from labkit.viz.isolation import device_state_figure
    from labkit.vmm.devices import vulnerable

    states, result = {}, None
    for name, specs in (("vulnerable", vulnerable.vulnerable_fifo_device(i_know_it_is_vulnerable=True)),
                        ("bounded", vulnerable.bounded_fifo_device())):
        with Machine("venom64", backend=backend_name, isolate=True, devices=specs) as machine:
            result = machine.run(timeout=10)
            states[name] = machine.device_state(specs[0].name)
    figure = device_state_figure(states, result)
    texts(figure)
    axes = figure.axes[0]
    thick = [patch for patch in axes.patches if patch.get_linewidth() == 3]
    assert [(patch.get_x(), patch.get_y()) for patch in thick] == [(16, 1.1)]  # the vulnerable row's handler
    cells = [text.get_text() for text in axes.texts]
    assert cells[16] == "02" and cells[24 + 16] == "00"
    assert "measured on" in figure.get_suptitle()
