"""Tiny hand-encoded guests for the KVM backend tests, and how to load them.

Each guest is a few bytes of machine code with its Intel-syntax source beside
it, so a reader can check the encoding against the SDM (vol. 2) or ``objdump``.
"""

from __future__ import annotations

from labkit.x86 import boot, layout
from labkit.x86.idt import Gate, encode_gate64
from labkit.x86.state import Regs, Segment

ENTRY = 0x8000
MMIO_ADDRESS = 0x1000_0000  # above RAM, below the 1 GiB the boot page tables map: an MMIO exit

# Real mode (16-bit): port I/O in every width, then hlt.
PORT_ROUND_TRIP16 = bytes.fromhex(
    "b0 48"        # mov al, 'H'
    "e6 10"        # out 0x10, al
    "ba f8 03"     # mov dx, 0x3f8
    "b8 ef be"     # mov ax, 0xbeef
    "ef"           # out dx, ax
    "e4 11"        # in al, 0x11
    "88 c3"        # mov bl, al
    "ed"           # in ax, dx
    "89 c1"        # mov cx, ax
    "66 ed"        # in eax, dx
    "66 89 c6"     # mov esi, eax
    "f4"           # hlt
)

# Real mode: rep outsb of 5 bytes from 0x9000, rep insb of 3 bytes to 0x9100, hlt.
STRING_IO16 = bytes.fromhex(
    "be 00 90"     # mov si, 0x9000
    "b9 05 00"     # mov cx, 5
    "ba f8 03"     # mov dx, 0x3f8
    "fc"           # cld
    "f3 6e"        # rep outsb
    "bf 00 91"     # mov di, 0x9100
    "b9 03 00"     # mov cx, 3
    "f3 6c"        # rep insb
    "f4"           # hlt
)

# Real mode: out 0x10, al; hlt  (at ENTRY) and out 0x20, al; hlt (at ENTRY + 0x100).
OUT_HLT16 = bytes.fromhex("e6 10 f4")
OUT_HLT16_OTHER = bytes.fromhex("e6 20 f4")

# 64-bit: an MMIO read and an MMIO write above RAM.
MMIO64 = bytes.fromhex(
    "48 8b 04 25 00 00 00 10"            # mov rax, [0x10000000]
    "48 89 c3"                           # mov rbx, rax
    "c7 04 25 10 00 00 10 44 33 22 11"   # mov dword ptr [0x10000010], 0x11223344
    "f4"                                 # hlt
)

# 64-bit: load an IDT with limit 0 (descriptor at 0x9000), then #UD: no gate -> #GP -> #DF -> triple fault.
TRIPLE_FAULT64 = bytes.fromhex(
    "0f 01 1c 25 00 90 00 00"   # lidt [0x9000]
    "0f 0b"                     # ud2
)
EMPTY_IDT_DESCRIPTOR = bytes(10)  # limit 0, base 0

# 64-bit: write one byte into page 0x20 and one into page 0x31, hlt.
DIRTY64 = bytes.fromhex(
    "c6 04 25 00 00 02 00 01"   # mov byte ptr [0x20000], 1
    "c6 04 25 00 10 03 00 02"   # mov byte ptr [0x31000], 2
    "f4"                        # hlt
)

ENDLESS = bytes.fromhex("eb fe")  # jmp $   (same bytes in every mode)
HLT = bytes.fromhex("f4")


def load_real_mode(backend, code: bytes, entry: int = ENTRY) -> None:
    """Flat real mode by hand (all segments 0), ``code`` at ``entry``, SP = 0x7000."""
    backend.memory[entry:entry + len(code)] = code
    sregs = backend.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, Segment(base=0, limit=0xFFFF, selector=0, type=0xB if name == "cs" else 0x3))
    backend.set_sregs(sregs)
    backend.set_regs(Regs(rip=entry, rsp=0x7000))


def load_boot_state(backend, mode: int, code: bytes, *, user: bool = False, entry: int = ENTRY) -> None:
    """The shared start state (``labkit.x86.boot.boot_state``) plus ``code`` at ``entry``."""
    boot.load_boot_state(backend, boot.boot_state(mode, entry, len(backend.memory), user=user), code)


class RecordingDispatcher:
    """A dispatcher that records every access and answers reads from ``answers`` (port/address -> value)."""

    def __init__(self, answers=None, stop_on=()):
        self.stop = False
        self.answers = dict(answers or {})
        self.stop_on = set(stop_on)
        self.log: list[tuple] = []

    def pio(self, port, size, is_write, value, rip):
        self.log.append(("pio", port, size, is_write, value, rip))
        self.stop = port in self.stop_on
        if is_write:
            return 0
        answer = self.answers.get(port, 0)
        return answer() if callable(answer) else answer

    def mmio(self, address, size, is_write, value, rip):
        self.log.append(("mmio", address, size, is_write, value, rip))
        self.stop = address in self.stop_on
        return self.answers.get(address, 0)


# --- guests for kick, interrupts and memory regions (64-bit CPL0 unless a test passes user=True) ---

# `in` in a loop, folding each value into RBX and RDX: any value lost, doubled or
# read into a stale RAX changes the final registers.
IN_LOOP64 = bytes.fromhex(
    "b9 b8 0b 00 00"     # mov ecx, 3000
    "e5 20"              # 1: in eax, 0x20
    "01 c3"              # add ebx, eax
    "48 c1 c3 07"        # rol rbx, 7
    "48 31 da"           # xor rdx, rbx
    "ff c9"              # dec ecx
    "75 f1"              # jnz 1b
    "f4"                 # hlt
)
IN_LOOP64_AFTER_IN = ENTRY + 7  # RIP once the `in` has completed
IN_LOOP64_ITERATIONS = 3000

HANDLER = 0x9000
INTERRUPT_VECTOR = 0x20
# The handler for INTERRUPT_VECTOR: count in R15, keep the interrupted RIP (the frame's first qword) in R14.
COUNT_HANDLER64 = bytes.fromhex(
    "49 ff c7"           # inc r15
    "4c 8b 34 24"        # mov r14, [rsp]
    "48 cf"              # iretq
)

# IF = 1 and twenty port writes: an interrupt raised at one of them arrives at the next entry.
STI_OUT_LOOP64 = bytes.fromhex(
    "fb"                 # sti
    "b9 14 00 00 00"     # mov ecx, 20
    "e6 10"              # 1: out 0x10, al
    "ff c9"              # dec ecx
    "75 fa"              # jnz 1b
    "f4"                 # hlt
)

# IF = 0 while an interrupt is raised at `out 0x10`; it must wait for `sti` and, because of
# the one-instruction sti shadow, arrive only after the `hlt` (the `sti; hlt` idiom).
CLI_STI_HLT64 = bytes.fromhex(
    "fa"                 # cli
    "e6 10"              # out 0x10, al
    "b9 14 00 00 00"     # mov ecx, 20
    "ff c9"              # 1: dec ecx
    "75 fc"              # jnz 1b
    "e6 11"              # out 0x11, al
    "fb"                 # sti
    "f4"                 # hlt
    "e6 12"              # out 0x12, al
    "f4"                 # hlt
)
CLI_STI_HLT64_AFTER_HLT = ENTRY + 16

# A tight loop with IF = 1 and no exits: only a kick (or the interrupt window) gets in.
STI_SPIN64 = bytes.fromhex(
    "fb"                 # sti
    "eb fe"              # 1: jmp 1b
)

# IF = 0 at `out 0x10` (the interrupt is raised there), then `sti` and a loop with no exits:
# only the interrupt-window exit can deliver it.
CLI_STI_SPIN64 = bytes.fromhex(
    "fa"                 # cli
    "e6 10"              # out 0x10, al
    "fb"                 # sti
    "eb fe"              # 1: jmp 1b
)

# IF = 0 at `out 0x10` (the interrupt is raised there), then a loop that opens IF for one
# instruction only: the interrupt can arrive at one boundary, between the `nop` and the `cli`.
STI_NOP_CLI_LOOP64 = bytes.fromhex(
    "fa"                 # cli
    "e6 10"              # out 0x10, al
    "fb"                 # 1: sti
    "90"                 # nop
    "fa"                 # cli
    "49 ff c5"           # inc r13
    "eb f8"              # jmp 1b
)
STI_NOP_CLI_LOOP64_WINDOW = ENTRY + 5

HLT_OUT_HLT64 = bytes.fromhex(
    "f4"                 # hlt
    "e6 10"              # out 0x10, al
    "f4"                 # hlt
)

REGION_ADDRESS = 0x40_0000      # a writable region of 64 KiB (pages 0x400..0x40f)
ROM_ADDRESS = 0x60_0000         # a read-only region of 8 KiB
# Writes two RAM pages (0x20, 0x31) and one region page (0x403), reads the ROM and writes it
# (an MMIO write exit), reads the region; no stack, so the written set is exact.
REGION64 = bytes.fromhex(
    "c6 04 25 00 00 02 00 01"            # mov byte ptr [0x20000], 1
    "48 89 34 25 f8 1f 03 00"            # mov qword ptr [0x31ff8], rsi
    "c7 04 25 00 30 40 00 03 00 00 00"   # mov dword ptr [0x403000], 3
    "48 8b 04 25 00 00 60 00"            # mov rax, [0x600000]
    "89 04 25 10 00 60 00"               # mov [0x600010], eax
    "48 8b 1c 25 00 00 40 00"            # mov rbx, [0x400000]
    "f4"                                 # hlt
)


def install_handler(backend, vector: int = INTERRUPT_VECTOR, handler: bytes = COUNT_HANDLER64) -> None:
    """Put ``handler`` at HANDLER and a 64-bit interrupt gate for ``vector`` into the boot IDT."""
    backend.memory[HANDLER:HANDLER + len(handler)] = handler
    gate = encode_gate64(Gate(offset=HANDLER, selector=layout.KERNEL_CS64))
    start = layout.IDT_ADDRESS + vector * len(gate)
    backend.memory[start:start + len(gate)] = gate


class InterruptDispatcher(RecordingDispatcher):
    """A dispatcher with one interrupt line: ``raise_on`` ports raise it when written; acknowledging lowers it.

    Implements the backend's interrupt members (``interrupt_pending``, ``pending_vector()``,
    ``acknowledge_interrupt(vector)``) as a minimal edge-triggered controller would.
    """

    def __init__(self, vector: int = INTERRUPT_VECTOR, raise_on=(), **kwargs):
        super().__init__(**kwargs)
        self.vector = vector
        self.raise_on = set(raise_on)
        self.interrupt_pending = False
        self.acknowledged: list[int] = []
        self.pending_asked = 0

    def pio(self, port, size, is_write, value, rip):
        answer = super().pio(port, size, is_write, value, rip)
        if port in self.raise_on:
            self.interrupt_pending = True
        return answer

    def pending_vector(self):
        self.pending_asked += 1
        return self.vector if self.interrupt_pending else None

    def acknowledge_interrupt(self, vector):
        self.acknowledged.append(vector)
        self.interrupt_pending = False
