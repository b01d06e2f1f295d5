"""Every host-side access to guest RAM goes through ``labkit.memory.GuestMemory``.

The accessors built on it (instruction fetch, the page walk, the monitors'
context, the trap frame, the forwarding stubs), and a scan of labkit's source
that fails when a hand-written bounds check on guest RAM appears outside
``labkit/memory.py`` and the backends.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from fakes import FakeBackend
from labkit import exits
from labkit.errors import ConfigError, GuestMemoryError
from labkit.guest import Guest
from labkit.memory import GuestMemory
from labkit.vmm import forwarding
from labkit.vmm.core import MachineCore
from labkit.vmm.devices import DeviceContext, DeviceSpec
from labkit.vmm.interrupts import MASTER_PORT
from labkit.vmm.status import StatusKind
from labkit.x86 import layout, paging
from labkit.x86.boot import RFLAGS_IF
from labkit.x86.disasm import instruction_at
from labkit.x86.idt import Gate, decode_gate64, encode_gate64
from labkit.x86.state import Regs

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RAM = 0x10000


def memory(size: int = RAM, *extra: tuple[int, int]) -> GuestMemory:
    """RAM at 0, then a region ``(address, size)`` for each of ``extra``."""
    regions = [(0, memoryview(bytearray(size)), False)]
    regions += [(address, memoryview(bytearray(length)), False) for address, length in extra]
    return GuestMemory(regions)


# -- GuestMemory's clipped read and RAM size --------------------------------------------------------

def test_read_at_most_stops_where_the_region_ends_and_is_empty_outside_every_region():
    guest = memory(RAM, (0x20000, 0x1000))
    guest.write(RAM - 3, b"abc")
    assert guest.read_at_most(RAM - 3, 15) == b"abc"
    assert guest.read_at_most(RAM - 3, 2) == b"ab"
    assert guest.read_at_most(RAM, 15) == b"", "the gap between RAM and the region"
    assert guest.read_at_most(0x20FFF, 15) == b"\x00", "the last byte of the second region"
    assert guest.read_at_most(0x21000, 1) == b""
    assert guest.read_at_most(-1, 4) == b""
    with pytest.raises(GuestMemoryError):
        guest.read(RAM - 3, 15)  # read never clips


@pytest.mark.parametrize("address, size", [(1.5, 4), ("0", 4), (True, 4), (0, -1)])
def test_read_at_most_refuses_what_is_not_a_range(address, size):
    with pytest.raises(GuestMemoryError, match="whole numbers|not inside"):
        memory().read_at_most(address, size)


def test_ram_size_is_the_region_at_zero():
    assert memory(RAM, (0x20000, 0x1000)).ram_size == RAM
    assert GuestMemory([(0x20000, memoryview(bytearray(0x1000)), False)]).ram_size == 0


# -- instruction fetch (x86 reads through the Readable protocol) ---------------------------------------

def test_instruction_at_fetches_up_to_the_end_of_ram():
    guest = memory()
    guest.write(RAM - 1, b"\xf4")  # hlt in RAM's last byte: 1 byte to fetch, not 15
    assert instruction_at(guest, RAM - 1, 64) == "hlt"
    guest.write(RAM - 2, b"\x0f")  # 0f f4 is no instruction
    assert instruction_at(guest, RAM - 2, 64) == "(undecodable bytes 0f f4)"
    assert instruction_at(guest, RAM, 64) == f"(rip {RAM:#x} is outside guest RAM)"
    assert instruction_at(guest, -4, 64) == "(rip -0x4 is outside guest RAM)"


def test_instruction_at_reads_other_regions_too():
    guest = memory(RAM, (0x20000, 0x1000))
    guest.write(0x20000, b"\x0f\x01\xd0")
    assert instruction_at(guest, 0x20000, 64) == "xgetbv"


# -- the page walk ------------------------------------------------------------------------------------

def test_a_page_table_entry_outside_guest_memory_is_a_guest_memory_error_naming_it():
    guest = memory()
    for address, table in paging.build_page_tables():
        guest.write(address, table)
    guest.write(layout.PML4_ADDRESS, struct.pack("<Q", 0x80000 | paging.PRESENT | paging.WRITABLE))
    with pytest.raises(GuestMemoryError, match=r"page-table entry at 0x80000 lies outside guest memory: "
                                                r"guest-physical range \[0x80000, 0x80008\)"):
        paging.translate(guest, 0x1000)


# -- the monitors' context, the trap frame, the stubs --------------------------------------------------

def test_the_monitor_context_reads_and_writes_through_guest_memory():
    guest = memory()
    context = forwarding.MonitorContext(guest, lambda *access: 0, lambda status, regs: None)
    context.write(0x100, b"xyz")
    assert guest.read(0x100, 3) == b"xyz" and context.read(0x100, 3) == b"xyz"
    with pytest.raises(GuestMemoryError, match=r"\[0xfffe, 0x10002\)"):
        context.read(RAM - 2, 4)
    with pytest.raises(GuestMemoryError, match=r"\[0xffff, 0x10001\)"):
        context.write(RAM - 1, b"ab")
    assert guest.read(RAM - 2, 2) == b"\0\0", "nothing written when the range does not fit"


class Recorder:
    def __init__(self):
        self.traps = []

    def on_trap(self, trap, context):
        self.traps.append((trap.vector, trap.error_code, trap.regs.rip))
        trap.regs.rip += 2
        trap.regs.rax = 0x1234

    def summary(self):
        return None


def trap_port(rsp: int):
    backend = FakeBackend()
    backend.set_regs(Regs(rsp=rsp))
    stops = []
    context = forwarding.MonitorContext(GuestMemory.of(backend), lambda *access: 0,
                                        lambda status, regs: stops.append(status))
    monitor = Recorder()
    return forwarding.TrapPort(monitor, backend, context), backend, monitor, stops


def test_the_trap_port_reads_and_writes_the_frame_through_guest_memory():
    base = 0x7000
    port, backend, monitor, stops = trap_port(base)
    words = [0] * forwarding.FRAME_WORDS
    words[len(forwarding.PUSHED):] = [13, 0x18, 0x8000, 0x2B, 0x202, 0x9000, 0x23]  # vector .. SS
    forwarding.FRAME.pack_into(backend.memory, base, *words)
    port.write(0, 1, 0)
    assert monitor.traps == [(13, 0x18, 0x8000)] and stops == []
    after = forwarding.FRAME.unpack_from(backend.memory, base)
    assert after[len(forwarding.PUSHED) - 1] == 0x1234, "rax, the last register pushed, written back"
    assert after[len(forwarding.PUSHED) + 2] == 0x8002, "the monitor's RIP written back"


@pytest.mark.parametrize("offset", [forwarding.FRAME.size - 1, 0, -8])
def test_a_trap_frame_outside_guest_ram_stops_the_run(offset):
    backend = FakeBackend()
    rsp = len(backend.memory) - offset
    port, backend, monitor, stops = trap_port(rsp & 0xFFFF_FFFF_FFFF_FFFF)
    port.write(0, 1, 0)
    assert monitor.traps == []
    assert [(stop.kind, stop.message) for stop in stops] == [
        (StatusKind.ERROR, f"trap frame at {rsp & 0xFFFF_FFFF_FFFF_FFFF:#x} lies outside guest RAM")]


def test_install_points_the_gates_at_the_stubs_through_guest_memory():
    guest = memory()

    def gates(at: int, count: int) -> None:
        for vector in range(count):
            guest.write(at + 16 * vector, encode_gate64(Gate(offset=0xDEAD, selector=0x10, type=0xE,
                                                             dpl=3 if vector == 3 else 0, present=True)))
    gates(0x3000, forwarding.FORWARDED_VECTORS)
    forwarding.install(guest, 0x3000)
    gate = decode_gate64(guest.read(0x3000 + 16 * 3, 16))
    assert (gate.offset, gate.selector, gate.dpl) == (layout.FORWARDING_STUBS + 3 * forwarding.STUB_SIZE, 0x10, 3)
    assert guest.read(layout.FORWARDING_STUBS, forwarding.STUB_SIZE) == forwarding.stub(0)
    gates(RAM - 16 * 4, 4)
    with pytest.raises(GuestMemoryError, match=r"\[0x10000, 0x10010\)"):
        forwarding.install(guest, RAM - 16 * 4)  # gate 4 would lie beyond RAM


# -- no hand-written bounds checks on guest RAM ---------------------------------------------------------

MEMORY_NAME = r"(?:\w+\.)*_?(?:guest_)?(?:memory|ram|mem)"
"""``memory``, ``self.memory``, ``context.memory``, ``self._ram``, ``guest_ram``: not ``program``."""
BOUNDS_CHECK = re.compile(
    rf"(?:[<>]=?|[-+,(])\s*len\(\s*{MEMORY_NAME}\s*\)"  # ... > len(memory), min(15, len(memory) - rip)
    rf"|len\(\s*{MEMORY_NAME}\s*\)\s*(?:[<>]=?|[-+])"  # len(memory) - size
    r"|\bram_size\s*(?:[<>]=?|-)|(?:[<>]=?|-)\s*(?:\w+\.)*ram_size\b")  # min(size, self.ram_size - address)
"""A comparison or arithmetic on the size of guest RAM: the shape of every bounds check GuestMemory replaced."""

ALLOWED = {
    ("labkit/x86/boot.py", "if address < 0 or end > len(memory):"):
        "load_boot_state checks that a boot image fits RAM before loading it through backend.memory; "
        "x86 sits below labkit.memory (round 2: the types helper owns boot.py)",
}
"""``(path, stripped line) -> why`` for the checks that remain, each named, so no new one hides among them."""


def bounds_checks(text: str) -> list[str]:
    """The stripped lines of ``text`` that compare or compute with the size of guest RAM."""
    return [line.strip() for line in text.splitlines() if BOUNDS_CHECK.search(line.split("#", 1)[0])]


@pytest.mark.parametrize("line", [
    "if address < 0 or size < 0 or address + size > len(self.memory):",
    "size = max(0, min(15, len(context.memory) - rip))",
    "if not 0 <= base <= len(memory) - FRAME.size:",
    "if physical + 8 > len(memory):",
    "if not 0 <= address < len(memory):",
    "size = max(0, min(size, self.ram_size - address))",
    "if offset + 4 >= len(self._ram):",
    "end = min(address + size, len(guest_ram))",
])
def test_the_scan_finds_the_bounds_checks_guest_memory_replaced(line):
    assert bounds_checks(f"def f():\n    {line}\n") == [line]


@pytest.mark.parametrize("line", [
    'raise ConfigError(f"guest ends beyond guest RAM ({len(self.backend.memory):#x} bytes)")',
    "if len(program) > 3:",
    "ram = context.memory.ram_size",
    "memory.write(address, data)  # not: address + len(data) > len(memory)",
])
def test_the_scan_leaves_other_uses_of_len_alone(line):
    assert bounds_checks(f"def f():\n    {line}\n") == []


def test_no_hand_written_guest_ram_bounds_checks_outside_guest_memory_and_the_backends():
    found = {}
    for path in sorted((ROOT / "labkit").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative == "labkit/memory.py" or relative.startswith(("labkit/kvm/", "labkit/emu/")):
            continue
        for line in bounds_checks(path.read_text()):
            if (relative, line) not in ALLOWED:
                found.setdefault(relative, []).append(line)
    assert found == {}, ("bounds checks on guest RAM written by hand; read and write through "
                         f"labkit.memory.GuestMemory (read, write, view, contains, read_at_most) instead: {found}")


def test_every_allowed_bounds_check_still_exists():
    for (relative, line), why in ALLOWED.items():
        assert line in bounds_checks((ROOT / relative).read_text()), f"{relative}: {line!r} is gone ({why}); drop it here"


# -- DeviceContext.set_armed ------------------------------------------------------------------------------

DOORBELL = 0x300
PIC_INIT = [exits.Io(MASTER_PORT, 1, True, 0x11), exits.Io(MASTER_PORT + 1, 1, True, 0x20),
            exits.Io(MASTER_PORT + 1, 1, True, 0x04), exits.Io(MASTER_PORT + 1, 1, True, 0x01)]
"""ICW1-ICW4 of the master PIC: vectors 0x20.., cascade on IR2, all lines unmasked."""


class Doorbell:
    """A user device: writing 1 starts a request that will raise line 5 later, writing 0 cancels it."""

    def __init__(self, context: DeviceContext):
        self.context = context

    def write(self, offset: int, size: int, value: int) -> None:
        self.context.set_armed(5, bool(value))

    def read(self, offset: int, size: int) -> int:
        return 0

    def reset(self) -> None:
        self.context.set_armed(5, False)

    def save(self) -> dict:
        return {}

    def restore(self, state) -> None:
        pass


@pytest.mark.parametrize("writes, kind", [
    ([], StatusKind.HALTED),
    ([1], StatusKind.TIMEOUT),  # waits for line 5, which never comes within the run's 0.1 s
    ([1, 0], StatusKind.HALTED),
])
def test_a_device_arming_a_line_makes_a_hlt_with_if_set_wait(writes, kind):
    spec = DeviceSpec("doorbell", "pio", DOORBELL, 1, Doorbell)
    backend = FakeBackend(script=PIC_INIT + [exits.Io(DOORBELL, 1, True, value) for value in writes] + [exits.Hlt()])
    core = MachineCore(Guest(name="doorbell", code=b"\xf4", mode=64), backend, len(backend.memory), devices=[spec])
    regs = backend.get_regs()
    regs.rflags |= RFLAGS_IF
    backend.set_regs(regs)
    assert core.run(0.1).status.kind is kind


def test_set_armed_without_a_controller_that_has_it_is_a_config_error():
    context = DeviceContext(memory=memory(), regs=Regs, raise_irq=print, lower_irq=print, kick=print)
    with pytest.raises(ConfigError, match="cannot arm line 5"):
        context.set_armed(5, True)


# -- MemoryWindow: GuestMemory.view without the region lookup ---------------------------------------------

@pytest.mark.parametrize("address, size", [
    (0, 16), (RAM - 16, 16), (RAM, 0), (RAM - 1, 2), (RAM, 1), (-1, 1), (0, -1), (0x20000, 16), (0x20FF0, 32),
    (True, 1), (0, True), (1.0, 1), ("0", 1), (2**64 - 1, 2),
])
def test_a_window_refuses_exactly_what_guest_memory_refuses(address, size):
    guest = memory(RAM, (0x20000, 0x1000))
    window = guest.window(0x100)
    outcomes = []
    for view in (guest.view, window.view):
        try:
            outcomes.append(bytes(view(address, size)))
        except GuestMemoryError as error:
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]


def test_a_window_counts_the_pages_it_hands_out_while_tracking():
    guest = memory(RAM)
    window = guest.window(0)
    window.view(0x1000, 16)
    guest.track_writes(True)
    window.view(0x2FF0, 32)
    guest.mark_written(0x5000, 1)
    assert guest.take_written() == {2, 3, 5}
    with pytest.raises(GuestMemoryError):
        guest.window(RAM)
