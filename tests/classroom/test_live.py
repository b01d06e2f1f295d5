"""The instructor's live view: it redraws while the guest runs, and start, pause, step and reset do what they say."""

from __future__ import annotations

import hashlib

import pytest

from labkit.virtio.measure import expected_console
from labkit.viz.live import RateSample, exit_rate, rates
from labkit.viz.style import readability_problems
from labkit.vmm.status import StatusKind
from labkit.widgets.live import CONSOLE_LINES, LiveView

pytestmark = pytest.mark.slow
# Long enough to pause mid-run and redraw twice: the emulator runs uart_console64 at 15-150 k exits/s here
# (loaded or not), PVM at 2-5 k (every port access goes through KVM's instruction emulator).
BYTES_ON = {"emu": 256 * 1024, "kvm": 16 * 1024}


def test_rates_are_exits_per_second_of_running_time():
    samples = [RateSample(0.5, {"IO": 100}), RateSample(1.5, {"IO": 300, "HLT": 1})]
    assert rates(samples) == {"IO": [(0.5, 200.0), (1.5, 200.0)], "HLT": [(0.5, 0.0), (1.5, 1.0)]}


def test_live_view_runs_pauses_steps_and_resets(backend_name):
    BYTES = BYTES_ON[backend_name]
    charts_while_running: list[str] = []
    out_of_step: list[str] = []

    def seen(view: LiveView) -> None:
        drawn = view.drawn  # what this redraw showed: the chart's last sample is the table's result
        if drawn.result is not None:
            exits = drawn.result.trace.exit_count()
            if drawn.samples[-1].counts != drawn.result.trace.by_reason() or f"VM exits ({exits})" not in view.table.value:
                out_of_step.append(f"chart {drawn.samples[-1].counts}, table {drawn.result.trace.by_reason()}")
        if view.samples and not view.finished:  # drawn after a slice, before the guest ended
            charts_while_running.append(hashlib.sha256(view.chart.value).hexdigest())

    view = LiveView(backend=backend_name, console_bytes=BYTES, slice_s=0.05, on_update=seen)
    try:
        assert "not started" in view.status.value and view.chart.value[:4] == b"\x89PNG"
        view.start()
        assert view.running
        while view.running and not view.samples:
            view.wait(0.05)
        view.pause()
        assert not view.running and not view.finished, f"the guest ended before the pause: {view.result.status}"
        assert view.result.status.kind in (StatusKind.PAUSED, StatusKind.TIMEOUT)
        assert "paused after" in view.status.value
        exits = view.result.trace.by_reason()["IO"]
        console = view.result.console
        assert 0 < exits < 2 * BYTES and console and console in expected_console(BYTES)

        view.step()
        assert view.result.trace.by_reason()["IO"] == exits + 1, "step did not run exactly one exit"
        assert f", {view.result.trace.exit_count()} VM exits" in view.status.value, view.status.value

        view.start()
        assert view.wait(120), "the guest did not finish within 120 s"
        assert view.result.status.kind is StatusKind.EXITED and view.result.status.code == 0
        assert view.finished and "exited" in view.status.value
        assert view.result.console == expected_console(BYTES), "pausing and stepping lost or repeated output"
        assert view.result.trace.by_reason()["IO"] == 2 * BYTES + 1, "two port-I/O exits per byte, one to exit"
        last_lines = expected_console(BYTES).splitlines()[-CONSOLE_LINES:]
        assert last_lines[-1] in view.console.value and last_lines[0] in view.console.value
        assert "VM exits (" in view.table.value and f">{2 * BYTES + 1}<" in view.table.value
        assert len(set(charts_while_running)) >= 2, "the chart did not change while the guest ran"
        assert view.updates >= 4 and out_of_step == [], f"a redraw's chart and table differ: {out_of_step[:3]}"
        label = "KVM (" + view.result.origin.flavour if backend_name == "kvm" else "emulator (Unicorn)"
        assert label in view.status.value or str(view.result.origin) in view.status.value

        figure = exit_rate(view.samples, view.result.origin, "uart_console64")
        title = figure.axes[0].get_title()
        assert (f"KVM ({view.result.origin.flavour})" if backend_name == "kvm" else "the emulator (Unicorn)") in title
        assert readability_problems(figure) == []

        worker = view.machine._worker
        view.step()
        assert view.result.status.kind is StatusKind.EXITED, "a step after the end must not restart the guest"
        view.reset()
        assert view.machine is None and view.result is None and "not started" in view.status.value
        if worker is not None:
            assert not worker.alive, "reset left the VM's worker process running"
        view.step()
        assert view.result.trace.by_reason() == {"IO": 1}, "after reset a step boots a fresh guest"
    finally:
        view.close()
