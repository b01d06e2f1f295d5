"""Shadow page tables: the deprivileged kernel's CR3 and page tables become virtual (Intel SDM vol. 3A, ch. 4).

Without nested paging the CPU can walk only one set of page tables, so a
monitor that lets a kernel believe it controls paging keeps *shadow* tables
the CPU really walks: guest-virtual to host-physical (here labkit's
guest-physical RAM, which the monitor hands the kernel unchanged).  A
:class:`ShadowPaging` does that for :class:`~labkit.monitor.trap_emulate.TrapAndEmulate`
(``TrapAndEmulate(shadow=ShadowPaging())``) and for
:class:`~labkit.monitor.binary_translation.BinaryTranslator`
(``BinaryTranslator(kernel, shadow=ShadowPaging())``, whose translated code takes
the page faults: see that module); :func:`run_shadowed` runs a kernel under either:

- The kernel's ``mov cr3`` sets its *virtual* CR3; the monitor loads the
  real CR3 with the shadow root it keeps for that value (one per address
  space, kept across switches, so switching back costs no refill).
- Shadow tables start empty and are filled on demand.  A #PF the kernel
  takes is walked in the kernel's own tables (:func:`walk_kernel`): if they
  allow the access, the fault is *hidden* (the monitor fills the shadow
  entry and the kernel never knows); if they do not, it is a *true* fault,
  reflected to the kernel's handler with the kernel's CR2 and an error code
  from the kernel's tables (P from its entry, W/R and I/D from the access, U/S
  clear: the kernel believes it ran in ring 0).
- Every page the kernel's tables were read from is write-protected in the
  shadow.  A kernel store there faults; the monitor carries it out (a plain
  ``mov`` store: anything else stops the run naming it) and drops every
  shadow entry built from the entry it changed (the next access refills
  it).  So a shadow entry never outlives the kernel entry it came from, and
  ``invlpg`` and CR3 loads, which the monitor also honours, find nothing stale.
- Accessed and dirty bits stay true: a walk sets A in every present entry it
  uses (the leaf's only when the access is allowed) and D in the leaf of a
  write, as the emulator's CPU does; a page whose D is clear is shadowed
  read-only, so the first write faults (hidden) and sets D.

What the CPU needs for the monitor itself is mapped in every shadow root,
supervisor-only, identity: labkit's forwarding stubs, GDT, IDT and TSS below
0x4000, the monitor's stack (0x6e000-0x70000) and the monitor's pool at the
top of RAM (the shadow tables and the ring-0 stub).  The kernel must not use
those virtual addresses, nor map the pool: either stops the run with a
message (VMware hid its monitor at the top of the address space the same way).

Shadow entries are written *as the guest*, by a ring-0 stub in the pool
(:func:`shadow_stub`), never by the host, once the CPU may have walked them:
KVM's shadow MMU under PVM ignores a host write to a page table it shadows
even after ``invlpg`` or a CR3 reload, and Unicorn keeps a TLB (DECISIONS,
binary translation).  Only pool pages the CPU has never seen are written by
the host.  Pool pages are never reused: a full pool stops the run with a
message (``pool_size``).  Not modelled: 5-level paging, PCIDs, global pages,
NX, reserved-bit faults, a store to a page table that straddles a page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from labkit.errors import ConfigError, GuestMemoryError, LabkitError
from labkit.memory import GuestMemory
from labkit.monitor.vcpu import Decoded, VirtualCpu, decode, effective_address, read_register
from labkit.vmm.forwarding import GuestContext, Trap
from labkit.vmm.status import RunResult, Status
from labkit.x86 import layout
from labkit.x86.arch import CR0_WP, PF_FETCH, PF_PRESENT, PF_WRITE, Vector
from labkit.x86.paging import ACCESSED, ADDRESS_MASK, DIRTY, PAGE_SIZE_BIT, PRESENT, USER, WRITABLE


if TYPE_CHECKING:
    from labkit.guest import Guest

PAGE = layout.PAGE_SIZE
PAGE_MASK = PAGE - 1
LEVELS = ("PML4", "PDPT", "PD", "PT")
SHIFTS = (39, 30, 21, 12)
POOL_SIZE = 256 << 10
"""RAM at the top the monitor keeps for its stub and shadow tables, by default."""
MONITOR_LOW = (0, layout.PML4_ADDRESS)
"""Forwarding stubs, GDT, IDT, TSS: what the CPU reads when the kernel traps."""
MONITOR_STACK = (layout.KERNEL_STACK_TOP - 0x2000, layout.KERNEL_STACK_TOP)
"""RSP0's page and the page below it, where the stub's ``iretq`` frame goes."""
STUB_FRAME = layout.KERNEL_STACK_TOP - 0x1000 - 40
STUB_COUNT = 128
"""Offset in the stub's page of the number of entries to write; the CR3 to load, then three arrays follow."""
STUB_CAPACITY = (PAGE - STUB_COUNT - 16) // 24
BOOT_BREAKPOINT = b"\xcc"
_ENTRY = struct.Struct("<Q")
_POINTER = PRESENT | WRITABLE | USER | ACCESSED
_SUPERVISOR = PRESENT | WRITABLE | ACCESSED | DIRTY


def shadow_stub(at: int) -> bytes:
    """Ring-0 code at ``at``: write shadow entries as the guest, ``invlpg`` each, maybe load CR3, ``iretq``.

    Its page holds, from ``at + STUB_COUNT``: the number of entries, the CR3 to
    load (0: none), then ``STUB_CAPACITY`` entry addresses, as many values and
    as many linear addresses to ``invlpg``::

        push rax ; push rcx ; push rdx
        mov rcx, [count]
        test rcx, rcx ; jz done
    again:
        mov rax, [entries + rcx * 8 - 8] ; mov rdx, [values + rcx * 8 - 8]
        mov [rax], rdx                     ; the guest's own store: KVM's shadow MMU sees it
        mov rax, [pages + rcx * 8 - 8] ; invlpg [rax]
        loop again
    done:
        mov rax, [cr3] ; test rax, rax ; jz out
        mov cr3, rax                       ; the shadow root of the kernel's new CR3; flushes the TLB
    out:
        pop rdx ; pop rcx ; pop rax
        iretq                              ; the frame the monitor wrote: the kernel, ring 3
    """
    count = at + STUB_COUNT
    cr3 = count + 8
    entries, values, pages = (cr3 + 8 + 8 * STUB_CAPACITY * i for i in range(3))
    if pages + 8 * STUB_CAPACITY >= 1 << 31:
        raise ConfigError(f"the shadow stub at {at:#x} must lie below 2 GiB (32-bit absolute addresses)")
    loop_body = (b"\x48\x8b\x04\xcd" + struct.pack("<i", entries - 8)
                 + b"\x48\x8b\x14\xcd" + struct.pack("<i", values - 8)
                 + b"\x48\x89\x10"
                 + b"\x48\x8b\x04\xcd" + struct.pack("<i", pages - 8)
                 + b"\x0f\x01\x38")
    loop = loop_body + b"\xe2" + bytes([(-(len(loop_body) + 2)) & 0xFF])
    code = (b"\x50\x51\x52" + b"\x48\x8b\x0c\x25" + struct.pack("<i", count)
            + b"\x48\x85\xc9" + b"\x74" + bytes([len(loop)]) + loop
            + b"\x48\x8b\x04\x25" + struct.pack("<i", cr3) + b"\x48\x85\xc0" + b"\x74\x03" + b"\x0f\x22\xd8"
            + b"\x5a\x59\x58\x48\xcf")
    if len(code) > STUB_COUNT:
        raise AssertionError("the shadow stub outgrew its slot")
    return code.ljust(STUB_COUNT, b"\xcc")


# -- the kernel's page walk -------------------------------------------------------------------

@dataclass(frozen=True)
class WalkStep:
    """One entry of a walk: its level, the table it is in, where it is and what it held."""

    level: str
    table: int
    address: int
    entry: int


@dataclass(frozen=True)
class KernelWalk:
    """The kernel's own tables for one access: the entries used, then the page or the fault's error code."""

    address: int
    steps: tuple[WalkStep, ...]
    page: int | None
    """Guest-physical page (4 KiB) behind ``address``; None if the access faults."""
    writable: bool
    error_code: int | None
    """The #PF error code the kernel's CPU would push (P, W/R; U/S clear); None if the access is allowed."""

    @property
    def physical(self) -> int | None:
        return None if self.page is None else self.page | self.address & PAGE_MASK


def walk_kernel(read_entry: Callable[[int], int], cr3: int, address: int, *, write: bool = False,
                write_protect: bool = True) -> KernelWalk:
    """Walk the kernel's 4-level tables from ``cr3`` for a supervisor access (SDM 4.5; 2 MiB and 1 GiB pages).

    ``read_entry`` reads the 8-byte entry at a guest-physical address.  With
    ``write_protect`` (CR0.WP) a write to a read-only page faults at ring 0 too.
    """
    steps: list[WalkStep] = []
    table = cr3 & ADDRESS_MASK
    writable = True
    access = PF_WRITE if write else 0
    for depth, (level, shift) in enumerate(zip(LEVELS, SHIFTS)):
        at = table + (address >> shift & 0x1FF) * 8
        entry = read_entry(at)
        steps.append(WalkStep(level, table, at, entry))
        if not entry & PRESENT:
            return KernelWalk(address, tuple(steps), None, False, access)
        writable = writable and bool(entry & WRITABLE)
        if depth == 3 or (depth in (1, 2) and entry & PAGE_SIZE_BIT):
            size = 1 << shift
            page = (entry & ADDRESS_MASK & ~(size - 1)) | (address & (size - 1) & ~PAGE_MASK)
            if write and not writable and write_protect:
                return KernelWalk(address, tuple(steps), None, False, access | PF_PRESENT)
            return KernelWalk(address, tuple(steps), page, writable or not write_protect, None)
        table = entry & ADDRESS_MASK
    raise AssertionError("unreachable: the PT level is always a leaf")


# -- what the monitor reports -------------------------------------------------------------------

@dataclass(frozen=True)
class ShadowEvent:
    """One page-fault-level event of the run: ``kind`` is "hidden", "true", "pt-write", "invlpg" or "cr3"."""

    kind: str
    address: int
    cr3: int


@dataclass
class ShadowReport:
    """What shadow paging counted during a run (``TrapEmulateReport.shadow``); it pickles."""

    hidden_faults: int
    """#PFs the monitor absorbed: it filled or refreshed a shadow entry the kernel's tables allowed."""
    true_faults: int
    """#PFs the kernel's own tables call for, reflected to its handler."""
    pt_writes: int
    """Kernel stores to its page-table pages, trapped and carried out by the monitor."""
    invlpgs: int
    cr3_loads: int
    roots_built: int
    """Shadow roots made (one per address space the kernel loaded)."""
    entries_zapped: int
    """Shadow entries dropped because the kernel entry they came from changed, or by ``invlpg``."""
    stub_runs: int
    """Resumptions through the ring-0 stub that writes shadow entries as the guest."""
    pool_pages_used: int
    tables: list[int]
    """The kernel's page-table pages the monitor write-protects (guest-physical)."""
    roots: dict[int, int]
    """Kernel CR3 -> its shadow root."""
    shadow: dict[tuple[int, int], int] = field(default_factory=dict)
    """(shadow root, virtual page) -> the shadow leaf entry, as the monitor last wrote it."""
    events: list[ShadowEvent] = field(default_factory=list)
    events_dropped: int = 0


class ShadowFull(LabkitError):
    """The monitor's pool has no page left for a shadow table (the run stops with this message)."""


# -- the monitor's part --------------------------------------------------------------------------

class ShadowPaging:
    """Shadow page tables for a monitor that runs a kernel in ring 3; see the module docstring.

    ``pool_size`` bytes at the top of RAM belong to the monitor (the stub and
    the shadow tables); the kernel's code, data and mappings must stay below.
    """

    def __init__(self, *, pool_size: int = POOL_SIZE, max_events: int = 20000) -> None:
        if pool_size % PAGE or pool_size < 4 * PAGE:
            raise ConfigError(f"pool_size must be a whole number of 4 KiB pages, at least 4, not {pool_size}")
        self.pool_size = pool_size
        self.max_events = max_events
        self.started = False
        self.entry: int | None = None
        self._entry_byte = b""
        self.pool = (0, 0)
        self.stub = 0
        self._next = 0
        self._fresh: set[int] = set()  # pool pages the CPU has never walked: the host may write them
        self.roots: dict[int, int] = {}  # kernel CR3 page -> shadow root
        self.live_root = 0
        self._tables: dict[tuple[int, int, int], int] = {}  # (root, depth, va >> shift of the level above) -> page
        self.leaves: dict[tuple[int, int], int] = {}  # (root, virtual page) -> shadow leaf
        self._by_physical: dict[int, set[tuple[int, int]]] = {}  # kernel page -> (root, virtual page) mapping it
        self._derived: dict[int, set[tuple[int, int, int]]] = {}  # kernel entry -> (root, virtual page, depth)
        self.tables: set[int] = set()
        self.protected: set[int] = set()
        """Kernel pages another part of the monitor keeps read-only (binary translation's code pages)."""
        self.shared: list[tuple[int, int, frozenset[int]]] = []
        """Monitor memory mapped identity *for ring 3* in every root: ``(start, end, writable pages)``."""
        self.mapping_changes = 0
        """Grows whenever the kernel's mappings may have changed: a page-table store, ``invlpg``, a CR3 load."""
        self._pending: dict[int, tuple[int, int]] = {}  # shadow entry address -> (value, linear address to invlpg)
        self._load_cr3 = 0
        self._cut: list[tuple[int, int, int]] = []  # (root, shift, prefix) of dropped subtrees that held monitor pages
        self._write_protect = True
        self.hidden_faults = self.true_faults = self.pt_writes = self.invlpgs = self.cr3_loads = 0
        self.entries_zapped = self.stub_runs = 0
        self.events: list[ShadowEvent] = []
        self.events_dropped = 0

    # -- booting ------------------------------------------------------------------------------

    def boot_guest(self, kernel: Guest) -> Guest:
        """``kernel`` with an ``int3`` at its entry, so the monitor takes over before its first instruction."""
        entry = kernel.load_address if kernel.entry is None else kernel.entry
        offset = entry - kernel.load_address
        if not 0 <= offset < len(kernel.code):
            raise ConfigError(f"{kernel.name!r}: entry {entry:#x} lies outside its code")
        self.entry, self._entry_byte = entry, kernel.code[offset:offset + 1]
        return replace(kernel, code=kernel.code[:offset] + BOOT_BREAKPOINT + kernel.code[offset + 1:])

    def start(self, trap: Trap, context: GuestContext, vcpu: VirtualCpu, *, top: int | None = None) -> bool:
        """Set up at the kernel's first trap: the pool, the stub, the root for its CR3. True if the trap was
        the boot breakpoint (consumed: the kernel resumes at its first instruction).

        The pool ends at ``top`` (default: the end of RAM; binary translation keeps its cache above it).
        """
        memory = context.memory
        ram = memory.ram_size if top is None else top
        base = ram - self.pool_size
        if base <= layout.STACK_TOP:
            raise ConfigError(f"shadow paging keeps {self.pool_size >> 10} KiB below {ram:#x} for its pool; "
                              f"that reaches below the kernel's stack top {layout.STACK_TOP:#x}: give the Machine more memory")
        self.started = True
        self.pool = (base, ram)
        self.stub = base
        context.write(base, bytes(self.pool_size))  # the CPU has never walked the pool: the host may clear it
        context.write(self.stub, shadow_stub(self.stub))
        self._next = base + PAGE
        self._write_protect = bool(vcpu.cr0 & CR0_WP)
        consumed = (self.entry is not None and trap.vector == Vector.BP
                    and trap.regs.rip == self.entry + 1)
        if consumed and self.entry is not None:
            context.write(self.entry, self._entry_byte)
            trap.regs.rip = self.entry
        self._switch(vcpu.cr3, context)  # the tables the kernel booted on
        return consumed

    # -- the monitor's hooks ----------------------------------------------------------------------

    def page_fault(self, trap: Trap, context: GuestContext, vcpu: VirtualCpu, *,
                   instruction: Callable[[], tuple[int, bytes]] | None = None) -> tuple[str, str] | None:
        """A #PF of the kernel: absorb it (hidden, a page-table store) and say what was done, or None: a true
        fault, for the monitor to reflect with ``trap.error_code`` (now the kernel's) and ``trap.cr2``.

        ``instruction`` gives the kernel's faulting instruction as ``(its RIP, its bytes)`` where the CPU
        did not run it at its own address (binary translation); by default it is read at ``trap.regs.rip``.
        A page-table store leaves ``trap.regs.rip`` after that instruction.  A write the kernel's tables
        allow to a page in :attr:`protected` is left to the caller: ``("protected", ...)``.
        """
        address = trap.cr2
        write = bool(trap.error_code & PF_WRITE)
        walk = self._walk(context, vcpu.cr3, address, write)
        self._set_accessed(walk, write, context)
        if walk.error_code is not None or walk.page is None:
            trap.error_code = (walk.error_code or 0) | (trap.error_code & PF_FETCH)
            self.true_faults += 1
            self._event("true", address)
            return None
        if self._reserved(address):
            ranges = ", ".join(f"{start:#x}-{end:#x}" for start, end, _ in self.shared)
            raise LabkitError(f"the kernel uses virtual address {address:#x}, which the monitor keeps for itself "
                              f"(below {MONITOR_LOW[1]:#x}, {MONITOR_STACK[0]:#x}-{MONITOR_STACK[1]:#x}, and "
                              f"{self.pool[0]:#x}-{self.pool[1]:#x}{', ' + ranges if ranges else ''})")
        self._check_physical(walk.page, address)
        if write and walk.page in self.tables:
            self._page_table_store(walk, trap, context, vcpu, instruction)
            return "pt-write", f"page-table store at {address:#x}"
        if write and walk.page in self.protected:
            return "protected", f"write to protected page {walk.page:#x} at {address:#x}"
        self._fill(walk, write)
        self.hidden_faults += 1
        self._event("hidden", address)
        return "hidden", f"shadow entry filled for {address:#x}"

    def protect(self, page: int) -> None:
        """Keep kernel page ``page`` (guest-physical) read-only in every shadow leaf mapping it, from now on."""
        if page in self.protected:
            return
        self.protected.add(page)
        self._read_only(page)

    def unprotect(self, page: int, context: GuestContext) -> None:
        """Stop keeping ``page`` read-only: each shadow leaf mapping it becomes writable where the kernel's
        tables allow the write and its leaf is already dirty; the others stay read-only, and a write through
        them is a hidden #PF that sets D, as for any clean page."""
        if page not in self.protected:
            return
        self.protected.discard(page)
        if page in self.tables:
            return
        kernel_cr3 = {root: cr3 for cr3, root in self.roots.items()}
        for root, virtual in sorted(self._by_physical.get(page, ())):
            value, cr3 = self.leaves.get((root, virtual)), kernel_cr3.get(root)
            if value is None or cr3 is None or value & WRITABLE:
                continue
            walk = self._walk(context, cr3, virtual, True)
            if walk.page == page and walk.error_code is None and walk.steps[-1].entry & DIRTY:
                self._write_leaf(root, virtual, value | WRITABLE, None)

    def fetch(self, context: GuestContext, cr3: int, address: int) -> int | None:
        """The kernel's CPU fetches at virtual ``address``: walk its tables from ``cr3``, set A, write-protect
        the tables used (so a store that remaps the code traps); the physical page, or None if it faults."""
        walk = self._walk(context, cr3, address, False)
        self._set_accessed(walk, False, context)
        if walk.page is not None:
            for step in walk.steps:
                self._track(step.table)
        return walk.page

    def physical(self, memory: GuestContext | GuestMemory, cr3: int, address: int) -> int | None:
        """Guest-physical address of the kernel's virtual ``address`` under ``cr3`` for a read, or None if it faults.

        A pure look-up: no accessed bit is set.
        """
        walk = walk_kernel(lambda at: int(_ENTRY.unpack(memory.read(at, 8))[0]), cr3, address,
                           write_protect=self._write_protect)
        return walk.physical

    def emulated(self, decoded: Decoded, trap: Trap, context: GuestContext, vcpu: VirtualCpu) -> None:
        """After the monitor emulated ``decoded``: honour ``invlpg``, a CR3 load, a change of CR0.WP."""
        if isinstance(context, KernelMemory):
            context = context.physical
        if decoded.mnemonic == "invlpg" and decoded.operands and decoded.operands[0].kind == "mem":
            address = effective_address(decoded.operands[0], trap.regs, trap.regs.rip)
            self.invlpgs += 1
            self.mapping_changes += 1
            self._event("invlpg", address)
            self._zap(self.live_root, address & ~PAGE_MASK, 3)
        elif decoded.mnemonic == "mov" and decoded.operands and decoded.operands[0].kind == "reg":
            target = decoded.operands[0].reg
            if target == "cr3":
                self.load_cr3(vcpu.cr3, context)
            elif target == "cr0" and bool(vcpu.cr0 & CR0_WP) != self._write_protect:
                self._write_protect = bool(vcpu.cr0 & CR0_WP)
                self.mapping_changes += 1
                self.roots.clear()  # every shadow entry was built under the other WP: build anew
                self._switch(vcpu.cr3, context)

    def load_cr3(self, cr3: int, context: GuestContext) -> None:
        """The kernel loaded ``cr3``: the real CR3 becomes its shadow root (made empty if new)."""
        self.cr3_loads += 1
        self.mapping_changes += 1
        self._event("cr3", cr3 & ADDRESS_MASK)
        self._switch(cr3, context)

    def _switch(self, cr3: int, context: GuestContext) -> None:
        key = cr3 & ADDRESS_MASK
        root = self.roots.get(key)
        if root is None:
            root = self._allocate(context)
            self.roots[key] = root
            self.live_root = root
            self._map_monitor(root, context)
        self.live_root = root
        self._track(key)
        self._load_cr3 = root

    def _map_monitor(self, root: int, context: GuestContext, shift: int = 64, prefix: int = 0) -> None:
        """Map the monitor's own memory in ``root`` (identity), the pages whose address ``>> shift`` is ``prefix``."""
        for start, end in (MONITOR_LOW, MONITOR_STACK, self.pool):
            for page in range(start, end, PAGE):
                if page >> shift == prefix:
                    self._write_leaf(root, page, page | _SUPERVISOR, context)
        for start, end, writable in self.shared:  # run by ring 3: user, read-only but for ``writable``
            for page in range(start, end, PAGE):
                if page >> shift == prefix:
                    flags = _SUPERVISOR | USER if page in writable else (_SUPERVISOR | USER) & ~WRITABLE
                    self._write_leaf(root, page, page | flags, context, kernel=False)

    def resume(self, trap: Trap, context: GuestContext) -> None:
        """If shadow entries or CR3 must change, resume the kernel through the stub that makes them as the guest."""
        for root, shift, prefix in self._cut:  # a dropped subtree took monitor pages with it: map them again
            self._map_monitor(root, context, shift, prefix)
        self._cut.clear()
        if not self._pending and not self._load_cr3:
            self._fresh.clear()
            return
        edits, self._pending = self._pending, {}
        if len(edits) > STUB_CAPACITY:
            raise ShadowFull(f"{len(edits)} shadow entries to change at once; the stub holds {STUB_CAPACITY}")
        regs = trap.regs
        context.write(STUB_FRAME, struct.pack("<5Q", regs.rip, trap.cs, regs.rflags, regs.rsp, trap.ss))
        at = self.stub + STUB_COUNT
        addresses = sorted(edits)
        context.write(at, struct.pack("<QQ", len(addresses), self._load_cr3))
        for index, values in enumerate((addresses, [edits[a][0] for a in addresses], [edits[a][1] for a in addresses])):
            if values:
                context.write(at + 16 + 8 * STUB_CAPACITY * index, struct.pack(f"<{len(values)}Q", *values))
        regs.rip, regs.rsp = self.stub, STUB_FRAME
        trap.cs, trap.ss = layout.KERNEL_CS64, layout.KERNEL_DS
        self._load_cr3 = 0
        self._fresh.clear()
        self.stub_runs += 1

    def view(self, context: GuestContext, vcpu: VirtualCpu) -> KernelMemory:
        """``context`` with the kernel's virtual addresses: what the monitor reads and writes for the kernel."""
        return KernelMemory(context, self, vcpu)

    def read_code(self, context: GuestContext, vcpu: VirtualCpu, rip: int, size: int) -> bytes:
        """Up to ``size`` bytes of kernel code at virtual ``rip`` (fewer where its mapping ends)."""
        return self.view(context, vcpu).read_at_most(rip, size)

    def summary(self) -> ShadowReport:
        return ShadowReport(self.hidden_faults, self.true_faults, self.pt_writes, self.invlpgs, self.cr3_loads,
                            len(self.roots), self.entries_zapped, self.stub_runs,
                            (self._next - self.pool[0]) // PAGE if self.started else 0, sorted(self.tables),
                            dict(self.roots), dict(self.leaves), list(self.events), self.events_dropped)

    # -- walking and filling ----------------------------------------------------------------------

    def _walk(self, context: GuestContext, cr3: int, address: int, write: bool) -> KernelWalk:
        def read(at: int) -> int:
            try:
                return int(_ENTRY.unpack(context.read(at, 8))[0])
            except GuestMemoryError:
                raise LabkitError(f"the kernel's page-table entry at {at:#x} (walking {address:#x}) lies outside "
                                  "guest RAM") from None

        return walk_kernel(read, cr3, address, write=write, write_protect=self._write_protect)

    def _set_accessed(self, walk: KernelWalk, write: bool, context: GuestContext) -> None:
        """A in each present entry the walk used, the leaf's only if the access is allowed; D in a written leaf."""
        allowed = walk.error_code is None
        for step in walk.steps:
            if not step.entry & PRESENT:
                break
            leaf = step is walk.steps[-1]
            if leaf and not allowed:
                break
            value = step.entry | ACCESSED | (DIRTY if leaf and write else 0)
            if value != step.entry:
                context.write(step.address, _ENTRY.pack(value))

    def _fill(self, walk: KernelWalk, write: bool) -> None:
        page, root = walk.address & ~PAGE_MASK, self.live_root
        if walk.page is None:
            raise AssertionError("filling a faulting walk")
        for step in walk.steps:
            self._track(step.table)
        leaf_entry = walk.steps[-1].entry | ACCESSED | (DIRTY if write else 0)
        writable = (walk.writable and leaf_entry & DIRTY and walk.page not in self.tables
                    and walk.page not in self.protected)
        value = walk.page | PRESENT | USER | ACCESSED | DIRTY | (WRITABLE if writable else 0)
        self._write_leaf(root, page, value, None)
        self._by_physical.setdefault(walk.page, set()).add((root, page))
        for depth, step in enumerate(walk.steps):
            self._derived.setdefault(step.address, set()).add((root, page, depth))

    def _track(self, table: int) -> None:
        """Write-protect kernel page ``table`` (it holds page-table entries): every shadow leaf mapping it read-only."""
        if table in self.tables:
            return
        self.tables.add(table)
        self._read_only(table)

    def _read_only(self, physical: int) -> None:
        """Make every shadow leaf that maps kernel page ``physical`` read-only."""
        for root, page in sorted(self._by_physical.get(physical, ())):
            value = self.leaves.get((root, page))
            if value is not None and value & WRITABLE:
                self._write_leaf(root, page, value & ~WRITABLE, None)

    def _page_table_store(self, walk: KernelWalk, trap: Trap, context: GuestContext, vcpu: VirtualCpu,
                          instruction: Callable[[], tuple[int, bytes]] | None) -> None:
        """Carry out the kernel's store into its page table (a plain ``mov``), then drop what derived from it."""
        if instruction is None:
            rip = trap.regs.rip
            code = self.view(context, vcpu).read_at_most(rip, 15)
        else:
            rip, code = instruction()
        decoded = decode(code, rip)
        if decoded is None or not _plain_store(decoded):
            raise LabkitError(f"the kernel wrote to its page table at {walk.address:#x} with "
                              f"'{decoded.text if decoded else 'undecodable'}' at rip {rip:#x}; the monitor carries "
                              "out plain mov stores only")
        target, source = decoded.operands
        next_rip = rip + decoded.length
        address = effective_address(target, trap.regs, next_rip)
        if address & ~PAGE_MASK != walk.address & ~PAGE_MASK or (address & PAGE_MASK) + target.size > PAGE:
            raise LabkitError(f"the kernel's page-table store at rip {rip:#x} straddles a page; not modelled")
        value = read_register(trap.regs, source.reg) if source.kind == "reg" else source.imm
        physical = (walk.page or 0) | address & PAGE_MASK
        context.write(physical, (value & ((1 << 8 * target.size) - 1)).to_bytes(target.size, "little"))
        trap.regs.rip = next_rip
        self.pt_writes += 1
        self._event("pt-write", address)
        self._changed(physical, target.size)

    def _changed(self, physical: int, size: int) -> None:
        """Kernel page-table bytes at ``physical`` changed: drop every shadow entry built from them."""
        self.mapping_changes += 1
        for entry in range(physical & ~7, physical + size, 8):
            for root, page, depth in sorted(self._derived.pop(entry, ())):
                self._zap(root, page, depth)

    def _zap(self, root: int, page: int, depth: int) -> None:
        """Make the shadow entry at ``depth`` for ``page`` in ``root`` not present (its subtree forgotten)."""
        if depth == 3:
            table = self._tables.get((root, 3, page >> 21))
            value = self.leaves.pop((root, page), None)
            if table is None or value is None:
                return
            self._by_physical.get(value & ADDRESS_MASK, set()).discard((root, page))
            self._queue(table + (page >> 12 & 0x1FF) * 8, 0, page)
            self.entries_zapped += 1
            return
        shift = SHIFTS[depth]
        table = root if depth == 0 else self._tables.get((root, depth, page >> (shift + 9)))
        if table is None or (root, depth + 1, page >> shift) not in self._tables:
            return
        self._queue(table + (page >> shift & 0x1FF) * 8, 0, page)
        self.entries_zapped += 1
        prefix = page >> shift
        for key in [key for key in self._tables if key[0] == root and key[1] > depth
                    and key[2] >> (shift - SHIFTS[key[1] - 1]) == prefix]:
            del self._tables[key]
        for leaf in [leaf for leaf in self.leaves if leaf[0] == root and leaf[1] >> shift == prefix]:
            value = self.leaves.pop(leaf)
            self._by_physical.get(value & ADDRESS_MASK, set()).discard(leaf)
        if any(start >> shift <= prefix <= (end - 1) >> shift for start, end in self._monitor_ranges()):
            self._cut.append((root, shift, prefix))
        if root == self.live_root:
            self._load_cr3 = root  # the TLB may hold any page below it: flush it all

    def _write_leaf(self, root: int, page: int, value: int, context: GuestContext | None, *,
                    kernel: bool = True) -> None:
        """Set the shadow leaf for ``page`` under ``root``, making the tables on the way (from the pool);
        ``kernel``: the leaf comes from the kernel's tables (not the monitor's own memory)."""
        table = root
        for depth in (1, 2, 3):
            shift = SHIFTS[depth - 1]
            key = (root, depth, page >> shift)
            child = self._tables.get(key)
            if child is None:
                child = self._allocate(context)
                self._tables[key] = child
                self._set(table + (page >> shift & 0x1FF) * 8, child | _POINTER, page, context)
            table = child
        self._set(table + (page >> 12 & 0x1FF) * 8, value, page, context)
        if kernel and value & PRESENT and value & USER:
            self.leaves[(root, page)] = value

    def _set(self, entry: int, value: int, page: int, context: GuestContext | None) -> None:
        if entry & ~PAGE_MASK in self._fresh and context is not None:
            context.write(entry, _ENTRY.pack(value))  # a pool page the CPU never walked
        else:
            self._queue(entry, value, page)

    def _queue(self, entry: int, value: int, page: int) -> None:
        self._pending[entry] = (value, page)

    def _allocate(self, context: GuestContext | None) -> int:
        page = self._next
        if page >= self.pool[1]:
            raise ShadowFull(f"the monitor's pool of {self.pool_size >> 10} KiB has no page left for a shadow table; "
                             "give ShadowPaging a larger pool_size")
        self._next += PAGE
        if context is not None:  # cleared at the start and never reused: the page is empty
            self._fresh.add(page)
        return page

    def _monitor_ranges(self) -> list[tuple[int, int]]:
        return [MONITOR_LOW, MONITOR_STACK, self.pool] + [(start, end) for start, end, _ in self.shared]

    def _reserved(self, address: int) -> bool:
        return any(start <= address < end for start, end in self._monitor_ranges())

    def _check_physical(self, page: int, address: int) -> None:
        if any(start <= page < end for start, end in self._monitor_ranges()):
            raise LabkitError(f"the kernel maps virtual {address:#x} to {page:#x}, memory the monitor keeps for "
                              "itself; the run stops rather than let it in")

    def _event(self, kind: str, address: int) -> None:
        if len(self.events) < self.max_events:
            self.events.append(ShadowEvent(kind, address, self.live_root))
        else:
            self.events_dropped += 1


def _plain_store(decoded: Decoded) -> bool:
    """``mov m, r`` or ``mov m, imm`` (1 to 8 bytes)."""
    return (decoded.mnemonic == "mov" and len(decoded.operands) == 2 and decoded.operands[0].kind == "mem"
            and decoded.operands[1].kind in ("reg", "imm") and decoded.operands[0].size in (1, 2, 4, 8))


class KernelMemory:
    """The monitor's accesses for the kernel, at the kernel's virtual addresses (a :class:`GuestContext`).

    Each page is walked in the kernel's tables as its CPU would at ring 0,
    setting A (and D for a write); a fault raises :class:`LabkitError` (the
    kernel could not have done it either).  A write into one of the kernel's
    page tables drops the shadow entries built from it.
    """

    def __init__(self, context: GuestContext, shadow: ShadowPaging, vcpu: VirtualCpu):
        self._context = context
        self._shadow = shadow
        self.vcpu = vcpu
        self.memory: GuestMemory = context.memory
        self.physical = context
        """The context this one wraps: guest-physical addresses."""

    @property
    def trap(self) -> Trap | None:
        return self._context.trap

    def pio(self, port: int, size: int, is_write: bool, value: int = 0) -> int:
        return self._context.pio(port, size, is_write, value)

    def stop(self, status: Status) -> None:
        self._context.stop(status)

    def _physical(self, address: int, write: bool) -> int:
        shadow = self._shadow
        walk = shadow._walk(self._context, self.vcpu.cr3, address, write)
        shadow._set_accessed(walk, write, self._context)
        if walk.physical is None:
            raise LabkitError(f"the kernel's tables do not allow the monitor's {'write' if write else 'read'} at "
                              f"virtual {address:#x} for it (#PF error code {walk.error_code:#x})")
        return walk.physical

    def _pieces(self, address: int, size: int) -> list[tuple[int, int, int]]:
        pieces, done = [], 0
        while done < size:
            here = address + done
            length = min(size - done, PAGE - (here & PAGE_MASK))
            pieces.append((here, done, length))
            done += length
        return pieces

    def read(self, address: int, size: int) -> bytes:
        return b"".join(self._context.read(self._physical(here, False), length)
                        for here, _, length in self._pieces(address, size))

    def read_at_most(self, address: int, size: int) -> bytes:
        out = b""
        for here, _, length in self._pieces(address, size):
            try:
                out += self._context.read(self._physical(here, False), length)
            except LabkitError:
                break
        return out

    def write(self, address: int, data: bytes) -> None:
        """Store for the kernel (a pushed frame, an emulated ``sgdt``); never into the monitor's own memory."""
        shadow = self._shadow
        for here, offset, length in self._pieces(address, len(data)):
            physical = self._physical(here, True)
            if shadow._reserved(here):
                raise LabkitError(f"the kernel uses virtual address {here:#x}, which the monitor keeps for itself: "
                                  "the monitor will not store there for it")
            shadow._check_physical(physical & ~PAGE_MASK, here)
            self._context.write(physical, data[offset:offset + length])
            if physical & ~PAGE_MASK in self._shadow.tables:
                self._shadow._changed(physical, length)


# -- the paging kernel ----------------------------------------------------------------------------

EDITS_MAGIC = b"PTEDITS "
EDITS_OFFSET = 16
"""Offset in ``pagingkernel64.bin`` of the number of random page-table edits; the LCG seed follows at 24."""


def paging_kernel(edits: int = 100, seed: int = 1) -> Guest:
    """The shipped ``pagingkernel64`` making ``edits`` random page-table edits from ``seed`` (a :class:`labkit.Guest`)."""
    from labkit.guest import Guest

    if isinstance(edits, bool) or not isinstance(edits, int) or not 0 <= edits <= 1_000_000:
        raise ConfigError(f"edits must be a whole number from 0 to 1,000,000, not {edits!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ConfigError(f"seed must be a 64-bit unsigned number, not {seed!r}")
    base = Guest.named("pagingkernel64")
    code = bytearray(base.code)
    if code[8:16] != EDITS_MAGIC:
        raise ConfigError("pagingkernel64.bin does not carry its edit count at offset 16; rebuild the guests")
    struct.pack_into("<QQ", code, EDITS_OFFSET, edits, seed)
    return replace(base, code=bytes(code))


MONITORS = ("trap-and-emulate", "binary translation")
"""The monitors that can keep shadow page tables (``monitor=`` of :func:`run_shadowed`)."""


def run_shadowed(kernel: Guest | str, backend: str = "auto", timeout: float = 30.0, *,
                 pool_size: int = POOL_SIZE, monitor: str = "trap-and-emulate", **machine_options: Any) -> RunResult:
    """Run ``kernel`` deprivileged with shadow page tables (``result.monitor.shadow``) under ``monitor``:
    trap-and-emulate or binary translation (one of :data:`MONITORS`)."""
    from labkit.monitor.binary_translation import run_translated
    from labkit.monitor.trap_emulate import TrapAndEmulate, run_deprivileged

    _check_monitor(monitor)
    shadow = ShadowPaging(pool_size=pool_size)
    if monitor == "binary translation":
        return run_translated(kernel, backend, timeout, shadow=shadow, **machine_options)
    return run_deprivileged(kernel, backend, timeout, monitor=TrapAndEmulate(shadow=shadow), **machine_options)


def _check_monitor(monitor: str) -> None:
    if monitor not in MONITORS:
        raise ConfigError(f"shadow paging runs under {' or '.join(repr(name) for name in MONITORS)}, not {monitor!r}")


@dataclass(frozen=True)
class ShadowedRun:
    """A run under shadow paging and guest RAM at its end (the kernel's tables and the monitor's shadow)."""

    result: RunResult
    ram: bytes

    @property
    def report(self) -> ShadowReport:
        from labkit.monitor.binary_translation import TranslationSummary
        from labkit.monitor.trap_emulate import TrapEmulateReport

        monitor = self.result.monitor
        if not isinstance(monitor, (TrapEmulateReport, TranslationSummary)) or monitor.shadow is None:
            raise LabkitError(f"the run did not use shadow paging: {self.result.status}")
        return monitor.shadow

    def read_entry(self, address: int) -> int:
        """The 8-byte entry at guest-physical ``address``; ``GuestMemoryError`` outside the run's RAM."""
        return int(_ENTRY.unpack(GuestMemory([(0, memoryview(self.ram), True)]).read(address, 8))[0])

    def kernel_walk(self, cr3: int, address: int) -> KernelWalk:
        """The kernel's own tables for a read of ``address`` under ``cr3``, as they were at the end."""
        return walk_kernel(self.read_entry, cr3, address)

    def shadow_walk(self, cr3: int, address: int) -> KernelWalk:
        """The monitor's shadow tables for ``address`` in the address space of kernel CR3 ``cr3``."""
        root = self.report.roots.get(cr3 & ADDRESS_MASK)
        if root is None:
            raise ConfigError(f"the kernel never loaded CR3 {cr3:#x}; it loaded {sorted(self.report.roots)}")
        return walk_kernel(self.read_entry, root, address)


def run_shadowed_with_memory(kernel: Guest | str, backend: str = "auto", timeout: float = 30.0, *,
                             pool_size: int = POOL_SIZE, monitor: str = "trap-and-emulate") -> ShadowedRun:
    """:func:`run_shadowed`, keeping guest RAM at the end of the run (for pictures of both sets of tables)."""
    from labkit.guest import Guest
    from labkit.monitor.binary_translation import BinaryTranslator
    from labkit.monitor.trap_emulate import TrapAndEmulate
    from labkit.vmm.machine import Machine

    _check_monitor(monitor)
    if isinstance(kernel, str):
        kernel = Guest.named(kernel)
    shadow = ShadowPaging(pool_size=pool_size)
    chosen: TrapAndEmulate | BinaryTranslator
    if monitor == "binary translation":
        chosen = BinaryTranslator(kernel, shadow=shadow)
        guest = chosen.guest
    else:
        chosen = TrapAndEmulate(shadow=shadow)
        guest = replace(shadow.boot_guest(kernel), user=True)
    with Machine(guest, backend=backend, monitor=chosen) as machine:
        result = machine.run(timeout)
        ram = machine.read_memory(0, machine.memory_size)
    return ShadowedRun(result, ram)


def switch_costs(report: ShadowReport) -> list[tuple[int, int, int, bool]]:
    """Per kernel CR3 load: (its number, the CR3, hidden faults until the next load, whether the root was new)."""
    rows: list[tuple[int, int, int, bool]] = []
    seen: set[int] = set()
    for event in report.events:
        if event.kind == "cr3":
            rows.append((len(rows) + 1, event.address, 0, event.address not in seen))
            seen.add(event.address)
        elif event.kind == "hidden" and rows:
            number, cr3, hidden, new = rows[-1]
            rows[-1] = (number, cr3, hidden + 1, new)
    return rows
