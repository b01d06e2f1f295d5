"""Notebook 01's experiment: try one instruction in ring 0 and in ring 3 and see the classifier's verdict."""

from __future__ import annotations

from typing import Any

from labkit.widgets.experiment import Experiment, backend_picker, backends_here, dropdown, note


def instruction_choices() -> list[tuple[str, tuple[str, str, str, int, bool]]]:
    """Dropdown entries: Robin & Irvine's instructions, then a few privileged ones for contrast."""
    from labkit.classify import ROBIN_IRVINE

    choices = [(f"{e.name}: {e.instruction}", (e.name, e.instruction, e.setup, e.mode, e.umip)) for e in ROBIN_IRVINE]
    for name, instruction in (("CLI", "cli"), ("MOV from CR0", "mov rax, cr0"), ("HLT", "hlt")):
        choices.append((f"{name}: {instruction} (privileged)", (name, instruction, "", 64, False)))
    return choices


class InstructionProbe(Experiment):
    """Which instruction to try in ring 3 (and ring 0), on which backend: the classifier's verdict and why."""

    slots = 2

    def __init__(self, instruction: str = "smsw eax", backend: str | None = None) -> None:
        from labkit.backend import choose_backend

        backends, self.skipped = backends_here()
        choices = instruction_choices()
        value = next((value for _, value in choices if value[1] == instruction), choices[0][1])
        self.instruction = dropdown("instruction", choices, value)
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.instruction, self.backend], title="Classify an instruction:")

    def results(self) -> list[Any]:
        from labkit.assembler import have_binutils
        from labkit.classify import classify
        from labkit.viz.rings import classification_table

        if not have_binutils():
            return [note("GNU binutils (as, ld) is not installed here, so the classifier cannot assemble instructions")]
        name, instruction, setup, mode, umip = self.instruction.value
        result = classify(instruction, backend=self.backend.value, setup=setup, mode=mode, umip=umip)
        table = classification_table({result.backend_label: [result]}, names=[name])
        return [table, note(f"{instruction} on {result.backend_label}: {result.verdict.value}. {result.reason}")]
