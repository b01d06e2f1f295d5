"""Timer interrupts end to end: the PIT's ticks through the PIC into the guest's IDT, on both backends.

These need the whole of issue 7's interrupt path: the core with the
``InterruptController`` as device "pic" on ports 0x20-0x21 and the
``Pit8254`` as device "pit" on ports 0x40-0x43 (built in, as on a PC), its HLT
wait, and each backend's injection (KVM_INTERRUPT and the interrupt window on
KVM, labkit's delivery through the IDT on emulation).
"""

from __future__ import annotations

import struct

import pytest

from backends import HAS_KVM, NO_KVM_REASON
from labkit import Guest, Machine
from labkit.vmm.devices.timer import MIN_COUNT, PIT_HZ
from labkit.vmm.status import StatusKind

TIMER_VECTOR = 0x20
TARGET_OFFSET, COUNT_OFFSET = 16, 20
"""Where timer64 and preempt64 keep the number of ticks to take (.long) and the PIT count (.word)."""


def patched(name: str, target: int, count: int) -> Guest:
    guest = Guest.named(name)
    code = bytearray(guest.code)
    struct.pack_into("<I", code, TARGET_OFFSET, target)
    struct.pack_into("<H", code, COUNT_OFFSET, count)
    return Guest.from_bytes(bytes(code), guest.mode, name)


def run(guest, backend: str, timeout: float = 10.0):
    with Machine(guest, backend=backend) as machine:
        result = machine.run(timeout=timeout)
        return result, machine.device_state("pit"), machine.device_state("pic")


def interrupt_records(result) -> list:
    return [record for record in result.trace if record.reason == "INTERRUPT"]


def check_accounting(result, pit, pic, target: int, count: int) -> None:
    """Every tick the guest counted is one INTERRUPT record, and every period of host time is a tick
    delivered, coalesced or still pending at the PIC."""
    records = interrupt_records(result)
    assert len(records) == target and {record.data for record in records} == {TIMER_VECTOR}
    assert pic.delivered[0] == target
    assert not pit.counting, "the guest's last control word stopped the counter"
    assert pit.periods == target + pit.coalesced + (pic.master.irr & 1)
    assert result.elapsed_s >= target * count / PIT_HZ, "a tick cannot come before its period has passed"


def test_timer64_counts_its_ticks(backend_name):
    result, pit, pic = run("timer64", backend_name)
    assert (result.status.kind, result.status.code) == ("exited", 0), str(result.status)
    assert result.console == "ticks: 10\n"
    check_accounting(result, pit, pic, 10, 1193)
    assert (pic.master.icw2, pic.master.imr, pic.master.isr) == (TIMER_VECTOR, 0xFF, 0)


@pytest.mark.kvm
@pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)
@pytest.mark.parametrize("target,count", [(10, 1193), (25, 2386), (40, MIN_COUNT * 4)])
def test_timer64_same_tick_count_on_both_backends_for_the_same_periods(target, count):
    outcomes = {}
    for backend in ("kvm", "emu"):
        result, pit, pic = run(patched("timer64", target, count), backend)
        check_accounting(result, pit, pic, target, count)
        outcomes[backend] = (str(result.status), result.console, len(interrupt_records(result)),
                             result.trace.count("IO"), result.regs.gprs())
    assert outcomes["kvm"] == outcomes["emu"]
    assert outcomes["kvm"][1] == f"ticks: {target}\n"


def test_preempt64_ring3_loop_is_preempted_by_the_timer(backend_name):
    result, pit, pic = run("preempt64", backend_name)
    assert (result.status.kind, result.status.code) == ("exited", 0), str(result.status)
    assert result.console == "ticks: 10, from ring 3: 10\n"
    check_accounting(result, pit, pic, 10, 1193)


def test_preempt64_many_short_periods(backend_name):
    result, pit, pic = run(patched("preempt64", 100, MIN_COUNT * 2), backend_name)  # 200 us
    assert result.console == "ticks: 100, from ring 3: 100\n"
    check_accounting(result, pit, pic, 100, MIN_COUNT * 2)


PIC_AND_PIT = """
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, {imr}
        out 0x21, al
        mov al, 0x34
        out 0x43, al
        mov al, 0xa9
        out 0x40, al
        mov al, 0x04
        out 0x40, al
"""


def test_hlt_with_the_timer_masked_halts_at_once(backend_name):
    """Nothing unmasked can wake the guest: the HLT ends the run instead of waiting out the timeout."""
    guest = Guest.from_asm(PIC_AND_PIT.format(imr=0xFF) + "sti\nhlt\n", name="masked")
    result, pit, _ = run(guest, backend_name)
    assert result.status.kind == "halted"
    assert result.elapsed_s < 5.0 and pit.counting
    assert interrupt_records(result) == []


def test_an_unmodelled_pic_mode_ends_the_run_with_an_error_naming_it(backend_name):
    """The guest's doing, not a device bug: the run ends with status error and nothing is raised."""
    guest = Guest.from_asm("mov al, 0x19\nout 0x20, al\nhlt\n", name="level")  # ICW1.LTIM
    with Machine(guest, backend=backend_name) as machine:
        result = machine.run(timeout=10)
    assert result.status.kind is StatusKind.ERROR and result.status.device is None
    message = result.status.message
    assert "level-triggered" in message and "'pic'" in message and "0x20" in message


# -- a device's interrupt through the slave PIC ---------------------------------------------------------

DOORBELL_PORT = 0x300
DOORBELL_GUEST = """
        sidt [rip + idtr]
        mov rdi, [rip + idtr + 2]
        add rdi, 0x29 * 16              # IRQ 9 = slave IR1 = vector 0x29
        lea rax, [rip + handler]
        mov word ptr [rdi], ax
        mov word ptr [rdi + 2], 0x08
        mov word ptr [rdi + 4], 0x8E00
        shr rax, 16
        mov word ptr [rdi + 6], ax
        mov dword ptr [rdi + 8], 0
        mov dword ptr [rdi + 12], 0
        mov al, 0x11                    # master: cascade, vector 0x20, slave on IR2, only IR2 unmasked
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, 0xFB
        out 0x21, al
        mov al, 0x11                    # slave: vector 0x28, ID 2, only IR1 (IRQ 9) unmasked
        out 0xA0, al
        mov al, 0x28
        out 0xA1, al
        mov al, 0x02
        out 0xA1, al
        mov al, 0x01
        out 0xA1, al
        mov al, 0xFD
        out 0xA1, al
        sti
        mov ecx, 1
ring:   mov dx, {port}
        out dx, al                      # the doorbell raises IRQ 9
wait:   cmp [rip + count], ecx
        jne wait
        inc ecx
        cmp ecx, 3
        jbe ring
        cli
        mov eax, [rip + count]
        out 0xF4, al
handler:
        push rax
        inc dword ptr [rip + count]
        mov al, 0x20
        out 0xA0, al                    # EOI to the slave, then the master
        out 0x20, al
        pop rax
        iretq
count:  .long 0
idtr:   .word 0
        .quad 0
"""


class Doorbell:
    """A port that raises IRQ 9 (a pulse) on every write; counts the writes."""

    def __init__(self, context):
        self._context = context
        self.rings = 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.rings += 1
        self._context.raise_irq(9)
        self._context.lower_irq(9)

    def read(self, offset: int, size: int) -> int:
        return 0

    def reset(self) -> None:
        self.rings = 0

    def save(self) -> dict:
        return {"rings": self.rings}

    def restore(self, state: dict) -> None:
        self.rings = state["rings"]


def test_a_devices_interrupt_arrives_through_the_slave_pic(backend_name):
    from labkit.vmm.devices import DeviceSpec

    guest = Guest.from_asm(DOORBELL_GUEST.format(port=DOORBELL_PORT), name="doorbell")
    spec = DeviceSpec("doorbell", "pio", DOORBELL_PORT, 1, Doorbell)
    with Machine(guest, backend=backend_name, devices=[spec]) as machine:
        result = machine.run(timeout=10)
        assert machine.device_state("doorbell") == {"rings": 3}
        pic = machine.device_state("pic")
    assert (result.status.kind, result.status.code) == ("exited", 3), str(result.status)
    assert [record.data for record in interrupt_records(result)] == [0x29] * 3
    assert pic.delivered[9] == 3 and (pic.master.isr, pic.slave.isr) == (0, 0)
