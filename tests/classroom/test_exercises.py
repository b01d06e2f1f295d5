"""labkit.exercises: every reference answer passes and plausible wrong ones fail, with the same verdict on both
backends and a message that names the difference; the notebooks' nbgrader round trip (release, fill in, autograde).
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from labkit import exercises
from labkit.errors import ExerciseFailed
from labkit.monitor.trap_emulate import TrapAndEmulate
from labkit.monitor.vmx import Primary, Vmcs
from labkit.monitor.vmx.vmcs import io_bitmaps, kvm_like
from labkit.vmm.devices.vulnerable import FIFO, FIFO_SIZE, FifoDevice
from labkit.x86.layout import PML4_ADDRESS
from labkit.x86.paging import ACCESSED, ADDRESS_MASK, DIRTY, PAGE_SIZE_BIT, PRESENT, USER, WRITABLE

OK_BY_HAND = "mov dx, 0x3f8\nmov al, 'O'\nout dx, al\nmov al, 'K'\nout dx, al\nmov al, 10\nout dx, al\nhlt"
OK_BY_LOOP = """
    lea rsi, [rip + text]
    mov ecx, 3
    mov dx, 0x3f8
1:  lodsb
    out dx, al
    loop 1b
    hlt
text: .ascii "OK\\n"
"""
WRITE = "mov eax, 1\nlea rdi, [rip + message]\nmov esi, message_end - message\nint 0x80"
WRITE_TWICE_HALF = """
    mov eax, 1
    lea rdi, [rip + message]
    mov esi, 9
    int 0x80
    mov eax, 1
    lea rdi, [rip + message + 9]
    mov esi, message_end - message - 9
    int 0x80
"""


class SkipWbinvd(TrapAndEmulate):
    def on_trap(self, trap, context):
        if trap.vector == 13 and context.read(trap.regs.rip, 2) == b"\x0f\x09":
            trap.regs.rip += 2
            return
        super().on_trap(trap, context)


class SkipAnyWbinvdByDecoding(TrapAndEmulate):
    """Another correct answer: decode the instruction with labkit's decoder and skip its length."""

    def on_trap(self, trap, context):
        from labkit.monitor.vcpu import decode

        decoded = decode(context.read(trap.regs.rip, 15), trap.regs.rip)
        if trap.vector == 13 and decoded is not None and decoded.mnemonic == "wbinvd":
            trap.regs.rip += decoded.length
            return
        super().on_trap(trap, context)


class SkipOneByte(TrapAndEmulate):
    def on_trap(self, trap, context):
        if trap.vector == 13 and context.read(trap.regs.rip, 2) == b"\x0f\x09":
            trap.regs.rip += 1
            return
        super().on_trap(trap, context)


class HaltAtWbinvd(TrapAndEmulate):
    """Wrong: treats wbinvd as the end of the kernel."""

    def on_trap(self, trap, context):
        from labkit.vmm.status import Status, StatusKind

        if trap.vector == 13 and context.read(trap.regs.rip, 2) == b"\x0f\x09":
            context.stop(Status(StatusKind.HALTED, message="wbinvd"))
            return
        super().on_trap(trap, context)


BITMAP_A, BITMAP_B = io_bitmaps([0x3F8])
ONLY_UART = Vmcs(primary=Primary.USE_IO_BITMAPS, io_bitmap_a=BITMAP_A, io_bitmap_b=BITMAP_B)
ONLY_UART_FROM_KVM = kvm_like().with_controls(primary=Primary.USE_IO_BITMAPS, exception_bitmap=0,
                                              io_bitmap_a=BITMAP_A, io_bitmap_b=BITMAP_B,
                                              cr0_guest_host_mask=0, cr4_guest_host_mask=0)

# 03: change code that already ran (the patched immediate of `add rax, 1`), or let the monitor's one-shot path do it
SMC_STORE = "mov ecx, 2\nxor eax, eax\n1: add rax, 1\nmov byte ptr [rip + 1b + 3], 0x10\nloop 1b"
SMC_INC = "lea rdx, [rip + 1f + 3]\nmov ecx, 2\nxor eax, eax\n1: add rax, 1\ninc byte ptr [rdx]\nloop 1b"
SMC_NOT_YET_RUN = "xor eax, eax\nmov byte ptr [rip + 2f + 3], 0x10\njmp 2f\n2: add rax, 1"

PV_LINE = """
    mov edi, 0                  # console_io(write, 6, text)
    mov esi, 6
    lea rdx, [rip + text]
    mov eax, 18
    int 4
    mov edi, 2                  # sched_op(shutdown, poweroff)
    xor esi, esi
    mov eax, 29
    int 4
text: .ascii "pv ok\\n"
"""
PV_MULTICALL = """
    lea rdi, [rip + calls]      # multicall(calls, 2): the line and the power-off in one entry
    lea rax, [rip + text]
    mov [rdi + 32], rax
    mov esi, 2
    mov eax, 13
    int 4
    .balign 8
calls: .quad 18, 0, 0, 6, 0, 0, 0, 0
       .quad 29, 0, 2, 0, 0, 0, 0, 0
text: .ascii "pv ok\\n"
"""
PV_BYTE_BY_BYTE = PV_LINE.replace("mov esi, 6\n    lea rdx, [rip + text]\n    mov eax, 18\n    int 4", """lea rbx, [rip + text]
    mov r12d, 6
1:  mov edi, 0
    mov esi, 1
    mov rdx, rbx
    mov eax, 18
    int 4
    inc rbx
    dec r12d
    jnz 1b""")


def walk(read_entry, cr3, address):
    table = cr3 & ADDRESS_MASK
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = read_entry(table + (address >> shift & 0x1FF) * 8)
        if not entry & PRESENT:
            return None
        if level == 3 or (level in (1, 2) and entry & PAGE_SIZE_BIT):
            size = 1 << shift
            return (entry & ADDRESS_MASK & ~(size - 1)) | (address & (size - 1))
        table = entry & ADDRESS_MASK


def walk_recursive(read_entry, cr3, address, shift=39):
    entry = read_entry((cr3 & ADDRESS_MASK) + (address >> shift & 0x1FF) * 8)
    if not entry & PRESENT:
        return None
    if shift == 12 or (shift in (30, 21) and entry & PAGE_SIZE_BIT):
        return (entry & ADDRESS_MASK) & ~((1 << shift) - 1) | address & ((1 << shift) - 1)
    return walk_recursive(read_entry, entry, address, shift - 9)


def walk_without_large_pages(read_entry, cr3, address):
    table = cr3 & ADDRESS_MASK
    for shift in (39, 30, 21, 12):
        entry = read_entry(table + (address >> shift & 0x1FF) * 8)
        if not entry & PRESENT:
            return None
        table = entry & ADDRESS_MASK
    return table | address & 0xFFF


def walk_without_offset(read_entry, cr3, address):
    physical = walk(read_entry, cr3, address)
    return None if physical is None else physical & ~0xFFF


def shadow_leaf(page, writable, dirty, page_table):
    return page | PRESENT | USER | (WRITABLE if writable and dirty and not page_table else 0)


def shadow_leaf_with_accessed_and_dirty(page, writable, dirty, page_table):
    """Also right: A and D set in the shadow entry itself (the CPU would set them; the monitor tracks the kernel's)."""
    value = page | PRESENT | USER | ACCESSED | DIRTY
    return value | WRITABLE if writable and dirty and not page_table else value


def shadow_leaf_ignoring_dirty(page, writable, dirty, page_table):
    return page | PRESENT | USER | (WRITABLE if writable and not page_table else 0)


def shadow_leaf_ignoring_tables(page, writable, dirty, page_table):
    return page | PRESENT | USER | (WRITABLE if writable and dirty else 0)


def shadow_leaf_read_only(page, writable, dirty, page_table):
    return page | PRESENT | USER


def shadow_leaf_supervisor(page, writable, dirty, page_table):
    return page | PRESENT | (WRITABLE if writable and dirty and not page_table else 0)


class BoundedStore(FifoDevice):
    def store(self, value):
        if self.data_pos < FIFO_SIZE:
            self.state[FIFO + self.data_pos] = value
            self.data_pos += 1


class BoundedAndCounted(FifoDevice):
    def store(self, value):
        if self.data_pos >= FIFO_SIZE:
            self.rejected += 1
        else:
            self.state[FIFO + self.data_pos] = value
            self.data_pos += 1


class OffByOne(FifoDevice):
    def store(self, value):
        if self.data_pos <= FIFO_SIZE:
            self.state[FIFO + self.data_pos] = value
            self.data_pos += 1


class WrapsAround(FifoDevice):
    def store(self, value):
        self.state[FIFO + self.data_pos % FIFO_SIZE] = value
        self.data_pos += 1


SCAN = """
    mov rbx, ~0x5452434553504f54    # the pattern's complement: the code holds no copy of it
    not rbx
    xor ecx, ecx
1:  cmp [rcx], rbx
    je 2f
    inc rcx
    cmp rcx, 0x200000 - 7
    jb 1b
    xor ecx, ecx
2:  mov rdi, rcx
    xor eax, eax
    int 4
"""
SCAN_BY_BYTES = """
    lea rsi, [rip + pattern]
    xor ecx, ecx
1:  xor edx, edx
2:  mov al, [rcx + rdx]
    mov bl, [rsi + rdx]
    xor bl, 0xff                    # the pattern is stored inverted
    cmp al, bl
    jne 3f
    inc edx
    cmp edx, 8
    jb 2b
    jmp 4f
3:  inc rcx
    cmp rcx, 0x200000 - 7
    jb 1b
    xor ecx, ecx
4:  mov rdi, rcx
    xor eax, eax
    int 4
pattern: .byte ~0x54 & 0xff, ~0x4f & 0xff, ~0x50 & 0xff, ~0x53 & 0xff, ~0x45 & 0xff, ~0x43 & 0xff, ~0x52 & 0xff, ~0x54 & 0xff
"""
SCAN_ALIGNED = SCAN.replace("inc rcx", "add rcx, 8").replace("0x200000 - 7", "0x200000")
SCAN_OWN_COPY = SCAN.replace("mov rbx, ~0x5452434553504f54    # the pattern's complement: the code holds no copy of it\n"
                             "    not rbx", "mov rbx, 0x5452434553504f54")

DIRTY_THREE = "mov byte ptr [0x100000], 1\nmov byte ptr [0x101000], 1\nmov byte ptr [0x102000], 1\nhlt"
DIRTY_STRADDLING = "mov qword ptr [0x100ffc], -1\nmov byte ptr [0x105000], 1\nhlt"
DIRTY_ONE_PAGE = "mov byte ptr [0x100000], 1\nmov byte ptr [0x100800], 1\nmov byte ptr [0x100fff], 1\nhlt"
DIRTY_TWO_STRADDLES = "mov qword ptr [0x100ffc], -1\nmov qword ptr [0x102ffc], -1\nhlt"


def changed_pages(before, after):
    return [page for page in range(len(before) // 4096)
            if before[page * 4096:(page + 1) * 4096] != after[page * 4096:(page + 1) * 4096]]


def changed_pages_by_view(before, after):
    old, new = memoryview(before).cast("Q"), memoryview(after).cast("Q")
    return sorted({index // 512 for index in range(len(old)) if old[index] != new[index]})


def changed_pages_first_byte(before, after):
    return [page for page in range(len(before) // 4096) if before[page * 4096] != after[page * 4096]]


def changed_addresses(before, after):
    return [page * 4096 for page in changed_pages(before, after)]


# notebook 09: the qcow2 lookup (header fields from qcow2.rst "Header"; L1/L2 entries' offset bits 9-55)
OFFSET_BITS = 0x00FF_FFFF_FFFF_FE00


def _lookup(file, offset, *, cluster=None, l2_mask=OFFSET_BITS):
    file.seek(0)
    header = file.read(48)
    cluster = cluster or 1 << struct.unpack_from(">I", header, 20)[0]
    l1_index, l2_index = divmod(offset // cluster, cluster // 8)
    if l1_index >= struct.unpack_from(">I", header, 36)[0]:
        return None
    file.seek(struct.unpack_from(">Q", header, 40)[0] + 8 * l1_index)
    table = struct.unpack(">Q", file.read(8))[0] & OFFSET_BITS
    if not table:
        return None
    file.seek(table + 8 * l2_index)
    host = struct.unpack(">Q", file.read(8))[0] & l2_mask
    return host + offset % cluster if host else None


def cluster_lookup(file, offset):
    return _lookup(file, offset)


def cluster_lookup_unmasked(file, offset):
    """Takes the L2 entry as it is: bit 63 (COPIED) is part of the offset."""
    return _lookup(file, offset, l2_mask=(1 << 64) - 1)


def cluster_lookup_64k(file, offset):
    """QEMU's default cluster size, not the header's."""
    return _lookup(file, offset, cluster=65536)


def cluster_lookup_cluster_start(file, offset):
    """The cluster, not the byte in it."""
    found = cluster_lookup(file, offset)
    return None if found is None else found - offset % exercises.LOOKUP_CLUSTER


def damaged_files(disk):
    from labkit.backup.files import SECTOR, read_layout

    return [entry.name for entry in read_layout(disk).files
            if hashlib.sha256(disk.read(entry.first_sector * SECTOR, entry.length)).digest() != entry.sha256]


def damaged_files_whole_sectors(disk):
    """Hashes every sector the file occupies, slack included."""
    from labkit.backup.files import SECTOR, read_layout

    return [entry.name for entry in read_layout(disk).files
            if hashlib.sha256(disk.read(entry.first_sector * SECTOR, entry.sectors * SECTOR)).digest() != entry.sha256]


def damaged_files_directory_only(disk):
    """Trusts the directory's checksum: the files' own bytes are never read."""
    from labkit.backup.files import read_layout

    read_layout(disk)
    return []


# exercise: (check, [right answers], [(wrong answer, words its message must contain)])
CASES = {
    "print_ok": (exercises.check_print_ok, [OK_BY_HAND, OK_BY_LOOP], [
        (OK_BY_HAND.replace("mov al, 10\nout dx, al\n", ""), "printed 'OK'"),
        (OK_BY_HAND.replace("'O'", "'o'").replace("'K'", "'k'"), "printed 'ok\\n'"),
        (OK_BY_HAND.replace("0x3f8", "0x2f8"), "printed ''"),
    ]),
    "five_exits": (exercises.check_five_exits, ["mov dx, 0x3fd\nmov ecx, 5\n1: in al, dx\nloop 1b\nhlt",
                                                "in al, 0x80\n" * 5 + "hlt"], [
        ("mov dx, 0x3f8\nmov ecx, 5\n1: out dx, al\nloop 1b\nhlt", "printed '\\x00"),
        ("mov dx, 0x3fd\nmov ecx, 4\n1: in al, dx\nloop 1b\nhlt", "made 4 IO exit(s)"),
        ("mov dx, 0x3fd\nmov ecx, 5\n1: in al, dx\nout 0x80, al\nloop 1b\nhlt", "made 10 IO exit(s)"),
    ]),
    "write_without_fault": (exercises.check_write_without_fault, [WRITE, WRITE_TWICE_HALF], [
        (WRITE.replace("int 0x80", "syscall"), "printed ''"),
        ("lea r15, [rip + 1f]\nmov dx, 0x3f8\nmov al, 'h'\nout dx, al\n1:", "#GP (error 0x0) from ring 3"),
        (WRITE.replace("message_end - message", "5"), "printed 'hello'"),
    ]),
    "page_fault": (exercises.check_page_fault, ["lea r15, [rip + 1f]\nmov byte ptr [0x40000000], 1\n1:",
                                                "lea r15, [rip + 1f]\nmov qword ptr [0x7fff0000], rax\n1:"], [
        ("lea r15, [rip + 1f]\nmov byte ptr [SECRET], 1\n1:", "error 0x7"),
        ("lea r15, [rip + 1f]\nmov al, byte ptr [0x40000000]\n1:", "error 0x4"),
        ("lea r15, [rip + 1f]\nmov byte ptr [0x40000000], 1\n1: lea r15, [rip + 1f]\nmov rax, cr3\n1:",
         "#GP (error 0x0) from ring 3"),
    ]),
    "wbinvd_monitor": (exercises.check_wbinvd_monitor, [SkipWbinvd, SkipAnyWbinvdByDecoding], [
        (TrapAndEmulate, "unemulated instruction at RIP"),
        (HaltAtWbinvd, "the console stops after line 2"),
        (SkipWbinvd(), "not a subclass of TrapAndEmulate"),
    ]),
    "sensitive_routine": (exercises.check_sensitive_routine, ["mov eax, cs", "cli\npushfq\npop rax",
                                                              "sgdt [rip + scratch]\nmov rax, [rip + scratch + 2]"], [
        ("rdtsc\nshl rdx, 32\nor rax, rdx", "nondeterminism"),
        ("mov rax, cr0", "both natively and under the monitor"),
        ("str ax\nmovzx rax, ax", "both natively and under the monitor"),
    ]),
    "translation_set": (exercises.check_translation_set, [{"pushfq", "popfq", "sgdt", "smsw", "iretq"}], [
        ({"pushfq", "popfq", "sgdt", "smsw", "iretq", "cli"}, "native without 'cli' too"),
        ({"pushfq", "sgdt", "smsw", "iretq"}, "IF in the interrupted code"),
        ({"pushfq", "popfq", "sgdt", "smsw"}, "unemulated instruction at RIP"),
    ]),
    "one_notification": (exercises.check_one_notification, [lambda kib: (4096, kib // 4), lambda kib: (4096, 16),
                                                           lambda kib: (1024, kib)], [
        (lambda kib: (256, 16), "16 KiB: 4 notification(s)"),
        (lambda kib: (kib * 1024, 1), "more than a page"),
        (lambda kib: (2048, max(1, kib // 4)), "4 KiB: 2 notification(s)"),
    ]),
    "output_exits_only": (exercises.check_output_exits_only, [ONLY_UART, ONLY_UART_FROM_KVM], [
        (Vmcs(primary=Primary.UNCONDITIONAL_IO_EXITING), "not an out to 0x3f8"),
        (kvm_like(), "also exits"),
        (Vmcs(), "0 out exits"),
    ]),
    "cr3_loads_only": (exercises.check_cr3_loads_only, [Vmcs(primary=Primary.CR3_LOAD_EXITING),
                                                        Vmcs(primary=Primary.CR3_LOAD_EXITING, cr3_target_values=(0x1000,))], [
        (Vmcs(primary=Primary.CR3_LOAD_EXITING | Primary.CR3_STORE_EXITING), "not a CR3 load (the first: 'mov rax, cr3')"),
        (Vmcs(primary=Primary.CR3_LOAD_EXITING, cr3_target_values=(PML4_ADDRESS,)), "1 CR3 load(s) ran with no exit"),
        (Vmcs(cr0_guest_host_mask=(1 << 64) - 1), "'mov cr0, rax'"),
    ]),
    "self_modifying": (exercises.check_self_modifying, [SMC_STORE, SMC_INC], [
        (SMC_NOT_YET_RUN, "dropped no translation"),
        ("mov ecx, 3\nxor eax, eax\n1: add rax, 1\nmov byte ptr [rip + scratch], 0x10\nloop 1b", "rax = 0x3 both ways"),
    ]),
    "paravirtual_port": (exercises.check_paravirtual_port, [PV_LINE, PV_MULTICALL], [
        ("cli\nmov dx, 0x3f8\nmov al, 'p'\nout dx, al\nhlt", "privileged instruction(s) trapped"),
        (PV_BYTE_BY_BYTE, "7 entries into the hypervisor (console_io x 6, sched_op x 1)"),
        (PV_LINE.replace("mov edi, 2 ", "mov edi, 1 "), "not powered off"),
    ]),
    "page_walk": (exercises.check_page_walk, [walk, walk_recursive], [
        (walk_without_large_pages, "for 0x0 under CR3 0x100000 your walk gives None, the kernel's tables 0x0"),
        (walk_without_offset, "for 0x8123 under CR3 0x100000 your walk gives 0x8000"),
        (lambda read_entry, cr3, address: read_entry(address), "raised GuestMemoryError"),
    ]),
    "shadow_leaf": (exercises.check_shadow_leaf, [shadow_leaf, shadow_leaf_with_accessed_and_dirty], [
        (shadow_leaf_ignoring_dirty, "line 9 is 'random edits"),
        (shadow_leaf_ignoring_tables, "page-table store(s), the kernel made 38"),
        (shadow_leaf_supervisor, "without U/S"),
        (shadow_leaf_read_only, "without R/W: the kernel's store"),
    ]),
    "bounded_fifo": (exercises.check_bounded_fifo, [BoundedStore, BoundedAndCounted], [
        (OffByOne, "the device called host_debug_dump, the bounded one checksum"),
        (WrapsAround, "fifo holds 02 41"),
        (BoundedStore(), "not a subclass of FifoDevice"),
    ]),
    "secret_scanner": (exercises.check_secret_scanner, [SCAN, SCAN_BY_BYTES], [
        (SCAN_ALIGNED, "RDI = 0x0 with the secret planted at 0x1c3a5d"),
        (SCAN_OWN_COPY, "your own code's copy of the pattern"),
    ]),
    "dirty_pages": (exercises.check_dirty_pages, [DIRTY_THREE, DIRTY_STRADDLING], [
        (DIRTY_ONE_PAGE, "the diff holds 1 page(s) (at 0x100000)"),
        (DIRTY_TWO_STRADDLES, "the diff holds 4 page(s)"),
    ]),
    "changed_pages": (exercises.check_changed_pages, [changed_pages, changed_pages_by_view], [
        (changed_pages_first_byte, "10 changed page(s) missing (the first at 0x101000)"),
        (changed_addresses, "page 1048576 (address 0x100000000) is outside"),
    ]),
    "cluster_lookup": (exercises.check_cluster_lookup, [cluster_lookup], [
        (cluster_lookup_unmasked, "past the end of the"),
        (cluster_lookup_64k, "lookup gave None, not a file offset"),
        (cluster_lookup_cluster_start, "not the guest's byte"),
    ]),
    "damaged_files": (exercises.check_damaged_files, [damaged_files], [
        (damaged_files_whole_sectors, "named but intact (what changed is past the file's end, or nothing): "
                                      "notes.txt, photo.raw"),
        (damaged_files_directory_only, "damaged but not named: log.txt, thesis.tex"),
    ]),
}


def _cases(right: bool):
    for name, (check, good, bad) in CASES.items():
        for index, answer in enumerate(good if right else [answer for answer, _ in bad]):
            words = None if right else bad[index][1]
            yield pytest.param(check, answer, words, id=f"{name}-{'right' if right else 'wrong'}{index}")


@pytest.mark.parametrize("check, answer, words", list(_cases(True)))
def test_reference_answers_pass(backend_name, check, answer, words):
    verdict = check(answer, backend=backend_name)
    assert verdict.passed, str(verdict)
    verdict.require()
    assert ("KVM" if backend_name == "kvm" else "emulator") in verdict.where


@pytest.mark.parametrize("check, answer, words", list(_cases(False)))
def test_wrong_answers_fail_naming_the_difference(backend_name, check, answer, words):
    verdict = check(answer, backend=backend_name)
    assert not verdict.passed, str(verdict)
    assert words in verdict.observed, str(verdict)
    with pytest.raises(ExerciseFailed, match="not yet"):
        verdict.require()
    with pytest.raises(AssertionError):  # nbgrader counts a failed test cell by its exception
        verdict.require()


@pytest.mark.unit
def test_every_exercise_has_two_wrong_answers():
    for name, (_, good, bad) in CASES.items():
        assert good and len(bad) >= 2, name


def test_an_answer_that_does_not_assemble_is_refused_with_the_assembler_message():
    verdict = exercises.check_print_ok("mov dx, 0x3f8\nmvo al, 1\nhlt", backend="emu")
    assert not verdict.passed
    assert "could not run: AssemblyError" in verdict.observed and "mvo" in verdict.observed


def test_a_guest_that_never_stops_is_stopped_and_named():
    verdict = exercises.check_print_ok("jmp .", backend="emu")
    assert not verdict.passed and "timeout" in verdict.observed


# -- the nbgrader round trip -----------------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
ROUND_TRIP = "00-welcome"
WRONG_FIVE_EXITS = "FIVE_EXITS = 'mov dx, 0x3f8\\nmov ecx, 5\\n1: out dx, al\\nloop 1b\\nhlt'"


def _exercises(*arguments, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "scripts" / "exercises"), *map(str, arguments)],
                          capture_output=True, text=True, env=env, timeout=600)


def _answered(released, source, replace=None):
    """The released notebook with each solution cell filled in from the instructor's notebook (or ``replace``)."""
    by_id = {cell["metadata"].get("nbgrader", {}).get("grade_id"): cell for cell in source["cells"]}
    notebook = __import__("copy").deepcopy(released)
    for cell in notebook["cells"]:
        grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id")
        if cell["metadata"].get("nbgrader", {}).get("solution"):
            cell["source"] = (replace or {}).get(grade_id, by_id[grade_id]["source"])
    return notebook


def _exercise_section(notebook):
    """The notebook from its "## Exercises" cell on: what a student may hand in to be graded (nbgrader grades the
    solution and test cells it finds; the lesson's cells above need not run again)."""
    cells = notebook["cells"]
    start = next(index for index, cell in enumerate(cells)
                 if cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith("## Exercises"))
    return dict(notebook, cells=cells[start:])


ROUND_TRIP_SECTION = "06-memory-virtualization"
"""Handed in as its Exercises section only (the lesson above it takes most of a minute to run)."""
WRONG_SHADOW_LEAF = ("def shadow_leaf(page, writable, dirty, page_table):\n"
                     "    return page | PRESENT | USER | (WRITABLE if writable and dirty else 0)")


@pytest.mark.slow
@pytest.mark.emu
def test_release_and_autograde_give_full_marks_to_the_reference_and_partial_to_a_wrong_answer(tmp_path):
    import json
    import os

    # No skip: nbgrader is in the test extra (scripts/test installs it); without it the script says how to install.
    course, submissions = tmp_path / "course", tmp_path / "submitted"
    done = _exercises("release", course, ROUND_TRIP, ROUND_TRIP_SECTION)
    assert done.returncode == 0, done.stdout + done.stderr
    released = {name: json.loads((course / "release" / name / f"{name}.ipynb").read_text())
                for name in (ROUND_TRIP, ROUND_TRIP_SECTION)}
    text = json.dumps(released[ROUND_TRIP])
    assert "BEGIN SOLUTION" not in text and "mov al, 'O'" not in text, "the release still holds a reference answer"
    assert text.count("raise NotImplementedError()") == 2
    text = json.dumps(released[ROUND_TRIP_SECTION])
    assert "BEGIN SOLUTION" not in text and "value |= WRITABLE" not in text and "def walk(" not in text
    assert text.count("raise NotImplementedError()") == 2
    sources = {name: json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
               for name in (ROUND_TRIP, ROUND_TRIP_SECTION)}
    wrong = {"exercises-00-five-answer": WRONG_FIVE_EXITS, "exercises-06-leaf-answer": WRONG_SHADOW_LEAF}
    for student, replace in (("reference", None), ("wrong", wrong), ("blank", False)):
        (submissions / student).mkdir(parents=True)
        for name, source in sources.items():
            notebook = released[name] if replace is False else _answered(released[name], source, replace)
            if name == ROUND_TRIP_SECTION:
                notebook = _exercise_section(notebook)
            (submissions / student / f"{name}.ipynb").write_text(json.dumps(notebook))
    done = _exercises("autograde", course, submissions, env=dict(os.environ, LABKIT_BACKEND="emu"))
    assert done.returncode == 0, done.stdout + done.stderr
    grades = {tuple(line.split(",")[:2]): line.split(",")[2:]
              for line in (course / "grades.csv").read_text().splitlines()[1:]}
    assert grades == {(student, name): [score, "4"] for student, scores in
                      (("reference", ("4", "4")), ("wrong", ("2", "2")), ("blank", ("0", "0")))
                      for name, score in zip((ROUND_TRIP, ROUND_TRIP_SECTION), scores)}, done.stdout
    for name, message in ((ROUND_TRIP, "five silent exits: not yet"),
                          (ROUND_TRIP_SECTION, "the shadow page-table entry: not yet")):
        graded = json.loads((course / "autograded" / "wrong" / name / f"{name}.ipynb").read_text())
        failed = [cell for cell in graded["cells"] if any(output.get("ename") for output in cell.get("outputs", []))]
        assert len(failed) == 1 and message in json.dumps(failed[0]), name
    assert "page-table store(s), the kernel made" in json.dumps(failed[0])


@pytest.mark.unit
def test_every_notebook_with_exercises_has_nbgrader_cells_that_release_cleanly():
    """What ``scripts/exercises release`` needs of each notebook (00-08; the round trip above releases two of them):
    unique grade ids, each solution region marked, and each answer followed by its graded check with points."""
    import json

    names = sorted(path.stem for path in (ROOT / "notebooks").glob("0[0-8]-*.ipynb"))
    assert len(names) == 9
    for name in names:
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        graded = [(index, cell["metadata"]["nbgrader"]) for index, cell in enumerate(cells)
                  if "nbgrader" in cell["metadata"]]
        ids = [meta["grade_id"] for _, meta in graded]
        assert len(ids) == len(set(ids)), f"{name}: grade ids repeat"
        answers = [index for index, meta in graded if meta["solution"]]
        for index in answers:
            source = "".join(cells[index]["source"])
            assert source.startswith("### BEGIN SOLUTION\n") and source.rstrip().endswith("### END SOLUTION"), name
            check = cells[index + 1]["metadata"].get("nbgrader", {})
            assert check.get("grade") and check.get("points", 0) > 0 and check.get("locked"), f"{name} cell {index + 1}"
        assert len(answers) >= 2, f"{name} has {len(answers)} exercise(s); every notebook ends with two or more"


def test_autograde_without_a_release_says_what_to_do(tmp_path):
    done = _exercises("autograde", tmp_path / "course", tmp_path)
    assert done.returncode == 2 and "run 'scripts/exercises release" in done.stderr

