"""Devices given as specs live where the guest runs: the same count, the same error, on both backends."""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.errors import ConfigError, DeviceError
from labkit.vmm.devices import DeviceSpec
from labkit.vmm.status import StatusKind

PORT = 0x510
WRITES_THREE_TIMES = f"""
    mov dx, {PORT}
    mov al, 1
    out dx, al
    out dx, al
    in al, dx
    out dx, al
    hlt
"""


class WriteCounter:
    """Counts the guest's writes; reads return the count."""

    def __init__(self, context):
        self.writes = 0

    def read(self, offset, size):
        return self.writes

    def write(self, offset, size, value):
        self.writes += 1

    def reset(self):
        self.writes = 0

    def save(self):
        return {"writes": self.writes}

    def restore(self, state):
        self.writes = state["writes"]


class Broken:
    def __init__(self, context):
        pass

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        raise ZeroDivisionError("the device model divided by zero")


def counter_spec() -> DeviceSpec:
    return DeviceSpec("counter", "pio", PORT, 1, WriteCounter)


def test_a_counting_device_reads_the_same_count_on_every_backend(backend_name):
    guest = Guest.from_asm(WRITES_THREE_TIMES, mode=64)
    with Machine(guest, backend=backend_name, devices=[counter_spec()]) as machine:
        result = machine.run(timeout=10)
        assert result.status.kind is StatusKind.HALTED
        assert machine.device_state("counter") == {"writes": 3}
        assert result.regs.rax & 0xFF == 2, "the guest read the count the device had then"
        assert machine.device_state("uart") == {"ier": 0, "lcr": 3, "mcr": 0, "scr": 0, "dll": 1, "dlm": 0}
        with pytest.raises(ConfigError, match="no device is named 'nothing'"):
            machine.device_state("nothing")


def test_a_raising_device_ends_the_run_with_the_same_error_on_every_backend(backend_name):
    guest = Guest.from_asm(f"mov dx, 0x3f8\nmov al, 'x'\nout dx, al\nmov dx, {PORT}\nout dx, al\n"
                           "mov dx, 0x3f8\nout dx, al\nhlt\n", mode=64)
    with Machine(guest, backend=backend_name, devices=[DeviceSpec("broken", "pio", PORT, 1, Broken)]) as machine:
        with pytest.raises(DeviceError) as raised:
            machine.run(timeout=10)
        # The failing `out dx, al` is at +11; both backends report RIP after a completed `out`, as KVM does.
        rip = guest.load_address + 12
        assert str(raised.value) == (f"device 'broken' failed on a write to port {PORT:#x} at guest rip {rip:#x}: "
                                     "ZeroDivisionError: the device model divided by zero")
        result = machine.last_result
        assert result.status.kind is StatusKind.ERROR and result.status.device == "broken"
        assert result.console == "x", "the guest stopped at the failing access"


@pytest.mark.emu
def test_a_device_object_for_an_emulated_machine_is_refused():
    with pytest.raises(ConfigError, match="DeviceSpec"):
        Machine("hello64", backend="emu", devices=[("pio", PORT, 1, WriteCounter(None))])


def test_a_device_object_in_process_still_works(backend_name):
    counter = WriteCounter(None)
    guest = Guest.from_asm(WRITES_THREE_TIMES, mode=64)
    with Machine(guest, backend=backend_name, isolate=False, devices=[("pio", PORT, 1, counter)]) as machine:
        assert machine.run(timeout=10).status.kind is StatusKind.HALTED
    assert counter.writes == 3
