"""A model of the VMCS fields that decide VM exits (Intel SDM vol. 3C, ch. 25 "Virtual Machine Control Structures").

Only the VM-execution control fields are modelled (SDM 25.6), each named as in
the SDM and with its field encoding from Appendix B:

==========================================  ========  =====================================================
field (SDM name)                            encoding  here
==========================================  ========  =====================================================
Pin-based VM-execution controls             0x4000    :attr:`Vmcs.pin_based` (:class:`PinBased`)
Primary processor-based VM-execution ctls   0x4002    :attr:`Vmcs.primary` (:class:`Primary`)
Secondary processor-based VM-execution ctls 0x401E    :attr:`Vmcs.secondary` (:class:`Secondary`)
Exception bitmap                            0x4004    :attr:`Vmcs.exception_bitmap` (bit v: vector v exits)
Page-fault error-code mask / match          0x4006/8  :attr:`Vmcs.page_fault_error_code_mask` / ``_match``
CR3-target count, CR3-target value 0..3     0x400A,   :attr:`Vmcs.cr3_target_values` (count = its length)
                                            0x6008..
I/O bitmap A / B (addresses; 4 KiB each)    0x2000/2  :attr:`Vmcs.io_bitmap_a` (ports 0-7FFF),
                                                      :attr:`Vmcs.io_bitmap_b` (ports 8000-FFFF)
MSR bitmaps (address; 4 KiB)                0x2004    :attr:`Vmcs.msr_bitmap` (read low, read high,
                                                      write low, write high: 1 KiB each)
TSC offset                                  0x2010    :attr:`Vmcs.tsc_offset`
CR0 / CR4 guest/host mask                   0x6000/2  :attr:`Vmcs.cr0_guest_host_mask` / ``cr4_...``
CR0 / CR4 read shadow                       0x6004/6  :attr:`Vmcs.cr0_read_shadow` / ``cr4_...``
==========================================  ========  =====================================================

Controls the model does not carry out (interrupt-window exiting, TPR shadow,
EPT, the monitor trap flag, ...) are refused with a :class:`ConfigError` naming
them, rather than accepted and ignored.  The "default1" bits a real CPU forces
on (SDM Appendix A.3) are left out of the values: they change no decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntFlag
from typing import Iterable

from labkit.errors import ConfigError
from labkit.x86.arch import CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR0_TS, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE

BITMAP_BYTES = 4096
"""Each I/O bitmap and the MSR bitmap page is 4 KiB."""
LOW_MSRS_END = 0x2000
"""MSRs 0x00000000-0x00001FFF have bits in the low halves of the MSR bitmaps."""
HIGH_MSRS_START = 0xC000_0000
"""MSRs 0xC0000000-0xC0001FFF have bits in the high halves; every other MSR always exits (SDM 25.6.9)."""


class PinBased(IntFlag):
    """Pin-based VM-execution controls (SDM vol. 3C, table 25-5)."""

    EXTERNAL_INTERRUPT_EXITING = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    ACTIVATE_VMX_PREEMPTION_TIMER = 1 << 6
    PROCESS_POSTED_INTERRUPTS = 1 << 7


class Primary(IntFlag):
    """Primary processor-based VM-execution controls (SDM vol. 3C, table 25-6)."""

    INTERRUPT_WINDOW_EXITING = 1 << 2
    USE_TSC_OFFSETTING = 1 << 3
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    MWAIT_EXITING = 1 << 10
    RDPMC_EXITING = 1 << 11
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR3_STORE_EXITING = 1 << 16
    CR8_LOAD_EXITING = 1 << 19
    CR8_STORE_EXITING = 1 << 20
    USE_TPR_SHADOW = 1 << 21
    NMI_WINDOW_EXITING = 1 << 22
    MOV_DR_EXITING = 1 << 23
    UNCONDITIONAL_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class Secondary(IntFlag):
    """Secondary processor-based VM-execution controls (SDM vol. 3C, table 25-7); in force only with
    ``Primary.ACTIVATE_SECONDARY_CONTROLS``."""

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    DESCRIPTOR_TABLE_EXITING = 1 << 2
    ENABLE_RDTSCP = 1 << 3
    ENABLE_VPID = 1 << 5
    WBINVD_EXITING = 1 << 6
    UNRESTRICTED_GUEST = 1 << 7


MODELLED_PIN_BASED = PinBased.EXTERNAL_INTERRUPT_EXITING
MODELLED_PRIMARY = (Primary.USE_TSC_OFFSETTING | Primary.HLT_EXITING | Primary.INVLPG_EXITING | Primary.RDPMC_EXITING
                    | Primary.RDTSC_EXITING | Primary.CR3_LOAD_EXITING | Primary.CR3_STORE_EXITING
                    | Primary.CR8_LOAD_EXITING | Primary.CR8_STORE_EXITING | Primary.MOV_DR_EXITING
                    | Primary.UNCONDITIONAL_IO_EXITING | Primary.USE_IO_BITMAPS | Primary.USE_MSR_BITMAPS
                    | Primary.ACTIVATE_SECONDARY_CONTROLS)
MODELLED_SECONDARY = Secondary.DESCRIPTOR_TABLE_EXITING | Secondary.WBINVD_EXITING
"""The controls whose exits this model decides; any other set bit is refused."""

FIELD_ENCODINGS = {
    "pin_based": 0x4000, "primary": 0x4002, "exception_bitmap": 0x4004, "page_fault_error_code_mask": 0x4006,
    "page_fault_error_code_match": 0x4008, "cr3_target_count": 0x400A, "secondary": 0x401E,
    "io_bitmap_a": 0x2000, "io_bitmap_b": 0x2002, "msr_bitmap": 0x2004, "tsc_offset": 0x2010,
    "cr0_guest_host_mask": 0x6000, "cr4_guest_host_mask": 0x6002, "cr0_read_shadow": 0x6004,
    "cr4_read_shadow": 0x6006, "cr3_target_values": 0x6008,
}
"""Field -> its VMCS encoding (SDM vol. 3D, appendix B; the CR3-target values follow at 0x600A, 0x600C, 0x600E)."""

BOOT_CR0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG
"""CR0 as labkit starts a 64-bit guest (the kernel's view at the start; the default read shadow)."""
BOOT_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT


def _bits(ports_or_msrs: Iterable[int]) -> set[int]:
    return set(ports_or_msrs)


def io_bitmaps(ports: Iterable[int] | None = None) -> tuple[bytes, bytes]:
    """I/O bitmaps A and B with a bit set for each of ``ports`` (None, the default: every port exits)."""
    if ports is None:
        return b"\xff" * BITMAP_BYTES, b"\xff" * BITMAP_BYTES
    bitmap = bytearray(2 * BITMAP_BYTES)
    for port in _bits(ports):
        if not 0 <= port <= 0xFFFF:
            raise ConfigError(f"an I/O port is 0..0xffff, not {port:#x}")
        bitmap[port >> 3] |= 1 << (port & 7)
    return bytes(bitmap[:BITMAP_BYTES]), bytes(bitmap[BITMAP_BYTES:])


def msr_bitmap(read: Iterable[int] = (), write: Iterable[int] = ()) -> bytes:
    """The 4 KiB MSR bitmap page with a bit set for each MSR in ``read`` / ``write`` (SDM 25.6.9).

    Each MSR must lie in 0-0x1FFF or 0xC0000000-0xC0001FFF: others have no bit (they always exit).
    """
    page = bytearray(BITMAP_BYTES)
    for base, msrs in ((0, read), (2048, write)):
        for msr in _bits(msrs):
            index = msr_bitmap_bit(msr)
            if index is None:
                raise ConfigError(f"MSR {msr:#x} has no bit in the MSR bitmaps (only 0-0x1fff and "
                                  "0xc0000000-0xc0001fff do): it always exits")
            page[base + (index >> 3)] |= 1 << (index & 7)
    return bytes(page)


def msr_bitmap_bit(msr: int) -> int | None:
    """Bit number of ``msr`` within a read or write half of the MSR bitmap (high MSRs after 1 KiB); None if none."""
    if 0 <= msr < LOW_MSRS_END:
        return msr
    if HIGH_MSRS_START <= msr < HIGH_MSRS_START + LOW_MSRS_END:
        return 8 * 1024 + (msr - HIGH_MSRS_START)
    return None


@dataclass(frozen=True)
class Vmcs:
    """The VM-execution control fields of one VMCS (see the module docstring); everything off by default.

    A model: no VMCS region in memory, no VMREAD/VMWRITE, only the fields that
    decide whether an instruction of the guest causes a VM exit.
    """

    pin_based: PinBased = PinBased(0)
    primary: Primary = Primary(0)
    secondary: Secondary = Secondary(0)
    exception_bitmap: int = 0
    page_fault_error_code_mask: int = 0
    page_fault_error_code_match: int = 0
    io_bitmap_a: bytes = field(default=bytes(BITMAP_BYTES), repr=False)
    io_bitmap_b: bytes = field(default=bytes(BITMAP_BYTES), repr=False)
    msr_bitmap: bytes = field(default=bytes(BITMAP_BYTES), repr=False)
    tsc_offset: int = 0
    cr0_guest_host_mask: int = 0
    cr0_read_shadow: int = BOOT_CR0
    cr4_guest_host_mask: int = 0
    cr4_read_shadow: int = BOOT_CR4
    cr3_target_values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, value, kind, modelled in (("pin_based", self.pin_based, PinBased, MODELLED_PIN_BASED),
                                            ("primary", self.primary, Primary, MODELLED_PRIMARY),
                                            ("secondary", self.secondary, Secondary, MODELLED_SECONDARY)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
                raise ConfigError(f"Vmcs.{name} is a 32-bit control field, not {value!r}")
            unmodelled = int(value) & ~int(modelled)
            if unmodelled:
                names = [str(flag.name) for flag in kind if flag & unmodelled] or [f"bits {unmodelled:#x}"]
                raise ConfigError(f"Vmcs.{name}: {', '.join(names)} not modelled; this model carries out "
                                  + ", ".join(str(flag.name) for flag in kind if flag & modelled))
            object.__setattr__(self, name, kind(value))
        if not 0 <= self.exception_bitmap < 1 << 32:
            raise ConfigError(f"the exception bitmap has 32 bits (vectors 0-31), not {self.exception_bitmap:#x}")
        for name in ("io_bitmap_a", "io_bitmap_b", "msr_bitmap"):
            if len(getattr(self, name)) != BITMAP_BYTES:
                raise ConfigError(f"Vmcs.{name} is a 4 KiB page, not {len(getattr(self, name))} bytes")
        if len(self.cr3_target_values) > 4:
            raise ConfigError(f"at most 4 CR3-target values (SDM 25.6.7), not {len(self.cr3_target_values)}")
        for name in ("page_fault_error_code_mask", "page_fault_error_code_match"):
            if not 0 <= getattr(self, name) < 1 << 32:
                raise ConfigError(f"Vmcs.{name} is 32 bits wide")

    @property
    def secondary_in_force(self) -> Secondary:
        """The secondary controls, or none when ``ACTIVATE_SECONDARY_CONTROLS`` is clear (SDM 25.6.2)."""
        return self.secondary if self.primary & Primary.ACTIVATE_SECONDARY_CONTROLS else Secondary(0)

    def with_controls(self, *, pin_based: PinBased | None = None, primary: Primary | None = None,
                      secondary: Secondary | None = None, **fields: object) -> "Vmcs":
        """A copy with the given fields replaced (``dataclasses.replace`` that keeps the checks)."""
        changes: dict[str, object] = dict(fields)
        for name, value in (("pin_based", pin_based), ("primary", primary), ("secondary", secondary)):
            if value is not None:
                changes[name] = value
        return replace(self, **changes)  # type: ignore[arg-type]

    def vmread(self, encoding: int) -> int:
        """The field with VMCS ``encoding`` (a number from :data:`FIELD_ENCODINGS`); bitmaps give 0, their
        addresses are not modelled."""
        for name, number in FIELD_ENCODINGS.items():
            if number == encoding:
                if name == "cr3_target_count":
                    return len(self.cr3_target_values)
                if name in ("io_bitmap_a", "io_bitmap_b", "msr_bitmap"):
                    return 0
                if name == "cr3_target_values":
                    return self.cr3_target_values[0] if self.cr3_target_values else 0
                return int(getattr(self, name))
        raise ConfigError(f"VMCS field encoding {encoding:#x} is not modelled; modelled: "
                          + ", ".join(f"{name} {number:#x}" for name, number in FIELD_ENCODINGS.items()))

    def controls_text(self) -> list[str]:
        """The set controls by SDM name (``"HLT exiting"``), pin-based first."""
        names: list[IntFlag] = [flag for flag in PinBased if flag & self.pin_based]
        names += [flag for flag in Primary if flag & self.primary]
        names += [flag for flag in Secondary if flag & self.secondary_in_force]
        return [control_name(flag) for flag in names]


def control_name(flag: IntFlag) -> str:
    """The SDM's name of a control: ``Primary.CR3_LOAD_EXITING`` -> "CR3-load exiting"."""
    special = {"CR3_LOAD_EXITING": "CR3-load exiting", "CR3_STORE_EXITING": "CR3-store exiting",
               "CR8_LOAD_EXITING": "CR8-load exiting", "CR8_STORE_EXITING": "CR8-store exiting",
               "MOV_DR_EXITING": "MOV-DR exiting", "UNCONDITIONAL_IO_EXITING": "unconditional I/O exiting",
               "USE_IO_BITMAPS": "use I/O bitmaps", "USE_MSR_BITMAPS": "use MSR bitmaps",
               "HLT_EXITING": "HLT exiting", "RDTSC_EXITING": "RDTSC exiting", "RDPMC_EXITING": "RDPMC exiting",
               "INVLPG_EXITING": "INVLPG exiting", "USE_TSC_OFFSETTING": "use TSC offsetting",
               "WBINVD_EXITING": "WBINVD exiting", "NMI_EXITING": "NMI exiting",
               "ACTIVATE_SECONDARY_CONTROLS": "activate secondary controls"}
    name = str(flag.name)
    return special.get(name, name.replace("_", " ").lower())


# -- presets ---------------------------------------------------------------------------------------

EVERY_EXCEPTION = 0xFFFF_FFFF


def every_exit() -> Vmcs:
    """Every control this model has set: each candidate instruction of the kernel exits."""
    return Vmcs(pin_based=MODELLED_PIN_BASED, primary=MODELLED_PRIMARY & ~Primary.USE_IO_BITMAPS
                & ~Primary.USE_MSR_BITMAPS & ~Primary.USE_TSC_OFFSETTING, secondary=MODELLED_SECONDARY,
                exception_bitmap=EVERY_EXCEPTION, cr0_guest_host_mask=(1 << 64) - 1,
                cr4_guest_host_mask=(1 << 64) - 1)


def kvm_like() -> Vmcs:
    """Roughly what KVM on VT-x with EPT programs (arch/x86/kvm/vmx/vmx.c, setup_vmcs_config and
    vmx_set_constant_host_state): HLT, MOV-DR and RDPMC exiting; I/O bitmaps with every port set;
    MSR bitmaps passing through FS/GS base and the SYSCALL MSRs; the host owns every CR0 bit but TS
    and most of CR4; #UD, #DB, #BP, #AC and #MC intercepted; CR3 not intercepted (EPT)."""
    from labkit.x86.arch import CR4_DE, CR4_PCE, CR4_PVI, CR4_TSD, MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE
    from labkit.x86.arch import MSR_CSTAR, MSR_LSTAR, MSR_SFMASK, MSR_STAR

    a, b = io_bitmaps()
    passthrough = (MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK)
    every_low = [msr for msr in range(LOW_MSRS_END)]
    every_high = [msr for msr in range(HIGH_MSRS_START, HIGH_MSRS_START + LOW_MSRS_END) if msr not in passthrough]
    bitmap = msr_bitmap(read=every_low + every_high, write=every_low + every_high)
    guest_cr4 = CR4_PVI | CR4_DE | CR4_PCE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_TSD
    return Vmcs(primary=Primary.HLT_EXITING | Primary.MOV_DR_EXITING | Primary.RDPMC_EXITING | Primary.USE_IO_BITMAPS
                | Primary.USE_MSR_BITMAPS | Primary.USE_TSC_OFFSETTING, exception_bitmap=(1 << 6) | (1 << 1) | (1 << 3)
                | (1 << 17) | (1 << 18), io_bitmap_a=a, io_bitmap_b=b, msr_bitmap=bitmap,
                cr0_guest_host_mask=((1 << 64) - 1) & ~CR0_TS, cr4_guest_host_mask=((1 << 64) - 1) & ~guest_cr4)


def shadow_paging() -> Vmcs:
    """:func:`kvm_like` without EPT: the VMM shadows the kernel's page tables, so it must see every CR3
    load and store, every INVLPG and every page fault (KVM with ``ept=0``)."""
    vmcs = kvm_like()
    return vmcs.with_controls(primary=vmcs.primary | Primary.CR3_LOAD_EXITING | Primary.CR3_STORE_EXITING
                              | Primary.INVLPG_EXITING, exception_bitmap=vmcs.exception_bitmap | 1 << 14)


PRESETS = {"nothing exits": Vmcs, "KVM-like (EPT)": kvm_like, "KVM-like, shadow paging": shadow_paging,
           "every exit": every_exit}
"""Named VMCS set-ups for notebooks and the command line: name -> a function making the Vmcs."""
