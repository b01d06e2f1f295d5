"""Notebook 04: which routines and which kernel (native, trap-and-emulate, paravirtual); the virtqueue's batch size."""

from __future__ import annotations

from typing import Any, Sequence

import ipywidgets as widgets

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, note

TIMEOUT_S = 10.0
KIB_SIZES = (1, 4, 16, 64)
"""The amounts of console output the UART and the ring write (KiB)."""
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes worth comparing (buffers per virtqueue notification); the control offers 1 to the largest."""
WIDGET_ROUTINES = ("cli_pushf", "popf", "smsw")


class KernelChoice(Experiment):
    """Which routines, which backend: the three kernels' hypervisor entries by kind, one kernel's in detail,
    and the three consoles line by line."""

    slots = 4

    def __init__(self, routines: tuple[str, ...] | None = None, kernel: str = "paravirtual",
                 backend: str | None = None) -> None:
        from labkit.backend import choose_backend
        from labkit.monitor.paravirt import KERNELS, PV_ROUTINES

        backends, self.skipped = backends_here()
        self.routines = widgets.SelectMultiple(options=list(PV_ROUTINES), value=list(routines or WIDGET_ROUTINES),
                                               rows=len(PV_ROUTINES), description="routines")
        self.kernel = widgets.ToggleButtons(options=list(KERNELS), value=kernel, description="details of")
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.routines, self.kernel, self.backend], title="Three kernels, same routines:")
        self.last: Any = None
        """The last :class:`labkit.monitor.paravirt.KernelComparison`."""

    def results(self) -> list[Any]:
        from labkit.monitor.paravirt import compare_kernels

        comparison = compare_kernels(tuple(self.routines.value), backend=self.backend.value, timeout=TIMEOUT_S)
        self.last = comparison
        runs = comparison.runs
        differ = {kernel: sum(1 for a, b in zip(runs["native"].result.console.splitlines(),
                                                run.result.console.splitlines()) if a != b)
                  for kernel, run in runs.items()}
        summary = (f"{len(comparison.routines)} routine(s) on {self.backend.label}: native {runs['native'].total} "
                   f"exits, trap-and-emulate {runs['trap-and-emulate'].total} traps "
                   f"({differ['trap-and-emulate']} console line(s) differ from native), paravirtual "
                   f"{runs['paravirtual'].total} entries ({differ['paravirtual']} line(s) differ).")
        return [note(summary), comparison.table(), comparison.details(self.kernel.value), comparison.consoles()]


class ConsoleBatch(Experiment):
    """The virtqueue's batch size (buffers per notification) and the backend: exits and host time per KiB
    of the byte-wise UART and of the ring, for every amount in ``kib`` (a figure).  ``measured``: earlier
    :func:`labkit.virtio.measure_console` results whose UART runs are reused (64 KiB byte by byte takes
    seconds under PVM, whose instruction emulator runs the ring-0 driver)."""

    slots = 2

    def __init__(self, batch: int = 16, backend: str | None = None, kib: tuple[int, ...] = KIB_SIZES,
                 flavour: str | None = None, measured: Sequence[Any] = ()) -> None:
        from labkit.backend import choose_backend

        backends, self.skipped = backends_here()
        self.kib = kib
        self.flavour = flavour
        self.batch = widgets.IntSlider(value=batch, min=1, max=max(BATCH_SIZES), description="batch size",
                                       continuous_update=False)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.batch, self.backend], title="Virtqueue batch size:")
        self._measured: dict[tuple[str, str, int, int], Any] = {
            (m.backend, m.path, m.kib, 0 if m.path == "uart" else m.batch): m for m in measured}
        """Measurements by (backend, path, KiB, batch; 0 for the UART, which does not batch): ``measured``
        ones are reused, so the first display repeats nothing the notebook ran already."""
        self.last: list[Any] = []
        """The measurements behind the last figure."""

    def measurements(self) -> list[Any]:
        from labkit.virtio import measure_console

        backend, batch = self.backend.value, self.batch.value
        made = []
        for kib in self.kib:
            for path, key in (("uart", 0), ("ring", batch)):
                if (backend, path, kib, key) not in self._measured:
                    self._measured[backend, path, kib, key] = measure_console(kib, path, batch=batch,
                                                                              backend=backend)
                made.append(self._measured[backend, path, kib, key])
        return made

    def results(self) -> list[Any]:
        from labkit.viz.paravirt import console_paths

        made = self.measurements()
        self.last = made
        largest = max(self.kib)
        uart = next(m for m in made if m.path == "uart" and m.kib == largest)
        ring = next(m for m in made if m.path == "ring" and m.kib == largest)
        fewer = uart.exits / ring.exits if ring.exits else float("inf")
        ok = all(m.console_ok for m in made)
        summary = (f"{largest} KiB on {self.backend.label}, batch of {self.batch.value}: UART {uart.exits} exits, "
                   f"ring {ring.exits} exits ({ring.notifications} notifications): {fewer:.0f}x fewer; "
                   f"host time {uart.host_seconds * 1e3:.0f} ms against {ring.host_seconds * 1e3:.0f} ms. "
                   f"Console output {'correct' if ok else 'WRONG'} in every run.")
        return [note(summary), console_paths(made, flavour=self.flavour)]
