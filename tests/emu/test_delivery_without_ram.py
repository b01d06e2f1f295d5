"""An exception whose delivery touches guest-physical memory with no RAM behind it ends alike on both backends.

labkit's guests see an MMIO hole above their RAM (identity-mapped up to 1 GiB).  A ring-0 fault whose
frame, gate or page tables lie there cannot be delivered: KVM (measured on kvm_pvm) makes it a #DF, and
a #DF that cannot be delivered a triple fault; a paging-structure entry there reads as not present.  The
emulator's delivery (labkit.emu.delivery) does the same; it used to stop with "an exception stack ...
lies outside RAM", an end no CPU has (random_bytes_guest(5)).  Each case runs on every backend here.
"""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.assembler import assemble
from labkit.isolation import random_bytes_guest
from labkit.vmm.status import StatusKind
from labkit.x86 import layout

MMIO_STACK = 0x375BC8FB  # random_bytes_guest(5)'s RSP when its `into` raises #UD: in the MMIO hole
IST1 = f"mov qword ptr [{layout.TSS_ADDRESS + 0x24:#x}], 0x60000\n"  # TSS.IST1: a stack in RAM


def _ist1(vector: int) -> str:
    """Set the IST field of labkit's boot IDT gate ``vector`` to 1."""
    return f"mov byte ptr [{layout.IDT_ADDRESS + 16 * vector + 4:#x}], 1\n"


CASES = {
    # name: (source, status, vector of the fault the stub reports)
    "frame in the MMIO hole": (f"mov rsp, {MMIO_STACK:#x}\nud2\n", StatusKind.SHUTDOWN, None),
    "frame across RAM's end": (f"mov rsp, {layout.DEFAULT_MEMORY + 0x10:#x}\nud2\n", StatusKind.SHUTDOWN, None),
    "#DF on an IST stack catches it": (IST1 + _ist1(8) + f"mov rsp, {MMIO_STACK:#x}\nud2\n", StatusKind.FAULT, 8),
    "#PF on an IST stack does not": (IST1 + _ist1(14) + f"mov rsp, {MMIO_STACK:#x}\nud2\n",
                                     StatusKind.SHUTDOWN, None),
    "#UD on an IST stack is delivered": (IST1 + _ist1(6) + f"mov rsp, {MMIO_STACK:#x}\nud2\n", StatusKind.FAULT, 6),
    "IST stack in the hole": (f"mov qword ptr [{layout.TSS_ADDRESS + 0x24:#x}], 0x10000000\n" + _ist1(6) + "ud2\n",
                              StatusKind.FAULT, 8),
    "IDT in the hole": ("push 0x10000000\npush 0x10000000\nmov word ptr [rsp + 6], 0xfff\nlidt [rsp + 6]\nud2\n",
                        StatusKind.SHUTDOWN, None),
    "page directory in the hole": (f"mov qword ptr [{layout.PDPT_ADDRESS + 8:#x}], 0x10000003\n"
                                   "mov rsp, 0x40001000\nud2\n", StatusKind.SHUTDOWN, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_delivery_into_the_mmio_hole_ends_as_on_kvm(backend_name, case):
    source, kind, vector = CASES[case]
    code = assemble(source, 64)
    with Machine(Guest.from_bytes(code, 64, "hole"), backend=backend_name) as machine:
        result = machine.run(timeout=10)
    assert result.status.kind is kind, str(result.status)
    ud2_at = layout.LOAD_ADDRESS + len(code) - 2
    if vector is None:
        assert result.regs.rip == ud2_at  # stopped at the fault, RF set as KVM leaves it
        assert result.regs.rflags & 0x10000
    else:
        assert result.status.fault.vector == vector and result.status.fault.rip == ud2_at


def test_random_bytes_seed_5_triple_faults(backend_name):
    with Machine(random_bytes_guest(5), backend=backend_name) as machine:
        result = machine.run(timeout=10)
    assert result.status.kind is StatusKind.SHUTDOWN
    assert (result.regs.rip, result.regs.rsp) == (0x8011, MMIO_STACK)  # `into` (#UD in 64-bit mode)
