"""Notebook 05's KVM section: switch KVM's exit controls on and off and rerun the same guest.

    >>> from labkit.widgets.kvm_controls import KvmControls
    >>> KvmControls()       # one checkbox per control; the counts follow

On a machine without KVM (the emulator) the panel says why there is nothing to
control and shows no numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import ipywidgets as widgets

from labkit.widgets.experiment import Experiment, note

TIMEOUT_S = 2.0


def kvm_here() -> tuple[bool, str]:
    """Whether this session runs KVM (``choose_backend()`` is ``kvm``), and why (or why not)."""
    from labkit.backend import choose_backend

    choice = choose_backend()
    return choice.name == "kvm", choice.reason


class KvmControls(Experiment):
    """The exit-mix guest (:data:`labkit.viz.kvm_stats.EXIT_MIX_SOURCE`) with the chosen exit controls,
    beside the same guest with none: exits that reached labkit, KVM's counters, and what labkit delivered."""

    slots = 3

    def __init__(self, chosen: Sequence[str] = ("ioeventfd",)) -> None:
        from labkit.viz.kvm_stats import CONTROL_NAMES, CONTROL_TITLES

        self.kvm, self.reason = kvm_here()
        self.boxes = {name: widgets.Checkbox(value=name in chosen, description=CONTROL_TITLES[name],
                                             disabled=not self.kvm, indent=False,
                                             layout=widgets.Layout(width="auto"))
                      for name in CONTROL_NAMES}
        super().__init__(list(self.boxes.values()), title="KVM exit controls:", run_button=True)
        self.controls[-1].disabled = not self.kvm  # "run again" without KVM would only repeat the note
        self._baseline: Any = None
        self.last: Any = None
        """The last :class:`labkit.viz.kvm_stats.ControlEffect` (``None`` without KVM)."""

    @property
    def chosen(self) -> tuple[str, ...]:
        return tuple(name for name, box in self.boxes.items() if box.value)

    def results(self) -> list[Any]:
        from labkit.viz.kvm_stats import (ControlEffect, control_effects, control_table, kvm_absent_reason,
                                          run_exit_mix)

        if not self.kvm:
            return [note(f"No KVM in this session ({self.reason}): {kvm_absent_reason('emu')}.")]
        if self._baseline is None:
            self._baseline = run_exit_mix((), timeout=TIMEOUT_S)
        effect = ControlEffect(self.chosen, self._baseline, run_exit_mix(self.chosen, timeout=TIMEOUT_S))
        self.last = effect
        before, after = effect.before.stats, effect.after.stats
        summary = (f"With {effect.title}: {after.userspace_total} exits reached labkit "
                   f"(without: {before.userspace_total}); KVM's exit counter {after.counters.get('exits', 0)} "
                   f"(without: {before.counters.get('exits', 0)}); {sum(after.delivered.values())} writes KVM "
                   f"kept in the kernel were delivered by labkit; output "
                   f"{'identical' if effect.same_output else 'DIFFERENT'}; status {effect.after.result.status}; "
                   f"this run took {effect.after.result.elapsed_s * 1e3:.1f} ms of host time (run {self.runs}).")
        return [note(summary), control_table([effect]), control_effects([effect])]
