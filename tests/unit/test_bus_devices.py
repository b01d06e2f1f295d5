"""Buses, device models (and their reset/save/restore), guest memory, and exit decisions fed with hand-made exits."""

import errno

import pytest

from labkit import exits
from labkit.errors import ConfigError, GuestMemoryError
from labkit.memory import GuestMemory
from labkit.vmm.devices import Console, DebugExit, DeviceSpec, HypercallPort, Uart16550
from labkit.vmm.devices.hypercall import HC_NOP, HC_WRITE, MAX_WRITE
from labkit.vmm.exit_handling import Action, Situation, decide
from labkit.vmm.fault import FaultReporter
from labkit.vmm.bus import Bus, PortBus
from labkit.vmm.status import Status, StatusKind
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


@pytest.mark.parametrize("exit, kind", [
    (exits.Hlt(), StatusKind.HALTED),
    (exits.Shutdown(), StatusKind.SHUTDOWN),
    (exits.SystemEvent(type=1), StatusKind.SHUTDOWN),
    (exits.Timeout(budget_s=1.0), StatusKind.TIMEOUT),
    (exits.InternalError(suberror=1), StatusKind.ERROR),
    (exits.FailEntry(hardware_entry_failure_reason=0x21), StatusKind.ERROR),
    (exits.EmulatorFailure("boom"), StatusKind.ERROR),
    (exits.Unsupported(99), StatusKind.ERROR),
    (exits.Debug(), StatusKind.ERROR),
])
def test_terminal_exits_become_statuses(exit, kind):
    decision = decide(exit, Situation(where=lambda: " at rip 0x1234: nop"))
    assert decision.action is Action.STOP and decision.record
    assert decision.status.kind is kind
    if kind is StatusKind.ERROR:
        assert decision.status.message
    if isinstance(exit, (exits.InternalError, exits.EmulatorFailure)):
        assert decision.status.message.endswith(" at rip 0x1234: nop")


@pytest.mark.parametrize("exit", [exits.Io(0x3F8, 1, True, 0x41), exits.Mmio(0x1000_0000, 4, False, 0)])
def test_a_stop_after_an_access_is_the_device_status_then_a_pause_then_a_step(exit):
    exited = Status(StatusKind.EXITED, code=3)
    assert decide(exit, Situation(device_status=exited, pause_requested=True, stepping=True)).status is exited
    assert decide(exit, Situation(pause_requested=True, stepping=True)).status.kind is StatusKind.PAUSED
    assert decide(exit, Situation(stepping=True)).status.kind is StatusKind.RUNNING
    spurious = decide(exit, Situation())
    assert spurious.action is Action.RESUME and not spurious.record


def test_a_kick_resumes_unless_a_pause_was_asked():
    assert decide(exits.Interrupted()).action is Action.RESUME
    paused = decide(exits.Interrupted(), Situation(pause_requested=True))
    assert paused.action is Action.STOP and paused.status.kind is StatusKind.PAUSED and not paused.record


def test_hlt_waits_only_when_the_guest_can_take_an_armed_interrupt():
    assert decide(exits.Hlt(), Situation(halt_can_wait=lambda: True)).action is Action.WAIT
    assert decide(exits.Hlt(), Situation(halt_can_wait=lambda: False)).status.kind is StatusKind.HALTED


def test_status_kinds_are_an_enum_equal_to_the_old_strings():
    assert Status("halted").kind is StatusKind.HALTED and StatusKind.HALTED == "halted"
    assert [kind for kind in StatusKind if kind.resumable] == [StatusKind.RUNNING, StatusKind.PAUSED,
                                                               StatusKind.TIMEOUT]
    with pytest.raises(ValueError):
        Status("sleeping")


# -- guest memory ----------------------------------------------------------------------------


def test_guest_memory_checks_every_range_against_one_region():
    ram = memoryview(bytearray(0x2000))
    extra = memoryview(bytearray(0x1000))
    memory = GuestMemory([(0, ram, False), (0x10000, extra, True)])
    memory.write(0x1FFE, b"ab")
    assert memory.read(0x1FFE, 2) == b"ab" and ram[0x1FFE] == ord("a")
    memory.write(0x10FFF, b"z")
    assert extra[0xFFF] == ord("z") and memory.view(0x10000, 0x1000)[0xFFF] == ord("z")
    assert memory.contains(0, 0x2000) and memory.contains(0x10000, 0x1000) and memory.contains(0x2000, 0)
    for address, size in ((0x1FFF, 2), (0x2000, 1), (-1, 1), (0x10FFF, 2), (2**64 - 1, 2), (0, -1)):
        assert not memory.contains(address, size)
        with pytest.raises(GuestMemoryError, match="not inside one memory region|whole numbers"):
            memory.read(address, size)
    with pytest.raises(GuestMemoryError):
        memory.write(0x1FFF, b"xy")
    assert ram[0x1FFF] == ord("b"), "a refused write changes nothing"


def test_guest_memory_sees_regions_added_later():
    regions = [(0, memoryview(bytearray(0x1000)), False)]
    memory = GuestMemory(lambda: regions)
    assert not memory.contains(0x8000, 4)
    regions.append((0x8000, memoryview(bytearray(0x1000)), False))
    memory.write(0x8000, b"new!")
    assert memory.read(0x8000, 4) == b"new!"


# -- device state: reset, save (plain data), restore --------------------------------------


def plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(key, str) and plain(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(item) for item in value)
    return isinstance(value, (int, bytes, str)) and not isinstance(value, bool)


def test_uart_state_round_trips_and_resets():
    uart = Uart16550(Console())
    power_on = uart.save()
    for offset, value in ((3, 0x80), (0, 0x0C), (1, 0x00), (3, 0x1B), (1, 0x05), (4, 0x13), (7, 0x5A)):
        uart.write(offset, 1, value)
    state = uart.save()
    assert plain(state) and state != power_on
    other = Uart16550(Console())
    other.restore(state)
    assert other.save() == state
    assert [other.read(offset, 1) for offset in range(8)] == [uart.read(offset, 1) for offset in range(8)]
    uart.reset()
    assert uart.save() == power_on
    with pytest.raises(ConfigError):
        other.restore({"ier": 1})


def test_console_state_round_trips_and_keeps_the_drop_count():
    console = Console(capacity=4)
    console.extend(b"abcdef")
    state = console.save()
    assert plain(state) and state == {"output": b"abcd", "dropped": 2}
    copy = Console(capacity=4)
    copy.restore(state)
    assert copy.save() == state and copy.text() == "abcd"
    console.reset()
    assert console.save() == {"output": b"", "dropped": 0}


def test_hypercall_state_round_trips_and_resets():
    port, _ = make_hypercalls(Regs())
    port.write(0, 4, 0xDEAD)
    port.write(0, 4, HC_NOP)
    state = port.save()
    assert plain(state) and state == {"result": 0, "calls": {"unknown": 1, "NOP": 1}}
    port.write(0, 4, 0xBEEF)
    copy, _ = make_hypercalls(Regs())
    copy.restore(port.save())
    assert copy.save() == port.save() and copy.read(0, 4) == (-errno.ENOSYS) & 0xFFFFFFFF
    port.reset()
    assert port.save() == {"result": 0, "calls": {}}


def test_stateless_ports_save_nothing_and_refuse_state():
    memory = GuestMemory([(0, memoryview(bytearray(4096)), False)])
    devices = [DebugExit(lambda code: None),
               FaultReporter(64, Regs, lambda: None, memory, lambda status, regs: None)]
    for device in devices:
        device.reset()
        assert device.save() == {}
        device.restore({})
        with pytest.raises(ConfigError):
            device.restore({"x": 1})


def test_a_device_spec_is_checked_when_made():
    with pytest.raises(ConfigError, match="bus"):
        DeviceSpec("d", "isa", 0x100, 1, lambda context: None)
    with pytest.raises(ConfigError, match="factory"):
        DeviceSpec("d", "pio", 0x100, 1, object())
    with pytest.raises(ConfigError, match="name"):
        DeviceSpec("", "pio", 0x100, 1, lambda context: None)


def test_unclaimed_accesses_to_random_addresses_do_not_grow_without_bound():
    """A guest writing to random MMIO addresses (wildwrite64) must not grow the host's memory."""
    from labkit.vmm.bus import MAX_UNCLAIMED, Bus

    bus = Bus("mmio", 1 << 30)
    for address in range(0, 3 * MAX_UNCLAIMED * 8, 8):
        bus.write(address, 4, 1)
    bus.read(0, 4)
    assert len(bus.unclaimed) == MAX_UNCLAIMED and bus.unclaimed[0] == 2
    assert bus.unclaimed_elsewhere == 2 * MAX_UNCLAIMED
