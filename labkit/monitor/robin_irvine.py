"""Robin and Irvine's instructions as routines of a kernel: what it sees natively, under trap-and-emulate, translated.

Robin and Irvine (USENIX Security 2000) listed the x86 instructions that are
sensitive but do not trap in user mode; :mod:`labkit.classify.robin_irvine`
runs each of them bare to classify it.  Here each one is a routine of the
shipped ``minikernel64`` (its student routine,
:func:`labkit.monitor.trap_emulate.minikernel`), written as a 64-bit kernel
would use it and leaving what the kernel observes in RAX, which the kernel
prints.  :func:`run_probes` runs every routine natively (ring 0), under
trap-and-emulate and under binary translation (both ring 3) and reads the
value back from the console.

In 64-bit mode some of the paper's forms do not exist: ``push cs``/``push
ss``/``pop ss`` and the direct far ``call``/``jmp ptr16:32`` are #UD (SDM vol.
2A/2B, "Invalid" in the 64-bit column).  The routines use the forms that do:
``push fs``, ``pop fs``, far ``call``/``jmp`` through memory, ``retfq``;
:data:`MORE_PROBES` adds ``push cs`` (#UD in every run, as it should be), a
read of SS and a load of DS.

On this project's PVM host the *native* ring-0 run cannot execute ``lar``,
``lsl``, ``verr``, ``verw`` or ``int n`` (KVM's instruction emulator, which
runs all ring-0 code there, does not implement them): :func:`run_probes` then
takes the native value from the emulator and says so (``ProbeRow.reference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from labkit.errors import ConfigError
from labkit.progress import tracked
from labkit.table import Table
from labkit.vmm.status import RunResult, StatusKind, exception_name

if TYPE_CHECKING:
    from labkit.guest import Guest


@dataclass(frozen=True)
class Probe:
    """One instruction as a kernel routine: ``routine`` leaves what the kernel observes in RAX."""

    name: str
    """The paper's name for it (``"LAR"``), or the form for :data:`MORE_PROBES` (``"MOV from SS"``)."""
    instruction: str
    """What the routine runs, in a few words."""
    routine: str
    """Intel-syntax assembly spliced into ``minikernel64`` as its student routine."""
    observes: str
    """What RAX holds, natively."""


# The routines may use the kernel's labels: scratch (16 bytes), idt, set_gate, ud_handler, int30_handler.
_POPF = """
        lea rdi, [rip + idt + 6 * 16]      # a #UD handler of its own: it records the RFLAGS it interrupted
        lea rax, [rip + 1f]
        call set_gate
        cli
        push 0x202
        popfq                              # IF = 1, as a kernel restoring its flags does
        ud2
        jmp 2f
1:      mov rax, [rsp + 16]
        mov [rip + scratch], rax
        add qword ptr [rsp], 2
        iretq
2:      cli
        lea rdi, [rip + idt + 6 * 16]
        lea rax, [rip + ud_handler]
        call set_gate
        mov rax, [rip + scratch]
        and eax, 0x200
"""
_INT = """
        lea rdi, [rip + idt + 0x30 * 16]   # a handler of its own for vector 0x30: it records the CS pushed
        lea rax, [rip + 1f]
        call set_gate
        int 0x30
        jmp 2f
1:      mov rax, [rsp + 8]
        mov [rip + scratch], rax
        iretq
2:      lea rdi, [rip + idt + 0x30 * 16]
        lea rax, [rip + int30_handler]
        call set_gate
        mov rax, [rip + scratch]
"""

ROBIN_IRVINE_PROBES = (
    Probe("SGDT", "sgdt [scratch]", "sgdt [rip + scratch]\nmov rax, [rip + scratch + 2]",
          "the base of the kernel's own GDT"),
    Probe("SIDT", "sidt [scratch]", "sidt [rip + scratch]\nmov rax, [rip + scratch + 2]",
          "the base of the kernel's own IDT"),
    Probe("SLDT", "sldt eax", "sldt eax", "LDTR: 0, no LDT (the monitor's is null too)"),
    Probe("SMSW", "mov cr0 (TS = 1), smsw eax", "mov rax, cr0\nor rax, 8\nmov cr0, rax\nsmsw eax\nclts",
          "CR0[31:0] with the TS bit (0x8) the kernel set"),
    Probe("PUSHF", "cli; pushfq", "cli\npushfq\npop rax\nand eax, 0x200", "RFLAGS.IF after cli: 0"),
    Probe("POPF", "popfq (IF = 1); ud2", _POPF, "RFLAGS.IF restored by popfq, as the #UD handler sees it: 0x200"),
    Probe("LAR", "lar eax, ecx (ecx = 0x8)", "mov ecx, 8\nlar eax, ecx",
          "access rights of the kernel's code selector 0x8"),
    Probe("LSL", "lsl eax, ecx (ecx = 0x10)", "mov ecx, 0x10\nlsl eax, ecx",
          "limit of the kernel's data selector 0x10"),
    Probe("VERR", "verr cx (cx = 0x10); setz al", "mov ecx, 0x10\nverr cx\nsetz al",
          "ZF: 1, selector 0x10 is readable at CPL 0"),
    Probe("VERW", "verw cx (cx = 0x10); setz al", "mov ecx, 0x10\nverw cx\nsetz al",
          "ZF: 1, selector 0x10 is writable at CPL 0"),
    Probe("PUSH", "push fs; pop rax", "push fs\npop rax", "the kernel's FS selector 0x10"),
    Probe("POP", "pop fs (0, then 0x10)", "push 0\npop fs\npush 0x10\npop fs\nmov eax, fs",
          "FS after popping the kernel's selector 0x10"),
    Probe("CALL", "call far [0x8:target]", "call fword ptr [rip + 1f]\njmp 3f\n1: .long 2f\n.word 8\n"
          "2: mov eax, [rsp + 4]\nretf\n3:", "the CS the far call pushed: 0x8"),
    Probe("JMP", "jmp far [0x8:target]", "jmp fword ptr [rip + 1f]\n1: .long 2f\n.word 8\n2: mov eax, 1",
          "1: the far jump arrived"),
    Probe("INT n", "int 0x30", _INT, "the CS in the frame the handler got: 0x8"),
    Probe("RET", "retfq to 0x8:target", "push 8\nlea rax, [rip + 1f]\npush rax\nretfq\n1: mov eax, 1",
          "1: the far return arrived"),
    Probe("STR", "str eax", "str eax", "TR: the TSS selector 0x40 (the monitor's is the same)"),
    Probe("MOV", "mov eax, cs", "mov eax, cs", "CS: 0x8, whose low bits are the CPL"),
)
"""One routine per row of Robin and Irvine's table, in the order :mod:`labkit.classify.robin_irvine` lists them."""

MORE_PROBES = (
    Probe("MOV from SS", "mov eax, ss", "mov eax, ss", "SS: the kernel's 0x10"),
    Probe("MOV to DS", "mov ds, ecx (ecx = 0x10); mov eax, ds", "mov ecx, 0x10\nmov ds, ecx\nmov eax, ds",
          "DS after loading the kernel's 0x10"),
    Probe("PUSH CS", "push cs (0x0e: #UD in 64-bit mode)", ".byte 0x0e\nnop", "#UD, as on every 64-bit CPU"),
)
"""Forms the table has no row of its own for."""

ALL_PROBES = ROBIN_IRVINE_PROBES + MORE_PROBES
TECHNIQUES = ("native", "trap-and-emulate", "binary translation")

_RAX = "  rax = "
_UD = "  #UD handler:"
_UNEXPECTED = "minikernel: unexpected exception or interrupt"


@dataclass(frozen=True)
class Observation:
    """What the kernel observed in one run of a probe: ``value`` as the table shows it."""

    value: str
    """``"0xa09b00"``; ``"#UD, then 0x0"``; ``"#GP: kernel halted"``; ``"stopped: ..."``."""
    printed: bool
    """Whether the kernel got to print RAX."""
    kind: StatusKind
    status: str


@dataclass(frozen=True)
class ProbeRow:
    """One probe on one backend: the native reference and the two monitors."""

    probe: Probe
    native: Observation
    reference: str
    """Where the native value was measured: the backend, or ``"emu"`` when the backend's ring 0 cannot run it."""
    native_here: Observation
    """The native run on the backend itself (differs from ``native`` only when the reference is the emulator)."""
    trap_emulate: Observation
    translated: Observation

    @property
    def leaks(self) -> bool:
        """Trap-and-emulate shows the kernel something else than native."""
        return self.trap_emulate.value != self.native.value

    @property
    def exact(self) -> bool:
        """Binary translation shows the kernel the native value."""
        return self.translated.value == self.native.value


IDT_ON_ITS_OWN_PAGE = ".set IDT_ON_ITS_OWN_PAGE, 1\n"
"""Assembled into every probe kernel: its IDT goes on a page of its own (see ``minikernel64.S``), so that
binary translation does not trap each of the kernel's boot-time gate stores (they would share a page with
translated code); notebook 03's full minikernel run shows that cost."""


@lru_cache(maxsize=64)
def probe_kernel(routine: str) -> Guest:
    """``minikernel64`` running only ``routine`` as its student routine (assembled once per routine),
    with its IDT on a page of its own."""
    from labkit.monitor.trap_emulate import minikernel

    return minikernel((), student=IDT_ON_ITS_OWN_PAGE + routine)


def observation(result: RunResult) -> Observation:
    """Read what the probe's kernel printed (or why it printed nothing) from a run."""
    lines = result.console.splitlines()
    prefix = "#UD, then " if any(line.startswith(_UD) for line in lines) else ""
    for line in lines:
        if line.startswith(_RAX):
            return Observation(prefix + line[len(_RAX):], True, result.status.kind, str(result.status))
    if any(line.startswith(_UNEXPECTED) for line in lines):
        return Observation(f"{_faults(result)}: kernel halted", False, result.status.kind, str(result.status))
    return Observation(f"stopped: {result.status.message or result.status.kind.value}", False, result.status.kind,
                       str(result.status))


def _faults(result: RunResult) -> str:
    """The exceptions a monitor reflected into the kernel in this run, by name (``#GP``)."""
    from labkit.monitor.binary_translation import TranslationSummary
    from labkit.monitor.trap_emulate import TrapEmulateReport
    from labkit.monitor.vcpu import VirtualCpu

    report = result.monitor
    if isinstance(report, TrapEmulateReport):
        vectors = sorted(report.reflected)
    elif isinstance(report, TranslationSummary) and isinstance(report.vcpu, VirtualCpu):
        vectors = sorted(report.vcpu.reflected)
    else:
        return "exception"
    return ", ".join(exception_name(vector).split(" ")[0] for vector in vectors) or "exception"


def run_probe(probe: Probe, technique: str, backend: str, timeout: float = 10.0) -> RunResult:
    """Run ``probe``'s kernel ``technique``-ly (one of :data:`TECHNIQUES`) on ``backend``."""
    from labkit.monitor.binary_translation import run_translated
    from labkit.monitor.trap_emulate import run_deprivileged
    from labkit.vmm.machine import Machine

    kernel = probe_kernel(probe.routine)
    if technique == "native":
        with Machine(kernel, backend=backend) as machine:
            return machine.run(timeout)
    if technique == "trap-and-emulate":
        return run_deprivileged(kernel, backend, timeout=timeout)
    if technique == "binary translation":
        return run_translated(kernel, backend, timeout=timeout)
    raise ConfigError(f"technique {technique!r} is not one of {', '.join(TECHNIQUES)}")


def run_probes(backend: str, probes: tuple[Probe, ...] = ALL_PROBES, timeout: float = 10.0) -> list[ProbeRow]:
    """Each probe natively, under trap-and-emulate and under binary translation on ``backend``.

    Where the backend's ring 0 cannot run a probe natively (status ``error``: KVM's
    instruction emulator under PVM lacks ``lar`` and ``int n``), the native value
    comes from the emulator and the row's ``reference`` says ``"emu"``.
    """
    rows = []
    for probe in tracked(probes, f"probes on {backend}"):
        native_here = observation(run_probe(probe, "native", backend, timeout))
        native, reference = native_here, backend
        if not native_here.printed and backend != "emu" and native_here.kind == StatusKind.ERROR:
            native, reference = observation(run_probe(probe, "native", "emu", timeout)), "emu"
        rows.append(ProbeRow(probe, native, reference, native_here,
                             observation(run_probe(probe, "trap-and-emulate", backend, timeout)),
                             observation(run_probe(probe, "binary translation", backend, timeout))))
    return rows


def probe_table(rows: list[ProbeRow], backend_label: str) -> Table:
    """The probes as a table: native value, trap-and-emulate and binary translation, ``≠`` where they differ."""
    body = []
    for row in rows:
        native = row.native.value + ("" if row.reference != "emu" or row.native is row.native_here
                                     else "\n(on the emulator: this ring 0 cannot run it)")
        body.append([row.probe.name, row.probe.instruction, native,
                     ("≠ " if row.leaks else "") + row.trap_emulate.value,
                     ("≠ " if not row.exact else "") + row.translated.value])
    leaking = sum(row.leaks for row in rows)
    exact = sum(row.exact for row in rows)
    return Table(f"What the kernel sees, {len(rows)} instructions on {backend_label} (≠: differs from native)",
                 ["instruction", "kernel routine", "native (ring 0)", "trap-and-emulate (ring 3)",
                  "binary translation (ring 3)"], body,
                 note=f"trap-and-emulate differs from native in {leaking} of {len(rows)} rows; "
                      f"binary translation gives the native value in {exact} of {len(rows)}.")


WHY_THE_SAME = {
    "SLDT": "the monitor's LDTR is null, like the kernel's",
    "STR": "the monitor's TR holds the same TSS selector as the kernel's",
    "INT n": "`int 0x30` traps in ring 3, and the monitor reflects it through the kernel's IDT with the kernel's CS",
    "PUSH CS": "an invalid opcode in 64-bit mode: #UD natively too",
}
"""Why a row can show trap-and-emulate the native value although the instruction is on the list."""


def leak_summary(rows: list[ProbeRow], backend: str, flavour: str | None = None) -> str:
    """A Markdown paragraph on ``rows``: which leak under trap-and-emulate, how many BT gets right, and why the
    native value of some came from the emulator (on a KVM whose ring 0 cannot run them)."""
    leaking = [row for row in rows if row.leaks]
    same = "; ".join(f"{row.probe.name}: {WHY_THE_SAME.get(row.probe.name, 'the same value by coincidence')}"
                     for row in rows if not row.leaks)
    exact = sum(row.exact for row in rows)
    text = (f"Under **trap-and-emulate** the kernel sees something else than natively in **{len(leaking)} of "
            f"{len(rows)}** rows: {', '.join(row.probe.name for row in leaking)}.")
    if same:
        text += f" The others look right here only because the ring-3 answer happens to be the same or the " \
                f"instruction traps: {same}."
    text += f" Under **binary translation** the kernel sees its native value in **{exact} of {len(rows)}**."
    elsewhere = [row.probe.name for row in rows if row.reference != backend]
    if elsewhere:
        host = f"this `{flavour}` host" if flavour else "this KVM host"
        text += (f"\n\nThe native column of {', '.join(elsewhere)} comes from the emulator: on {host} the native "
                 "ring-0 run stops at them with an emulation error.")
        if flavour == "kvm_pvm":
            text += (" Under PVM every ring-0 instruction runs in KVM's instruction emulator, which cannot run them "
                     "(a VT-x or AMD-V host runs them in hardware). A ring-3 `lar` or `mov eax, cs` there even "
                     "answers from the *host's* GDT (the selectors in the trap-and-emulate column are the host's), "
                     "so without translation the kernel cannot see its own.")
    return text
