"""Issue 11's isolation guests and the deliberately vulnerable FIFO device, on both backends."""

from __future__ import annotations

import re
import struct

import pytest

from backends import HAS_KVM, NO_KVM_REASON

from labkit import Machine
from labkit.errors import ConfigError, DeviceError
from labkit.vmm.devices import vulnerable
from labkit.vmm.devices.vulnerable import (BoundedFifo, VulnerableFifo, bounded_fifo_device,
                                           vulnerable_fifo_device)
from labkit.vmm.status import StatusKind

SECRET = struct.unpack("<Q", b"TOPSECRT")[0]


def test_the_scanner_finds_the_secret_where_it_is_planted(backend_name):
    """The positive control: the same scan that finds nothing in VM B finds a planted qword."""
    with Machine("scan64", backend=backend_name) as machine:
        machine.write_memory(0x123458, b"TOPSECRT")
        result = machine.run(timeout=10)
    assert "0 matches" not in result.console.splitlines()[0]
    assert "scan: RAM [0x0, 0x200000): 262144 qwords, 1 matches\n" in result.console
    assert "scan: first match at 0x123458\n" in result.console
    assert result.status.fault.vector == 14 and result.status.fault.cr2 == 0x40000000


def test_the_scanner_answers_its_parameters(backend_name):
    with Machine("scan64", backend=backend_name, memory=4 << 20) as machine:
        machine.write_memory(0x80000, struct.pack("<4Q", ~SECRET & (2**64 - 1), 4 << 20, 0x4000000, 0x20000000))
        result = machine.run(timeout=10)
    assert "scan: RAM [0x0, 0x400000): 524288 qwords, 0 matches\n" in result.console
    reads = (0x20000000 - (4 << 20) + 0x4000000 - 1) // 0x4000000
    assert f"every 0x4000000: {reads} reads (MMIO exits), {reads} all ones, 0 matches\n" in result.console
    assert result.status.fault.cr2 == 0x40000000 and result.status.fault.error_code == 0x4


def test_a_filled_vm_holds_the_secret_and_a_scanning_vm_never_sees_it(backend_name):
    with Machine("secret64", backend=backend_name) as a, Machine("scan64", backend=backend_name) as b:
        filled = a.run(timeout=10)
        scanned = b.run(timeout=10)
        ram = a.read_memory(0x100000, 0x100000)
    assert filled.status.code == 0 and ram == b"TOPSECRT" * (0x100000 // 8)
    assert "0 matches" in scanned.console and "scan: no match\n" in scanned.console


def test_usertasks_fault_codes(backend_name):
    with Machine("usertasks64", backend=backend_name) as machine:
        result = machine.run(timeout=10)
    codes = dict(re.findall(r"task (\d) .*error code (0x[0-9a-f]+)", result.console))
    assert codes == {"1": "0x5", "2": "0x7", "4": "0x7", "5": "0x4", "6": "0x6"}
    assert "preempted by the timer 5 times: killed" in result.console
    assert result.console.endswith("kernel: 8 tasks run, 6 killed, still running\n")


@pytest.mark.unit
def test_the_vulnerable_fifo_lets_the_17th_byte_overwrite_the_handler_index():
    device = VulnerableFifo()
    for byte in b"A" * 16 + b"\x02":
        device.write(1, 1, byte)
    assert device.fields()["handler"] == 2 and device.fields()["owner"] == vulnerable.OWNER_TAG
    device.write(0, 1, vulnerable.CMD_EXECUTE)
    assert device.calls == ["host_debug_dump"]
    for byte in b"\x00\x00\x00\x00\x00\x00\x00":  # on over the padding and into owner: the buffer's end
        device.write(1, 1, byte)
    with pytest.raises(DeviceError, match="past the device's 24-byte state"):
        device.write(1, 1, 0x41)
    device.write(0, 1, vulnerable.CMD_RESET)
    device.state[vulnerable.HANDLER] = 7
    with pytest.raises(DeviceError, match="outside the 3-entry handler table"):
        device.write(0, 1, vulnerable.CMD_EXECUTE)


@pytest.mark.unit
def test_the_bounded_twin_drops_what_does_not_fit():
    device = BoundedFifo()
    for byte in b"A" * 16 + b"\x02" * 40:
        device.write(1, 1, byte)
    assert device.fields()["handler"] == 0 and device.rejected == 40
    device.write(0, 1, vulnerable.CMD_EXECUTE)
    assert device.calls == ["checksum"] and device.result == b"checksum 0x0410"


@pytest.mark.unit
def test_the_vulnerable_device_must_be_asked_for():
    with pytest.raises(ConfigError, match="i_know_it_is_vulnerable=True"):
        vulnerable_fifo_device()
    assert vulnerable_fifo_device(i_know_it_is_vulnerable=True)[0].name.startswith("VULNERABLE")


@pytest.mark.kvm
@pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)
def test_the_fifo_devices_never_run_in_the_callers_process():
    """Only KVM can run a machine in the caller's process (the emulator always has a worker)."""
    for specs in (bounded_fifo_device(), vulnerable_fifo_device(i_know_it_is_vulnerable=True)):
        with pytest.raises(ConfigError, match="worker process"):
            Machine("venom64", backend="kvm", isolate=False, devices=specs)


def test_venom_overwrites_the_vulnerable_device_and_fails_against_the_bounded_one(backend_name):
    import os

    specs = vulnerable_fifo_device(i_know_it_is_vulnerable=True)
    with Machine("venom64", backend=backend_name, isolate=True, devices=specs) as machine:
        attacked = machine.run(timeout=10)
        state = machine.device_state(specs[0].name)
    assert state["state"][16] == 2 and state["calls"] == ["host_debug_dump"]
    pid = int(re.search(r"host pid (\d+)", attacked.console).group(1))
    assert pid != os.getpid()  # the host side it reached is the worker's, not the notebook's
    with Machine("venom64", backend=backend_name, isolate=True, devices=bounded_fifo_device()) as machine:
        defended = machine.run(timeout=10)
        state = machine.device_state(vulnerable.BOUNDED_NAME)
    assert defended.console == "venom: sent 17 bytes; the device answered: checksum 0x0410\n"
    assert state["state"][16] == 0 and state["rejected"] == 1 and defended.status.kind is StatusKind.EXITED
