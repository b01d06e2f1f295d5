"""The virtual CPU of a deprivileged guest kernel, and how a monitor emulates and reflects for it.

A guest kernel run in ring 3 by a monitor (trap-and-emulate, binary
translation) believes it is in ring 0.  What ring 0 would own, the monitor
keeps here, in a :class:`VirtualCpu`: the virtual interrupt flag, CR0/CR2/CR3/CR4,
GDTR/IDTR/LDTR/TR, a few MSRs and the virtual interrupts waiting for the
virtual IF.  The real CPU keeps labkit's own GDT, IDT, page tables and IF = 1.

Three functions, shared by both monitors (stable interface)::

    emulate(vcpu, trap, context, code) -> str | None
        Decode the instruction at trap.regs.rip (its bytes are ``code``) with
        Capstone, carry it out on the virtual CPU and the guest's registers,
        advance trap.regs.rip past it and return its text ("mov cr3, rax").
        None when it is not an instruction this module emulates (see
        EMULATED); then nothing was changed.
    reflect(vcpu, trap, context, vector, error_code=None, *, cr2=None)
        Deliver exception/interrupt ``vector`` through the guest's *virtual*
        IDT: push SS, RSP, RFLAGS (IF = the virtual IF), CS (the virtual ring-0
        CS), RIP [, error code] on the guest's stack, as a CPU at CPL 0 would,
        and continue at the gate's handler.  Raises VirtualTripleFault when
        the virtual IDT cannot deliver it.
    deliver_pending(vcpu, trap, context) -> int | None
        Reflect the oldest pending virtual interrupt when the virtual IF is
        set; returns its vector.

Emulated instructions (EMULATED): ``cli sti hlt pushfq popfq in out mov crN
clts lgdt lidt sgdt sidt sldt str smsw lmsw invlpg rdmsr wrmsr iretq int n
int3``: the privileged ones a kernel uses, and the sensitive ones too (binary
translation hands those to :func:`emulate`; under trap-and-emulate they never
trap).  Which instructions are privileged, sensitive or innocuous is defined
once, in :mod:`labkit.x86.instructions` (re-exported here).  ``hlt`` only marks ``vcpu.halted`` (the monitor decides what a halt
means); ``in``/``out`` go to ``vcpu.ports`` (devices only the monitor has,
such as a virtual timer) or else to the machine's bus through
``context.pio``.  ``iretq`` returns to virtual ring 0 only (a virtual user
mode is not modelled: an ``iretq`` to RPL 3 is not emulated).

Simplifications, on purpose: guest-linear addresses are guest-physical
(labkit's identity map; the monitor does not shadow the guest's page
tables, so a ``mov cr3`` only changes the virtual CR3); FS/GS bases are
taken as 0 in memory operands; an ``sti`` makes a pending interrupt
deliverable at once (no one-instruction interrupt shadow).

The package: :mod:`~labkit.monitor.vcpu.state` (:class:`VirtualCpu`),
:mod:`~labkit.monitor.vcpu.decoding` (Capstone, registers by name) and
:mod:`~labkit.monitor.vcpu.emulation` (the functions above).
"""

from labkit.monitor.vcpu.decoding import (MASK64, Decoded, Operand, decode, effective_address, read_register,
                                          write_register)
from labkit.monitor.vcpu.emulation import (CONTROL_REGISTERS, EMULATED, LETS_INTERRUPTS_IN, RFLAGS_GUEST_SETTABLE,
                                           after_emulation, deliver_pending, emulate, has_error_code, reflect,
                                           traps_when_deprivileged, virtual_rflags)
from labkit.monitor.vcpu.state import PortDevice, VirtualCpu, VirtualTripleFault
from labkit.x86.arch import PF_USER
from labkit.x86.instructions import PRIVILEGED, SENSITIVE, InstructionClass, instruction_class

__all__ = ["CONTROL_REGISTERS", "EMULATED", "LETS_INTERRUPTS_IN", "MASK64", "PF_USER", "PRIVILEGED",
           "RFLAGS_GUEST_SETTABLE", "SENSITIVE", "Decoded", "InstructionClass", "Operand", "PortDevice", "VirtualCpu",
           "VirtualTripleFault", "after_emulation", "decode", "deliver_pending", "effective_address", "emulate",
           "has_error_code", "instruction_class", "read_register", "reflect", "traps_when_deprivileged",
           "virtual_rflags", "write_register"]
