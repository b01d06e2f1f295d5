"""The notebooks' control panels: each control reruns its experiment and replaces the results.

Each panel is driven here as a student would drive it (a control's value set),
on every backend this machine has; the browser test drives the same panels in
JupyterLab.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from labkit.errors import AssemblyError
from labkit.table import Table
from labkit.widgets import ExitStepper, GuestRun, InstructionProbe, RoutineComparison, TranslationChoice
from labkit.widgets.experiment import Experiment, note


def text_of(part) -> str:
    if isinstance(part, Table):
        return str(part)
    return getattr(part, "data", None) or str(part)


class Panel:
    """An Experiment shown once; ``after(change)`` applies a change and returns what replaced the results."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.shown: list = []
        experiment._made = self._recording(experiment._made)
        self.first = experiment._made()

    def _recording(self, made):
        def wrapper():
            parts = made()
            self.shown = parts
            return parts
        return wrapper

    def after(self, change) -> list[str]:
        runs = self.experiment.runs
        change()
        assert self.experiment.runs == runs + 1, "the change did not rerun the experiment"
        return [text_of(part) for part in self.shown]


def test_guest_run_follows_its_guest_and_backend(backend_name):
    run = GuestRun(backend=backend_name)
    panel = Panel(run)
    assert "hello64" in text_of(panel.first[0]) and run.last.console == "Hello from 64-bit mode!\n"
    texts = panel.after(lambda: setattr(run.guest, "value", "unmapped64"))
    assert run.last.console == "read 0xffffffff from 0x10000000\n"
    assert "MMIO" in texts[1] and "unmapped64" in texts[0]
    run.guest.value = "forever64"
    assert run.last.status.kind == "timeout"
    table = [part for part in panel.shown if isinstance(part, Table)][0]
    assert [row[0] for row in table.rows] == ["labkit events, not VM exits:", "TIMEOUT", "total"]
    before = str(table)
    panel.after(lambda: run.controls[-1].click())  # run again: the same run measured once more
    assert run.last.status.kind == "timeout" and str(panel.shown[1]) != before


def test_guest_run_switches_backend_where_both_run():
    run = GuestRun(backend="emu")
    if len(run.backend.options) < 2:
        assert run.backend.disabled and "not run here" in text_of(run._made()[0])
        return
    panel = Panel(run)
    texts = panel.after(lambda: setattr(run.backend, "value", "kvm"))
    assert "on KVM" in texts[0] and run.last.origin.backend == "kvm"


def test_instruction_probe_gives_each_instruction_its_verdict(backend_name):
    probe = InstructionProbe(backend=backend_name)
    panel = Panel(probe)
    assert "smsw eax on" in text_of(panel.first[1]) and ": sensitive." in text_of(panel.first[1])
    cli = next(value for label, value in probe.instruction.options if value[1] == "cli")
    texts = panel.after(lambda: setattr(probe.instruction, "value", cli))
    assert "cli on" in texts[1] and ": privileged." in texts[1]


def test_routine_comparison_shows_where_trap_and_emulate_differs(backend_name):
    panel_of = RoutineComparison(routine="cli_pushf", backend=backend_name)
    panel = Panel(panel_of)
    assert "1 of 3 lines differ" in text_of(panel.first[0])
    assert ("KVM handled" in text_of(panel.first[0])) == (backend_name == "kvm")
    assert "#GP" in text_of(panel.first[2]) and "emulated" in text_of(panel.first[2])
    texts = panel.after(lambda: setattr(panel_of.routine, "value", "control_registers"))
    assert texts[0].startswith("<p>control_registers on")
    assert "mov" in texts[2] and "What the monitor did" in texts[2]


def test_translation_choice_brings_the_divergence_back_and_removes_it(backend_name):
    choice = TranslationChoice(routine="popf", leave_out=frozenset({"popfq"}), backend=backend_name)
    panel = Panel(choice)
    assert "left untranslated: popfq. The translated console is different" in text_of(panel.first[0])
    texts = panel.after(lambda: setattr(choice.translate, "value", tuple(choice.translate.options)))
    assert "left untranslated: nothing. The translated console is the same as the native one" in texts[0]


def test_exit_stepper_walks_the_trace():
    choice = TranslationChoice(backend="emu")
    choice._made()
    stepper = ExitStepper(choice.last)
    panel = Panel(stepper)
    assert text_of(panel.first[0]).startswith("Exit 0 of ")
    texts = panel.after(lambda: setattr(stepper.position, "value", 5))
    assert texts[0].startswith("Exit 5 of ") and "▶  5" in texts[0]
    assert stepper.position.max == len(choice.last.trace.records) - 1


def test_a_labkit_error_is_one_line_in_the_results_not_a_traceback():
    class Broken(Experiment):
        slots = 2

        def results(self):
            raise AssemblyError("line 1: no such instruction: `movv eax, 1'")

    parts = Broken([], title="broken")._made()
    assert parts[0].data == note("AssemblyError: line 1: no such instruction: `movv eax, 1'").data
    assert parts[1].data == ""


@pytest.mark.unit
def test_import_labkit_and_labkit_widgets_load_no_widgets():
    code = ("import sys, labkit, labkit.widgets; "
            "print(sorted(m for m in ('ipywidgets', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_results_are_displayed_once_and_replaced_in_place(monkeypatch):
    """The first results are ordinary outputs with display ids; a change updates those ids, nothing is added."""
    import labkit.widgets.experiment as experiment

    shown, updates = [], []

    class Handle:
        def __init__(self, part):
            self.part = part

        def update(self, part):
            updates.append((self, part))

    def display(part, display_id=None):
        shown.append((part, display_id))
        return Handle(part) if display_id else None

    monkeypatch.setattr(experiment, "display", display)
    run = GuestRun(backend="emu")
    run._ipython_display_()
    assert shown[0] == (run.panel, None) and [display_id for _, display_id in shown[1:]] == [True] * run.slots
    handles = run._handles
    run.guest.value = "hello32"
    assert len(shown) == 1 + run.slots, "a change displayed new outputs instead of replacing them"
    assert [handle for handle, _ in updates] == handles
    assert "hello32" in updates[0][1].data and run.status.value == ""
