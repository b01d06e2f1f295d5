"""The translator of binary translation: guest basic blocks into a translation cache.

:class:`TranslationCache` decodes one basic block of guest code at a time with
Capstone (up to a control transfer, at most ``MAX_BLOCK_INSTRUCTIONS``), and
writes its translation into a region of guest RAM the guest does not use.
Ordinary instructions are copied (RIP-relative displacements rebased to the
new address); each sensitive or privileged one becomes a *site*: an ``int3``
that enters the monitor, which emulates the original instruction.  Every way
out of a block is a site too, until the monitor *chains* it to the translated
successor.  The cache is append-only: nothing is ever rewritten that the CPU
has executed (Unicorn keeps its own translations of code it has run and would
not see a host write), so chaining writes a data slot, never code.

Translation of each kind of guest instruction (``G`` = guest address, ``T`` = in the cache)::

    ordinary            copied; [rip + d] becomes [rip + d + (G_next - T_next)]
    sensitive (cli..)   int3                                     site "sensitive"
    jmp rel             exit stub(target)
    jcc rel             jcc rel32 -> taken ; exit stub(next) ; taken: exit stub(target)
    loop/jrcxz rel8     op +2 ; jmp short +15 ; exit stub(target) ; exit stub(next)
    call rel            push imm32 G_next   (the guest's return address, not the cache's)
                        exit stub(target)
    ret                 with a return table: look the guest return address up in ring 3
                        (pushfq; push rax; ...; ret to the translation); a miss ends in an
                        int3, site "indirect".  ``ret imm16``: a site "indirect" always
    jmp/call r/m        int3                                     site "indirect": the monitor
                                                                 finds the target and looks it up
    undecodable bytes   int3                                     site "invalid": #UD for the guest

    exit stub (15 bytes):   FF 25 00000000   jmp [rip + 0]       ; jump through the slot
                            <8-byte slot>                        ; = address of the int3 below,
                            CC               int3                ;   or the successor once chained

Layout of the cache region, the top ``size`` bytes of guest RAM::

    base                 +----------------------------+
                         | return table               |  (optional) guest address -> translation
                         | hit counter (its own page) |  the one page translated code writes
    code_start           +----------------------------+
                         | block 1 | block 2 | ...    |  appended in translation order
    base + used          +----------------------------+
                         | free                       |
    base + size = RAM end+----------------------------+
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from labkit.errors import ConfigError, LabkitError
from labkit.x86.layout import PAGE_SIZE
from labkit.x86.disasm import MAX_INSTRUCTION
from labkit.x86.readable import Readable

CsInsn = Any
"""A Capstone instruction (``capstone.CsInsn``, with detail); Capstone has no type hints."""
Instruction = tuple[int, bytes, str]
"""``(guest address, bytes, text)``."""

SENSITIVE = frozenset({
    # IF and the flags: visible or changed without a trap in ring 3
    "cli", "sti", "pushfq", "pushf", "popfq", "popf",
    # descriptor tables and machine status: readable from ring 3 without a trap
    "sgdt", "sidt", "sldt", "smsw", "str",
    # segment checks: answered by the GDT the CPU really uses, at CPL 3 (under PVM: the host's)
    "lar", "lsl", "verr", "verw",
    # segment loads from a far pointer (LDS/LES are invalid in 64-bit mode)
    "lfs", "lgs", "lss",
    # privileged: #GP in ring 3
    "lgdt", "lidt", "lldt", "ltr", "lmsw", "clts", "invlpg", "wbinvd", "invd",
    "rdmsr", "wrmsr", "swapgs", "hlt",
    # port I/O (#GP in ring 3 with IOPL 0 and no I/O bitmap; also under PVM, measured)
    "in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd",
    # transfers between privilege levels
    "iretq", "iretd", "iret", "int", "int3", "int1", "into", "syscall", "sysretq", "sysret",
    "sysenter", "sysexit", "ljmp", "lcall", "retf", "retfq",
})
"""Capstone mnemonics the translator replaces by monitor entries by default (``mov`` to/from a
control or debug register and every move, push and pop of a segment register are matched by their
operands, the far ``call``/``jmp`` through memory by their ModRM byte: see :func:`is_sensitive`)."""

OPERAND_CLASSES = frozenset({"cr", "dr", "sreg"})
"""Keys of ``translate=`` that name operands, not mnemonics: ``mov`` to/from a control (``"cr"``) or debug
(``"dr"``) register; ``mov``/``push``/``pop`` of a segment register (``"sreg"``)."""

INDIRECT = frozenset({"ret", "jmp", "call"})
"""With a register or memory operand (or none, for ``ret``): the target is known only at run time."""
CONDITIONAL = frozenset({"ja", "jae", "jb", "jbe", "je", "jne", "jg", "jge", "jl", "jle",
                         "jo", "jno", "jp", "jnp", "js", "jns"})
LOOPS = frozenset({"loop", "loope", "loopne", "jrcxz", "jecxz"})

INLINE_RETURN_SAVED = (1, 2, 42, 47)
"""Offsets in an inline ``ret`` sequence: from the first, its ``pushfq`` has pushed the flags (RSP - 8); from the
second, ``push rax`` has pushed RAX too (RSP - 16, RAX and the flags to be restored from the stack); from the third,
the hit counter has counted the hit; from the fourth (``pop rax``) on, nothing that writes memory is left."""
INLINE_RETURN_SIZE = 52

MAX_BLOCK_INSTRUCTIONS = 32
EXIT_STUB_SIZE = 15
INT3 = b"\xcc"
MAX_RETURN_TABLE = 64 << 10
"""At most this many bytes of return table (8 per guest code byte covered)."""
CACHE_SIZE = 256 << 10
"""Default size of the cache region (at the top of guest RAM)."""


def _page_align(size: int) -> int:
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class CacheFull(LabkitError):
    """The translation cache has no room for another block."""


@dataclass(frozen=True)
class Site:
    """A monitor entry in translated code: the ``int3`` at ``address`` and what it stands for."""

    address: int
    kind: str
    """``"exit"`` (leaves a block), ``"sensitive"``, ``"indirect"`` or ``"invalid"``."""
    guest_rip: int
    """The guest instruction it stands for (for an exit: the branch, or the block's last instruction)."""
    guest_next: int
    code: bytes
    text: str
    target: int | None = None
    """For an exit: the guest address execution continues at."""
    slot: int | None = None
    """For an exit: the 8 bytes holding where ``jmp [rip]`` goes (the ``int3``, or the chained block)."""

    @property
    def mnemonic(self) -> str:
        return self.text.split(" ", 1)[0]


@dataclass
class Block:
    """One translated basic block: the guest's instructions and what replaced them."""

    guest_start: int
    guest_end: int
    cache_start: int
    cache_end: int
    original: list[tuple[int, bytes, str]]
    """``(guest address, bytes, text)`` of each guest instruction."""
    translated: list[tuple[int, bytes, str, int]] = field(default_factory=list)
    """``(cache address, bytes, text, guest address it stands for)`` of each emitted piece."""
    one_shot: bool = False
    """A one-instruction translation run once while its page is open for a write (never looked up or chained)."""
    valid: bool = True
    """False once the guest changed the bytes it was translated from (see :meth:`TranslationCache.invalidate`)."""

    @property
    def guest_code(self) -> bytes:
        """The guest bytes this block was translated from."""
        return b"".join(code for _, code, _ in self.original)

    def pages(self) -> range:
        """The 4 KiB guest pages its guest code lies on."""
        first = self.guest_start & ~(PAGE_SIZE - 1)
        return range(first, max(self.guest_end, self.guest_start + 1), PAGE_SIZE)


def is_sensitive(instruction: CsInsn, mnemonics: frozenset[str]) -> bool:
    """Does this Capstone instruction get a monitor entry under the set ``mnemonics``?

    ``mov`` to or from a control or debug register counts as ``"cr"`` / ``"dr"``; ``mov``,
    ``push`` and ``pop`` of a segment register as ``"sreg"``; ``FF /3`` and ``FF /5`` with a
    memory operand (Capstone: ``call ptr``/``jmp ptr`` without REX.W) as ``"lcall"``/``"ljmp"``.
    """
    from labkit.monitor.segments import segment_operation

    name = instruction.mnemonic
    if name in ("mov", "push", "pop", "call", "jmp"):
        kind = segment_operation(bytes(instruction.bytes), instruction.address)
        if kind is not None:
            return ("sreg" if kind.endswith(" sreg") else kind) in mnemonics
    if name == "mov":
        operands = instruction.op_str
        if "cr" in mnemonics and any(f"cr{n}" in operands.split(", ") for n in (0, 2, 3, 4, 8)):
            return True
        return "dr" in mnemonics and any(f"dr{n}" in operands.split(", ") for n in range(8))
    for prefix in ("rep ", "repe ", "repne "):  # rep outsb: Capstone puts the prefix in the mnemonic
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name in mnemonics


def exit_stub(address: int) -> bytes:
    """``jmp [rip + 0]`` ; slot (= the ``int3`` that follows) ; ``int3``, for a stub at ``address``."""
    return b"\xff\x25\x00\x00\x00\x00" + struct.pack("<Q", address + 14) + INT3


class TranslationCache:
    """Translated blocks in guest RAM at ``[base, base + size)``, looked up by guest address.

    ``memory`` reads guest memory (a :class:`~labkit.x86.readable.Readable`:
    the machine's :class:`~labkit.memory.GuestMemory`, or the monitor's view of
    it) and ``write(address, data)`` stores into it;
    ``sensitive`` is the set of mnemonics replaced by monitor entries (plus
    the :data:`OPERAND_CLASSES`).
    """

    def __init__(self, base: int, size: int, memory: Readable,
                 write: Callable[[int, bytes], None], sensitive: Iterable[str] = SENSITIVE | OPERAND_CLASSES,
                 returns: tuple[int, int] | None = None):
        import capstone

        if base < 0 or size <= EXIT_STUB_SIZE * 4:
            raise ConfigError(f"a translation cache needs a base >= 0 and room for a block, not {base:#x}+{size:#x}")
        self.base = base
        self.size = size
        self.used = 0
        self.returns: tuple[int, int, int] | None = None
        """``(guest start, guest size, table address)`` of the return table, if there is one."""
        self.writable_pages: tuple[int, ...] = ()
        """Pages of the cache that translated code writes (the return hit counter's); the rest
        may be mapped read-only for the guest."""
        if returns is not None:
            guest_start, guest_size = returns
            guest_size = min(guest_size, MAX_RETURN_TABLE // 8)
            # One slot per guest byte, then the hit counter on a page of its own.
            table_bytes = _page_align(8 * guest_size) + PAGE_SIZE
            if table_bytes > size // 2:
                raise ConfigError(f"a return table for {guest_size} guest bytes does not fit a {size >> 10} KiB cache")
            self.returns = (guest_start, guest_size, base)
            self.used = table_bytes
            self.writable_pages = (self._return_counter() & ~(PAGE_SIZE - 1),)
        self.code_start = base + self.used
        """Where translated code begins (after the return table)."""
        self.memory = memory
        self.write = write
        self.sensitive = frozenset(sensitive)
        self.blocks: dict[int, Block] = {}
        """Guest start address -> translated block."""
        self.sites: dict[int, Site] = {}
        """Address of a site's ``int3`` -> the site."""
        self.site_blocks: dict[int, Block] = {}
        """Address of a site's ``int3`` -> the block it belongs to."""
        self.one_shots: dict[int, Block] = {}
        """Guest address -> its one-instruction translation (see :meth:`one_shot`)."""
        self.invalidated = 0
        """Blocks dropped because the guest wrote to the code they were translated from."""
        self._chained_into: dict[int, list[int]] = {}  # cache address of a block -> slots chained to it
        self.inline_returns: list[int] = []
        """Cache address of each inline ``ret`` sequence (see :meth:`_inline_return`), ascending."""
        self._cache_starts: list[int] = []  # cache_start of every block ever translated, ascending
        self._cache_blocks: list[Block] = []
        self._starts: list[int] = []  # cache address of each emitted piece, ascending
        self._guest: list[int] = []  # the guest address each piece stands for
        self._cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._cs.detail = True
        self.guest_bytes = 0

    # -- lookups --------------------------------------------------------------

    @property
    def code_bytes(self) -> int:
        """Bytes of translated code, exit stubs and slots written so far."""
        return self.base + self.used - self.code_start

    def lookup(self, guest: int) -> int | None:
        """Cache address of the block translated from guest address ``guest``, if any."""
        block = self.blocks.get(guest)
        return None if block is None else block.cache_start

    def contains(self, address: int) -> bool:
        return self.code_start <= address < self.base + self.used

    def guest_address(self, cache: int) -> int | None:
        """The guest instruction that the translated code at ``cache`` stands for (a fault's RIP mapped back)."""
        if not self.contains(cache):
            return None
        index = bisect.bisect_right(self._starts, cache) - 1
        return self._guest[index] if index >= 0 else None

    def block_at(self, cache: int) -> Block | None:
        """The block (valid or not, one-shots included) whose translation holds cache address ``cache``."""
        index = bisect.bisect_right(self._cache_starts, cache) - 1
        if index < 0:
            return None
        block = self._cache_blocks[index]
        return block if block.cache_start <= cache < block.cache_end else None

    def inline_return_offset(self, cache: int) -> int | None:
        """How far into an inline ``ret`` sequence ``cache`` lies (0 for its ``pushfq``), or None.

        A fault there must be undone before it is the guest ``ret``'s: :data:`INLINE_RETURN_SAVED`.
        """
        index = bisect.bisect_right(self.inline_returns, cache) - 1
        if index < 0 or cache - self.inline_returns[index] >= INLINE_RETURN_SIZE:
            return None
        return cache - self.inline_returns[index]

    def resume_point(self, block: Block, guest: int) -> int | None:
        """Where ``block``'s translation of guest instruction ``guest`` starts, if it is valid and has one."""
        if not block.valid:
            return None
        return next((at for at, _, _, stands_for in block.translated if stands_for == guest), None)

    def chain(self, site: Site, successor: int) -> None:
        """Point ``site``'s exit slot at the translated successor: later runs jump there natively."""
        if site.slot is None:
            raise ConfigError(f"site at {site.address:#x} ({site.kind}) is not an exit and cannot be chained")
        self.write(site.slot, struct.pack("<Q", successor))
        self._chained_into.setdefault(successor, []).append(site.slot)

    # -- self-modifying code ------------------------------------------------------

    def translated_in(self, start: int, end: int) -> list[Block]:
        """Valid blocks (one-shots included) with guest code in ``[start, end)``, by guest address."""
        found = [block for block in [*self.blocks.values(), *self.one_shots.values()]
                 if block.guest_start < end and start < block.guest_end]
        return sorted(found, key=lambda block: (block.guest_start, block.one_shot))

    def stale(self, start: int, end: int) -> list[Block]:
        """The blocks with guest code in ``[start, end)`` whose guest bytes are no longer what was translated."""
        return [block for block in self.translated_in(start, end)
                if self.memory.read_at_most(block.guest_start, block.guest_end - block.guest_start)
                != block.guest_code]

    def invalidate(self, block: Block) -> None:
        """Forget ``block``: no lookup, return-table entry or chained exit leads to it any more.

        Its code stays in the (append-only) cache, so an instruction of it that is running
        finishes; every way into it is cut: the return table's entry is cleared and each exit
        slot chained to it points at its own ``int3`` again (data writes, never code).
        """
        if not block.valid:
            return
        block.valid = False
        self.invalidated += 1
        if block.one_shot:
            self.one_shots.pop(block.guest_start, None)
            return
        if self.blocks.get(block.guest_start) is block:
            del self.blocks[block.guest_start]
        if self.returns is not None and 0 <= block.guest_start - self.returns[0] < self.returns[1]:
            self.write(self.returns[2] + 8 * (block.guest_start - self.returns[0]), bytes(8))
        for slot in self._chained_into.pop(block.cache_start, []):
            self.write(slot, struct.pack("<Q", slot + 8))  # the int3 right behind the slot (see exit_stub)

    def one_shot(self, guest: int) -> Block:
        """A translation of the one guest instruction at ``guest`` that always ends in a monitor entry.

        The monitor runs it while the instruction's target page is open for writing: its exits
        are never chained and a ``ret`` is never looked up inline, so the monitor regains control
        right after the instruction and can close the page again.
        """
        found = self.one_shots.get(guest)
        if found is not None and found.valid:
            return found
        block = self.translate(guest, limit=1, one_shot=True)
        self.one_shots[guest] = block
        return block

    # -- translation ------------------------------------------------------------

    def translate(self, guest: int, *, limit: int = MAX_BLOCK_INSTRUCTIONS, one_shot: bool = False) -> Block:
        """Translate the basic block at guest address ``guest`` into the cache (or return the existing one).

        ``limit`` caps its guest instructions; ``one_shot`` builds the unregistered
        translation of :meth:`one_shot` (``limit`` 1, no inline return).
        """
        if guest in self.blocks and not one_shot:
            return self.blocks[guest]
        start = self.base + self.used
        block = Block(guest, guest, start, start, [], one_shot=one_shot)
        out = bytearray()
        pending: list[Site] = []

        def emit(data: bytes, text: str, stands_for: int) -> int:
            at = start + len(out)
            block.translated.append((at, bytes(data), text, stands_for))
            out.extend(data)
            return at

        def emit_site(kind: str, insn: Instruction, text: str, **extra: Any) -> None:
            at = emit(INT3, text, insn[0])
            pending.append(Site(at, kind, insn[0], insn[0] + len(insn[1]), insn[1], insn[2], **extra))

        def emit_exit(insn: Instruction, target: int, why: str) -> None:
            at = start + len(out)
            stub = exit_stub(at)
            emit(stub[:6], f"jmp [rip + 0]      ; via slot: {why} -> {target:#x}", insn[0])
            emit(stub[6:14], f".quad {at + 14:#x}  ; slot: until chained, the int3 below", insn[0])
            site_at = emit(INT3, f"int3               ; -> monitor: translate {target:#x}", insn[0])
            pending.append(Site(site_at, "exit", insn[0], insn[0] + len(insn[1]), insn[1], insn[2],
                                            target=target, slot=at + 6))

        address = guest
        ended = False
        inline_returns: list[int] = []
        for _ in range(limit):
            instruction = self.decode(address)
            if instruction is None:
                code = self.peek(address, 1)
                original = (address, code, f"(undecodable {code.hex()})")
                block.original.append(original)
                emit_site("invalid", original, "int3               ; -> monitor: #UD")
                address += 1
                ended = True
                break
            insn = (instruction.address, bytes(instruction.bytes), f"{instruction.mnemonic} {instruction.op_str}".strip())
            block.original.append(insn)
            next_address = address + instruction.size
            name = instruction.mnemonic
            if is_sensitive(instruction, self.sensitive):
                emit_site("sensitive", insn, f"int3               ; -> monitor: emulate {insn[2]}")
                address = next_address
                if _transfers_control(instruction):
                    ended = True
                    break
                continue
            if name == "jmp" and _relative(instruction):
                emit_exit(insn, _target(instruction), "jmp")
                ended = True
            elif name in CONDITIONAL and _relative(instruction):
                condition = instruction.opcode[0] & 0x0F if instruction.opcode[0] != 0x0F else instruction.opcode[1] & 0x0F
                emit(bytes([0x0F, 0x80 | condition]) + struct.pack("<i", EXIT_STUB_SIZE),
                     f"{name} +{EXIT_STUB_SIZE}            ; taken: the second stub", insn[0])
                emit_exit(insn, next_address, "not taken")
                emit_exit(insn, _target(instruction), "taken")
                ended = True
            elif name in LOOPS:
                emit(bytes(instruction.bytes[:-1]) + b"\x02", f"{name} +2", insn[0])
                emit(bytes([0xEB, EXIT_STUB_SIZE]), f"jmp +{EXIT_STUB_SIZE}", insn[0])
                emit_exit(insn, _target(instruction), "taken")
                emit_exit(insn, next_address, "not taken")
                ended = True
            elif name == "call" and _relative(instruction):
                if next_address >= 1 << 31:
                    raise ConfigError(f"call at {address:#x}: return address above 2 GiB cannot be pushed as imm32")
                emit(b"\x68" + struct.pack("<i", next_address), f"push {next_address:#x}        ; the guest's return address", insn[0])
                emit_exit(insn, _target(instruction), "call")
                ended = True
            elif name == "ret" and not instruction.operands and self.returns is not None and not one_shot:
                first = start + len(out)
                for piece, text in self._inline_return(first):
                    if text.startswith("int3"):
                        emit_site("indirect", insn, text)
                    else:
                        emit(piece, text, insn[0])
                inline_returns.append(first)
                ended = True
            elif name in INDIRECT or _transfers_control(instruction):
                emit_site("indirect", insn, f"int3               ; -> monitor: {insn[2]} (indirect)")
                ended = True
            else:
                at = start + len(out)
                moved = self._relocated(instruction, at)
                text = insn[2] if moved == insn[1] else self._text(moved, at)
                emit(moved, text, insn[0])
            address = next_address
            if ended:
                break
        if not ended:  # block too long: fall through to the next one
            last = block.original[-1]
            emit_exit(last, address, "fall through")
        block.guest_end = address
        if self.used + len(out) > self.size:
            raise CacheFull(f"the translation cache ({self.size >> 10} KiB at {self.base:#x}) is full "
                            f"after {len(self.blocks)} blocks")
        self.write(start, bytes(out))
        self.used += len(out)
        block.cache_end = start + len(out)
        for at, _, _, stands_for in block.translated:
            self._starts.append(at)
            self._guest.append(stands_for)
        for site in pending:
            self.sites[site.address] = site
            self.site_blocks[site.address] = block
        self._cache_starts.append(block.cache_start)
        self._cache_blocks.append(block)
        self.inline_returns.extend(inline_returns)
        self.guest_bytes += block.guest_end - block.guest_start
        if one_shot:
            return block
        if self.returns is not None and 0 <= guest - self.returns[0] < self.returns[1]:
            self.write(self.returns[2] + 8 * (guest - self.returns[0]), struct.pack("<Q", start))
        self.blocks[guest] = block
        return block

    def inline_return_hits(self) -> int:
        """How many ``ret``s found their target in the return table without entering the monitor."""
        if self.returns is None:
            return 0
        return struct.unpack("<Q", self.memory.read(self._return_counter(), 8))[0]

    def _return_table(self) -> tuple[int, int, int]:
        if self.returns is None:
            raise LabkitError("this translation cache has no return table")
        return self.returns

    def uncount_return_hit(self) -> None:
        """Take back one inline return hit (its ``ret`` faulted after counting and runs again)."""
        counter = self._return_counter()
        hits = struct.unpack("<Q", self.memory.read(counter, 8))[0]
        self.write(counter, struct.pack("<Q", hits - 1))

    def _return_counter(self) -> int:
        guest_start, guest_size, table = self._return_table()
        return table + _page_align(8 * guest_size)

    def _inline_return(self, at: int) -> list[tuple[bytes, str]]:
        """``ret`` as a lookup in the return table, in ring 3: a hit jumps to the translated return
        address with no monitor entry; a miss (not translated yet, or outside the table) enters it.
        Uses two quadwords below the guest's RSP as scratch (the guest's flags and RAX)."""
        guest_start, guest_size, table = self._return_table()
        hit = [
            (b"\x9c", "pushfq             ; ret, inline: save flags and rax below the guest's stack"),
            (b"\x50", "push rax"),
            (b"\x48\x8b\x44\x24\x10", "mov rax, [rsp + 16]  ; the guest's return address"),
            (b"\x48\x2d" + struct.pack("<i", guest_start), f"sub rax, {guest_start:#x}"),
            (b"\x48\x3d" + struct.pack("<i", guest_size), f"cmp rax, {guest_size:#x}"),
            (None, "jae miss"),
            (b"\x48\x8b\x04\xc5" + struct.pack("<i", table), f"mov rax, [{table:#x} + rax * 8]  ; return table"),
            (b"\x48\x85\xc0", "test rax, rax"),
            (None, "jz miss            ; not translated yet"),
            (b"\x48\xff\x04\x25" + struct.pack("<i", self._return_counter()), "inc qword [hits]"),
            (b"\x48\x89\x44\x24\x10", "mov [rsp + 16], rax  ; the translated return address"),
            (b"\x58", "pop rax"),
            (b"\x9d", "popfq"),
            (b"\xc3", "ret                ; to the translation, natively"),
        ]
        miss = [(b"\x58", "miss: pop rax"), (b"\x9d", "popfq"), (INT3, "int3               ; -> monitor: ret (lookup)")]
        # The two jumps to "miss" (rel8: the hit path is short).
        pieces, offset = [], at
        lengths = [2 if code is None else len(code) for code, _ in hit]
        miss_at = at + sum(lengths)
        for (code, text), length in zip(hit, lengths):
            if code is None:
                opcode = 0x73 if text.startswith("jae") else 0x74
                code = bytes([opcode, miss_at - (offset + 2)])
            pieces.append((code, text))
            offset += length
        return pieces + miss

    def peek(self, address: int, size: int) -> bytes:
        """Up to ``size`` bytes of guest memory at ``address`` (fewer where guest memory ends)."""
        return self.memory.read_at_most(address, size)

    def decode(self, address: int) -> CsInsn | None:
        """The Capstone instruction (with detail) at guest ``address``, or None if it does not decode."""
        return self.disassemble(self.peek(address, MAX_INSTRUCTION), address)

    def disassemble(self, code: bytes, address: int) -> CsInsn | None:
        """The first Capstone instruction (with detail) of ``code`` placed at ``address``, or None."""
        for instruction in self._cs.disasm(code, address, 1):
            return instruction
        return None

    def _text(self, code: bytes, at: int) -> str:
        for instruction in self._cs.disasm(code, at, 1):
            return f"{instruction.mnemonic} {instruction.op_str}".strip()
        return code.hex()

    @staticmethod
    def _relocated(instruction: CsInsn, at: int) -> bytes:
        """The instruction's bytes for address ``at``: a RIP-relative displacement is rebased."""
        code = bytearray(instruction.bytes)
        if instruction.disp_size == 4 and any(
                operand.type == 3 and instruction.reg_name(operand.mem.base) == "rip" for operand in instruction.operands):
            offset = instruction.disp_offset
            displacement = struct.unpack_from("<i", code, offset)[0]
            moved = displacement + (instruction.address - at)
            if not -(1 << 31) <= moved < 1 << 31:
                raise ConfigError(f"{instruction.mnemonic} {instruction.op_str} at {instruction.address:#x}: "
                                  "RIP-relative operand out of reach from the cache")
            struct.pack_into("<i", code, offset, moved)
        return bytes(code)


def _relative(instruction: CsInsn) -> bool:
    return len(instruction.operands) == 1 and instruction.operands[0].type == 2  # X86_OP_IMM


def _target(instruction: CsInsn) -> int:
    return instruction.operands[0].imm & 0xFFFF_FFFF_FFFF_FFFF


def _transfers_control(instruction: CsInsn) -> bool:
    import capstone

    return any(group in instruction.groups for group in (
        capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET, capstone.CS_GRP_IRET,
        capstone.CS_GRP_INT)) or instruction.mnemonic in LOOPS
