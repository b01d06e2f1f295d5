"""The raw KVM interface: ctypes Structures, constants and ioctl numbers.

Everything is named exactly as in the kernel's UAPI headers, so a reader can
grep ``linux/kvm.h`` (and ``asm/kvm.h`` for the x86 structures) for any name
used here.  Taken from linux-libc-dev 6.1.187 (``KVM_API_VERSION`` 12); the
ABI is append-only, so these layouts also hold on newer kernels (6.18 here).
x86-64 only.  ``tests/unit/test_kvm_bindings.py`` compares every size and
field offset with the header by compiling a C program.

Ioctl numbers are grouped by the fd they are issued on (system, VM, vCPU),
as in the kernel documentation (Documentation/virt/kvm/api.rst).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any
from ctypes import (
    Structure, Union, c_char, c_int16, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p, sizeof,
)

HEADER_VERSION = "linux-libc-dev 6.1.187 (linux/kvm.h, asm/kvm.h)"
KVM_API_VERSION = 12

# --- ioctl number encoding (asm-generic/ioctl.h) ---------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


_ArgumentType = type[Structure] | type[c_uint64]
"""What an ioctl number's argument size is taken from: a Structure, or ``__u64`` for a few."""


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: _ArgumentType) -> int:
    return _IOC(_IOC_READ, type_, nr, sizeof(struct))


def _IOW(type_: int, nr: int, struct: _ArgumentType) -> int:
    return _IOC(_IOC_WRITE, type_, nr, sizeof(struct))


def _IOWR(type_: int, nr: int, struct: _ArgumentType) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, sizeof(struct))


def _IOC_SIZE(number: int) -> int:
    return (number >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


KVMIO = 0xAE

# --- constants (linux/kvm.h) -------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_NOTIFY = 37

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_READONLY_MEM = 81
KVM_CAP_XSAVE = 55
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_COALESCED_MMIO = 15  # the answer is KVM_COALESCED_MMIO_PAGE_OFFSET
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

# KVM_CAP_X86_DISABLE_EXITS: args[0] of KVM_ENABLE_CAP (VM fd, before any vCPU exists)
KVM_X86_DISABLE_EXITS_MWAIT = 1 << 0
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2
KVM_X86_DISABLE_EXITS_CSTATE = 1 << 3

# KVM_CAP_X86_USER_SPACE_MSR: args[0], and kvm_run.msr.reason
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

# KVM_X86_SET_MSR_FILTER (asm/kvm.h)
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0 << 0
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600

# KVM_IOEVENTFD
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_CUMULATIVE = 0x0 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_INSTANT = 0x1 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_PEAK = 0x2 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LINEAR_HIST = 0x3 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LOG_HIST = 0x4 << KVM_STATS_TYPE_SHIFT
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BYTES = 0x1 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_SECONDS = 0x2 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_CYCLES = 0x3 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BOOLEAN = 0x4 << KVM_STATS_UNIT_SHIFT

# asm/kvm.h (x86)
KVM_NR_INTERRUPTS = 256
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling
SYNC_REGS_SIZE_BYTES = 2048
KVM_COALESCED_MMIO_PAGE_OFFSET = 2  # pages into the vCPU mmap (page 1 is the PIO data page)

# --- structures from asm/kvm.h (x86) ----------------------------------------


class kvm_regs(Structure):
    _fields_ = [(name, c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
    )]


class kvm_segment(Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class kvm_sregs(Structure):
    _fields_ = (
        [(name, kvm_segment) for name in SEGMENT_NAMES]
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + [(name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
        + [("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]
    )


class kvm_fpu(Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_debugregs(Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_xsave(Structure):
    """The XSAVE area: bytes 0-511 in FXSAVE layout (Intel SDM vol. 1, 10.5.1), the XSAVE header at 512."""

    _fields_ = [("region", c_uint32 * 1024)]


class kvm_msr_entry(Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(Structure):
    """Header only; ``entries`` is a flexible array: use :func:`kvm_msrs_with`."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(Structure):
    """Header only; ``entries`` is a flexible array: use :func:`kvm_cpuid2_with`."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_debug_exit_arch(Structure):
    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64), ("dr7", c_uint64)]


class _kvm_vcpu_events_exception(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8), ("pending", c_uint8),
                ("error_code", c_uint32)]


class _kvm_vcpu_events_interrupt(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8), ("latched_init", c_uint8)]


class _kvm_vcpu_events_triple_fault(Structure):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(Structure):
    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_sync_regs(Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


# --- structures from linux/kvm.h ---------------------------------------------


class kvm_userspace_memory_region(Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class _kvm_dirty_log_u(Union):
    _fields_ = [("dirty_bitmap", c_void_p), ("padding2", c_uint64)]


class kvm_dirty_log(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("u", _kvm_dirty_log_u)]


class kvm_interrupt(Structure):
    """``KVM_INTERRUPT``'s argument: the vector to inject (userspace interrupt controller only)."""

    _fields_ = [("irq", c_uint32)]


class kvm_enable_cap(Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_signal_mask(Structure):
    """Header only; ``sigset`` (``len`` bytes) follows: use :func:`kvm_signal_mask_with`."""

    _fields_ = [("len", c_uint32)]


class kvm_coalesced_mmio_zone(Structure):
    """``KVM_REGISTER_COALESCED_MMIO``'s argument; ``pio`` (the union's other name is ``pad``) = 1 for ports."""

    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


class kvm_coalesced_mmio(Structure):
    """One write KVM put in the coalesced ring instead of exiting."""

    _fields_ = [("phys_addr", c_uint64), ("len", c_uint32), ("pio", c_uint32), ("data", c_uint8 * 8)]


class kvm_coalesced_mmio_ring(Structure):
    """Header only; ``coalesced_mmio`` (a flexible array of :class:`kvm_coalesced_mmio`) follows."""

    _fields_ = [("first", c_uint32), ("last", c_uint32)]


KVM_COALESCED_MMIO_MAX = (4096 - sizeof(kvm_coalesced_mmio_ring)) // sizeof(kvm_coalesced_mmio)
"""Entries in the ring page (170); the kernel keeps one free, so at most 169 writes wait in it."""


class kvm_ioeventfd(Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class kvm_msr_filter_range(Structure):
    _fields_ = [("flags", c_uint32), ("nmsrs", c_uint32), ("base", c_uint32), ("bitmap", c_void_p)]


class kvm_msr_filter(Structure):
    _fields_ = [("flags", c_uint32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


class kvm_stats_header(Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


class kvm_stats_desc(Structure):
    """Fixed part; ``name`` (``kvm_stats_header.name_size`` bytes) follows it."""

    _fields_ = [
        ("flags", c_uint32),
        ("exponent", c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    ]


# kvm_run and its exit union.

class _kvm_run_hw(Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _kvm_run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_ex(Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _kvm_run_io(Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class _kvm_run_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _kvm_run_mmio(Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class _kvm_run_hypercall(Structure):
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("longmode", c_uint32),
        ("pad", c_uint32),
    ]


class _kvm_run_tpr_access(Structure):
    _fields_ = [("rip", c_uint64), ("is_write", c_uint32), ("pad", c_uint32)]


class _kvm_run_internal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_emulation_failure(Structure):
    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    ]


class _kvm_run_system_event_u(Union):
    _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]


class _kvm_run_system_event(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("u", _kvm_run_system_event_u)]


class _kvm_run_msr(Structure):
    _fields_ = [
        ("error", c_uint8),
        ("pad", c_uint8 * 7),
        ("reason", c_uint32),
        ("index", c_uint32),
        ("data", c_uint64),
    ]


class _kvm_run_notify(Structure):
    _fields_ = [("flags", c_uint32)]


class _kvm_run_exit(Union):
    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("debug", _kvm_run_debug),
        ("mmio", _kvm_run_mmio),
        ("hypercall", _kvm_run_hypercall),
        ("tpr_access", _kvm_run_tpr_access),
        ("internal", _kvm_run_internal),
        ("emulation_failure", _kvm_run_emulation_failure),
        ("system_event", _kvm_run_system_event),
        ("msr", _kvm_run_msr),
        ("notify", _kvm_run_notify),
        ("padding", c_char * 256),
    ]


class _kvm_run_s(Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * SYNC_REGS_SIZE_BYTES)]


class kvm_run(Structure):
    """The per-vCPU page shared with the kernel (mmap of the vCPU fd); ``KVM_RUN`` fills it."""

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("u", _kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", _kvm_run_s),
    ]


# --- variable-length structures ----------------------------------------------


@functools.lru_cache(maxsize=64)
def _sized(name: str, head: tuple[tuple[str, Any], ...], tail: str, element: Any, count: int) -> type[Structure]:
    """The ``Structure`` class ``head`` + ``element[count]`` (made once per size: a ctypes class costs about
    a millisecond to build, and every machine asks for the same few)."""
    return type(name, (Structure,), {"_fields_": [*head, (tail, element * count)]})


def kvm_msrs_with(count: int) -> Structure:
    """A ``struct kvm_msrs`` followed by ``count`` ``kvm_msr_entry`` (``nmsrs`` set)."""
    value = _sized("kvm_msrs_n", (("nmsrs", c_uint32), ("pad", c_uint32)), "entries", kvm_msr_entry, count)()
    value.nmsrs = count
    return value


def kvm_cpuid2_with(count: int) -> Structure:
    """A ``struct kvm_cpuid2`` with room for ``count`` entries (``nent`` set)."""
    value = _sized("kvm_cpuid2_n", (("nent", c_uint32), ("padding", c_uint32)), "entries", kvm_cpuid_entry2, count)()
    value.nent = count
    return value


def kvm_signal_mask_with(sigset: bytes) -> Structure:
    """A ``struct kvm_signal_mask`` carrying the kernel sigset ``sigset`` (8 bytes on x86-64)."""
    value = _sized("kvm_signal_mask_n", (("len", c_uint32),), "sigset", c_uint8, len(sigset))()
    value.len = len(sigset)
    ctypes.memmove(value.sigset, sigset, len(sigset))
    return value


# --- ioctls on the system fd (/dev/kvm) ---------------------------------------

KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)

# --- ioctls on a VM fd -----------------------------------------------------------

KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, kvm_coalesced_mmio_zone)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)  # also valid on a vCPU fd for vCPU caps
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)  # also valid on a vCPU fd
KVM_X86_SET_MSR_FILTER = _IOW(KVMIO, 0xC6, kvm_msr_filter)

# --- ioctls on a vCPU fd ---------------------------------------------------------

KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, kvm_interrupt)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, kvm_signal_mask)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)

IOCTL_ARGUMENTS = {
    "KVM_GET_SUPPORTED_CPUID": kvm_cpuid2,
    "KVM_GET_DIRTY_LOG": kvm_dirty_log,
    "KVM_SET_USER_MEMORY_REGION": kvm_userspace_memory_region,
    "KVM_SET_IDENTITY_MAP_ADDR": c_uint64,
    "KVM_ENABLE_CAP": kvm_enable_cap,
    "KVM_REGISTER_COALESCED_MMIO": kvm_coalesced_mmio_zone,
    "KVM_UNREGISTER_COALESCED_MMIO": kvm_coalesced_mmio_zone,
    "KVM_IOEVENTFD": kvm_ioeventfd,
    "KVM_X86_SET_MSR_FILTER": kvm_msr_filter,
    "KVM_GET_REGS": kvm_regs,
    "KVM_SET_REGS": kvm_regs,
    "KVM_GET_SREGS": kvm_sregs,
    "KVM_SET_SREGS": kvm_sregs,
    "KVM_INTERRUPT": kvm_interrupt,
    "KVM_GET_MSRS": kvm_msrs,
    "KVM_SET_MSRS": kvm_msrs,
    "KVM_SET_SIGNAL_MASK": kvm_signal_mask,
    "KVM_GET_FPU": kvm_fpu,
    "KVM_SET_FPU": kvm_fpu,
    "KVM_SET_CPUID2": kvm_cpuid2,
    "KVM_GET_CPUID2": kvm_cpuid2,
    "KVM_GET_VCPU_EVENTS": kvm_vcpu_events,
    "KVM_SET_VCPU_EVENTS": kvm_vcpu_events,
    "KVM_GET_DEBUGREGS": kvm_debugregs,
    "KVM_SET_DEBUGREGS": kvm_debugregs,
    "KVM_GET_XSAVE": kvm_xsave,
    "KVM_SET_XSAVE": kvm_xsave,
}
"""The argument Structure of every sized ioctl above, by name (for the size test)."""
