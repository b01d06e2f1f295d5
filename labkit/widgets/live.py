"""The instructor's live view: a guest runs while its exit rate, exit table and console update, for a projector.

:class:`LiveView` runs the guest in a background thread in slices of
``slice_s`` seconds (``Machine.run`` with that timeout continues where the last
slice stopped) and redraws after each slice: the exit-rate chart
(:func:`labkit.viz.live.exit_rate`), the exit table
(:func:`labkit.viz.report.exit_table`) and the console's last lines, all from one
:class:`LiveState` (the latest slice's result and the samples up to it).
``start`` runs (or continues), ``pause`` stops at the next exit boundary
(``Machine.pause``), ``step`` runs exactly one exit (``Machine.steps``) and
``reset`` throws the VM away; the next start boots a fresh one.  Text is sized
for a projector (:data:`FONT_PX`), the chart is a labkit figure
(:mod:`labkit.viz.style`) titled with what ran it.

The same view is the page ``labkit demo`` serves with Voila (``live.ipynb``
beside this module).
"""

from __future__ import annotations

import html
import io
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import ipywidgets as widgets

from labkit.errors import LabkitError
from labkit.guest import Guest
from labkit.viz.live import RateSample, exit_rate
from labkit.viz.report import exit_table
from labkit.virtio.measure import PARAMS_ADDRESS, parameter_block
from labkit.vmm.machine import Machine
from labkit.vmm.status import RunResult, StatusKind

FONT_PX = 20
"""Text size of the table, console and status on the page (a projector at the back of a room)."""
CONSOLE_LINES = 12
"""The console shows its last this many lines."""
DEFAULT_GUEST = "uart_console64"
DEFAULT_CONSOLE_BYTES = 64 * 1024
"""uart_console64 writes this much: two port-I/O exits per byte, long enough to watch on either backend."""
GUESTS_WITH_SIZE = ("uart_console64",)
"""Guests that read labkit.virtio.measure's parameter block (how many bytes to write)."""
STOPPED = (StatusKind.RUNNING, StatusKind.TIMEOUT, StatusKind.PAUSED)
"""Statuses after which the guest can go on (anything else ended it)."""


@dataclass(frozen=True)
class LiveState:
    """What one redraw shows: the latest result, the chart's samples up to it, and the running time.

    Replaced whole (one attribute assignment) after every slice or step, and read once per redraw, so
    the chart, the table, the console and the status line of a redraw always come from the same slice.
    """

    result: RunResult | None = None
    samples: tuple[RateSample, ...] = ()
    run_s: float = 0.0


class LiveView:
    """Runs ``guest`` on ``backend`` with start, pause, step and reset, redrawing while it runs.

    ``console_bytes`` is how much uart_console64 writes (ignored for other guests).
    ``on_update`` (for tests and the Voila page) is called after every redraw.
    """

    def __init__(self, guest: str = DEFAULT_GUEST, backend: str = "auto", *,
                 console_bytes: int = DEFAULT_CONSOLE_BYTES, slice_s: float = 0.25,
                 on_update: Callable[[LiveView], None] | None = None) -> None:
        self.guest_name = guest
        self.guest = Guest.named(guest)
        self.backend = backend
        self.console_bytes = console_bytes
        self.slice_s = slice_s
        self.on_update = on_update
        self.machine: Machine | None = None
        self.state = LiveState()
        """The latest result and the samples up to it (see :class:`LiveState`)."""
        self.drawn = self.state
        """The state the latest redraw showed (chart, table, console and status alike)."""
        self.updates = 0
        """How many times the view was redrawn."""
        self._thread: threading.Thread | None = None
        self._drawer: threading.Thread | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._lock = threading.Lock()

        def button(description: str, icon: str, action: Callable[[], None]) -> widgets.Button:
            made = widgets.Button(description=description, icon=icon,
                                  layout=widgets.Layout(width="130px", height="48px"))
            made.style.font_size = f"{FONT_PX}px"
            made.on_click(lambda _: action())
            return made

        self.start_button = button("start", "play", self.start)
        self.pause_button = button("pause", "pause", self.pause)
        self.step_button = button("step", "step-forward", self.step)
        self.reset_button = button("reset", "undo", self.reset)
        self.status = widgets.HTML()
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.table = widgets.HTML()
        self.console = widgets.HTML()
        title = widgets.HTML(f"<div style='font-size:{FONT_PX + 8}px'><b>live: {html.escape(guest)}</b></div>")
        self.panel = widgets.VBox([
            title,
            widgets.HBox([self.start_button, self.pause_button, self.step_button, self.reset_button, self.status],
                         layout=widgets.Layout(align_items="center", flex_flow="row wrap")),
            self.chart, self.table, self.console])
        self._redraw()

    # --- the four controls ----------------------------------------------------------------------

    def start(self) -> None:
        """Run (or continue) the guest in the background until it ends or is paused."""
        with self._lock:
            if self.running or self.finished:
                return
            machine = self._machine()
            if machine is None:
                return
            self._stop.clear()
            self._changed.clear()
            self._thread = threading.Thread(target=self._run, args=(machine,), name="labkit-live", daemon=True)
            self._drawer = threading.Thread(target=self._draw_while_running, name="labkit-live-draw", daemon=True)
            self._thread.start()
            self._drawer.start()

    def pause(self) -> None:
        """Stop the run at the next exit boundary; ``start`` continues exactly there."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        if self.machine is not None:
            self.machine.pause()
        thread.join()
        self._thread = None
        self._join_drawer()

    def step(self) -> None:
        """Run the paused guest up to its next exit (nothing while it runs or after it ended)."""
        with self._lock:
            if self.running or self.finished:
                return
            machine = self._machine()
            if machine is None:
                return
            started = time.perf_counter()
            try:
                # A pause that reached the machine after its last slice had already ended is still
                # pending: the first step only consumes it (status paused, no exit), so step again.
                for _attempt in range(2):
                    stepped = False
                    for _ in machine.steps(timeout=5.0):
                        stepped = True
                        break
                    last = machine.last_result
                    if stepped or last is None or last.status.kind is not StatusKind.PAUSED:
                        break
            except LabkitError as error:
                self._failed(error)
                return
            self._took(machine, time.perf_counter() - started)
        self._redraw()

    def reset(self) -> None:
        """Throw the VM away; the next start or step boots the guest afresh."""
        self.pause()
        if self.machine is not None:
            self.machine.close()
        self.machine, self.state = None, LiveState()
        self._redraw()

    def close(self) -> None:
        """Stop the run and release the VM (and its worker process)."""
        self.reset()

    # --- state ----------------------------------------------------------------------------------

    @property
    def result(self) -> RunResult | None:
        return self.state.result

    @property
    def samples(self) -> tuple[RateSample, ...]:
        return self.state.samples

    @property
    def run_s(self) -> float:
        return self.state.run_s

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def finished(self) -> bool:
        """The guest ended (halted, exited, faulted...): only reset helps."""
        result = self.state.result
        return result is not None and result.status.kind not in STOPPED

    def wait(self, timeout: float) -> bool:
        """Wait until the background run ends (the guest stopped or was paused); False after ``timeout``."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        self._join_drawer()
        return True

    def _machine(self) -> Machine | None:
        if self.machine is None:
            try:
                self.machine = Machine(self.guest, self.backend)
                if self.guest_name in GUESTS_WITH_SIZE:
                    self.machine.write_memory(PARAMS_ADDRESS, parameter_block(self.console_bytes, 0, 1))
            except LabkitError as error:
                self._failed(error)
                return None
        return self.machine

    def _run(self, machine: Machine) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                result = machine.run(timeout=self.slice_s)
            except LabkitError as error:
                self._failed(error)
                return
            self._took(machine, time.perf_counter() - started)
            self._changed.set()
            if result.status.kind not in STOPPED:
                return

    def _draw_while_running(self) -> None:
        """Redraw after each slice, beside the run (drawing a figure takes longer than a slice runs)."""
        runner = self._thread
        while runner is not None and runner.is_alive():
            if self._changed.wait(0.05):
                self._changed.clear()
                self._redraw()
        self._redraw()

    def _join_drawer(self) -> None:
        drawer, self._drawer = self._drawer, None
        if drawer is not None:
            drawer.join()

    def _took(self, machine: Machine, seconds: float) -> None:
        result = machine.last_result
        if result is None:
            return
        # The machine's trace goes on growing in the next slice, while a redraw may still be drawing this one:
        # keep a copy, so the table shows the same exits as the chart's last sample (the table used to run a
        # slice ahead of the chart, the figure being the slowest part of a redraw).
        result = replace(result, trace=result.trace.copy())
        state = self.state
        run_s = state.run_s + seconds
        # One assignment: a redraw beside it sees the old state or the new one, never a mix.
        self.state = LiveState(result, state.samples + (RateSample(run_s, result.trace.by_reason()),), run_s)

    def _failed(self, error: LabkitError) -> None:
        self.status.value = self._text(f"{type(error).__name__}: {error}", colour="#b00")

    # --- drawing --------------------------------------------------------------------------------

    @staticmethod
    def _text(text: str, *, colour: str = "inherit") -> str:
        return f"<span style='font-size:{FONT_PX}px;color:{colour}'>{html.escape(text)}</span>"

    def _redraw(self) -> None:
        shown = self.state  # read once: everything below shows this one slice
        result = shown.result
        if self.running:
            state = "running"
        elif result is None:
            state = "not started"
        elif result.status.kind not in STOPPED:
            state = f"{result.status} after {shown.run_s:.2f} s"
        else:
            state = f"paused after {shown.run_s:.2f} s"
        origin = result.origin if result is not None else None
        where = f" ({origin})" if origin is not None else f" (backend {self.backend})"
        exits = f", {result.trace.exit_count()} VM exits" if result is not None else ""
        figure = exit_rate(shown.samples, origin, self.guest_name)
        png = io.BytesIO()
        figure.savefig(png, format="png")
        if result is not None:
            table = exit_table(result)._repr_html_()
            lines = result.console.splitlines()[-CONSOLE_LINES:]
            console = "\n".join(lines) or "(nothing yet)"
        else:
            table, console = "", "(not started)"
        # Everything is made first (the figure takes the longest), then the widgets change together.
        self.status.value = self._text(state + exits + where)
        self.chart.value = png.getvalue()
        self.table.value = f"<div style='font-size:{FONT_PX}px'>{table}</div>"
        self.console.value = (f"<pre style='font-size:{FONT_PX}px;line-height:1.2;background:#111;color:#eee;"
                              f"padding:8px;white-space:pre-wrap'>{html.escape(console)}</pre>")
        self.drawn = shown
        self.updates += 1
        if self.on_update is not None:
            self.on_update(self)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.panel)
