"""A model of VMX, run on labkit's backends: an unmodified kernel, a VMCS, and the VM exits the SDM says it causes.

This is a model, not VT-x: neither backend gives labkit a VMCS (the emulator has
no VMX; this project's KVM is PVM, with no nested VMX).  The kernel runs
deprivileged in ring 3 under binary translation
(:class:`~labkit.monitor.binary_translation.BinaryTranslator`), which hands
every instruction that could tell ring 3 from ring 0 to the monitor before it
runs: the privileged ones (``hlt``, ``in``/``out``, ``mov crN``, ``rdmsr``, ...)
and the sensitive but unprivileged ones (``sgdt``, ``pushf``, ``smsw``, ...).
At each one :class:`VmxModel` asks the SDM's rules (:mod:`labkit.monitor.vmx.rules`)
whether VMX non-root operation would exit on it under the :class:`Vmcs`:

- **VM exit**: the model records a :class:`VmExit` (basic reason, qualification,
  ...) and the "VMM" handles it: it carries the instruction out for the kernel
  as KVM's handlers would (a port access reaches the machine's device, a MOV to
  CR0 updates CR0 and its read shadow, an intercepted exception is reinjected);
- **no exit**: the model carries the instruction out silently, the way the CPU
  does in VMX non-root operation: on the kernel's own state (its IF, GDTR, ...),
  with CR0/CR4 reads taken from the read shadows for host-owned bits and writes
  loading only guest-owned bits, RDTSC adding the TSC offset.

Either way the kernel sees what it would see running on the CPU itself: its
console equals the native run's, whatever the VMCS says; only the exit record
changes.  The kernel's own exceptions (``ud2``, a page fault) go through the
exception bitmap the same way before they reach its IDT.

How this builds on binary translation (kept small, as that module is changed
by others): :class:`VmxModel` subclasses ``BinaryTranslator``, adds ``rdtsc``
and ``rdpmc`` to the instructions it translates (they do not fault in ring 3
on PVM, whatever CR4.TSD says: measured), and overrides its two funnels,
``_emulate`` (every translated or trapped privileged/sensitive instruction) and
``_reflect`` (every exception the kernel itself raises).  The translation
machinery's own monitor entries (block exits, indirect branches) are how the
model gets control; they are counted apart (``VmxReport.translation``) and
are not VM exits.

Not modelled: CPUID (it always exits on VT-x, but runs natively in ring 3 here,
so the model never sees it), EPT and its violations, interrupt and NMI windows,
the TPR shadow, VM entry checks and the default1 control bits.  CR8 and the debug
registers are kept as the kernel writes them, not acted on (no TPR masking of
the virtual interrupts, no breakpoints); performance counters read 0.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from labkit.errors import ConfigError, LabkitError
from labkit.monitor.binary_translation import BinaryTranslator, TranslationSummary
from labkit.monitor.vcpu import (Decoded, VirtualCpu, decode, effective_address, has_error_code, read_register,
                                 write_register)
from labkit.monitor.vmx.exits import ExitReason, VmExit
from labkit.monitor.vmx.rules import (LMSW_BITS, exception_exit, instruction_exit, interrupt_exit, lmsw_source,
                                      mnemonic_of)
from labkit.monitor.vmx.vmcs import Primary, Vmcs
from labkit.table import Table
from labkit.vmm.forwarding import GuestContext, Trap
from labkit.vmm.status import RunResult
from labkit.x86.arch import CR0_PE, CR0_TS, Vector

if TYPE_CHECKING:
    from labkit.guest import Guest

MAX_EXITS = 4096
"""Exits kept one by one (all are counted)."""
MODEL_TRANSLATES = frozenset({"rdtsc", "rdpmc"})
SOFTWARE_INTERRUPTS = frozenset({"int", "int3", "into", "int1"})
"""Their vectors are decided by the instruction rules (INT3/INTO/INT1 by the exception bitmap, INT n never)."""
"""Instructions the model has binary translation hand over besides the sensitive ones (see the module docstring)."""
DR6_INIT, DR7_INIT = 0xFFFF_0FF0, 0x400
"""Debug registers after reset (SDM vol. 3, 18.2)."""
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class VmxReport:
    """What a run under :class:`VmxModel` reports (``RunResult.monitor``); it pickles."""

    vmcs: Vmcs
    """The VMCS as the run started."""
    final_vmcs: Vmcs
    """The VMCS at the end: the VMM updates the read shadows when it handles a CR0/CR4 write."""
    exits: tuple[VmExit, ...]
    """The first :data:`MAX_EXITS` exits, in order."""
    exits_dropped: int
    exit_counts: dict[int, int]
    """Exits by basic exit reason number."""
    non_root: dict[str, int]
    """Instructions the model carried out with no exit (as VMX non-root operation would), by mnemonic
    (a ``mov`` to or from a control or debug register by its text: ``"mov rax, cr0"``)."""
    translation: TranslationSummary = field(repr=False)
    """The binary translation underneath: how the model got control (not VM exits)."""
    model_ns: int = 0
    """Host time the model spent deciding and recording exits (not handling them)."""

    @property
    def exit_count(self) -> int:
        return sum(self.exit_counts.values())

    def by_reason(self) -> dict[str, int]:
        """Exit counts keyed ``"30 I/O instruction"``, by reason number."""
        return {f"{reason} {ExitReason(reason).sdm_name}": count for reason, count in sorted(self.exit_counts.items())}

    def exits_of(self, reason: ExitReason) -> list[VmExit]:
        return [exit for exit in self.exits if exit.reason == reason]

    def exit_table(self, where: str = "") -> Table:
        """One row per basic exit reason: number, the SDM's name, count, the first exit's instruction and
        its decoded qualification.  ``where`` names the backend ("run on KVM (kvm_pvm)")."""
        rows = []
        for reason, count in sorted(self.exit_counts.items()):
            first = next((exit for exit in self.exits if exit.reason == reason), None)
            distinct = sorted({exit.qualification_text() for exit in self.exits if exit.reason == reason})
            rows.append([str(reason), ExitReason(reason).sdm_name, str(count),
                         f"{first.instruction} at {first.guest_rip:#x}" if first else "",
                         "\n".join(distinct[:4]) + (f"\n(+{len(distinct) - 4} more)" if len(distinct) > 4 else "")])
        controls = ", ".join(self.vmcs.controls_text()) or "none"
        return Table(f"VM exits of a model of VMX{' ' + where if where else ''}: {self.exit_count} exit(s)",
                     ["basic reason", "SDM name", "count", "first at", "qualification(s)"], rows,
                     note=f"controls set: {controls}; exception bitmap {self.vmcs.exception_bitmap:#010x}; "
                          f"CR0 mask {self.vmcs.cr0_guest_host_mask:#x}, CR4 mask {self.vmcs.cr4_guest_host_mask:#x}. "
                          f"{sum(self.non_root.values())} candidate instruction(s) ran with no exit. The model's "
                          f"own binary-translation entries ({self.translation.monitor_entries}) are not VM exits.")


class VmxModel(BinaryTranslator):
    """A monitor that runs ``kernel`` (64-bit, written for ring 0) as VMX non-root operation would under ``vmcs``.

    Run :attr:`guest` (the kernel with the translator's boot breakpoint), not the kernel::

        model = VmxModel("minikernel64", Vmcs(primary=Primary.HLT_EXITING))
        result = Machine(model.guest, monitor=model).run()
        result.monitor.exit_counts        # {12: 1}

    or simply :func:`run_vmx`.  ``timer=True`` gives the kernel the monitor's
    virtual timer (an external interrupt source for external-interrupt exiting).
    """

    name = "VMX model"

    def __init__(self, kernel: Guest | str, vmcs: Vmcs | None = None, *, timer: bool = False,
                 max_exits: int = MAX_EXITS) -> None:
        from labkit.guest import Guest

        if isinstance(kernel, Guest) and kernel.mode != 64:
            raise ConfigError(f"the VMX model runs 64-bit kernels; {kernel.name!r} starts in {kernel.mode}-bit mode")
        super().__init__(kernel, timer=timer)
        vmcs = Vmcs() if vmcs is None else vmcs
        if not isinstance(vmcs, Vmcs):
            raise ConfigError(f"VmxModel takes a labkit.monitor.vmx.Vmcs, not {type(vmcs).__name__}")
        self.translated = self.translated | MODEL_TRANSLATES
        self.initial_vmcs = vmcs
        self.vmcs = vmcs
        """The live VMCS: the VMM writes the read shadows as it handles CR0/CR4 exits."""
        self.exits: list[VmExit] = []
        self.exits_dropped = 0
        self.max_exits = max_exits
        self.exit_counts: dict[int, int] = {}
        self.non_root: dict[str, int] = {}
        self.cr8 = 0
        self.debug_registers = [0, 0, 0, 0, 0, 0, DR6_INIT, DR7_INIT]
        self.model_ns = 0

    def __repr__(self) -> str:
        return f"<VmxModel of {self.kernel.name!r}: {', '.join(self.vmcs.controls_text()) or 'no controls'}>"

    def summary(self) -> VmxReport:  # type: ignore[override]
        return VmxReport(self.initial_vmcs, self.vmcs, tuple(self.exits), self.exits_dropped, dict(self.exit_counts),
                         dict(self.non_root), super().summary(), self.model_ns)

    # -- the two funnels of binary translation -------------------------------------------------

    def _emulate(self, guest_rip: int, code: bytes, text: str, trap: Trap, context: GuestContext) -> None:
        decoded = decode(bytes(code[:15]), guest_rip)
        if decoded is None:
            super()._emulate(guest_rip, code, text, trap, context)
            return
        started = time.perf_counter_ns()
        trap.regs.rip = guest_rip  # the kernel's RIP, not the translation's, whatever happens next
        try:
            exit = instruction_exit(self.vmcs, decoded, trap.regs, context.read)
        except LabkitError as error:  # an LMSW operand outside guest RAM
            self._stop_error(context, f"at RIP {guest_rip:#x}: {error}")
            return
        mnemonic = mnemonic_of(decoded)[0]
        if exit is not None:
            self._record(exit)
        else:
            name = decoded.text if mnemonic == "mov" else mnemonic  # "mov rax, cr0": which register, which way
            self.non_root[name] = self.non_root.get(name, 0) + 1
        self.model_ns += time.perf_counter_ns() - started
        if self._carry_out(decoded, mnemonic, exit is not None, trap, context):
            trap.regs.rip = (guest_rip + decoded.length) & _MASK64
            return
        vcpu = self.vcpu
        pending = list(vcpu.pending) if vcpu is not None else []
        reflected = dict(vcpu.reflected) if vcpu is not None else {}
        super()._emulate(guest_rip, code, text, trap, context)
        if vcpu is None:
            return
        if mnemonic not in SOFTWARE_INTERRUPTS:
            self._raised_by(decoded, reflected, vcpu, trap, context)
        if len(vcpu.pending) > len(pending):
            for vector in vcpu.pending[len(pending):]:
                interrupt = interrupt_exit(self.vmcs, vector, guest_rip)
                if interrupt is not None:
                    self._record(interrupt)

    def _reflect(self, vector: int, error_code: int | None, trap: Trap, context: GuestContext) -> None:
        rip = trap.regs.rip
        exit = exception_exit(self.vmcs, vector, error_code, rip, cr2=trap.cr2, instruction=self._text_at(rip))
        if exit is not None:
            self._record(exit)  # the VMM reinjects it: the kernel's own handler runs either way
        super()._reflect(vector, error_code, trap, context)

    def _raised_by(self, decoded: Decoded, before: dict[int, int], vcpu: VirtualCpu, trap: Trap,
                   context: GuestContext) -> None:
        """An exception the emulated instruction itself raised (a segment load's #GP, as the translator
        reflects it straight into the kernel's IDT): through the exception bitmap like any other.  Its
        error code is the last word the reflection pushed (``trap.regs.rsp``)."""
        for vector, count in vcpu.reflected.items():
            if vector >= 32 or count <= before.get(vector, 0):
                continue
            error_code = None
            if has_error_code(vector):
                try:
                    error_code = struct.unpack("<Q", context.read(trap.regs.rsp, 8))[0] & 0xFFFF_FFFF
                except LabkitError:
                    error_code = 0
            exit = exception_exit(self.vmcs, vector, error_code, decoded.address, instruction=decoded.text)
            if exit is not None:
                self._record(exit)

    # -- carrying out what differs from the virtual CPU's emulation ------------------------------

    def _carry_out(self, decoded: Decoded, mnemonic: str, exited: bool, trap: Trap, context: GuestContext) -> bool:
        """Do what VMX non-root operation (or the VMM, after an exit) does where the plain virtual CPU would
        not: CR0/CR4 through the guest/host masks and read shadows, CR8, debug registers, RDTSC, RDPMC.
        False for everything else (the virtual CPU's emulation is then right)."""
        regs = trap.regs
        operands = decoded.operands
        if mnemonic == "mov" and len(operands) == 2 and all(op.kind == "reg" for op in operands):
            target, source = operands
            if target.reg in ("cr0", "cr4"):
                self._write_cr(int(target.reg[2]), read_register(regs, source.reg), exited)
                return True
            if source.reg in ("cr0", "cr4"):
                write_register(regs, target.reg, self._read_cr(int(source.reg[2])))
                return True
            if target.reg == "cr8":
                self.cr8 = read_register(regs, source.reg) & 0xF
                return True
            if source.reg == "cr8":
                write_register(regs, target.reg, self.cr8)
                return True
            if target.reg.startswith("dr"):
                self.debug_registers[int(target.reg[2:])] = read_register(regs, source.reg)
                return True
            if source.reg.startswith("dr"):
                write_register(regs, target.reg, self.debug_registers[int(source.reg[2:])])
                return True
            return False
        if mnemonic == "smsw":
            value = self._read_cr(0)
            operand = operands[0]
            if operand.kind == "mem":
                address = effective_address(operand, regs, decoded.address + decoded.length)
                context.write(address, struct.pack("<H", value & 0xFFFF))
            else:
                write_register(regs, operand.reg, value)
            return True
        if mnemonic == "clts":
            vcpu = self._vcpu()
            if exited:  # the VMM: the kernel asked for TS = 0
                vcpu.cr0 &= ~CR0_TS
                self._shadow(0, self.vmcs.cr0_read_shadow & ~CR0_TS)
            elif not self.vmcs.cr0_guest_host_mask & CR0_TS:
                vcpu.cr0 &= ~CR0_TS  # guest-owned: cleared; host-owned with a clear shadow: left alone (26.3)
            return True
        if mnemonic == "lmsw":
            try:
                word = lmsw_source(operands[0], regs, context.read, decoded.address + decoded.length)
            except LabkitError:
                return False
            vcpu = self._vcpu()
            loaded = word & LMSW_BITS | vcpu.cr0 & CR0_PE  # LMSW cannot clear PE
            if exited:
                vcpu.cr0 = vcpu.cr0 & ~LMSW_BITS | loaded
                shadow = self.vmcs.cr0_read_shadow
                self._shadow(0, shadow & ~LMSW_BITS | loaded & LMSW_BITS | shadow & CR0_PE)
            else:
                guest_owned = LMSW_BITS & ~self.vmcs.cr0_guest_host_mask
                vcpu.cr0 = vcpu.cr0 & ~guest_owned | loaded & guest_owned
            return True
        if mnemonic == "rdtsc":
            tsc = time.perf_counter_ns()
            if self.vmcs.primary & Primary.USE_TSC_OFFSETTING:
                tsc = (tsc + self.vmcs.tsc_offset) & _MASK64
            regs.rax, regs.rdx = tsc & 0xFFFF_FFFF, tsc >> 32
            return True
        if mnemonic == "rdpmc":
            regs.rax = regs.rdx = 0  # the model has no performance counters: every counter reads 0
            return True
        return False

    def _read_cr(self, number: int) -> int:
        """MOV from CR0/CR4 in non-root operation: host-owned bits (mask set) from the read shadow (SDM 26.3)."""
        vcpu = self._vcpu()
        if number == 0:
            mask, shadow, actual = self.vmcs.cr0_guest_host_mask, self.vmcs.cr0_read_shadow, vcpu.cr0
        else:
            mask, shadow, actual = self.vmcs.cr4_guest_host_mask, self.vmcs.cr4_read_shadow, vcpu.cr4
        return (actual & ~mask | shadow & mask) & _MASK64

    def _write_cr(self, number: int, value: int, exited: bool) -> None:
        """After an exit the VMM gives the kernel its value (CR and shadow); without one the CPU loads only
        the guest-owned bits (the host-owned ones already equal the shadow, or it would have exited)."""
        vcpu = self._vcpu()
        mask = self.vmcs.cr0_guest_host_mask if number == 0 else self.vmcs.cr4_guest_host_mask
        actual = vcpu.cr0 if number == 0 else vcpu.cr4
        if exited:
            new = value
            self._shadow(number, value)
        else:
            new = actual & mask | value & ~mask
        if number == 0:
            vcpu.cr0 = new & _MASK64
        else:
            vcpu.cr4 = new & _MASK64

    def _shadow(self, number: int, value: int) -> None:
        if number == 0:
            self.vmcs = replace(self.vmcs, cr0_read_shadow=value & _MASK64)
        else:
            self.vmcs = replace(self.vmcs, cr4_read_shadow=value & _MASK64)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _record(self, exit: VmExit) -> None:
        self.exit_counts[exit.reason] = self.exit_counts.get(exit.reason, 0) + 1
        if len(self.exits) < self.max_exits:
            self.exits.append(exit)
        else:
            self.exits_dropped += 1

    def _vcpu(self) -> VirtualCpu:
        return self._started()[1]

    def _text_at(self, rip: int) -> str:
        cache = self.cache
        decoded = cache.decode(rip) if cache is not None else None
        return f"{decoded.mnemonic} {decoded.op_str}".strip() if decoded is not None else ""

    def _stop_error(self, context: GuestContext, message: str) -> None:
        from labkit.vmm.status import StatusKind

        self._stop(context, StatusKind.ERROR, message)


def run_vmx(kernel: Guest | str = "minikernel64", vmcs: Vmcs | None = None, backend: str = "auto",
            timeout: float = 10.0, *, timer: bool = False, **machine_options: Any) -> RunResult:
    """Run ``kernel`` under a model of VMX with ``vmcs`` (default: no controls set); a ``RunResult`` whose
    ``monitor`` is the :class:`VmxReport`."""
    from labkit.vmm.machine import Machine

    model = VmxModel(kernel, vmcs, timer=timer)
    with Machine(model.guest, backend=backend, monitor=model, **machine_options) as machine:
        return machine.run(timeout)


def ran_on(result: RunResult) -> str:
    """``KVM (kvm_pvm)`` or ``the emulator (Unicorn 2.1.4)``: where a run ran, from the result's own origin."""
    origin = result.origin
    if origin is not None and origin.backend == "kvm":
        return f"KVM ({origin.flavour or 'flavour unknown'})"
    if origin is not None and origin.backend == "emu":
        return f"the emulator (Unicorn {origin.unicorn})"
    return origin.backend if origin is not None else result.backend


def where(result: RunResult) -> str:
    """``run on KVM (kvm_pvm)`` or ``run on the emulator (Unicorn 2.1.4)``: what the model ran on."""
    return f"run on {ran_on(result)}"


def exit_table(result: RunResult) -> Table:
    """The exit table of a :func:`run_vmx` result, labelled with where the model ran."""
    report = result.monitor
    if not isinstance(report, VmxReport):
        raise ConfigError("exit_table needs a run under VmxModel (labkit.monitor.vmx.run_vmx)")
    return report.exit_table(where(result))
