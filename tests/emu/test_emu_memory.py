"""Memory regions, read-only memory and the dirty log on the Unicorn backend (issue 7)."""

from __future__ import annotations

import pytest

from labkit.emu import EmuBackend
from labkit.errors import ConfigError
from labkit.exits import Io, Mmio
from labkit.x86 import layout

from emu_guests import MEMORY, Recorder, assemble, boot, needs_binutils
from dirty_guest import dirty_guest_pages, dirty_guest_source

pytestmark = [pytest.mark.emu, needs_binutils]
REGION = 0x4000_0000 - 0x10_0000  # 1 MiB below MAPPED_LIMIT
ROM = 0x0800_0000


def test_a_region_is_memory_for_guest_and_host_and_mmio_stays_around_it():
    code = assemble(f"""
        mov rax, [{REGION + 0x10}]
        mov qword ptr [{REGION + 0x20}], 0x5566
        mov ebx, [{REGION - 0x1000}]
        mov ecx, [{REGION + 0x10_0000 - 0x2000 + 0x1000}]
        out 0xf4, al
    """)
    backend = boot(64, code)
    view = backend.add_memory_region(REGION, 0x10_0000)
    view[0x10:0x18] = (0x1122334455667788).to_bytes(8, "little")
    view[0xFF000:0xFF004] = b"\x01\x02\x03\x04"
    recorder = Recorder(replies={REGION - 0x1000: 0xAB})
    assert backend.run(recorder, 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0x88)
    regs = backend.get_regs()
    assert regs.rax == 0x1122334455667788 and regs.rcx == 0x04030201 and regs.rbx == 0xAB
    assert int.from_bytes(view[0x20:0x28], "little") == 0x5566
    mmio = [entry for entry in recorder.trace if entry[0] == "mmio"]
    assert mmio == [("mmio", REGION - 0x1000, 4, False, 0)]  # below the region: still MMIO
    assert [(address, read_only) for address, _, read_only in backend.regions()] == [(0, False), (REGION, False)]
    assert backend.regions()[0][1] is backend.memory


def test_mmio_above_and_below_a_region_reports_guest_physical_addresses():
    code = assemble(f"""
        mov dword ptr [{ROM - 4}], 1
        mov dword ptr [{ROM + 0x2000}], 2
        out 0xf4, al
    """)
    backend = boot(64, code)
    backend.add_memory_region(ROM, 0x2000)
    recorder = Recorder()
    backend.run(recorder, 2.0)
    assert [entry[1:] for entry in recorder.trace if entry[0] == "mmio"] == [(ROM - 4, 4, True, 1),
                                                                            (ROM + 0x2000, 4, True, 2)]


def test_read_only_region_reads_and_runs_as_memory_and_writes_become_mmio_exits():
    code = assemble(f"""
        mov rax, [{ROM}]
        mov dword ptr [{ROM + 8}], 0xdeadbeef
        mov rbx, [{ROM + 8}]
        mov rdx, {ROM + 0x100}
        call rdx
        out 0xf4, al
    """)
    backend = boot(64, code)
    rom = backend.add_memory_region(ROM, 0x1000, read_only=True)
    rom[0:16] = bytes(range(16))
    rom[0x100:0x100 + 8] = assemble("mov ecx, 0x77\nret", origin=ROM + 0x100)[:8].ljust(8, b"\x90")
    recorder = Recorder()
    assert backend.run(recorder, 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    regs = backend.get_regs()
    assert regs.rax == int.from_bytes(bytes(range(8)), "little")
    assert regs.rbx == int.from_bytes(bytes(range(8, 16)), "little")  # the store did not land
    assert regs.rcx == 0x77  # code in the read-only region ran
    assert bytes(rom[0:16]) == bytes(range(16))
    assert [entry[1:] for entry in recorder.trace if entry[0] == "mmio"] == [(ROM + 8, 4, True, 0xDEADBEEF)]
    assert backend.regions()[1][0] == ROM and backend.regions()[1][2] is True


def test_a_write_to_a_read_only_region_can_stop_the_run():
    code = assemble(f"mov byte ptr [{ROM + 3}], 0x42\nout 0xf4, al")
    backend = boot(64, code)
    backend.add_memory_region(ROM, 0x1000, read_only=True)

    class StopOnMmio(Recorder):
        def mmio(self, address, size, is_write, value, rip):
            result = super().mmio(address, size, is_write, value, rip)
            self.stop = True
            return result

    assert backend.run(StopOnMmio(), 2.0) == Mmio(ROM + 3, 1, True, 0x42)
    assert backend.run(Recorder(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)


@pytest.mark.parametrize("address, size, why", [
    (0x1000, 0x1000, "overlaps RAM"),
    (REGION + 1, 0x1000, "whole number"),
    (REGION, 0x1001, "whole number"),
    (REGION, 0, "empty"),
    (layout.MAPPED_LIMIT - 0x1000, 0x2000, "ends above"),
    ("0x1000", 0x1000, "whole number"),
])
def test_bad_regions_are_config_errors(address, size, why):
    with EmuBackend(MEMORY, 64) as backend:
        with pytest.raises(ConfigError, match=why):
            backend.add_memory_region(address, size)


def test_overlapping_regions_are_refused():
    with EmuBackend(MEMORY, 64) as backend:
        backend.add_memory_region(ROM, 0x3000)
        with pytest.raises(ConfigError, match="overlaps the region"):
            backend.add_memory_region(ROM + 0x2000, 0x2000, read_only=True)
        backend.add_memory_region(ROM + 0x3000, 0x1000, read_only=True)
        assert [(a, len(v), ro) for a, v, ro in backend.regions()] == [
            (0, MEMORY, False), (ROM, 0x3000, False), (ROM + 0x3000, 0x1000, True)]


def run_dirty_guest(backend: EmuBackend, rounds: int) -> list[list[int]]:
    """Run the dirty-log guest ``rounds`` times (it stops on port 0xf4 after each pass), fetching after each."""
    fetched = []
    for _ in range(rounds):
        exit_ = backend.run(Recorder(), 5.0)
        assert exit_ == Io(layout.DEBUG_EXIT_PORT, 1, True, exit_.data), exit_
        fetched.append(backend.dirty_log_fetch())
    return fetched


def test_dirty_log_gives_exactly_the_written_pages_and_fetch_clears():
    backend = boot(64, assemble(dirty_guest_source(REGION)))
    region = backend.add_memory_region(REGION, 0x10_0000)
    backend.memory[0x30_000:0x30_010] = b"x" * 16  # host writes before and during the log are not logged
    backend.dirty_log_start()
    region[0:4] = b"host"
    backend.memory[0x31_000:0x31_004] = b"host"
    first, second, third = run_dirty_guest(backend, 3)
    assert first == dirty_guest_pages(0, REGION)
    assert second == dirty_guest_pages(1, REGION)  # the second pass writes another set
    assert third == dirty_guest_pages(2, REGION)
    # The stores landed (the tracking changes no data), in RAM and in the region.
    assert backend.get_regs().rbx == 3
    assert int.from_bytes(backend.memory[0x10_0000 + 8:0x10_0000 + 16], "little") == 0x1234
    assert int.from_bytes(region[0x5008:0x5010], "little") == 0x1234
    backend.dirty_log_stop()
    with pytest.raises(ConfigError, match="not started"):
        backend.dirty_log_fetch()


def test_dirty_log_composes_with_exact_io_stops():
    # An I/O stop freezes RAM for the rest of the block (begin_stop); afterwards the pages logged
    # so far stay writable and the others stay watched.
    code = assemble("""
        mov qword ptr [0x20000], 1
        out 0xf4, al
        mov qword ptr [0x21000], 2
        mov qword ptr [0x20008], 3
        out 0xf4, al
        mov qword ptr [0x22000], 4
        out 0xf4, al
    """)
    backend = boot(64, code)
    backend.dirty_log_start()
    assert backend.run(Recorder(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert backend.dirty_log_fetch() == [0x20]
    assert backend.run(Recorder(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert backend.dirty_log_fetch() == [0x20, 0x21]
    assert backend.run(Recorder(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert backend.dirty_log_fetch() == [0x22]
    assert int.from_bytes(backend.memory[0x22000:0x22008], "little") == 4


def test_dirty_log_runs_read_modify_write_instructions_once():
    # The first store to a watched page is abandoned and the instruction run again once the page is
    # writable: an `add [mem]` must add once (a store that landed before a restart would add twice).
    code = assemble("""
        inc qword ptr [0x20000]
        inc qword ptr [0x20000]
        add qword ptr [0x21008], 5
        push rax
        push rax
        out 0xf4, al
    """)
    backend = boot(64, code)
    backend.dirty_log_start()
    assert backend.run(Recorder(), 2.0) == Io(layout.DEBUG_EXIT_PORT, 1, True, 0)
    assert int.from_bytes(backend.memory[0x20000:0x20008], "little") == 2
    assert int.from_bytes(backend.memory[0x21008:0x21010], "little") == 5
    assert backend.get_regs().rsp == layout.STACK_TOP - 16
    assert backend.dirty_log_fetch() == [0x20, 0x21, (layout.STACK_TOP - 8) >> 12]


def test_a_run_stopped_at_mmio_goes_on_and_each_access_reaches_the_dispatcher_once():
    # Stopping at every access, as a step-wise caller does: the guest must progress (issue 7: steps()
    # on the emulator yielded the same MMIO exit forever), and the read value must reach RBX.
    code = assemble(f"""
        mov eax, [{MEMORY + 0x100}]
        mov rbx, rax
        mov dword ptr [{MEMORY + 0x104}], 5
        out 0x80, al
        mov ecx, [{MEMORY + 0x108}]
        out 0xf4, al
    """)
    backend = boot(64, code)

    class StopEveryTime(Recorder):
        def mmio(self, address, size, is_write, value, rip):
            result = super().mmio(address, size, is_write, value, rip)
            self.stop = True
            return result

    dispatcher = StopEveryTime(replies={MEMORY + 0x100: 0x77, MEMORY + 0x108: 0x99})
    exits = [backend.run(dispatcher, 2.0) for _ in range(4)]  # (port 0x80 does not stop the Recorder)
    assert exits == [Mmio(MEMORY + 0x100, 4, False, 0x77), Mmio(MEMORY + 0x104, 4, True, 5),
                     Mmio(MEMORY + 0x108, 4, False, 0x99), Io(layout.DEBUG_EXIT_PORT, 1, True, 0x77)]
    assert [entry[1] for entry in dispatcher.trace] == [MEMORY + 0x100, MEMORY + 0x104, 0x80, MEMORY + 0x108,
                                                        layout.DEBUG_EXIT_PORT]
    regs = backend.get_regs()
    assert regs.rbx == 0x77 and regs.rcx == 0x99
