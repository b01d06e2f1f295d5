"""Where things live in a labkit guest: guest-physical memory map, ports, selectors.

Both backends and every shipped guest use this one layout, so a guest written
for one runs on the other.  All addresses are guest-physical; page tables map
them 1:1 (identity) in long mode.

    0x0000_0000  real-mode IVT (256 x 4 bytes)
    0x0000_0500  boot area: default exception stubs and the ring-3 trampoline
    0x0000_1000  GDT
    0x0000_2000  IDT (256 x 16 bytes)
    0x0000_3000  TSS (with RSP0 = KERNEL_STACK_TOP)
    0x0000_4000  PML4, 0x5000 PDPT, 0x6000 PD, 0x7000 PT (first 2 MiB in 4 KiB pages)
    0x0000_8000  guest code (LOAD_ADDRESS), entry point unless the guest says otherwise
    ...          guest code and data
    STACK_TOP    initial stack, grows down (0x8_0000); kernel stack below it
    memory_size  end of RAM; above it, up to 1 GiB, identity-mapped with no RAM:
                 an access there is an MMIO exit
"""

from __future__ import annotations

from labkit.errors import ConfigError

PAGE_SIZE = 0x1000

IVT_ADDRESS = 0x0000
BOOT_AREA = 0x0500
GDT_ADDRESS = 0x1000
IDT_ADDRESS = 0x2000
TSS_ADDRESS = 0x3000
PML4_ADDRESS = 0x4000
PDPT_ADDRESS = 0x5000
PD_ADDRESS = 0x6000
PT_ADDRESS = 0x7000
LOAD_ADDRESS = 0x8000
STACK_TOP = 0x80000
KERNEL_STACK_TOP = 0x70000
"""RSP0 in the TSS: the stack a fault or interrupt from ring 3 switches to."""
MAPPED_LIMIT = 1 << 30
"""Long-mode page tables identity-map [0, 1 GiB); beyond it a guest access page-faults."""

DEFAULT_MEMORY = 2 << 20
MIN_MEMORY = 1 << 20
MAX_MEMORY = 1 << 30


def check_memory_size(memory: int) -> int:
    """Validate a guest RAM size: whole 4 KiB pages, between 1 MiB and 1 GiB; return it, else ConfigError.

    The one check of a RAM size: ``Machine``, both backends and the boot-state builder call it.
    """
    if isinstance(memory, bool) or not isinstance(memory, int):
        raise ConfigError(f"memory must be a whole number of bytes, not {memory!r}")
    if memory % PAGE_SIZE:
        raise ConfigError(f"memory must be a multiple of the 4 KiB page size; {memory} bytes is not "
                          f"(try {memory // PAGE_SIZE * PAGE_SIZE or PAGE_SIZE})")
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        raise ConfigError(f"memory must be between {MIN_MEMORY >> 20} MiB and {MAX_MEMORY >> 20} MiB; "
                          f"got {memory} bytes")
    return memory

# GDT selectors.  The order of 0x08..0x28 is what SYSCALL/SYSRET expect with
# STAR = (USER_BASE << 48) | (KERNEL_CS64 << 32): SYSRET loads CS = base + 16, SS = base + 8.
KERNEL_CS64 = 0x08
KERNEL_DS = 0x10
USER_CS32 = 0x18 | 3
USER_DS = 0x20 | 3
USER_CS64 = 0x28 | 3
KERNEL_CS32 = 0x30
KERNEL_CS16 = 0x38
TSS_SELECTOR = 0x40
GDT_ENTRIES = 10  # the 64-bit TSS descriptor takes two slots
STAR_USER_BASE = 0x18

# Ports.
COM1_PORT = 0x3F8
"""Minimal 16550A UART (8 ports)."""
DEBUG_EXIT_PORT = 0xF4
"""A write ends the run with the written value as exit code."""
HYPERCALL_PORT = 0xF0
"""A write of EAX makes a hypercall (arguments in RBX, RCX, RDX, RSI); a read returns its result."""
FAULT_PORT = 0xF1
"""The default exception stubs write the vector here; labkit reports the fault and stops."""
TRAP_PORT = 0xF2
"""Under a monitor, the forwarding stubs write here: labkit hands the trap to the monitor and resumes."""
MONITOR_TIMER_PORT = 0xF3
"""The trap-and-emulate monitor's one-shot virtual timer (only a monitor answers it; the PC's PIT is at 0x40)."""
VIRTIO_NOTIFY_PORT = 0xF6
"""Virtqueue notification: a 16-bit write of the queue index (``labkit.virtio``; a KVM_IOEVENTFD can take it)."""
VIRTIO_MMIO_BASE = 0x3FFF_F000
"""The virtio console's virtio-mmio register block (one page, the last below MAPPED_LIMIT; above any RAM < 1 GiB)."""
VIRTIO_BLK_MMIO_BASE = 0x3FFF_E000
"""The virtio block device's virtio-mmio register block (the page below the console's)."""
VIRTIO_BLK_NOTIFY_PORT = 0xF8
"""The virtio block device's queue notification: a 16-bit write of the queue index (0xf6-0xf7 are the console's)."""
FORWARDING_STUBS = 0x0000
"""Under a monitor (long mode only), the per-vector trap-forwarding stubs; the IVT is unused there."""
