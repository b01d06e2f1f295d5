"""The frame every control panel shares: controls above, results below, replaced in place on a change.

The results are displayed with IPython display ids: the first run's tables and
figures are ordinary cell outputs (what ``nbclient``, an HTML export and a
reader without a live kernel see), and each change of a control sends
``update_display_data`` for the same ids, so the new results replace the old
ones where they stand instead of piling up below.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import ipywidgets as widgets
from IPython.display import HTML, DisplayHandle, display

from labkit.errors import LabkitError

BACKEND_NAMES = {"kvm": "KVM", "emu": "emulator (Unicorn)"}


def backends_here() -> tuple[list[str], dict[str, str]]:
    """The backends this session runs (``["kvm", "emu"]`` or ``["emu"]``) and why each other one is not run."""
    from labkit.viz.report import backends_to_compare

    usable, skipped = [], {}
    for backend, why_not in backends_to_compare():
        if why_not:
            skipped[backend] = why_not
        else:
            usable.append(backend)
    return usable, skipped


def note(text: str) -> HTML:
    """A short paragraph of plain text as a display object (escaped: no markup from the caller's data)."""
    return HTML(f"<p>{html.escape(text)}</p>")


NOTHING = HTML("")
"""An empty result slot."""


class Experiment:
    """Controls for one experiment and the ``slots`` results they produce.

    A subclass builds its controls, passes them here and implements
    :meth:`results`, which returns exactly ``slots`` display objects (tables,
    figures, :func:`note`, :data:`NOTHING`).  A :class:`LabkitError` from a run
    (an instruction that does not assemble, a guest that cannot start) is
    shown in the first slot as one line, never as a traceback.
    """

    slots = 1

    def __init__(self, controls: Sequence[widgets.Widget], *, title: str, run_button: bool = False) -> None:
        self.controls = list(controls)
        self.status = widgets.HTML()
        self.runs = 0
        """How many times the results were made (the first display counts)."""
        self._handles: list[DisplayHandle] = []
        for control in self.controls:
            control.observe(self._changed, names="value")
        parts: list[widgets.Widget] = [widgets.HTML(f"<b>{html.escape(title)}</b>"), *self.controls]
        if run_button:
            button = widgets.Button(description="run again", icon="play", tooltip="run the experiment again")
            button.on_click(self._clicked)
            parts.append(button)
            self.controls.append(button)
        self.panel = widgets.VBox([widgets.HBox(parts, layout=widgets.Layout(flex_flow="row wrap",
                                                                            align_items="center")), self.status])

    def results(self) -> list[Any]:
        """The display objects for the controls' current values (exactly ``slots`` of them)."""
        raise NotImplementedError

    def _made(self) -> list[Any]:
        self.runs += 1
        try:
            made = list(self.results())
        except LabkitError as error:
            made = [note(f"{type(error).__name__}: {error}")]
        if len(made) > self.slots:
            raise ValueError(f"{type(self).__name__}.results gave {len(made)} outputs for {self.slots} slots")
        return made + [NOTHING] * (self.slots - len(made))

    def _ipython_display_(self) -> None:
        display(self.panel)
        self._handles = [display(part, display_id=True) for part in self._made()]

    def refresh(self) -> None:
        """Run the experiment again with the controls' values and replace the results in place."""
        self.status.value = "<i>running…</i>"
        try:
            made = self._made()
            if self._handles:
                for handle, part in zip(self._handles, made):
                    handle.update(part)
        finally:
            self.status.value = ""

    def _changed(self, change: dict[str, Any]) -> None:
        self.refresh()

    def _clicked(self, button: widgets.Button) -> None:
        self.refresh()


def backend_picker(backends: Sequence[str], value: str | None = None) -> widgets.ToggleButtons:
    """One button per backend this session runs (a single, disabled one when only the emulator runs)."""
    return widgets.ToggleButtons(options=[(BACKEND_NAMES.get(b, b), b) for b in backends],
                                 value=value if value in backends else backends[0],
                                 description="backend", disabled=len(backends) < 2)


def dropdown(label: str, options: Sequence[str] | Sequence[tuple[str, Any]], value: Any) -> widgets.Dropdown:
    return widgets.Dropdown(options=list(options), value=value, description=label,
                            layout=widgets.Layout(width="auto"), style={"description_width": "initial"})


def skipped_note(skipped: dict[str, str]) -> str:
    """"KVM is not run here: ..." for each backend this session leaves out ("" when none)."""
    return " ".join(f"{BACKEND_NAMES.get(b, b)} is not run here: {why}." for b, why in skipped.items())


