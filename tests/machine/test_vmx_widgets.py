"""Notebook 05's panels driven as a student would: each control reruns the model or the technique."""

from __future__ import annotations

from labkit.monitor.vmx import Primary
from labkit.monitor.vmx.vmcs import kvm_like
from labkit.table import Table
from labkit.widgets.hardware import TechniqueChoice, VmxControls, selections_of, vmcs_from


class Panel:
    def __init__(self, experiment):
        self.experiment = experiment
        self.shown = experiment._made()
        made = experiment._made

        def recording():
            self.shown = made()
            return self.shown
        experiment._made = recording

    def after(self, change):
        runs = self.experiment.runs
        change()
        assert self.experiment.runs == runs + 1, "the change did not rerun the experiment exactly once"
        return self.shown


def exits_of(shown) -> dict[str, str]:
    table = next(part for part in shown if isinstance(part, Table))
    return {row[0]: row[2] for row in table.rows}


def test_the_presets_round_trip_through_the_selections():
    chosen, exceptions = selections_of(kvm_like())
    vmcs = vmcs_from(tuple(chosen), tuple(exceptions), None)
    assert vmcs.primary == kvm_like().primary & ~Primary.USE_TSC_OFFSETTING & ~Primary.RDPMC_EXITING
    assert vmcs.exception_bitmap == kvm_like().exception_bitmap
    assert vmcs.cr0_guest_host_mask == kvm_like().cr0_guest_host_mask


def test_each_control_changes_the_exits_as_the_sdm_says(backend_name):
    panel = Panel(VmxControls(backend=backend_name))
    assert exits_of(panel.shown) == {"0": "2", "12": "1", "30": "1028"}  # KVM-like: #UD, HLT, every port
    assert "the same as its native console" in panel.shown[0].data
    controls = panel.experiment
    shown = panel.after(lambda: setattr(controls.io_ports, "value", "COM1 data 0x3f8 only"))
    assert exits_of(shown)["30"] == "514"  # only the OUTs to 0x3f8 exit
    shown = panel.after(lambda: setattr(controls.controls_list, "value",
                                        tuple(controls.controls_list.value) + ("CR3-load exiting",)))
    assert exits_of(shown)["28"] == "1"
    shown = panel.after(lambda: setattr(controls.exceptions, "value", ("#PF",)))
    assert exits_of(shown)["0"] == "1" and "0x80000000" in str(shown[1])
    shown = panel.after(lambda: setattr(controls.preset, "value", "nothing exits"))  # one rerun for a preset
    assert "0 VM exit(s)" in shown[0].data and controls.controls_list.value == ()
    assert "the same as its native console" in shown[0].data


def test_the_technique_panel_shows_entries_and_consoles(backend_name):
    panel = Panel(TechniqueChoice(backend=backend_name))
    table = panel.shown[0]
    assert table.rows[0][0] == "trap-and-emulate" and "5 line(s) differ" in table.rows[0][6]
    shown = panel.after(lambda: setattr(panel.experiment.technique, "value", "VMX model"))
    assert shown[0].rows[0][0] == "VMX model" and shown[0].rows[0][6] == "yes"
    assert "1031 VM exits (model)" in shown[0].rows[0][1]
