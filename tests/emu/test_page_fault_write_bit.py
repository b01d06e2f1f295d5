"""A read-modify-write instruction's #PF reports a write (W/R = 1) on both backends.

Unicorn (QEMU's TCG) raises it from the instruction's load, with W/R = 0; the CPU checks the access as
a write, and KVM reports it so.  labkit.emu.delivery decodes the instruction at a W/R = 0 #PF and sets
the bit (``reads_and_writes_memory``).  Found by benchmarks/sweep_random_bytes.py: 66 of 500 seeds.
"""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.emu.delivery import reads_and_writes_memory
from labkit.x86.paging import pt_entry_address
from labkit.vmm.status import StatusKind

UNMAPPED = 0x4000_0000  # above labkit's 1 GiB identity map: not present
KERNEL_PAGE = 0x30000  # made supervisor-only below: a ring-3 access is a protection fault (P = 1, U/S = 1)

CASES = {
    # name: (instruction at rax, ring 3, expected error code)
    "add [rax], al": ("add byte ptr [rax], al", False, 0x2),
    "rcr qword [rax], cl": ("rcr qword ptr [rax], cl", False, 0x2),
    "lock xadd [rax], ebx": ("lock xadd dword ptr [rax], ebx", False, 0x2),
    "inc qword [rax]": ("inc qword ptr [rax]", False, 0x2),
    "btc [rax], 3": ("btc dword ptr [rax], 3", False, 0x2),
    "cmp [rax], al (a read)": ("cmp byte ptr [rax], al", False, 0x0),
    "bt [rax], 3 (a read)": ("bt dword ptr [rax], 3", False, 0x0),
    "mov rbx, [rax] (a read)": ("mov rbx, qword ptr [rax]", False, 0x0),
    "ring 3 neg on a kernel page": ("neg dword ptr [rax]", True, 0x7),
    "ring 3 test on a kernel page (a read)": ("test dword ptr [rax], 1", True, 0x5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_write_bit_of_a_page_fault_is_the_same_on_both_backends(backend_name, case):
    instruction, user, error_code = CASES[case]
    if user:
        guest = Guest.from_asm(f"mov rax, {KERNEL_PAGE:#x}\n{instruction}\n", user=True, name="rmw")
    else:
        guest = Guest.from_asm(f"mov rax, {UNMAPPED:#x}\n{instruction}\n", name="rmw")
    with Machine(guest, backend=backend_name) as machine:
        if user:  # clear U/S of the kernel page's PTE
            entry = int.from_bytes(machine.read_memory(pt_entry_address(KERNEL_PAGE), 8), "little")
            machine.write_memory(pt_entry_address(KERNEL_PAGE), (entry & ~4).to_bytes(8, "little"))
        result = machine.run(timeout=10)
    assert result.status.kind is StatusKind.FAULT and result.status.fault.vector == 14, str(result.status)
    assert result.status.fault.error_code == error_code
    assert result.status.fault.cr2 == (KERNEL_PAGE if user else UNMAPPED)


@pytest.mark.unit
def test_read_modify_write_is_told_from_the_opcode_map():
    rmw = ["0000", "4801 18", "f0 0fc1 18", "48 d3 18", "f6 18", "ff 08", "0fab 18", "0fba 28 03", "87 18",
           "66 83 00 01", "0fc7 08", "26 f0 4d 0fb1 08"]
    plain = ["3800", "f6 00 01", "ff 30", "0fba 20 03", "0fa3 18", "8b 00", "89 00", "01 c0", "87 c3",
             "0fc7 30", "", "f0", "0f"]
    assert all(reads_and_writes_memory(bytes.fromhex(code), True) for code in rmw)
    assert not any(reads_and_writes_memory(bytes.fromhex(code), True) for code in plain)
    assert reads_and_writes_memory(bytes.fromhex("82 00 01"), False)  # 82 is group 1 outside 64-bit mode
    assert not reads_and_writes_memory(bytes.fromhex("40 00 00"), False)  # 40 is INC eax there, not REX
