"""Notebook 07's control panel: the faults and the number of VMs rerun the containment run."""

from __future__ import annotations

from labkit.widgets.isolation import FaultInjection
from test_widgets import Panel, text_of


def test_fault_injection_follows_the_chosen_faults_and_vm_count(backend_name):
    injection = FaultInjection(faults=("triple fault", "endless loop"), vms=6, backend=backend_name, timeout=1.0)
    panel = Panel(injection)
    summary = text_of(panel.first[0])
    assert "6 VMs on" in summary and "2 with a fault injected, 4 healthy; 4 of the 4 healthy" in summary
    assert injection.vms.min == 6
    assert [row.kind for row in injection.last.rows][:2] == ["triple fault", "endless loop"]
    texts = panel.after(lambda: setattr(injection.faults, "value", ("console flood",)))
    assert "1 with a fault injected, 5 healthy; 5 of the 5 healthy" in texts[0]
    assert "console flood" in texts[2] and "flood64" in texts[2]
    texts = panel.after(lambda: setattr(injection.vms, "value", 8))
    assert "8 VMs on" in texts[0] and len(injection.last.rows) == 8
