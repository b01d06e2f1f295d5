"""Notebook 00's experiment: run a shipped guest on a backend and read its exit table."""

from __future__ import annotations

from typing import Any, Sequence

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, dropdown, note, skipped_note

GUESTS = ("hello64", "hello32", "hello16", "exit64", "unmapped64", "fault64", "timer64", "forever64")
"""Guests that end within a second or two (forever64 ends by its timeout: a status, not an exit)."""
TIMEOUT_S = 2.0


class GuestRun(Experiment):
    """Which guest, which backend, run: its status and console, the exit table and the exit timeline."""

    slots = 3

    def __init__(self, guests: Sequence[str] = GUESTS, guest: str = "hello64", backend: str | None = None) -> None:
        from labkit.backend import choose_backend

        backends, self.skipped = backends_here()
        self.guest = dropdown("guest", list(guests), guest)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.guest, self.backend], title="Run a guest:", run_button=True)
        self.last: Any = None
        """The last RunResult."""

    def results(self) -> list[Any]:
        from labkit.viz.exits import exit_timeline
        from labkit.viz.report import exit_table
        from labkit.vmm.machine import Machine

        with Machine(self.guest.value, backend=self.backend.value) as machine:
            result = machine.run(timeout=TIMEOUT_S)
        self.last = result
        text = f"{self.guest.value} on {self.backend.label}: {result.status}; console {result.console!r}."
        if self.skipped:
            text += " " + skipped_note(self.skipped)
        return [note(text), exit_table(result), exit_timeline(result, guest=self.guest.value)]
