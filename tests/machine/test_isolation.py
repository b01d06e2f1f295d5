"""labkit.isolation: the memory-isolation experiment, the host mappings, and the fault-containment run."""

from __future__ import annotations

import pytest

from labkit import Machine
from labkit.errors import ConfigError
from labkit.isolation import (FAULTS, HEALTHY, Agreement, ScanReport, compare_backends, containment_specs,
                              memory_isolation, random_bytes_guest, run_containment, same_ending)
from labkit.vmm.status import Fault, Status, StatusKind


def test_vm_b_never_finds_vm_a_secret_and_their_ram_is_apart(backend_name):
    isolation = memory_isolation(backend=backend_name)
    assert isolation.secret_qwords_in_a == 0x100000 // 8
    assert isolation.scan.matches == 0 and isolation.scan.first_match is None
    assert isolation.scan.ram_qwords == 0x200000 // 8 and isolation.scan.mmio_reads == 1022
    assert isolation.scan.mmio_all_ones == 1022 and isolation.secret_qwords_in_b == 0
    assert isolation.scanner.status.fault.cr2 == 0x40000000
    (a,), (b,) = isolation.mappings["A"], isolation.mappings["B"]
    assert not a.overlaps(b) and a.size == b.size == 0x200000
    assert a.maps_line and b.maps_line
    if backend_name == "kvm":  # one process, two memory slots into separate anonymous host ranges
        assert " rw-p " in a.maps_line and " rw-p " in b.maps_line
        assert a.pid == b.pid and (a.host_end <= b.host_address or b.host_end <= a.host_address)
        assert isolation.mmio_exits == 1022
    else:  # one worker process per VM, each VM's RAM a memory file of its own (its inode in the maps line)
        assert a.pid != b.pid
        assert all(" rw-s " in m.maps_line and "/memfd:labkit-guest-ram" in m.maps_line for m in (a, b))
        assert a.maps_line.split()[4] != b.maps_line.split()[4]
        assert isolation.mmio_exits == 2 * 1022  # Unicorn splits an 8-byte MMIO read in two


def test_a_kvm_machines_mapping_is_in_this_process_and_holds_its_ram(backend_name):
    import ctypes
    import os

    with Machine("secret64", backend=backend_name) as machine:
        machine.run(timeout=10)
        (mapping,) = machine.host_mappings()
        ram = machine.read_memory(0x100000, 16)
        if backend_name == "kvm":  # read (never write) this process's mapping while the machine holds it
            assert mapping.pid == os.getpid()
            assert ctypes.string_at(mapping.host_address + 0x100000, 16) == b"TOPSECRT" * 2
        else:
            assert mapping.pid != os.getpid()
    assert ram == b"TOPSECRT" * 2
    start, end = (int(part, 16) for part in mapping.maps_line.split()[0].split("-"))
    assert start <= mapping.host_address and mapping.host_end <= end


@pytest.mark.unit
def test_the_scan_report_is_parsed_and_a_wrong_console_refused():
    console = ("scan: RAM [0x0, 0x200000): 262144 qwords, 1 matches\n"
               "scan: above RAM [0x200000, 0x40000000) every 0x100000: 1022 reads (MMIO exits), 1022 all ones, "
               "0 matches\nscan: first match at 0x123458\nscan: reading 0x40000000, which the page tables do not map\n")
    report = ScanReport.parse(console)
    assert (report.ram_matches, report.mmio_reads, report.first_match, report.unmapped) == (1, 1022, 0x123458, 1 << 30)
    with pytest.raises(ConfigError, match="not a complete scan64 report"):
        ScanReport.parse("Hello from 64-bit mode!\n")


@pytest.mark.unit
def test_bad_containment_arguments_are_named():
    with pytest.raises(ConfigError, match="unknown fault"):
        containment_specs(["meltdown"], 4)
    with pytest.raises(ConfigError, match="vms must be a count"):
        containment_specs(list(FAULTS), 3)
    with pytest.raises(ConfigError, match="stride"):
        memory_isolation(backend="emu", stride=12)
    specs = containment_specs(["triple fault", "random bytes"], 5, backend="emu")
    assert [kind for _, kind in specs] == ["triple fault", "random bytes", "healthy", "healthy", "healthy"]
    assert [spec.guest for spec, _ in specs][2:] == list(HEALTHY[:3])
    assert random_bytes_guest(7).code == random_bytes_guest(7).code != random_bytes_guest(8).code


def test_sixteen_vms_with_every_fault_the_healthy_ones_end_as_alone(backend_name):
    run = run_containment(list(FAULTS), 16, backend=backend_name, timeout=2.0)
    assert len(run.rows) == 16 and run.healthy_all_match
    by_kind = {row.kind: row.outcome for row in run.rows if row.faulty}
    assert by_kind["triple fault"].status is StatusKind.SHUTDOWN
    assert by_kind["endless loop"].status is StatusKind.TIMEOUT
    assert by_kind["console flood"].status is StatusKind.TIMEOUT and by_kind["console flood"].console
    assert by_kind["port hammer"].status is StatusKind.TIMEOUT
    assert by_kind["wild writes"].status in (StatusKind.FAULT, StatusKind.TIMEOUT)
    assert by_kind["random bytes"].status in (StatusKind.FAULT, StatusKind.SHUTDOWN, StatusKind.ERROR,
                                              StatusKind.TIMEOUT, StatusKind.HALTED)
    # How closely each budget is kept with 16 VMs on 2 cores is labkit.fleet's test (tests/machine/test_fleet.py).
    assert all(row.outcome.started_s <= row.outcome.ended_s for row in run.rows)


# benchmarks/sweep_random_bytes.py runs seeds 0-499; this is a fixed sample of it (about 0.5 s).
RANDOM_BYTES_SAMPLE = {0: Agreement.KVM_CANNOT_RUN, 1: Agreement.KVM_CANNOT_RUN, 2: Agreement.SAME,
                       3: Agreement.KVM_CANNOT_RUN, 4: Agreement.SAME, 5: Agreement.SAME, 6: Agreement.KVM_CANNOT_RUN,
                       7: Agreement.SAME, 8: Agreement.SAME, 325: Agreement.SAME}


@pytest.mark.kvm
def test_a_sample_of_random_bytes_seeds_ends_the_same_on_both_backends():
    agreements = {}
    for seed in RANDOM_BYTES_SAMPLE:
        comparison = compare_backends(random_bytes_guest(seed))
        agreements[seed] = comparison.agreement
        if seed in (5, 325):  # a #UD pushed onto a stack in the MMIO hole: #DF, then a triple fault, on both
            assert comparison.kvm.status.kind is comparison.emu.status.kind is StatusKind.SHUTDOWN
        if seed == 8:  # `rcr qword ptr [r14 - 0x59], cl` on an unmapped page: a write, on both
            assert comparison.emu.status.fault.error_code == 0x2
    assert agreements == RANDOM_BYTES_SAMPLE


@pytest.mark.unit
def test_endings_compare_kind_code_and_fault_not_the_message():
    pf = Fault(14, 0x8000, 0x2, 0x1000)
    assert same_ending(Status(StatusKind.FAULT, fault=pf), Status(StatusKind.FAULT, message="x", fault=pf))
    assert not same_ending(Status(StatusKind.FAULT, fault=pf), Status(StatusKind.FAULT, fault=Fault(14, 0x8000, 0,
                                                                                                       0x1000)))
    assert not same_ending(Status(StatusKind.EXITED, code=1), Status(StatusKind.EXITED, code=2))
    assert not same_ending(Status(StatusKind.SHUTDOWN), Status(StatusKind.ERROR))
