"""Binary translation: the monitor runs translated copies of the guest kernel's code, never the code itself.

A :class:`BinaryTranslator` is a monitor (see :mod:`labkit.vmm.forwarding`)
for a kernel that runs deprivileged in ring 3, as VMware's binary translator
ran guest kernels outside ring 0.  Before a basic block of kernel code runs,
the monitor translates it (:mod:`labkit.monitor.translation_cache`) into a
translation cache at the top of guest RAM: ordinary instructions are copied,
each sensitive or privileged one becomes an ``int3``, the one entry into the
monitor that works from ring 3 on both backends.  At such an entry the
original instruction is carried out for the kernel as it would run at CPL 0:
on the same :class:`~labkit.monitor.vcpu.VirtualCpu` that trap-and-emulate
uses (:func:`~labkit.monitor.vcpu.emulate`: ``pushf`` pushes the *virtual* IF,
``popf`` restores it, ``sgdt``/``sidt``/``sldt``/``str``/``smsw`` store the
kernel's own GDTR, IDTR, LDTR, TR and CR0, ``int n`` goes through its IDT), and
for the segment instructions by :mod:`labkit.monitor.segments` (``lar``,
``lsl``, ``verr``, ``verw`` against the kernel's GDT; ``mov``/``push``/``pop``
of CS, SS, DS, ES, FS, GS with the kernel's selectors; far ``call``, ``jmp``
and ``ret``).  That covers every instruction on Robin and Irvine's list of
x86 instructions that are sensitive but do not trap (see
:mod:`labkit.monitor.robin_irvine`).  Every exit of a block is an entry too,
until the monitor chains it to its translated successor; then the jump runs
natively.

Memory: by default binary translation virtualizes the CPU, not memory.  A
``mov cr3`` only changes the virtual CR3 (the kernel keeps running on
labkit's identity map), and guest-linear addresses are guest-physical, as in
trap-and-emulate (:mod:`labkit.monitor.vcpu`).  ``BinaryTranslator(kernel,
shadow=ShadowPaging())`` makes the kernel's CR3 and page tables virtual with
shadow page tables (:mod:`labkit.monitor.shadow`), as trap-and-emulate does:

- The translator reads the kernel's code at its virtual addresses, through
  the kernel's own tables (setting A as its CPU's fetch would); a branch to
  code they do not map, or an instruction whose bytes run into such a page,
  is a true #PF at the first unmapped address (I/D as SDM 4.7 gives it: only
  with SMEP, or NXE), not a #UD.
- Every shadow root maps the translation cache where it is, for ring 3, read
  only but for the hit counter's page; the shadow pool lies right below it.
- A #PF of translated code goes to :meth:`ShadowPaging.page_fault` first:
  hidden faults and page-table stores (the guest instruction the translation
  stands for, carried out) are absorbed there and counted apart from true
  faults, which are reflected to the kernel's handler with its CR2 and error
  code.
- "Translated code is read-only" holds for the *physical* pages behind it:
  :meth:`ShadowPaging.protect` keeps every shadow leaf mapping them read-only,
  whatever virtual address the kernel writes through.  A translation is valid
  for the bytes its virtual addresses map now: after a page-table store,
  ``invlpg`` or a CR3 load, each virtual page of translated code that maps
  another physical page (or none) has its translations compared with what it
  maps now, and the changed ones are dropped.

Memory while a kernel runs under binary translation (identity-mapped, RAM of ``memory`` bytes; under
shadow paging the cache region is mapped as here in every shadow root, the shadow pool lies below it,
and labkit's page tables are left to the kernel as its boot tables)::

    0x0000_0000  forwarding stubs (int3 -> ring 0 stub -> TRAP_PORT -> on_trap)
    0x0000_1000  GDT, IDT, TSS, page tables (labkit's, not the guest kernel's)
    0x0000_8000  the kernel's code and data: read by the translator, never executed
                 (its first byte is replaced by an int3 so the monitor gets control
                 before any of it runs: :attr:`BinaryTranslator.guest`; the monitor
                 puts the kernel's own byte back at once)
    0x0006_c000  monitor stack (RSP0, KERNEL_STACK_TOP = 0x7_0000), then the kernel's stack
    0x0008_0000  (STACK_TOP) end of the kernel's stack
    memory - 256 KiB   page tables the monitor split (if any), the page-table stub's page,
                       then the translation cache: the return table (8 bytes per kernel
                       code byte, then a hit counter), translated blocks, exit stubs, slots
    memory       end of RAM

The cache sits above everything labkit or the kernel places in RAM (code, data
and stacks all end at or below STACK_TOP, which the constructor checks), so
the kernel never meets it unless it computes an address out there.  If it
writes there, it meets the page tables: before the kernel's first instruction
the monitor maps the region read-only (splitting a 2 MiB page into 4 KiB pages
with a page table at the bottom of the region where needed), all but the page
of the return-hit counter, which translated code increments; such a write
stops the run with a message instead of overwriting translated code.  (VMware
hid its monitor at the top of the address space by truncating the guest's
segment limits; long mode has no segment limits to truncate, paging does the job.)

Self-modifying code: every guest page with translated code on it is mapped
read-only, so a kernel store to it traps (#PF).  A plain ``mov`` store the
monitor does itself; any other instruction runs once from a one-shot
translation with its page open.  Either way the monitor then compares each
translated block on the page with the guest's bytes and drops the changed
ones (:meth:`TranslationCache.invalidate`: no lookup, return-table entry or
chained exit leads to them any more), so the next run of that code is
translated afresh: exact, byte for byte.  Stores the monitor makes for the
kernel (an emulated ``sgdt``) are checked the same way.  The page-table edits
are made by the guest itself, in a ring-0 stub that also ``invlpg``s them
(:func:`page_table_stub`): Unicorn keeps a TLB, and KVM's shadow MMU (PVM)
ignores a host's write to a page table it shadows.

Entries into the monitor, each one a trap through the forwarding stubs::

    int3 at a "sensitive" site   carry out the original instruction (above) at its guest RIP;
                                 continue after the site, or at the translation of
                                 wherever it went (iretq, int n, a far jump, ...)
    int3 at an "exit" site       translate (or find) the successor, chain the exit to it
    int3 at an "indirect" site   jmp r/m / call r/m, and a ret whose target the inline lookup
                                 in the return table missed: compute the guest target,
                                 find or translate its block (a cache hit or a miss)
    #PF writing translated code  "write: store" or "write: one-shot" (above)
    any other fault in the cache map RIP back to the guest instruction; a privileged one that
                                 was left untranslated is emulated as trap-and-emulate would,
                                 anything else is reflected to the guest kernel

What is counted (:class:`TranslationSummary`): blocks translated, cache hits
(lookups that found a translation), exits chained, guest and cache bytes, and
every monitor entry by reason.  Jumps through a chained exit run natively and
are not counted: they never reach the monitor.  Returns found in the return table
do not reach it either; the translated code counts them in the cache (``inline_return_hits``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable

from labkit.errors import ConfigError, LabkitError
from labkit.memory import GuestMemory
from labkit.monitor.translation_cache import (CACHE_SIZE, INDIRECT, INLINE_RETURN_SAVED, OPERAND_CLASSES, SENSITIVE,
                                              Block, CacheFull, Site, TranslationCache)
from labkit.monitor.segments import SegmentFault, Unmodelled, VirtualSegments, emulate_segment, segment_operation
from labkit.monitor.shadow import ShadowFull, ShadowPaging, ShadowReport
from labkit.monitor.vcpu import Decoded, VirtualCpu
from labkit.table import Table
from labkit.vmm.forwarding import GuestContext, MonitorContext, Trap
from labkit.vmm.status import RunResult, Status, StatusKind, exception_name
from labkit.x86 import layout
from labkit.x86.arch import PF_FETCH, PF_PRESENT, Vector
from labkit.x86.paging import LARGE_PAGE, PF_WRITE, WRITABLE, pt_entry_address, write_protect
from labkit.x86.disasm import MAX_INSTRUCTION
from labkit.x86.readable import Readable

if TYPE_CHECKING:
    from labkit.guest import Guest

TRANSLATABLE = SENSITIVE | OPERAND_CLASSES
"""Everything that can be put in ``translate=``: mnemonics, plus ``"cr"``/``"dr"`` for ``mov`` to/from them
and ``"sreg"`` for ``mov``/``push``/``pop`` of a segment register."""

BOOT_BREAKPOINT = b"\xcc"
_MASK64 = (1 << 64) - 1
PAGE_MASK = layout.PAGE_SIZE - 1

FLUSH_COUNT = 64
"""Offset in the page-table stub's page of the number of entries to write; three arrays follow it."""
FLUSH_CAPACITY = (layout.PAGE_SIZE - FLUSH_COUNT - 8) // 24
FLUSH_STACK = layout.KERNEL_STACK_TOP - 0x1000
"""The ring-0 stack the stub runs on: in the monitor's stack, well below the forwarding frame."""


def page_table_stub(at: int) -> bytes:
    """Ring-0 code at ``at`` that writes page-table entries *as the guest*, ``invlpg``s them and ``iretq``s on.

    The entries to write follow at ``at + FLUSH_COUNT``: their number, then
    ``FLUSH_CAPACITY`` entry addresses, as many values, as many pages::

        push rax ; push rcx ; push rdx
        mov rcx, [count]
    again:
        mov rax, [entries + rcx * 8 - 8]
        mov rdx, [values + rcx * 8 - 8]
        mov [rax], rdx               ; the guest's own store: KVM's shadow MMU sees it
        mov rax, [pages + rcx * 8 - 8]
        invlpg [rax]                 ; and no TLB keeps the old entry
        loop again
        pop rdx ; pop rcx ; pop rax
        iretq                        ; the frame the monitor wrote: the translated code, ring 3
    """
    count = at + FLUSH_COUNT
    entries, values, pages = (count + 8 + 8 * FLUSH_CAPACITY * i for i in range(3))
    if pages + 8 * FLUSH_CAPACITY >= 1 << 31:
        raise ConfigError(f"the page-table stub at {at:#x} must lie below 2 GiB (32-bit absolute addresses)")
    code = (b"\x50\x51\x52" + b"\x48\x8b\x0c\x25" + struct.pack("<i", count)
            + b"\x48\x8b\x04\xcd" + struct.pack("<i", entries - 8)
            + b"\x48\x8b\x14\xcd" + struct.pack("<i", values - 8)
            + b"\x48\x89\x10"
            + b"\x48\x8b\x04\xcd" + struct.pack("<i", pages - 8)
            + b"\x0f\x01\x38" + b"\xe2\xe0"
            + b"\x5a\x59\x58\x48\xcf")
    return code.ljust(FLUSH_COUNT, b"\xcc")


@dataclass(frozen=True)
class TranslationSummary:
    """What a binary-translation run counted (``RunResult.monitor``); pickles across the worker boundary."""

    blocks_translated: int
    cache_hits: int
    """Lookups that found a translation: in the monitor, and by ``ret`` in the return table."""
    inline_return_hits: int
    """Of ``cache_hits``: returns resolved inside translated code, with no monitor entry."""
    chained: int
    guest_bytes: int
    """Bytes of guest code translated."""
    cache_bytes: int
    """Bytes written into the translation cache (translated code, exit stubs, slots)."""
    entries: dict[str, int]
    """Monitor entries by reason: ``"start"``, ``"block exit"``, ``"indirect: ret"``,
    ``"emulate: cli"``, ``"trap: cli"`` (left untranslated, trapped), ``"fault: #PF"``."""
    translated: tuple[str, ...]
    """The mnemonics that were replaced by monitor entries."""
    invalidated: int
    """Translations dropped because the kernel changed the code they came from."""
    protected_pages: int
    """Guest pages write-protected because they hold translated code (at the end of the run)."""
    flushes: int
    """Resumes through the ring-0 page-table stub (a page protected or opened)."""
    blocks: dict[int, Block] = field(repr=False)
    """Guest start address -> translated block."""
    cache_base: int = 0
    vcpu: object = field(default=None, repr=False)
    """The virtual CPU's state at the end (IF, GDTR, ...), as the vcpu module reports it."""
    shadow: ShadowReport | None = None
    """What shadow paging counted (hidden and true page faults, page-table writes), if the kernel's paging was
    virtualized (``BinaryTranslator(..., shadow=ShadowPaging())``)."""

    @property
    def monitor_entries(self) -> int:
        return sum(self.entries.values())

    def entries_by_kind(self) -> dict[str, int]:
        """Entries grouped for a figure: emulated instructions, block exits, indirect branches, traps and faults."""
        groups: dict[str, int] = {}
        for reason, count in self.entries.items():
            kind = {"emulate": "emulated instructions", "block exit": "block exits",
                    "indirect": "indirect branches", "trap": "traps (untranslated)",
                    "write": "writes to translated code",
                    "fault": "faults and interrupts reflected", "start": "block exits",
                    "shadow": "shadow paging (#PF)"}.get(reason.split(":")[0], reason)
            groups[kind] = groups.get(kind, 0) + count
        return groups

    def block_at(self, guest: int) -> Block:
        """The translated block that starts at guest address ``guest``, or the one containing it."""
        if guest in self.blocks:
            return self.blocks[guest]
        for block in self.blocks.values():
            if block.guest_start <= guest < block.guest_end:
                return block
        known = ", ".join(f"{start:#x}" for start in sorted(self.blocks))
        raise ConfigError(f"no translated block contains {guest:#x}; blocks start at {known}")

    def blocks_containing(self, mnemonic: str) -> list[Block]:
        """The translated blocks with a guest instruction ``mnemonic`` (``"popfq"``), by guest address."""
        return [block for _, block in sorted(self.blocks.items())
                if any(text.split(" ", 1)[0] == mnemonic for _, _, text in block.original)]

    def side_by_side(self, guest: int) -> Table:
        """A :class:`labkit.table.Table`: the block's guest instructions and their translation."""
        block = self.block_at(guest)
        rows = []
        for address, code, text in block.original:
            pieces = [piece for piece in block.translated if piece[3] == address]
            after = "\n".join(f"{at:#x}  {piece_code.hex(' '):<23}  {piece_text}"
                              for at, piece_code, piece_text, _ in pieces)
            rows.append([f"{address:#x}  {code.hex(' '):<23}  {text}", after])
        return Table(f"Block at {block.guest_start:#x}: {len(block.original)} guest instructions "
                     f"({block.guest_end - block.guest_start} bytes) -> {block.cache_end - block.cache_start} "
                     f"bytes in the cache at {block.cache_start:#x}",
                     ["guest code (never executed)", "translation (what runs, in ring 3)"], rows,
                     code_rows=tuple(row[0] for row in rows))


class BinaryTranslator:
    """Monitor that runs a 64-bit kernel by binary translation; see the module docstring.

    ``kernel`` is a :class:`labkit.Guest` (or a shipped guest's name) that starts
    in ring 3 (``user=True``).  Run :attr:`guest`, not the kernel itself::

        bt = BinaryTranslator("minikernel64")
        result = Machine(bt.guest, monitor=bt).run()
        result.monitor.blocks_translated

    ``translate`` chooses which instructions become monitor entries (default:
    all of :data:`TRANSLATABLE`); one left out is copied and runs natively in
    ring 3, where it traps (``cli``), faults fatally (``in``/``out`` under PVM)
    or silently does the wrong thing (``popf``).
    """

    name = "binary translation"

    def __init__(self, kernel: Guest | str, *, translate: Iterable[str] | None = None, cache_size: int = CACHE_SIZE,
                 timer: bool = False, shadow: ShadowPaging | None = None) -> None:
        from labkit.guest import Guest

        if isinstance(kernel, str):
            kernel = Guest.named(kernel)
        if not isinstance(kernel, Guest):
            raise ConfigError(f"BinaryTranslator translates a labkit.Guest or a shipped guest's name, "
                              f"not {type(kernel).__name__}")
        if kernel.mode != 64:
            raise ConfigError(f"binary translation runs 64-bit kernels; {kernel.name!r} starts in {kernel.mode}-bit mode")
        chosen = TRANSLATABLE if translate is None else frozenset(translate)
        unknown = sorted(set(chosen) - TRANSLATABLE)
        if unknown:
            raise ConfigError(f"cannot translate {unknown}: choose from {sorted(TRANSLATABLE)}")
        if cache_size % layout.PAGE_SIZE or cache_size < layout.PAGE_SIZE:
            raise ConfigError(f"cache_size must be a whole number of 4 KiB pages, not {cache_size}")
        self.kernel = kernel
        self.translated = chosen
        self.cache_size = cache_size
        self.entry: int = kernel.load_address if kernel.entry is None else kernel.entry
        """Where the kernel starts (its first instruction, run by the monitor's translation)."""
        offset = self.entry - kernel.load_address
        self._entry_byte = kernel.code[offset:offset + 1]
        self.guest = replace(kernel, name=f"{kernel.name} (translated)", user=True,
                             code=kernel.code[:offset] + BOOT_BREAKPOINT + kernel.code[offset + 1:])
        """The kernel started in ring 3 with an ``int3`` at its entry: the monitor takes over before
        its first instruction."""
        self.timer = timer
        self.cache: TranslationCache | None = None
        self.cache_region = (0, 0)
        """``[start, end)`` of guest RAM the monitor keeps for itself (page tables it split, the cache)."""
        self.vcpu: VirtualCpu | None = None
        self.segments = VirtualSegments()
        """The data-segment selectors the kernel loaded (its CS and SS are in :attr:`vcpu`)."""
        self.entries: dict[str, int] = {}
        self.protected: set[int] = set()
        """Guest pages holding translated code, mapped read-only so the kernel's writes to them trap."""
        self._open: set[int] = set()  # pages opened for one instruction's write (see _write_fault)
        self._flush: dict[int, int] = {}  # page -> its new page-table entry, written by the stub before the kernel runs
        self._flush_stub = 0
        self.flushes = 0
        """Times the monitor resumed the kernel through the ring-0 ``invlpg`` stub."""
        self.cache_hits = 0
        self.chained = 0
        self._stopped = False
        self.shadow = shadow
        """Shadow page tables, if the kernel's paging is virtualized (see :mod:`labkit.monitor.shadow`): then
        :attr:`protected` holds guest-physical pages and the translator reads code at the kernel's virtual
        addresses, through its page tables."""
        self._code_pages: dict[int, int] = {}  # under shadow paging: virtual page with translated code -> its physical page
        self._mapping_seen = 0  # shadow.mapping_changes when the code pages were last checked
        self._context: MonitorContext | None = None  # the trap's own context (guest-physical addresses)
        self._open_bytes: dict[int, bytes] = {}  # under shadow paging: an open page's bytes before its one-shot

    def __repr__(self) -> str:
        return f"<BinaryTranslator of {self.kernel.name!r}>"

    # -- the Monitor protocol -------------------------------------------------------

    def on_trap(self, trap: Trap, context: MonitorContext) -> None:
        self._stopped = False
        self._context = context
        try:
            try:
                if self.cache is None:
                    self._start(trap, context)
                else:
                    self._handle(trap, context)
            except _FetchFault as fault:
                self._fetch_fault(fault, trap, context)
            if self._flush and not self._stopped:
                self._flush_on_resume(trap, context)
            if self.shadow is not None and self.shadow.started and not self._stopped:
                self._sync_code()
                self.shadow.resume(trap, context)
        except (CacheFull, _Unsupported, ShadowFull) as full:
            self._stop(context, StatusKind.ERROR, str(full))
        except _CacheWrite as write:
            self._stop_cache_write(context, write.address, trap.regs.rip)
        except LabkitError as error:  # under shadow paging: the kernel's tables or addresses the monitor refuses
            if self.shadow is None:
                raise
            self._stop(context, StatusKind.ERROR, f"at rip {trap.regs.rip:#x}: {error}")

    def _handle(self, trap: Trap, context: MonitorContext) -> None:
        cache = self._started()[0]
        rip = trap.regs.rip
        site = cache.sites.get(rip - 1) if trap.vector == Vector.BP else None
        # What the monitor writes on the kernel's behalf (an emulated sgdt, a pushed frame)
        # meets the same read-only cache as the kernel's own stores, and invalidates the
        # translations of any code it overwrites.
        kernel = _KernelWrites(self._kernel_view(context), self.cache_region, self._written)
        protected_write = None
        if self.shadow is not None and trap.vector == Vector.PF and site is None and cache.contains(rip):
            # First: a hidden fault (a one-shot's write to its open page among them) changes nothing the kernel sees.
            absorbed = self._shadow_fault(trap, context)
            if absorbed == "hidden":
                return
            if absorbed == "pt-write":
                if self._open:
                    self._close_pages(context)
                return
            protected_write = absorbed == "protected"
        if self._open:
            self._close_pages(context)
        if site is not None:
            self._entered_at(site, trap, kernel)
        elif cache.contains(rip):
            self._fault(trap, kernel, protected_write)
        else:
            self._count(f"fault: {_short(trap.vector)}")
            self._stop(context, StatusKind.ERROR, f"{exception_name(trap.vector)} at rip {rip:#x}, outside the "
                       "translation cache: the monitor never runs the kernel's own code")

    def summary(self) -> TranslationSummary:
        cache = self.cache
        inline = cache.inline_return_hits() if cache else 0
        return TranslationSummary(
            blocks_translated=len(cache.blocks) if cache else 0, cache_hits=self.cache_hits + inline,
            inline_return_hits=inline, chained=self.chained,
            guest_bytes=cache.guest_bytes if cache else 0, cache_bytes=cache.code_bytes if cache else 0,
            entries=dict(self.entries), translated=tuple(sorted(self.translated)),
            invalidated=cache.invalidated if cache else 0, protected_pages=len(self.protected), flushes=self.flushes,
            blocks=dict(cache.blocks) if cache else {}, cache_base=cache.base if cache else 0,
            vcpu=self.vcpu.snapshot() if self.vcpu is not None else None,
            shadow=self.shadow.summary() if self.shadow is not None else None)

    # -- entries --------------------------------------------------------------------

    def _start(self, trap: Trap, context: MonitorContext) -> None:
        entry = self.entry
        if trap.vector != Vector.BP or trap.regs.rip != entry + 1:
            self._stop(context, StatusKind.ERROR, f"binary translation must start at the kernel's entry {entry:#x}, but the "
                       f"first trap was {exception_name(trap.vector)} at rip {trap.regs.rip:#x}: run "
                       "BinaryTranslator.guest, not the kernel itself")
            return
        ram = context.memory.ram_size
        base = ram - self.cache_size
        lowest = max(self.kernel.end, layout.STACK_TOP)
        if base < lowest:
            self._stop(context, StatusKind.ERROR, f"no room for a {self.cache_size >> 10} KiB translation cache: RAM ends at "
                       f"{ram:#x} and the kernel and its stacks reach {lowest:#x}; give the Machine more memory")
            return
        # The kernel's first byte back: from here on only translations of it run, and the kernel
        # (reading or patching its own code) sees its own bytes.
        context.write(entry, self._entry_byte)
        # A page at the bottom for each 2 MiB the region touches, should write_protect split it;
        # then the page of the TLB-flush stub; then the cache.
        tables = [base + layout.PAGE_SIZE * i for i in range(((ram - 1) >> 21) - (base >> 21) + 1)]
        self._flush_stub = base + layout.PAGE_SIZE * len(tables)
        context.write(self._flush_stub, page_table_stub(self._flush_stub))
        start = self._flush_stub + layout.PAGE_SIZE
        code: Readable = context.memory if self.shadow is None else _KernelCode(context.memory, self, (base, ram))
        self.cache = TranslationCache(start, ram - start, code,
                                      context.write, self.translated, returns=(self.kernel.load_address, len(self.kernel.code)))
        if self.shadow is None:
            # Read-only for the kernel from here on.  No TLB holds these pages: the kernel has not
            # run yet (the monitor takes over at its first instruction) and nothing else touches them.
            edits = write_protect(lambda at: struct.unpack("<Q", context.read(at, 8))[0], base, ram,
                                  keep_writable=self.cache.writable_pages, spare_tables=tables)
            for address, data in edits:
                context.write(address, data)
        self.cache_region = (base, ram)
        self.vcpu = VirtualCpu()
        if self.timer:
            from labkit.monitor.trap_emulate import TIMER_PORT, VirtualTimer

            self.vcpu.ports[TIMER_PORT] = VirtualTimer(self.vcpu)
        if self.shadow is not None:
            # Every shadow root maps the cache where it is, for ring 3, read-only but for the hit counter's
            # page; the shadow pool lies right below it.  The kernel's own tables are left as they are.
            self.shadow.shared = [(base, ram, frozenset(self.cache.writable_pages))]
            self.shadow.start(trap, context, self.vcpu, top=base)
            self._mapping_seen = self.shadow.mapping_changes
        self._count("start")
        trap.regs.rip = entry
        self._resume(trap)

    def _entered_at(self, site: Site, trap: Trap, context: GuestContext) -> None:
        if site.kind == "exit":
            self._count("block exit")
            if site.target is None:
                raise LabkitError(f"the exit site at {site.address:#x} has no target")
            cache = self._started()[0]
            successor = self._find(site.target)
            if cache.site_blocks[site.address].one_shot:
                trap.regs.rip = successor  # a one-shot's exits always come back here
            else:
                cache.chain(site, successor)
                self.chained += 1
                trap.regs.rip = successor
        elif site.kind == "indirect":
            self._count(f"indirect: {site.mnemonic}")
            target = self._branch_target(site, trap, context)
            if target is not None:
                trap.regs.rip = target
                self._resume(trap)
        elif site.kind == "sensitive":
            self._count(f"emulate: {_entry_name(site.code, site.guest_rip)}")
            self._emulate(site.guest_rip, site.code, site.text, trap, context)
            if self._stopped:
                return
            self._sync_code()  # an emulated invlpg or mov cr3 may have remapped translated code
            block = self._started()[0].site_blocks[site.address]
            if trap.regs.rip == site.guest_next and block.valid and site.address + 1 < block.cache_end:
                trap.regs.rip = site.address + 1  # the translation goes on right after the site
            else:
                self._resume(trap)  # iretq, int n, a delivered interrupt: somewhere else
        else:  # "invalid": what the CPU does with bytes that do not decode
            trap.regs.rip = site.guest_rip
            unmapped = self._fetch_crosses_into_unmapped(site.guest_rip)
            if unmapped is not None:
                raise _FetchFault(unmapped, site.guest_rip)
            self._count("fault: #UD")
            self._reflect(6, None, trap, context)

    def _fault(self, trap: Trap, context: GuestContext, protected_write: bool | None = None) -> None:
        """A fault raised by translated code: emulate an untranslated privileged instruction, or reflect.

        ``protected_write``: the fault is a write to a page of translated code (under shadow paging,
        :class:`ShadowPaging` says so; without it, the fault's address does).
        """
        from labkit.monitor.vcpu import PF_USER, decode, has_error_code
        from labkit.x86.instructions import InstructionClass, instruction_class

        cache = self._started()[0]
        at = trap.regs.rip
        guest = cache.guest_address(at)
        block = cache.block_at(at)
        if guest is None or block is None:
            raise LabkitError(f"rip {at:#x} stands for no guest instruction in the translation cache")
        self._undo_inline_return(cache.inline_return_offset(at), trap, context)
        trap.regs.rip = guest
        # The instruction as it was translated (the guest may have changed its bytes since).
        code = next(code for address, code, _ in block.original if address == guest)
        decoded = decode(code, guest)
        if trap.vector in (Vector.UD, Vector.GP) and decoded is not None and (
                instruction_class(decoded.mnemonic, decoded.text.partition(" ")[2]) is not InstructionClass.INNOCUOUS
                or segment_operation(code, guest) is not None):
            self._count(f"trap: {_entry_name(code, guest)}")
            self._emulate(guest, code, decoded.text, trap, context)
            if not self._stopped:
                self._resume(trap)
            return
        if protected_write is None:
            protected_write = bool(trap.vector == Vector.PF and trap.error_code & PF_WRITE
                                   and trap.error_code & PF_PRESENT and trap.cr2 & ~PAGE_MASK in self.protected)
        if protected_write:
            self._write_fault(trap, context, block, code)
            return
        base, end = self.cache_region
        if self.shadow is None and trap.vector == Vector.PF and trap.error_code & PF_WRITE and base <= trap.cr2 < end:
            self._count("fault: #PF")
            self._stop_cache_write(context, trap.cr2, guest)
            return
        self._count(f"fault: {_short(trap.vector)}")
        error_code = trap.error_code if has_error_code(trap.vector) else None
        if trap.vector == Vector.PF and error_code is not None:
            error_code &= ~PF_USER  # the kernel believes it ran in ring 0
        self._reflect(trap.vector, error_code, trap, context)

    # -- helpers ----------------------------------------------------------------------

    def _emulate(self, guest_rip: int, code: bytes, text: str, trap: Trap, context: GuestContext) -> None:
        """Carry out the guest instruction at ``guest_rip`` on the virtual CPU.

        As in trap-and-emulate, a pending virtual interrupt is delivered after an emulated
        ``sti``, ``popfq``, ``iretq`` or ``hlt``, and a ``hlt`` that nothing can wake ends the run.
        """
        from labkit.monitor import vcpu as virtual

        trap.regs.rip = guest_rip
        try:
            vcpu = self._started()[1]
            try:
                if emulate_segment(vcpu, self.segments, trap, context, code) is not None:
                    name = _entry_name(code, guest_rip)
                    vcpu.emulated[name] = vcpu.emulated.get(name, 0) + 1
                    return
            except SegmentFault as fault:  # what the CPU raises at CPL 0: the kernel's own handler gets it
                trap.regs.rip = guest_rip
                virtual.reflect(vcpu, trap, context, fault.vector, fault.error_code)
                return
            except Unmodelled as unmodelled:
                self._stop(context, StatusKind.ERROR, f"not modelled at RIP {guest_rip:#x} ({text}): {unmodelled}")
                return
            if virtual.emulate(vcpu, trap, context, code) is None:
                self._stop(context, StatusKind.ERROR, f"unemulated instruction at RIP {guest_rip:#x}: {text}")
                return
            if self.shadow is not None and self._context is not None:
                decoded = virtual.decode(bytes(code[:15]), guest_rip)
                if decoded is not None:  # invlpg, mov cr3, a change of CR0.WP
                    self.shadow.emulated(decoded, trap, self._context, vcpu)
            _, halt = virtual.after_emulation(vcpu, trap, context, text.split(" ", 1)[0])
        except virtual.VirtualTripleFault as fault:
            self._stop(context, StatusKind.SHUTDOWN, f"virtual triple fault: {fault}")
            return
        if halt is not None:
            self._stop(context, StatusKind.HALTED, halt)

    def _undo_inline_return(self, offset: int | None, trap: Trap, context: GuestContext) -> None:
        """A fault inside an inline ``ret`` (a push to a read-only page): put back RSP, RAX and the flags it saved,
        so that the fault is the guest ``ret``'s, as if the sequence had not started."""
        pushed_flags, pushed_rax, counted, done = INLINE_RETURN_SAVED
        regs = trap.regs
        if offset is None or not pushed_flags <= offset < done:
            return
        if offset >= counted:
            self._started()[0].uncount_return_hit()
        if offset >= pushed_rax:
            regs.rax, regs.rflags = struct.unpack("<QQ", context.read(regs.rsp, 16))
            regs.rsp = (regs.rsp + 16) & _MASK64
        else:
            regs.rsp = (regs.rsp + 8) & _MASK64

    def _reflect(self, vector: int, error_code: int | None, trap: Trap, context: GuestContext) -> None:
        """Deliver ``vector`` through the guest kernel's virtual IDT and continue at its handler's translation."""
        from labkit.monitor import vcpu as virtual

        try:
            virtual.reflect(self._started()[1], trap, context, vector, error_code)
        except virtual.VirtualTripleFault as fault:
            self._stop(context, StatusKind.SHUTDOWN, f"virtual triple fault: {fault}")
            return
        self._resume(trap)

    def _resume(self, trap: Trap) -> None:
        """Continue at the translation of guest address ``trap.regs.rip`` (translating it if needed)."""
        trap.regs.rip = self._find(trap.regs.rip)

    def _find(self, guest: int) -> int:
        cache = self._started()[0]
        self._sync_code()
        found = cache.lookup(guest)
        if found is not None:
            self.cache_hits += 1
            return found
        if self.shadow is not None and self._physical_page(guest) is None:
            raise _FetchFault(guest)
        block = cache.translate(guest)
        for page in block.pages():
            self._protect(page)
        return block.cache_start

    # -- self-modifying code ------------------------------------------------------------

    def _protect(self, page: int) -> None:
        """Map guest ``page`` read-only (it holds translated code) before the kernel runs again.

        Under shadow paging ``page`` is virtual: the physical page behind it (walked as the kernel's CPU
        fetches, setting A) is kept read-only in every shadow leaf that maps it.
        """
        if self.shadow is not None:
            context = self._context
            if context is None:
                raise LabkitError("code is translated during a trap only")
            physical = self.shadow.fetch(context, self._started()[1].cr3, page)
            if physical is None:
                return  # the code was read through this mapping a moment ago: it cannot fault
            self._code_pages[page] = physical
            if physical not in self.protected:
                self.protected.add(physical)
                self.shadow.protect(physical)
            return
        if page in self.protected:
            return
        self._set_writable(page, False)
        self.protected.add(page)

    def _set_writable(self, page: int, writable: bool) -> None:
        """Queue the page-table edit for the stub (:func:`page_table_stub`), which makes it as the guest.

        A write by the host to a guest page-table entry is seen by neither backend in time:
        Unicorn keeps its TLB, and KVM's shadow MMU (PVM) trusts a shadowed page table it
        write-protects and ignores an ``invlpg`` of it.  The guest's own store is trapped by
        KVM, and the ``invlpg`` after it empties the TLB.
        """
        if not 0 <= page < LARGE_PAGE:
            raise _Unsupported(f"kernel code at {page:#x}: binary translation write-protects translated code in "
                               "the first 2 MiB of RAM only (labkit's 4 KiB page table)")
        entry = self._flush.get(page)
        if entry is None:
            entry = struct.unpack("<Q", self._memory().read(pt_entry_address(page), 8))[0]
        self._flush[page] = entry | WRITABLE if writable else entry & ~WRITABLE

    def _write_fault(self, trap: Trap, context: GuestContext, block: Block, code: bytes) -> None:
        """The kernel writes to a page of translated code (``code`` at ``trap.regs.rip`` in ``block``).

        A plain ``mov`` to memory the monitor carries out itself: the page stays read-only,
        the translations whose bytes the store changed are dropped (:meth:`_written`), and
        the kernel goes on after the store.  Any other instruction runs once with its page
        open: the page becomes writable and the instruction runs from a one-shot translation
        that ends in a monitor entry, where :meth:`_close_pages` compares every translated
        block on the page with the guest's bytes, drops the changed ones and protects the
        page again.
        """
        from labkit.monitor.vcpu import decode, effective_address, read_register

        cache = self._started()[0]
        guest = trap.regs.rip
        store = decode(code, guest)
        if store is not None and _plain_store(store, code):
            self._count("write: store")
            target, source = store.operands
            next_rip = guest + store.length
            value = read_register(trap.regs, source.reg) if source.kind == "reg" else source.imm
            address = effective_address(target, trap.regs, next_rip)
            context.write(address, (value & ((1 << 8 * target.size) - 1)).to_bytes(target.size, "little"))
            trap.regs.rip = next_rip
            after = cache.resume_point(block, next_rip)
            if after is None:
                self._resume(trap)
            else:
                trap.regs.rip = after
            return
        self._count("write: one-shot")
        page = trap.cr2 & ~PAGE_MASK
        if self.shadow is not None:
            physical = self._physical_page(page)
            if physical is None:
                raise LabkitError(f"the kernel's write to translated code at {trap.cr2:#x} lost its mapping")
            self.shadow.unprotect(physical, self._ram_context())
            self._open_bytes[physical] = self._ram().read_at_most(physical, layout.PAGE_SIZE)
            page = physical
        else:
            self._set_writable(page, True)
        self.protected.discard(page)
        self._open.add(page)
        trap.regs.rip = cache.one_shot(guest).cache_start

    def _close_pages(self, context: GuestContext) -> None:
        """After a one-shot write: drop the translations whose guest bytes changed, protect the pages again."""
        cache = self._started()[0]
        if self.shadow is not None:  # open pages are physical: check the virtual code pages on them
            for page, physical in sorted(self._code_pages.items()):
                if physical in self._open:
                    # Only what the instruction changed: the page's bytes before it ran against now.
                    before = self._open_bytes.get(physical, b"")
                    now = self._ram().read_at_most(physical, layout.PAGE_SIZE)
                    changed = [at for at in range(len(now)) if at >= len(before) or now[at] != before[at]]
                    if changed:
                        self._drop_stale(page + changed[0], page + changed[-1] + 1)
                    if cache.translated_in(page, page + layout.PAGE_SIZE):
                        self._protect(page)
                    else:
                        del self._code_pages[page]
            self._open.clear()
            self._open_bytes.clear()
            return
        for page in sorted(self._open):
            self._drop_stale(page, page + layout.PAGE_SIZE)
            if cache.translated_in(page, page + layout.PAGE_SIZE):
                self._protect(page)
        self._open.clear()

    def _written(self, address: int, size: int) -> None:
        """The monitor wrote guest memory for the kernel: drop the translations of code it changed."""
        if self.shadow is not None:  # ``address`` is virtual: translated code may lie behind another address
            if self.cache is None or not (self.protected or self._open):
                return
            here = address
            while here < address + size:  # one look-up per page written
                length = min(address + size - here, layout.PAGE_SIZE - (here & PAGE_MASK))
                physical = self._physical_page(here)
                for page, backing in sorted(self._code_pages.items()):
                    if backing == physical:  # the same bytes, seen through ``page``
                        start = page | here & PAGE_MASK
                        self._drop_stale(start, start + length)
                here += length
            return
        if self.cache is not None and any(page in self.protected or page in self._open
                                          for page in range(address & ~PAGE_MASK, address + size, layout.PAGE_SIZE)):
            self._drop_stale(address, address + size)

    # -- shadow paging ----------------------------------------------------------------

    def _kernel_view(self, context: MonitorContext) -> GuestContext:
        """What the monitor reads and writes for the kernel: at its virtual addresses under shadow paging."""
        if self.shadow is None:
            return context
        return self.shadow.view(context, self._started()[1])

    def _shadow_fault(self, trap: Trap, context: MonitorContext) -> str | None:
        """A #PF of translated code under shadow paging: ``"hidden"`` or ``"pt-write"`` (handled: the kernel
        goes on), ``"protected"`` (a write to translated code), or None: a true fault, the kernel's to handle."""
        shadow = self.shadow
        if shadow is None:
            raise LabkitError("no shadow paging")
        cache, vcpu = self._started()
        at = trap.regs.rip
        block = cache.block_at(at)
        guest = cache.guest_address(at)

        def instruction() -> tuple[int, bytes]:  # the guest instruction the faulting translation stands for
            if block is None or guest is None:
                raise LabkitError(f"rip {at:#x} stands for no guest instruction in the translation cache")
            return guest, next(code for address, code, _ in block.original if address == guest)

        outcome = shadow.page_fault(trap, context, vcpu, instruction=instruction)
        if outcome is None:
            return None
        kind = outcome[0]
        if kind == "hidden":
            self._count("shadow: hidden #PF")  # the same translated instruction runs again
        elif kind == "pt-write":  # carried out by shadow paging; trap.regs.rip is the guest's next instruction
            self._count("shadow: page-table write")
            self._sync_code()
            after = cache.resume_point(block, trap.regs.rip) if block is not None else None
            if after is None:
                self._resume(trap)
            else:
                trap.regs.rip = after
        return kind

    def _ram_context(self) -> MonitorContext:
        """The trap's own context: guest-physical addresses."""
        if self._context is None:
            raise LabkitError("guest memory is reached during a trap only")
        return self._context

    def _ram(self) -> GuestMemory:
        """Guest-physical memory (the trap's context's), whatever addresses the translator reads."""
        return self._ram_context().memory

    def _fetch_crosses_into_unmapped(self, rip: int) -> int | None:
        """Under shadow paging: if the instruction at ``rip`` did not decode only because its bytes run into a page
        the kernel's tables do not map, the first address there (its fetch faults: #PF, not #UD); else None."""
        if self.shadow is None:
            return None
        cache = self._started()[0]
        code = cache.peek(rip, MAX_INSTRUCTION)
        boundary = (rip | PAGE_MASK) + 1
        if len(code) == MAX_INSTRUCTION or rip + len(code) != boundary or self._physical_page(boundary) is not None:
            return None
        # Undecodable from its own bytes (an invalid opcode) is #UD; needing bytes from the next page is #PF.
        padded = cache.disassemble(code + bytes(MAX_INSTRUCTION), rip)
        return boundary if padded is not None and padded.size > len(code) else None

    def _physical_page(self, page: int) -> int | None:
        """The guest-physical page behind the kernel's virtual ``page`` under its CR3 now; None if unmapped."""
        cache, vcpu = self._started()
        memory = cache.memory
        if self.shadow is None or not isinstance(memory, _KernelCode):
            return page & ~PAGE_MASK
        physical = self.shadow.physical(memory.ram, vcpu.cr3, page)
        return None if physical is None else physical & ~PAGE_MASK

    def _sync_code(self) -> None:
        """After the kernel's mappings may have changed (a page-table store, ``invlpg``, a CR3 load): every
        virtual page of translated code that now maps another physical page (or none) has its translations
        compared with the bytes it maps now, and the changed ones dropped; the pages behind the ones that stay
        are protected, pages no translation stands on any more are released."""
        shadow = self.shadow
        if shadow is None or self.cache is None or shadow.mapping_changes == self._mapping_seen:
            return
        self._mapping_seen = shadow.mapping_changes
        cache = self.cache
        for page, physical in sorted(self._code_pages.items()):
            now = self._physical_page(page)
            if now == physical:
                continue
            self._drop_stale(page, page + layout.PAGE_SIZE)  # an unmapped page reads short: every block differs
            if now is not None and cache.translated_in(page, page + layout.PAGE_SIZE):
                self._code_pages[page] = now
                if now not in self.protected:
                    self.protected.add(now)
                    shadow.protect(now)
            else:
                del self._code_pages[page]
        for physical in sorted(self.protected - set(self._code_pages.values())):
            self.protected.discard(physical)
            shadow.unprotect(physical, self._ram_context())

    def _fetch_fault(self, fault: _FetchFault, trap: Trap, context: MonitorContext) -> None:
        """The kernel goes to code its tables do not map: a true #PF (I/D set) at that address, as its CPU
        would take fetching it.  A handler that is not mapped either faults again; the third time in one
        trap ends the run as a triple fault."""
        shadow = self.shadow
        if shadow is None:
            raise LabkitError("instruction fetch faults are shadow paging's")
        from labkit.x86.arch import CR4_PAE, CR4_SMEP, EFER_NXE, MSR_EFER

        vcpu = self._started()[1]
        kernel = _KernelWrites(self._kernel_view(context), self.cache_region, self._written)
        # I/D is set only with SMEP, or PAE paging with EFER.NXE (SDM vol. 3A, 4.7): the kernel's own settings.
        fetch = PF_FETCH if vcpu.cr4 & CR4_SMEP or (vcpu.cr4 & CR4_PAE
                                                    and vcpu.msrs.get(MSR_EFER, 0) & EFER_NXE) else 0
        for _ in range(3):
            address = fault.address
            walk = shadow._walk(context, vcpu.cr3, address & ~PAGE_MASK, False)
            shadow.true_faults += 1
            shadow._event("true", address)
            self._count("fault: #PF")
            trap.regs.rip, trap.cr2 = fault.rip, address
            try:
                self._reflect(Vector.PF, (walk.error_code or 0) | fetch, trap, kernel)
                return
            except _FetchFault as again:
                fault = again
        self._stop(context, StatusKind.SHUTDOWN, f"virtual triple fault: instruction fetches at {fault.address:#x} "
                   "keep faulting")

    def _drop_stale(self, start: int, end: int) -> None:
        cache = self._started()[0]
        for block in cache.stale(start, end):
            cache.invalidate(block)

    def _flush_on_resume(self, trap: Trap, context: MonitorContext) -> None:
        """Resume through the ring-0 stub that writes the queued page-table entries and ``invlpg``s them."""
        edits, self._flush = self._flush, {}
        if len(edits) > FLUSH_CAPACITY:
            raise _Unsupported(f"{len(edits)} page-table entries to change at once; the stub holds {FLUSH_CAPACITY}")
        regs = trap.regs
        frame = FLUSH_STACK - 40
        context.write(frame, struct.pack("<5Q", regs.rip, trap.cs, regs.rflags, regs.rsp, trap.ss))
        pages = sorted(edits)
        table = self._flush_stub + FLUSH_COUNT
        context.write(table, struct.pack("<Q", len(pages)))
        for index, values in enumerate(([pt_entry_address(page) for page in pages], [edits[page] for page in pages],
                                        pages)):
            context.write(table + 8 + 8 * FLUSH_CAPACITY * index, struct.pack(f"<{len(pages)}Q", *values))
        regs.rip, regs.rsp = self._flush_stub, frame
        trap.cs, trap.ss = layout.KERNEL_CS64, layout.KERNEL_DS
        self.flushes += 1

    def _memory(self) -> GuestMemory:
        cache = self._started()[0]
        if not isinstance(cache.memory, GuestMemory):
            raise LabkitError("the translation cache reads guest memory through a GuestMemory")
        return cache.memory

    def _started(self) -> tuple[TranslationCache, VirtualCpu]:
        """The cache and the virtual CPU, which exist once the first trap has started the translation."""
        if self.cache is None or self.vcpu is None:
            raise LabkitError("binary translation has not started: the kernel's first trap starts it")
        return self.cache, self.vcpu

    def _branch_target(self, site: Site, trap: Trap, context: GuestContext) -> int | None:
        """Carry out ``ret``/``jmp r/m``/``call r/m`` on the guest's registers and stack; the guest target."""
        from labkit.monitor.vcpu import decode, effective_address, read_register

        regs = trap.regs
        decoded = decode(site.code, site.guest_rip)
        if decoded is None:
            self._stop(context, StatusKind.ERROR, f"cannot decode the instruction at RIP {site.guest_rip:#x}")
            return None
        operands = decoded.operands
        if decoded.mnemonic == "ret":
            target = struct.unpack("<Q", context.read(regs.rsp, 8))[0]
            regs.rsp = (regs.rsp + 8 + (operands[0].imm if operands else 0)) & _MASK64
            return target
        if decoded.mnemonic not in INDIRECT or len(operands) != 1 or operands[0].kind == "imm":
            self._stop(context, StatusKind.ERROR, f"unemulated instruction at RIP {site.guest_rip:#x}: {site.text}")
            return None
        operand = operands[0]
        if operand.kind == "reg":
            target = read_register(regs, operand.reg)
        else:
            target = struct.unpack("<Q", context.read(effective_address(operand, regs, site.guest_next), 8))[0]
        if decoded.mnemonic == "call":
            regs.rsp = (regs.rsp - 8) & _MASK64
            context.write(regs.rsp, struct.pack("<Q", site.guest_next))
        return target

    def _stop_cache_write(self, context: GuestContext, address: int, rip: int) -> None:
        base, end = self.cache_region
        self._stop(context, StatusKind.ERROR, f"the kernel wrote to {address:#x} at rip {rip:#x}, inside the translation "
                   f"cache ({base:#x}-{end:#x}): the top {(end - base) >> 10} KiB of RAM belong to the monitor, "
                   "which keeps them read-only; keep the kernel's data below, or give the Machine more memory")

    def _stop(self, context: GuestContext, kind: StatusKind, message: str) -> None:
        self._stopped = True
        context.stop(Status(kind, message=message))

    def _count(self, reason: str) -> None:
        self.entries[reason] = self.entries.get(reason, 0) + 1


class _FetchFault(Exception):
    """Under shadow paging: the kernel's next instruction lies at a virtual address its tables do not map
    (``address``; ``rip``, where the instruction starts, if it began on a mapped page)."""

    def __init__(self, address: int, rip: int | None = None):
        super().__init__(address)
        self.address = address
        self.rip = address if rip is None else rip


class _KernelCode:
    """Guest memory as the translator reads it under shadow paging (a :class:`Readable`): the kernel's code at
    its virtual addresses, through the kernel's page tables; the translation cache at its own addresses."""

    def __init__(self, ram: GuestMemory, translator: BinaryTranslator, region: tuple[int, int]):
        self.ram = ram
        self._translator = translator
        self._region = region

    def read(self, address: int, size: int) -> bytes:
        data = self.read_at_most(address, size)
        if len(data) != size:
            raise LabkitError(f"the kernel's tables do not map all {size} bytes at virtual {address:#x}")
        return data

    def read_at_most(self, address: int, size: int) -> bytes:
        start, end = self._region
        if start <= address < end:
            return self.ram.read_at_most(address, min(size, end - address))
        out = b""
        while len(out) < size:
            here = address + len(out)
            physical = self._translator._physical_page(here)
            if physical is None:
                break
            length = min(size - len(out), layout.PAGE_SIZE - (here & PAGE_MASK))
            piece = self.ram.read_at_most(physical | here & PAGE_MASK, length)
            out += piece
            if len(piece) < length:
                break
        return out


class _CacheWrite(Exception):
    def __init__(self, address: int):
        super().__init__(address)
        self.address = address


class _Unsupported(LabkitError):
    """Something binary translation does not do (the run stops with this message)."""


class _KernelWrites:
    """A MonitorContext whose ``write`` refuses the monitor's region (raises :class:`_CacheWrite`)
    and reports every write it lets through to ``written(address, size)``."""

    def __init__(self, context: GuestContext, region: tuple[int, int], written: Callable[[int, int], None]):
        self._context = context
        self._region = region
        self._written = written
        self.memory = context.memory

    @property
    def trap(self) -> Trap | None:
        return self._context.trap

    def pio(self, port: int, size: int, is_write: bool, value: int = 0) -> int:
        return self._context.pio(port, size, is_write, value)

    def stop(self, status: Status) -> None:
        self._context.stop(status)

    def read(self, address: int, size: int) -> bytes:
        return self._context.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        start, end = self._region
        if address < end and address + len(data) > start:
            raise _CacheWrite(max(address, start))
        self._context.write(address, data)
        self._written(address, len(data))


def _plain_store(decoded: Decoded, code: bytes) -> bool:
    """``mov m, r`` or ``mov m, imm``, with no prefix that changes how its address is formed (FS, GS, 0x67)."""
    if decoded.mnemonic != "mov" or len(decoded.operands) != 2 or any(byte in (0x64, 0x65, 0x67) for byte in
                                                                       _legacy_prefixes(code)):
        return False
    target, source = decoded.operands
    return target.kind == "mem" and (source.kind == "imm" or (source.kind == "reg" and source.reg not in
                                                             ("cs", "ss", "ds", "es", "fs", "gs")))


def _legacy_prefixes(code: bytes) -> bytes:
    at = 0
    while at < len(code) and code[at] in (0x66, 0x67, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF0, 0xF2, 0xF3):
        at += 1
    return code[:at]


def _entry_name(code: bytes, address: int) -> str:
    """How an emulated instruction is counted: its mnemonic, or its segment operation (``"mov sreg"``, ``"lcall"``)."""
    from labkit.monitor.vcpu import decode

    kind = segment_operation(code, address)
    if kind is not None:
        return kind
    decoded = decode(bytes(code[:15]), address)
    return decoded.mnemonic if decoded is not None else code.hex()


def _short(vector: int) -> str:
    """``#PF`` for 14."""
    return exception_name(vector).split(" ")[0]


def run_translated(kernel: Guest | str, backend: str = "auto", timeout: float = 10.0, *,
                   translate: Iterable[str] | None = None, timer: bool = False, shadow: ShadowPaging | None = None,
                   **machine_options: Any) -> RunResult:
    """Run ``kernel`` (written for ring 0) by binary translation in ring 3; a ``RunResult``.

    ``result.monitor`` is the :class:`TranslationSummary`.  ``translate``,
    ``timer`` and ``shadow`` go to :class:`BinaryTranslator`, ``machine_options`` to the Machine.
    """
    from labkit.vmm.machine import Machine

    translator = BinaryTranslator(kernel, translate=translate, timer=timer, shadow=shadow)
    with Machine(translator.guest, backend=backend, monitor=translator, **machine_options) as machine:
        return machine.run(timeout)


def consoles_side_by_side(consoles: dict[str, str], *, reference: str | None = None) -> Table:
    """Console output of several runs line by line (a :class:`labkit.table.Table`).

    A line marked ``≠`` differs from the ``reference`` run's (default: the first).
    """
    if not consoles:
        raise ConfigError("consoles_side_by_side needs at least one console")
    names = list(consoles)
    reference = names[0] if reference is None else reference
    if reference not in consoles:
        raise ConfigError(f"reference {reference!r} is not one of {names}")
    lines = {name: text.splitlines() for name, text in consoles.items()}
    depth = max(len(text) for text in lines.values())
    rows = []
    for index in range(depth):
        cells = [lines[name][index] if index < len(lines[name]) else "" for name in names]
        base = cells[names.index(reference)]
        rows.append([str(index + 1)] + [("≠ " if cell != base else "  ") + cell for cell in cells])
    differing = {name: sum(1 for row in rows if row[1 + names.index(name)].startswith("≠")) for name in names}
    note = "; ".join(f"{name}: {count} line(s) differ from {reference}" for name, count in differing.items()
                     if name != reference)
    return Table("Console output, line by line (≠: differs from " + reference + ")", ["line"] + names, rows,
                 note=note)
