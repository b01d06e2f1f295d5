"""One workload under every technique: each counts its own hypervisor entries, and only trap-and-emulate
lets the kernel see a difference."""

from __future__ import annotations

import pytest
from backends import HAS_KVM

from labkit.errors import ConfigError
from labkit.monitor.techniques import TECHNIQUES, compare_techniques, run_technique
from labkit.monitor.vmx import Vmcs


@pytest.fixture(scope="module", params=["emu", pytest.param("kvm", marks=pytest.mark.kvm)])
def comparison(request):
    return compare_techniques(request.param)


def test_every_technique_runs_the_workload_and_counts_its_entries(comparison):
    runs = {run.technique: run for run in comparison.runs}
    assert tuple(runs) == TECHNIQUES
    native = runs["native"]
    console_bytes = len(comparison.native_console)
    assert native.by_kind == {"IO": 2 * console_bytes, "HLT": 1}  # one LSR poll and one THR write per byte
    te = runs["trap-and-emulate"]
    assert te.entry_kind == "traps" and te.entries == te.backend_exits  # each trap is one exit to the monitor
    assert te.by_kind["#UD"] == 2 and te.by_kind["#PF"] == 1 and te.by_kind["#GP"] >= 2 * console_bytes
    assert not te.console_matches_native and te.differing_lines == 5  # pushf, popf, sgdt, sidt, smsw leak
    bt = runs["binary translation"]
    assert bt.entry_kind == "monitor calls" and bt.console_matches_native and bt.entries > 2 * console_bytes
    vmx = runs["VMX model"]
    assert vmx.entry_kind == "VM exits (model)" and vmx.console_matches_native
    assert vmx.by_kind == {"0 exception or NMI": 2, "12 HLT": 1, "30 I/O": 2 * console_bytes}  # KVM-like VMCS
    assert vmx.entries < te.entries  # cli, pushf, sgdt, mov cr, iretq ... no longer enter the hypervisor
    pv = runs["paravirtual"]
    assert pv.entry_kind == "hypercalls and bounces" and pv.console_matches_native
    assert pv.by_kind["bounced #UD"] == 2 and pv.by_kind["bounced #PF"] == 1 and 0 < pv.console_entries < pv.entries
    assert "privileged-instruction traps" not in pv.by_kind and pv.entries < te.entries
    for run in runs.values():
        assert run.skipped or run.host_ms > 0
    assert all(run.measured_by.endswith(comparison.where) for run in runs.values()
               if not run.skipped and run.technique != "KVM")


def test_the_kvm_row_runs_on_kvm_or_says_why_not(comparison):
    kvm = comparison.run("KVM")
    if HAS_KVM:
        assert not kvm.skipped and kvm.backend == "kvm" and kvm.console_matches_native
        assert kvm.measured_by.split(", ")[-1].startswith("KVM (")
        assert sum(count for kind, count in kvm.by_kind.items() if "reached labkit" in kind) == \
            comparison.run("native").entries
    else:
        assert kvm.skipped.startswith("KVM is not usable here")


def test_emulation_only_sessions_leave_kvm_out(monkeypatch):
    monkeypatch.setenv("LABKIT_BACKEND", "emu")
    comparison = compare_techniques("auto", techniques=("native", "KVM"))
    assert comparison.backend == "emu"
    assert comparison.run("KVM").skipped.startswith("KVM is usable here, but LABKIT_BACKEND=emu" if HAS_KVM
                                                    else "KVM is not usable here")
    table = comparison.table()
    assert table.rows[1][0] == "KVM" and table.rows[1][3].startswith("not run: ")


def test_the_table_names_what_measured_each_row(comparison):
    table = comparison.table()
    assert table.title.startswith(f"One workload, every technique, run on {comparison.where}: ")
    assert [row[0] for row in table.rows] == list(TECHNIQUES)
    vmx = table.rows[TECHNIQUES.index("VMX model")]
    assert "the model's cost, not VT-x's" in vmx[4] and vmx[6] == "yes"
    assert table.rows[0][6] == "the reference"


@pytest.mark.unit
def test_bad_technique_requests_are_config_errors():
    with pytest.raises(ConfigError, match="unknown technique"):
        run_technique("vt-x")
    with pytest.raises(ConfigError, match="a VMCS belongs to the VMX model, not to trap-and-emulate"):
        run_technique("te", vmcs=Vmcs())
    with pytest.raises(ConfigError, match="unknown technique"):
        compare_techniques("emu", techniques=("native", "SVM"))


@pytest.mark.unit
def test_the_workload_is_the_paravirtual_kernels_routine_set():
    from labkit.monitor.paravirt import PV_ROUTINES
    from labkit.monitor.techniques import WORKLOAD

    assert WORKLOAD == PV_ROUTINES
