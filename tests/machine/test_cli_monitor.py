"""``labkit run GUEST --monitor te|bt|pv|vmx``: a kernel under a technique from the shell, with its entry table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def labkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("monitor, technique, entries", [
    ("te", "trap-and-emulate", "1051 traps"),
    ("bt", "binary translation", "1496 monitor calls"),
    ("vmx", "VMX model", "1031 VM exits (model)"),
])
def test_a_kernel_under_each_technique_prints_its_entry_table(backend_name, monitor, technique, entries):
    done = labkit("run", "minikernel64", "--monitor", monitor, "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("minikernel: own GDT and IDT loaded, CR3 reloaded\n")
    assert f"minikernel64 under {technique}: hypervisor entries" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith(technique + " "))
    assert entries in row
    assert ("no: 5 line(s) differ" if monitor == "te" else "yes") in row  # compared with the native console
    where = "KVM (" if backend_name == "kvm" else "emulator (Unicorn 2.1.4)"
    assert where in row
    if monitor == "vmx":
        assert "VM exits of a model of VMX run on" in done.stdout
        assert "size 1, direction OUT, string no, REP no, operand DX, port 0x3f8" in done.stdout


def test_json_carries_the_entries_and_every_vm_exit(backend_name):
    done = labkit("run", "minikernel64", "--monitor", "vmx", "--vmcs", "every-exit", "--backend", backend_name, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    monitor = report["monitor"]
    assert monitor["technique"] == "VMX model" and monitor["vmcs_preset"] == "every-exit"
    assert monitor["by_kind"] == {"0 exception or NMI": 3, "12 HLT": 1, "28 CR access": 5, "30 I/O": 1028,
                                  "46 GDTR/IDTR access": 4}
    assert monitor["entries"] == len(monitor["vm_exits"]) == 1041
    first = monitor["vm_exits"][0]
    assert first["reason"] == 46 and first["fields"]["instruction identity"] == "LGDT"
    cr3 = [exit for exit in monitor["vm_exits"] if exit["reason"] == 28][0]
    assert cr3["fields"] == {"control register": "CR3", "access type": "MOV FROM CR", "register": "RAX"}
    assert report["status"] == "halted"


def test_the_vmcs_preset_changes_the_exits():
    quiet = json.loads(labkit("run", "minikernel64", "--monitor", "vmx", "--vmcs", "none", "--backend", "emu",
                              "--json").stdout)
    assert quiet["monitor"]["entries"] == 0 and quiet["monitor"]["vm_exits"] == []
    assert quiet["console"] == json.loads(labkit("run", "minikernel64", "--backend", "emu", "--json").stdout)["console"]


def test_the_paravirtual_kernel_under_pv(backend_name):
    done = labkit("run", "pvkernel64", "--monitor", "pv", "--backend", backend_name, "--json")
    assert done.returncode == 0, done.stderr
    monitor = json.loads(done.stdout)["monitor"]
    assert monitor["technique"] == "paravirtual" and monitor["entries"] > 0
    assert "privileged-instruction traps" not in monitor["by_kind"]
    assert monitor["by_kind"]["bounced #UD"] == 2
    assert json.loads(done.stdout)["console"] == json.loads(labkit("run", "minikernel64", "--backend", backend_name,
                                                                   "--json").stdout)["console"]


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (("minikernel64", "--monitor", "pv"), "--monitor pv runs a kernel written for the hypercall ABI; minikernel64 is "
                                          "not one (try: labkit run pvkernel64 --monitor pv)"),
    (("hello16", "--monitor", "te"), "--monitor runs 64-bit kernels; hello16 starts in 16-bit mode"),
    (("pvkernel64", "--monitor", "te"), "pvkernel64 is paravirtual (it calls the hypervisor instead of trapping): "
                                        "run it with --monitor pv"),
    (("minikernel64", "--vmcs", "none"), "--vmcs sets up the VMX model: give --monitor vmx with it"),
    (("minikernel64", "--monitor", "bt", "--vmcs", "none"), "--vmcs belongs to the VMX model (--monitor vmx), "
                                                            "not to --monitor bt"),
])
def test_bad_combinations_are_one_line_errors(args, message):
    done = labkit("run", *args, "--backend", "emu")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"labkit: error: {message}\n"


@pytest.mark.unit
def test_unknown_monitor_or_preset_is_a_usage_error():
    done = labkit("run", "minikernel64", "--monitor", "vt-x")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "invalid choice: 'vt-x'" in done.stderr
    done = labkit("run", "minikernel64", "--monitor", "vmx", "--vmcs", "all")
    assert done.returncode == 2 and "invalid choice: 'all'" in done.stderr


def test_a_kernel_that_never_stops_times_out_under_the_model(backend_name):
    done = labkit("run", "forever64", "--monitor", "vmx", "--timeout", "1", "--backend", backend_name, "--json")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "timeout" and report["monitor"]["entries"] == 0
