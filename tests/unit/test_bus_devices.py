"""Buses, device models and exit handling, fed with hand-made exits."""

import errno

import pytest

from labkit import exits
from labkit.errors import ConfigError
from labkit.vmm.bus import Bus, PortBus
from labkit.vmm.devices import Console, DebugExit, HypercallPort, Uart16550
from labkit.vmm.devices.hypercall import HC_NOP, HC_WRITE, MAX_WRITE
from labkit.vmm.exit_handling import Buses, handle_exit
from labkit.x86.state import Regs

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))

    def read(self, offset, size):
        return 0x1234_5678_9ABC_DEF0


def test_devices_see_offsets_and_values_are_masked_to_the_access_size():
    bus = PortBus()
    device = Recorder()
    bus.register(0x100, 8, device)
    bus.write(0x103, 1, 0x1FF)
    assert device.writes == [(3, 1, 0xFF)]
    assert bus.read(0x107, 2) == 0xDEF0


def test_overlapping_devices_are_rejected():
    bus = Bus("mmio", 1 << 30)
    bus.register(0x1000, 0x100, Recorder())
    with pytest.raises(ConfigError, match="overlaps"):
        bus.register(0x10F0, 0x20, Recorder())
    with pytest.raises(ConfigError, match="overlaps"):
        bus.register(0x0F80, 0x100, Recorder())
    bus.register(0x1100, 0x10, Recorder())  # adjacent is fine


def test_out_of_range_registration_is_rejected():
    with pytest.raises(ConfigError):
        PortBus().register(0xFFFF, 2, Recorder())


def test_unclaimed_accesses_are_counted_reads_are_all_ones():
    bus = PortBus()
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 4) == 0xFFFF_FFFF
    bus.write(0x80, 1, 7)
    assert bus.unclaimed[0x80] == 3


def test_uart_transmits_and_reports_transmitter_empty():
    console = Console()
    uart = Uart16550(console)
    for byte in b"Hi\n":
        assert uart.read(5, 1) & 0x20, "THRE must be set so polling guests go on"
        uart.write(0, 1, byte)
    assert console.text() == "Hi\n"


def test_uart_divisor_latch_does_not_transmit():
    console = Console()
    uart = Uart16550(console)
    uart.write(3, 1, 0x80)  # DLAB on
    uart.write(0, 1, 0x0C)  # DLL: 9600 baud
    uart.write(1, 1, 0x00)
    uart.write(3, 1, 0x03)  # 8N1, DLAB off
    assert (uart.dll, uart.dlm) == (0x0C, 0)
    assert console.output == b""


def test_console_keeps_capacity_and_counts_the_rest():
    console = Console(capacity=4)
    console.extend(b"abcdef")
    console.put(ord("g"))
    assert console.output == b"abcd"
    assert console.dropped == 3


def test_debug_exit_passes_the_code():
    codes = []
    DebugExit(codes.append).write(0, 4, 42)
    assert codes == [42]


def make_hypercalls(regs, memory=None):
    console = Console()
    memory = memory if memory is not None else memoryview(bytearray(4096))
    return HypercallPort(lambda: regs, memory, console.extend), console


def test_hypercall_write_is_bounds_checked():
    memory = memoryview(bytearray(4096))
    memory[100:105] = b"hello"
    regs = Regs(rbx=100, rcx=5)
    port, console = make_hypercalls(regs, memory)
    port.write(0, 4, HC_WRITE)
    assert port.read(0, 4) == 5 and console.text() == "hello"
    for rbx, rcx in ((4090, 10), (0, MAX_WRITE + 1), (2**64 - 1, 2), (0, 2**63)):
        regs.rbx, regs.rcx = rbx, rcx
        port.write(0, 4, HC_WRITE)
        assert port.read(0, 4) == (-errno.EFAULT) & 0xFFFFFFFF
    assert console.text() == "hello"


def test_unknown_hypercall_returns_enosys():
    port, _ = make_hypercalls(Regs())
    port.write(0, 4, 0xDEAD)
    assert port.read(0, 4) == (-errno.ENOSYS) & 0xFFFFFFFF
    port.write(0, 4, HC_NOP)
    assert port.read(0, 4) == 0
    assert port.calls["unknown"] == 1 and port.calls["NOP"] == 1


def test_handle_exit_dispatches_io_and_mmio():
    buses = Buses(PortBus(), Bus("mmio", 1 << 30))
    device = Recorder()
    buses.pio.register(0x3F8, 8, device)
    assert handle_exit(exits.Io(0x3F8, 1, True, 0x41), buses).status is None
    assert device.writes == [(0, 1, 0x41)]
    assert handle_exit(exits.Io(0x3F9, 1, False), buses).value == 0xF0
    assert handle_exit(exits.Mmio(0x1000_0000, 4, False), buses).value == 0xFFFF_FFFF


@pytest.mark.parametrize("exit, kind", [
    (exits.Hlt(), "halted"),
    (exits.Shutdown(), "shutdown"),
    (exits.Timeout(budget_s=1.0), "timeout"),
    (exits.InternalError(suberror=1), "error"),
    (exits.FailEntry(hardware_entry_failure_reason=0x21), "error"),
    (exits.EmulatorFailure("boom"), "error"),
    (exits.Unsupported(99), "error"),
])
def test_terminal_exits_become_statuses(exit, kind):
    buses = Buses(PortBus(), Bus("mmio", 1 << 30))
    status = handle_exit(exit, buses).status
    assert status is not None and status.kind == kind
    if kind == "error":
        assert status.message


def test_interrupted_resumes():
    assert handle_exit(exits.Interrupted(), Buses(PortBus(), Bus("mmio", 1))).status is None
