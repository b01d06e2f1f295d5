"""Notebook 05: the VMX model's VMCS controls, and one technique at a time on the common workload.

:class:`VmxControls` edits a VMCS (a preset to start from, the VM-execution
controls, what the I/O bitmaps hold, the exception bitmap) and reruns
minikernel64 under the model; the exit table and figure follow.
:class:`TechniqueChoice` runs the workload under one technique and shows its
entries and its console beside the native one.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from labkit.monitor.vmx.vmcs import (EVERY_EXCEPTION, PRESETS, PinBased, Primary, Secondary, Vmcs, io_bitmaps,
                                     kvm_like)
from labkit.widgets.experiment import Experiment, backend_picker, backends_here, dropdown, note
from labkit.x86.arch import CR0_TS

TIMEOUT_S = 20.0
ALL_BITS = (1 << 64) - 1

CONTROLS: dict[str, tuple[str, int]] = {
    "HLT exiting": ("primary", Primary.HLT_EXITING),
    "RDTSC exiting": ("primary", Primary.RDTSC_EXITING),
    "CR3-load exiting": ("primary", Primary.CR3_LOAD_EXITING),
    "CR3-store exiting": ("primary", Primary.CR3_STORE_EXITING),
    "CR8-load exiting": ("primary", Primary.CR8_LOAD_EXITING),
    "CR8-store exiting": ("primary", Primary.CR8_STORE_EXITING),
    "MOV-DR exiting": ("primary", Primary.MOV_DR_EXITING),
    "unconditional I/O exiting": ("primary", Primary.UNCONDITIONAL_IO_EXITING),
    "use I/O bitmaps": ("primary", Primary.USE_IO_BITMAPS),
    "use MSR bitmaps": ("primary", Primary.USE_MSR_BITMAPS),
    "INVLPG exiting": ("primary", Primary.INVLPG_EXITING),
    "descriptor-table exiting (secondary)": ("secondary", Secondary.DESCRIPTOR_TABLE_EXITING),
    "external-interrupt exiting (pin-based)": ("pin_based", PinBased.EXTERNAL_INTERRUPT_EXITING),
    "CR0 guest/host mask: TS": ("cr0", CR0_TS),
    "CR0 guest/host mask: every other bit": ("cr0", ALL_BITS & ~CR0_TS),
    "CR4 guest/host mask: every bit": ("cr4", ALL_BITS),
}
"""The widget's control list: label -> (VMCS field, bits)."""

EXCEPTIONS = {"#DE": 0, "#DB": 1, "#BP": 3, "#UD": 6, "#GP": 13, "#PF": 14, "#AC": 17, "#MC": 18}
IO_BITMAPS = {"every port": None, "COM1 data 0x3f8 only": (0x3F8,), "COM1 status 0x3fd only": (0x3FD,),
              "no port": ()}
"""What I/O bitmaps A and B hold when "use I/O bitmaps" is set."""


def vmcs_from(chosen: tuple[str, ...], exceptions: tuple[str, ...], io_ports: tuple[int, ...] | None) -> Vmcs:
    """The Vmcs the widget's selections describe (MSR bitmaps as KVM sets them: see ``kvm_like``)."""
    fields: dict[str, int] = {"pin_based": 0, "primary": 0, "secondary": 0, "cr0": 0, "cr4": 0}
    for label in chosen:
        field, bits = CONTROLS[label]
        fields[field] |= int(bits)
    if fields["secondary"]:
        fields["primary"] |= Primary.ACTIVATE_SECONDARY_CONTROLS
    bitmap = 0
    for name in exceptions:
        bitmap |= 1 << EXCEPTIONS[name]
    a, b = io_bitmaps() if io_ports is None else io_bitmaps(io_ports)
    return Vmcs(pin_based=PinBased(fields["pin_based"]), primary=Primary(fields["primary"]),
                secondary=Secondary(fields["secondary"]), exception_bitmap=bitmap, io_bitmap_a=a, io_bitmap_b=b,
                msr_bitmap=kvm_like().msr_bitmap, cr0_guest_host_mask=fields["cr0"], cr4_guest_host_mask=fields["cr4"])


def selections_of(vmcs: Vmcs) -> tuple[list[str], list[str]]:
    """The widget's control and exception selections for a (preset) Vmcs."""
    values = {"pin_based": int(vmcs.pin_based), "primary": int(vmcs.primary), "secondary": int(vmcs.secondary_in_force),
              "cr0": vmcs.cr0_guest_host_mask, "cr4": vmcs.cr4_guest_host_mask}
    chosen = [label for label, (field, bits) in CONTROLS.items()
              if (values[field] & bits == bits if field != "cr4" else values[field] != 0)]
    exceptions = [name for name, vector in EXCEPTIONS.items() if vmcs.exception_bitmap >> vector & 1]
    return chosen, exceptions


class VmxControls(Experiment):
    """Edit the VMCS; minikernel64 reruns under the model of VMX and its exits follow."""

    slots = 3

    def __init__(self, preset: str = "KVM-like (EPT)", backend: str | None = None) -> None:
        from labkit.backend import choose_backend

        if preset not in PRESETS:
            from labkit.errors import ConfigError

            raise ConfigError(f"no VMCS preset {preset!r}; choose from {', '.join(PRESETS)}")
        backends, self.skipped = backends_here()
        self.preset = dropdown("start from", list(PRESETS), preset)
        chosen, exceptions = selections_of(PRESETS[preset]())
        self.controls_list = widgets.SelectMultiple(options=list(CONTROLS), value=chosen, rows=8,
                                                    description="VM-execution controls",
                                                    style={"description_width": "initial"},
                                                    layout=widgets.Layout(width="auto"))
        self.exceptions = widgets.SelectMultiple(options=list(EXCEPTIONS), value=exceptions, rows=8,
                                                 description="exception bitmap")
        self.io_ports = dropdown("I/O bitmaps hold", list(IO_BITMAPS), "every port")
        self.backend = backend_picker(backends, backend or choose_backend().name)
        self._applying = False
        self.preset.observe(self._preset_chosen, names="value")
        super().__init__([self.preset, self.io_ports, self.controls_list, self.exceptions, self.backend],
                         title="A model of VMX: the VMCS")
        self.last: Any = None
        """The last run (a RunResult whose monitor is the VmxReport)."""

    def vmcs(self) -> Vmcs:
        return vmcs_from(tuple(self.controls_list.value), tuple(self.exceptions.value),
                         IO_BITMAPS[self.io_ports.value])

    def _preset_chosen(self, change: dict[str, Any]) -> None:
        chosen, exceptions = selections_of(PRESETS[change["new"]]())
        self._applying = True
        try:
            self.controls_list.value = tuple(chosen)
            self.exceptions.value = tuple(exceptions)
        finally:
            self._applying = False

    def _changed(self, change: dict[str, Any]) -> None:
        if not self._applying:
            super()._changed(change)

    def results(self) -> list[Any]:
        from labkit.monitor.vmx.model import VmxReport, exit_table, run_vmx
        from labkit.viz.vmx import vmx_exits

        result = run_vmx("minikernel64", self.vmcs(), self.backend.value, TIMEOUT_S)
        self.last = result
        report = result.monitor
        if not isinstance(report, VmxReport):
            return [note(f"the model's run ended without a report: {result.status}")]
        native = _native_console()
        same = "the same as" if result.console == native else "DIFFERENT from"
        summary = (f"minikernel64 under a model of VMX on {self.backend.label}: {report.exit_count} VM exit(s), "
                   f"{sum(report.non_root.values())} candidate instruction(s) with no exit; the kernel's console "
                   f"is {same} its native console ({result.status}).")
        return [note(summary), exit_table(result), vmx_exits(result)]


class TechniqueChoice(Experiment):
    """One technique on the common workload: its entries and its console beside the native one."""

    slots = 2

    def __init__(self, technique: str = "trap-and-emulate", backend: str | None = None) -> None:
        from labkit.backend import choose_backend
        from labkit.monitor.techniques import TECHNIQUES

        choices = [name for name in TECHNIQUES if name != "KVM"]
        backends, self.skipped = backends_here()
        self.technique = dropdown("technique", choices, technique if technique in choices else choices[0])
        self.backend = backend_picker(backends, backend or choose_backend().name)
        super().__init__([self.technique, self.backend], title="One technique at a time:")
        self.last: Any = None

    def results(self) -> list[Any]:
        from labkit.monitor.binary_translation import consoles_side_by_side
        from labkit.monitor.techniques import entry_table, run_technique
        from labkit.monitor.vmx.vmcs import kvm_like

        native, _ = run_technique("native", None, self.backend.value, TIMEOUT_S)
        options = {"vmcs": kvm_like()} if self.technique.value == "VMX model" else {}
        result, row = run_technique(self.technique.value, None, self.backend.value, TIMEOUT_S,
                                    native=native.console, **options)
        self.last = row
        table = entry_table([row], f"The workload under {row.technique} on {self.backend.label}")
        consoles = consoles_side_by_side({"native": native.console, row.technique: result.console})
        return [table, consoles]


def _native_console() -> str:
    from labkit.guest import Guest

    return str(Guest.named("minikernel64").expected["console"])
