"""The VMX model's exit rules on hand-made instructions: each row written from the Intel SDM, vol. 3C, 26.1."""

from __future__ import annotations

import pytest

from labkit.errors import ConfigError
from labkit.monitor.vcpu import decode
from labkit.monitor.vmx import (ExitReason, PinBased, Primary, Secondary, Vmcs, describe_qualification, io_bitmaps,
                               msr_bitmap)
from labkit.monitor.vmx.exits import VmExit
from labkit.monitor.vmx.rules import exception_exit, instruction_exit, interrupt_exit
from labkit.monitor.vmx.vmcs import BOOT_CR0, every_exit, kvm_like, shadow_paging
from labkit.x86.state import Regs

pytestmark = pytest.mark.unit

RIP = 0x8000
TS, PE, MP = 1 << 3, 1 << 0, 1 << 1
EFER = 0xC0000080


def run(vmcs: Vmcs, code: str, **registers: int) -> VmExit | None:
    decoded = decode(bytes.fromhex(code), RIP)
    assert decoded is not None
    regs = Regs(rip=RIP, **registers)
    memory = {0x9000: b"\x09\x00"}
    return instruction_exit(vmcs, decoded, regs, lambda address, size: memory[address][:size])


def reason(exit: VmExit | None) -> tuple[int, int] | None:
    return None if exit is None else (int(exit.reason), exit.qualification)


HLT = Vmcs(primary=Primary.HLT_EXITING)
IO = Vmcs(primary=Primary.UNCONDITIONAL_IO_EXITING)
A, B = io_bitmaps([0x3F8, 0x8000, 0xFFFF])
BITMAPS = Vmcs(primary=Primary.USE_IO_BITMAPS | Primary.UNCONDITIONAL_IO_EXITING, io_bitmap_a=A, io_bitmap_b=B)

# (vmcs, instruction bytes, registers, (basic exit reason, qualification) or None)
SDM_TABLE = [
    # HLT exiting (26.1.3)
    (Vmcs(), "f4", {}, None),
    (HLT, "f4", {}, (12, 0)),
    # I/O: unconditional I/O exiting; table 28-5: size-1, direction (1 = IN), string, REP, immediate, port
    (Vmcs(), "ec", {"rdx": 0x3FD}, None),
    (IO, "ec", {"rdx": 0x3FD}, (30, 0x3FD << 16 | 1 << 3)),  # in al, dx
    (IO, "ee", {"rdx": 0x3F8}, (30, 0x3F8 << 16)),  # out dx, al
    (IO, "e6f3", {}, (30, 0xF3 << 16 | 1 << 6)),  # out 0xf3, al: immediate operand
    (IO, "e560", {}, (30, 0x60 << 16 | 3 | 1 << 3 | 1 << 6)),  # in eax, 0x60: 4 bytes
    (IO, "66ef", {"rdx": 0x70}, (30, 0x70 << 16 | 1)),  # out dx, ax: 2 bytes
    (IO, "f36e", {"rdx": 0x3F8}, (30, 0x3F8 << 16 | 1 << 4 | 1 << 5)),  # rep outsb: string, REP
    (IO, "6d", {"rdx": 0x80}, (30, 0x80 << 16 | 3 | 1 << 3 | 1 << 4)),  # insd
    # use I/O bitmaps overrides unconditional I/O exiting; A covers 0-7FFF, B 8000-FFFF; a wrap exits
    (BITMAPS, "ee", {"rdx": 0x3F8}, (30, 0x3F8 << 16)),
    (BITMAPS, "ec", {"rdx": 0x3FD}, None),
    (BITMAPS, "ee", {"rdx": 0x8000}, (30, 0x8000 << 16)),
    (BITMAPS, "66ef", {"rdx": 0x3F7}, (30, 0x3F7 << 16 | 1)),  # 2 bytes at 0x3f7 touch 0x3f8
    (BITMAPS, "ef", {"rdx": 0xFFFE}, (30, 0xFFFE << 16 | 3)),  # 4 bytes from 0xfffe wrap past 0xffff
    (BITMAPS, "ec", {"rdx": 0x7FFF}, None),
    # CR0: exits when a host-owned bit (mask) would differ from the read shadow; reads never exit
    (Vmcs(cr0_guest_host_mask=TS), "0f22c0", {"rax": BOOT_CR0 | TS}, (28, 0)),  # mov cr0, rax
    (Vmcs(cr0_guest_host_mask=TS), "0f22c0", {"rax": BOOT_CR0 | MP}, None),  # MP is guest-owned
    (Vmcs(cr0_guest_host_mask=TS, cr0_read_shadow=BOOT_CR0 | TS), "0f22c0", {"rax": BOOT_CR0 | TS}, None),
    (every_exit(), "0f20c0", {}, None),  # mov rax, cr0
    (every_exit(), "480f01e0", {}, None),  # smsw rax
    (Vmcs(cr4_guest_host_mask=1 << 7), "0f22e3", {"rbx": 1 << 7}, (28, 4 | 3 << 8)),  # mov cr4, rbx
    # CLTS exits only when TS is host-owned and set in the shadow
    (Vmcs(cr0_guest_host_mask=TS), "0f06", {}, None),
    (Vmcs(cr0_guest_host_mask=TS, cr0_read_shadow=TS), "0f06", {}, (28, 2 << 4)),
    # LMSW: low four bits; it cannot clear PE, so a masked PE exits only when being set
    (Vmcs(cr0_guest_host_mask=TS), "0f01f0", {"rax": TS | PE}, (28, 3 << 4 | (TS | PE) << 16)),  # lmsw ax
    (Vmcs(cr0_guest_host_mask=PE, cr0_read_shadow=PE), "0f01f0", {"rax": 0}, None),
    (Vmcs(cr0_guest_host_mask=PE, cr0_read_shadow=0), "0f01f0", {"rax": PE}, (28, 3 << 4 | PE << 16)),
    (Vmcs(cr0_guest_host_mask=TS), "0f013425" + "00900000", {}, (28, 3 << 4 | 1 << 6 | 9 << 16)),  # lmsw [0x9000]
    # CR3: load exiting unless a CR3-target value matches; store exiting
    (Vmcs(primary=Primary.CR3_LOAD_EXITING), "0f22d8", {"rax": 0x4000}, (28, 3)),
    (Vmcs(primary=Primary.CR3_LOAD_EXITING, cr3_target_values=(0x5000, 0x4000)), "0f22d8", {"rax": 0x4000}, None),
    (Vmcs(primary=Primary.CR3_LOAD_EXITING), "0f20d8", {}, None),
    (Vmcs(primary=Primary.CR3_STORE_EXITING), "0f20d8", {}, (28, 3 | 1 << 4)),
    (Vmcs(primary=Primary.CR3_STORE_EXITING), "410f20dd", {}, (28, 3 | 1 << 4 | 13 << 8)),  # mov r13, cr3
    # CR8
    (Vmcs(primary=Primary.CR8_LOAD_EXITING), "440f22c0", {"rax": 5}, (28, 8)),
    (Vmcs(primary=Primary.CR8_LOAD_EXITING), "440f20c0", {}, None),
    (Vmcs(primary=Primary.CR8_STORE_EXITING), "440f20c0", {}, (28, 8 | 1 << 4)),
    # MOV DR (table 28-4): direction 0 = to DR
    (Vmcs(), "0f23f9", {"rcx": 0x400}, None),
    (Vmcs(primary=Primary.MOV_DR_EXITING), "0f23f9", {"rcx": 0x400}, (29, 7 | 1 << 8)),  # mov dr7, rcx
    (Vmcs(primary=Primary.MOV_DR_EXITING), "0f21f2", {}, (29, 6 | 1 << 4 | 2 << 8)),  # mov rdx, dr6
    # MSRs: every access exits without MSR bitmaps; with them, by bit; outside both ranges always
    (Vmcs(), "0f32", {"rcx": 0xC0000080}, (31, 0)),
    (Vmcs(primary=Primary.USE_MSR_BITMAPS), "0f32", {"rcx": 0xC0000080}, None),
    (Vmcs(primary=Primary.USE_MSR_BITMAPS, msr_bitmap=msr_bitmap(read=[EFER])), "0f32", {"rcx": EFER}, (31, 0)),
    (Vmcs(primary=Primary.USE_MSR_BITMAPS, msr_bitmap=msr_bitmap(read=[EFER])), "0f30", {"rcx": EFER}, None),
    (Vmcs(primary=Primary.USE_MSR_BITMAPS, msr_bitmap=msr_bitmap(write=[0x10])), "0f30", {"rcx": 0x10}, (32, 0)),
    (Vmcs(primary=Primary.USE_MSR_BITMAPS), "0f30", {"rcx": 0x4000_0000}, (32, 0)),
    # RDTSC, RDPMC, INVLPG (qualification: the linear address), WBINVD (secondary), INVD (always)
    (Vmcs(), "0f31", {}, None),
    (Vmcs(primary=Primary.RDTSC_EXITING), "0f31", {}, (16, 0)),
    (Vmcs(primary=Primary.RDPMC_EXITING), "0f33", {}, (15, 0)),
    (Vmcs(primary=Primary.INVLPG_EXITING), "0f0138", {"rax": 0x1234}, (14, 0x1234)),
    (Vmcs(secondary=Secondary.WBINVD_EXITING), "0f09", {}, None),  # secondary controls not activated
    (Vmcs(primary=Primary.ACTIVATE_SECONDARY_CONTROLS, secondary=Secondary.WBINVD_EXITING), "0f09", {}, (54, 0)),
    (Vmcs(), "0f08", {}, (13, 0)),
    # descriptor tables (secondary control), qualification = displacement
    (Vmcs(secondary=Secondary.DESCRIPTOR_TABLE_EXITING), "0f010510000000", {}, None),
    (Vmcs(primary=Primary.ACTIVATE_SECONDARY_CONTROLS, secondary=Secondary.DESCRIPTOR_TABLE_EXITING),
     "0f010510000000", {}, (46, 0x10)),  # sgdt [rip + 0x10]
    (Vmcs(primary=Primary.ACTIVATE_SECONDARY_CONTROLS, secondary=Secondary.DESCRIPTOR_TABLE_EXITING),
     "0f00c8", {}, (47, 0)),  # str eax
    # never exit: cli, pushfq, int n; INT3 follows the exception bitmap's bit 3
    (every_exit(), "fa", {}, None),
    (every_exit(), "9c", {}, None),
    (every_exit(), "cd30", {}, None),
    (Vmcs(), "cc", {}, None),
    (Vmcs(exception_bitmap=1 << 3), "cc", {}, (0, 0)),
]


@pytest.mark.parametrize("vmcs, code, registers, expected", SDM_TABLE,
                         ids=[f"{row[1]}-{index}" for index, row in enumerate(SDM_TABLE)])
def test_each_instruction_exits_as_the_sdm_says(vmcs, code, registers, expected):
    assert reason(run(vmcs, code, **registers)) == expected


def test_instruction_information_names_the_descriptor_table_instruction():
    vmcs = Vmcs(primary=Primary.ACTIVATE_SECONDARY_CONTROLS, secondary=Secondary.DESCRIPTOR_TABLE_EXITING)
    identities = {code: run(vmcs, code, rax=0x9000).fields["instruction identity"]
                  for code in ("0f0100", "0f0108", "0f0110", "0f0118")}
    assert identities == {"0f0100": "SGDT", "0f0108": "SIDT", "0f0110": "LGDT", "0f0118": "LIDT"}


def test_int3_is_a_software_exception_with_valid_interruption_information():
    exit = run(Vmcs(exception_bitmap=1 << 3), "cc")
    assert exit.interruption_info == 1 << 31 | 6 << 8 | 3
    assert exit.fields["type"] == "software exception" and exit.instruction_length == 1


def test_exceptions_follow_the_bitmap_and_the_page_fault_filter():
    assert exception_exit(Vmcs(), 6, None, RIP) is None
    ud = exception_exit(Vmcs(exception_bitmap=1 << 6), 6, None, RIP)
    assert ud.reason == ExitReason.EXCEPTION_OR_NMI and ud.interruption_info == 1 << 31 | 3 << 8 | 6
    gp = exception_exit(Vmcs(exception_bitmap=1 << 13), 13, 0, RIP)
    assert gp.interruption_info >> 11 & 1 and gp.interruption_error_code == 0
    pf = exception_exit(Vmcs(exception_bitmap=1 << 14), 14, 2, RIP, cr2=0x8000_0000)
    assert pf.qualification == 0x8000_0000 and pf.interruption_error_code == 2  # CR2 goes to the qualification
    # SDM 25.6.3: with bit 14 set, exit iff (PFEC & mask) == match; with it clear, iff they differ.
    present = dict(page_fault_error_code_mask=1, page_fault_error_code_match=1)
    assert exception_exit(Vmcs(exception_bitmap=1 << 14, **present), 14, 0, RIP) is None
    assert exception_exit(Vmcs(exception_bitmap=1 << 14, **present), 14, 1, RIP) is not None
    assert exception_exit(Vmcs(**present), 14, 0, RIP) is not None
    assert exception_exit(Vmcs(**present), 14, 1, RIP) is None


def test_external_interrupts_exit_with_the_pin_based_control():
    assert interrupt_exit(Vmcs(), 0x20, RIP) is None
    assert interrupt_exit(Vmcs(pin_based=PinBased.EXTERNAL_INTERRUPT_EXITING), 0x20, RIP).reason == 1


def test_qualifications_decode_by_the_sdm_names():
    assert describe_qualification(30, 0x3FD << 16 | 1 << 3) == {
        "size": 1, "direction": "IN", "string": "no", "REP": "no", "operand": "DX", "port": "0x3fd"}
    assert describe_qualification(28, 3 | 1 << 4 | 13 << 8) == {
        "control register": "CR3", "access type": "MOV FROM CR", "register": "R13"}
    assert describe_qualification(28, 3 << 4 | 1 << 6 | 9 << 16)["LMSW source data"] == "0x9"
    assert describe_qualification(29, 7 | 1 << 8) == {"debug register": "DR7", "direction": "MOV to DR",
                                                      "register": "RCX"}


def test_presets_and_field_encodings():
    assert kvm_like().primary & Primary.USE_IO_BITMAPS and not kvm_like().primary & Primary.CR3_LOAD_EXITING
    assert shadow_paging().primary & Primary.CR3_LOAD_EXITING and shadow_paging().exception_bitmap >> 14 & 1
    vmcs = Vmcs(primary=Primary.HLT_EXITING, cr3_target_values=(0x4000,))
    assert vmcs.vmread(0x4002) == 1 << 7 and vmcs.vmread(0x400A) == 1 and vmcs.vmread(0x6008) == 0x4000
    assert vmcs.controls_text() == ["HLT exiting"]


@pytest.mark.parametrize("fields, message", [
    ({"primary": Primary.MONITOR_TRAP_FLAG}, "MONITOR_TRAP_FLAG not modelled"),
    ({"secondary": Secondary.ENABLE_EPT}, "ENABLE_EPT not modelled"),
    ({"primary": 1 << 40}, "32-bit control field"),
    ({"exception_bitmap": 1 << 32}, "32 bits"),
    ({"io_bitmap_a": b"\x00"}, "4 KiB page"),
    ({"cr3_target_values": (1, 2, 3, 4, 5)}, "at most 4"),
])
def test_bad_vmcs_fields_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        Vmcs(**fields)
    with pytest.raises(ConfigError, match="has no bit"):
        msr_bitmap(read=[0x4000_0000])
    with pytest.raises(ConfigError, match="not modelled"):
        Vmcs().vmread(0x681E)


def test_lmsw_names_no_register_in_its_qualification():
    exit = run(Vmcs(cr0_guest_host_mask=TS), "0f01f3", rbx=TS)  # lmsw bx
    assert exit.qualification == 3 << 4 | TS << 16  # bits 11:8 are 0 for CLTS and LMSW (SDM table 28-3)
