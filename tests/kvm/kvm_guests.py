"""Tiny hand-encoded guests for the KVM backend tests, and how to load them.

Each guest is a few bytes of machine code with its Intel-syntax source beside
it, so a reader can check the encoding against the SDM (vol. 2) or ``objdump``.
"""

from __future__ import annotations

from labkit.x86 import boot
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
