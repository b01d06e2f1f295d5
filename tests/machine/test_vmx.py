"""The VMX model on both backends: minikernel64 unmodified under one VMCS setting after another.

For each setting the exits must be the ones the Intel SDM's rules give for the
kernel's instructions (the table below, written from guests/minikernel64.S and
SDM vol. 3C, 26.1), and the kernel's console must equal its native console:
under VMX the kernel cannot tell, whatever exits.
"""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.monitor.trap_emulate import minikernel
from labkit.monitor.vmx import ExitReason, PinBased, Primary, Secondary, Vmcs, io_bitmaps
from labkit.monitor.vmx.model import VmxReport, exit_table, run_vmx
from labkit.monitor.vmx.vmcs import BOOT_CR0, every_exit
from labkit.vmm.status import StatusKind

CONSOLE_BYTES = 514
"""minikernel64's native console: one IN (LSR poll) and one OUT (THR) per byte."""
TS = 1 << 3
IN_LSR = "size 1, direction IN, string no, REP no, operand DX, port 0x3fd"
OUT_THR = "size 1, direction OUT, string no, REP no, operand DX, port 0x3f8"
SECONDARY = Primary.ACTIVATE_SECONDARY_CONTROLS

# setting -> (Vmcs, {basic exit reason: [(instruction, decoded qualification), ...] in order, or a count})
SETTINGS = {
    "no controls": (Vmcs(), {}),
    "HLT exiting": (Vmcs(primary=Primary.HLT_EXITING), {12: [("hlt", "-")]}),
    "unconditional I/O exiting": (Vmcs(primary=Primary.UNCONDITIONAL_IO_EXITING), {30: 2 * CONSOLE_BYTES}),
    "I/O bitmap: port 0x3f8 only": (Vmcs(primary=Primary.USE_IO_BITMAPS | Primary.UNCONDITIONAL_IO_EXITING,
                                         io_bitmap_a=io_bitmaps([0x3F8])[0]), {30: CONSOLE_BYTES}),
    "I/O bitmap: port 0x3fd only": (Vmcs(primary=Primary.USE_IO_BITMAPS, io_bitmap_a=io_bitmaps([0x3FD])[0]),
                                    {30: CONSOLE_BYTES}),
    "CR3-load exiting": (Vmcs(primary=Primary.CR3_LOAD_EXITING),
                         {28: [("mov cr3, rax", "control register CR3, access type MOV TO CR, register RAX")]}),
    "CR3-load exiting, CR3-target 0x4000": (Vmcs(primary=Primary.CR3_LOAD_EXITING, cr3_target_values=(0x4000,)), {}),
    "CR3-store exiting": (Vmcs(primary=Primary.CR3_STORE_EXITING),
                          {28: [("mov rax, cr3", "control register CR3, access type MOV FROM CR, register RAX")] * 2}),
    "CR0 mask TS": (Vmcs(cr0_guest_host_mask=TS),
                    {28: [("mov cr0, rax", "control register CR0, access type MOV TO CR, register RAX"),
                          ("clts", "control register CR0, access type CLTS")]}),
    "CR0 mask TS, shadow TS = 1": (Vmcs(cr0_guest_host_mask=TS, cr0_read_shadow=BOOT_CR0 | TS),
                                   {28: [("clts", "control register CR0, access type CLTS")]}),
    "CR4 mask all": (Vmcs(cr4_guest_host_mask=(1 << 64) - 1), {}),
    "MOV-DR, CR8, RDTSC exiting": (Vmcs(primary=Primary.MOV_DR_EXITING | Primary.CR8_LOAD_EXITING
                                        | Primary.CR8_STORE_EXITING | Primary.RDTSC_EXITING), {}),
    "exception bitmap #UD": (Vmcs(exception_bitmap=1 << 6),
                             {0: [("ud2", "vector #UD, type hardware exception")] * 2}),
    "exception bitmap #PF": (Vmcs(exception_bitmap=1 << 14), {0: [(
        "mov rax, qword ptr [rbx]",
        "vector #PF, type hardware exception, linear address 0x80000000, error code 0x0")]}),
    "#PF filtered out (P bit must match 1)": (Vmcs(exception_bitmap=1 << 14, page_fault_error_code_mask=1,
                                                   page_fault_error_code_match=1), {}),
    "descriptor-table exiting, secondary off": (Vmcs(secondary=Secondary.DESCRIPTOR_TABLE_EXITING), {}),
    "descriptor-table exiting": (Vmcs(primary=SECONDARY, secondary=Secondary.DESCRIPTOR_TABLE_EXITING),
                                 {46: [("lgdt", "instruction identity LGDT"), ("lidt", "instruction identity LIDT"),
                                       ("sgdt", "instruction identity SGDT"), ("sidt", "instruction identity SIDT")]}),
    "every exit": (every_exit(), {0: 3, 12: 1, 28: 5, 30: 2 * CONSOLE_BYTES, 46: 4}),
}


@pytest.fixture(scope="module")
def native_console():
    return Guest.named("minikernel64").expected["console"]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_exits_match_the_sdm_table_and_the_kernel_cannot_tell(backend_name, native_console, setting):
    vmcs, expected = SETTINGS[setting]
    result = run_vmx("minikernel64", vmcs, backend_name)
    report = result.monitor
    assert isinstance(report, VmxReport)
    assert result.status.kind == StatusKind.HALTED, str(result.status)
    assert result.console == native_console
    assert set(report.exit_counts) == set(expected)
    for reason, want in expected.items():
        if isinstance(want, int):
            assert report.exit_counts[reason] == want
            continue
        got = [(exit.instruction, exit.qualification_text()) for exit in report.exits_of(ExitReason(reason))]
        assert len(got) == len(want) == report.exit_counts[reason]
        for (instruction, qualification), (prefix, text) in zip(got, want):
            assert instruction.startswith(prefix) and qualification.startswith(text), (instruction, qualification)
    assert report.exits_dropped == 0


def test_io_exits_carry_port_and_direction_in_the_order_the_kernel_ran(backend_name):
    report = run_vmx("minikernel64", Vmcs(primary=Primary.UNCONDITIONAL_IO_EXITING), backend_name).monitor
    texts = [exit.qualification_text() for exit in report.exits]
    assert texts == [IN_LSR, OUT_THR] * CONSOLE_BYTES
    assert all(exit.instruction_length == 1 for exit in report.exits)
    assert report.non_root.get("in", 0) == report.non_root.get("out", 0) == 0


def test_without_exits_the_candidates_run_as_in_non_root_operation(backend_name):
    report = run_vmx("minikernel64", Vmcs(), backend_name).monitor
    assert report.exit_count == 0
    assert report.non_root["in"] == report.non_root["out"] == CONSOLE_BYTES
    assert report.non_root["hlt"] == 1 and report.non_root["sgdt"] == 1 and report.non_root["pushfq"] == 2
    assert report.non_root["mov cr3, rax"] == 1 and report.non_root["mov rax, cr3"] == 2


def test_the_vmm_updates_the_cr0_read_shadow_when_it_handles_the_exit(backend_name):
    report = run_vmx("minikernel64", Vmcs(cr0_guest_host_mask=TS), backend_name).monitor
    assert report.vmcs.cr0_read_shadow == BOOT_CR0
    assert report.final_vmcs.cr0_read_shadow == BOOT_CR0  # set by mov cr0 (TS = 1), cleared by clts
    assert report.translation.vcpu.cr0 == BOOT_CR0


STUDENT = """
    mov rax, 0x401
    mov dr7, rax
    mov rbx, dr7
    mov rax, 5
    mov cr8, rax
    mov rcx, cr8
    rdtsc
    lea rax, [rbx + 5]
"""
"""The console shows DR7 + 5, not CR8: Unicorn has no TPR (CR8 reads 0 there, 5 on KVM), a backend difference."""


def test_debug_registers_cr8_and_rdtsc_in_the_students_routine(backend_name):
    kernel = minikernel(["control_registers"], student=STUDENT)
    native = Machine(kernel, backend=backend_name).run(timeout=10)
    vmcs = Vmcs(primary=Primary.MOV_DR_EXITING | Primary.CR8_LOAD_EXITING | Primary.CR8_STORE_EXITING
                | Primary.RDTSC_EXITING)
    result = run_vmx(kernel, vmcs, backend_name)
    assert native.status.kind == result.status.kind == StatusKind.HALTED, (native.status, result.status)
    assert result.console == native.console and "rax = 0x406" in result.console
    got = [(int(exit.reason), exit.qualification_text()) for exit in result.monitor.exits]
    assert got == [(29, "debug register DR7, direction MOV to DR, register RAX"),
                   (29, "debug register DR7, direction MOV from DR, register RBX"),
                   (28, "control register CR8, access type MOV TO CR, register RAX"),
                   (28, "control register CR8, access type MOV FROM CR, register RCX"),
                   (16, "-")]
    quiet = run_vmx(kernel, Vmcs(), backend_name)
    assert quiet.console == native.console and quiet.monitor.exit_count == 0
    assert quiet.monitor.non_root["rdtsc"] == 1


def test_an_external_interrupt_exits_even_with_if_clear(backend_name):
    kernel = minikernel(["timer"])
    vmcs = Vmcs(pin_based=PinBased.EXTERNAL_INTERRUPT_EXITING)
    result = run_vmx(kernel, vmcs, backend_name, timer=True)
    assert [int(exit.reason) for exit in result.monitor.exits] == [1]
    assert result.monitor.exits[0].instruction == "external interrupt, vector 0x20"
    assert "  ticks after sti: 0x1" in result.console  # delivered when the kernel's IF allowed
    assert run_vmx(kernel, Vmcs(), backend_name, timer=True).monitor.exit_count == 0


def test_the_exit_table_says_it_is_a_model_and_where_it_ran(backend_name):
    result = run_vmx("minikernel64", every_exit(), backend_name)
    table = exit_table(result)
    assert table.title.startswith("VM exits of a model of VMX run on ")
    assert ("KVM (" if backend_name == "kvm" else "the emulator (Unicorn") in table.title
    assert [row[0] for row in table.rows] == ["0", "12", "28", "30", "46"]
    assert table.rows[3][1] == "I/O instruction" and table.rows[3][2] == str(2 * CONSOLE_BYTES)


MACHINE_STATUS = """
    smsw ax
    or ax, 8
    lmsw ax
    mov rax, cr4
    or rax, 0x80
    mov cr4, rax
    mov rbx, cr4
    smsw rax
    shl rax, 32
    or rax, rbx
"""
"""LMSW sets CR0.TS, a MOV to CR4 sets PGE; the kernel prints what SMSW and MOV from CR4 then read."""


@pytest.mark.parametrize("masks, exits", [
    ((0, 0), []),
    ((TS, 0x80), ["control register CR0, access type LMSW, LMSW operand register, LMSW source data 0x39",
                  "control register CR4, access type MOV TO CR, register RAX"]),
    (((1 << 64) - 1, (1 << 64) - 1), ["control register CR0, access type LMSW, LMSW operand register, "
                                      "LMSW source data 0x39",
                                      "control register CR4, access type MOV TO CR, register RAX"]),
])
def test_lmsw_and_cr4_through_the_masks_read_back_as_natively(backend_name, masks, exits):
    kernel = minikernel(["control_registers"], student=MACHINE_STATUS)
    native = Machine(kernel, backend=backend_name).run(timeout=10)
    assert "  rax = 0x80010039000006a0" in native.console  # CR0 with TS; CR4 0x620 with PGE
    result = run_vmx(kernel, Vmcs(cr0_guest_host_mask=masks[0], cr4_guest_host_mask=masks[1]), backend_name)
    assert result.console == native.console
    assert [exit.qualification_text() for exit in result.monitor.exits] == exits


def test_an_operand_outside_guest_ram_ends_the_run_with_a_clear_error(backend_name):
    guest = Guest.from_asm("mov rax, cr0\nlmsw word ptr [0x3ffffff0]\nhlt\n", name="lmsw-outside-ram")
    result = run_vmx(guest, Vmcs(cr0_guest_host_mask=TS), backend_name, 5)
    assert result.status.kind == StatusKind.ERROR and result.regs.rip == 0x8003
    assert result.status.message.startswith("at RIP 0x8003: guest-physical range [0x3ffffff0, 0x3ffffff2) is not "
                                            "inside one memory region")
