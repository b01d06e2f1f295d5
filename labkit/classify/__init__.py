"""Classify an x86 instruction by running it in ring 0 and in ring 3: privileged, sensitive or innocuous.

Popek and Goldberg (1974): a machine can be virtualized by trap-and-emulate
when every *sensitive* instruction (one that reads or changes privileged state,
or behaves differently by privilege level) is *privileged* (traps when run
outside the most privileged mode).  Robin and Irvine (USENIX Security 2000)
listed the x86 instructions that are sensitive but do not trap in ring 3
(:data:`ROBIN_IRVINE`: one experiment per name in their list, MOV run once).
The three kinds are defined once, in :mod:`labkit.x86.instructions`; the
classifier measures them.
:func:`classify` decides by experiment, never from a table::

    >>> classify("popfq", setup="pushfq\\n xor qword ptr [rsp], 0x200").verdict
    <Verdict.SENSITIVE: 'sensitive'>

How one classification runs.  The instruction is assembled into a small guest
(``_TEMPLATE``) whose 64-bit ring-0 prologue enters the code with ``iretq``,
so every run starts from the same registers (all GPRs 0, RSP = ``RUN_RSP``,
RFLAGS = IF|0x2, DS = ES = FS = GS = USER_DS) and differs only in the ring and
in the privileged state::

    run             entered with              privileged state
    ring 0          CS = KERNEL_CS (DPL 0)    labkit's boot state (GDT, IDT, TR, CR0)
    ring 3          CS = USER_CS (DPL 3)      the same
    ring 3 altered  CS = USER_CS, IF = 0      another GDT (GDTR base/limit), an IDT copy
                                              elsewhere, an LDT loaded, another TR, CR0.TS set
    ring 0 altered  CS = KERNEL_CS, IF = 0    the same other state
    ring 3 umip     CS = USER_CS (DPL 3)      labkit's, with CR4.UMIP (bit 11) set
                                              (only with ``umip=True``)
    ring 0 again,   as ring 0 and ring 3      the same: a second run
    ring 3 again
    ring 0/3        as ring 0 and ring 3      a second GDT layout: every descriptor
      relocated                               under another selector (guest.relocated_gdt);
                                              only where ring 0 and ring 3 differ
    ring 3 without  as ring 3, ``nop`` in     the same (only where KVM counts emulated
      it            the instruction's place   instructions)

The altered, relocated and "without it" runs happen only when ring 3 did not
trap.  Each run executes
``setup`` (optional), the instruction, and ``ud2``: labkit's default #UD stub reports the registers at the ``ud2``, so "#UD at the ud2" means "the
instruction completed without trapping".  ``mode=32`` runs setup and
instruction as 32-bit code in compatibility mode (CS = KERNEL_CS32 or
USER_CS32 under the same 64-bit kernel, as a 64-bit OS runs a 32-bit program),
which is where IA-32-only forms such as ``push cs`` or ``call far`` exist.

Names the setup may use: ``scratch`` (64 bytes of zeroed RAM, read back after
each run), ``after`` (the address of the final ``ud2``: a far transfer's
target), ``RUN_RSP`` and the selectors ``KERNEL_CS64``, ``KERNEL_CS32``,
``KERNEL_DS``, ``USER_CS32``, ``USER_CS64``, ``USER_DS``.

Outcome of one run (:class:`RingRun`.outcome):

- ``completed``: reached the ``ud2`` (or, in ring 0, ended with ``hlt`` or a
  port write that ends the run);
- ``trapped``: an exception at the instruction (or a shutdown, should a host
  turn the fault into a triple fault);
- ``entered``: the instruction itself vectored through the IDT (``int n``,
  ``int3``): the default stub for that vector reported it with RIP after it;
- ``not run``: the backend could not run it (KVM's emulator under PVM fails
  on some ring-0 instructions: ``int n``, ``lar``), it timed out, or the setup
  or prologue faulted.

Verdict (:class:`Classification`.verdict), from the outcomes:

- ``privileged``: traps in ring 3 and not in ring 0 (or ring 0 could not run);
- ``faults in both rings``: the same exception in ring 0 and ring 3 (not a
  question of privilege: an invalid instruction or operand);
- ``nondeterministic``: two runs of the same ring gave different results
  (``rdtsc``): a difference between the rings would say nothing;
- ``sensitive``: does not trap in ring 3, but ring 0 and ring 3 differ (GPRs,
  RFLAGS without RF, bytes pushed, ``scratch``, or one of them traps) under
  either privileged state, or ring 3's result changes with the privileged state
  (IF, which the altered run sets on purpose, is left out of that comparison);
- ``host-dependent``: ring 0 and ring 3 differ only in results ring 3 got from
  the host rather than from the guest;
- ``innocuous``: no trap and no difference;
- ``undetermined``: ring 3 did not run to an answer, or only ring 3 ran and
  showed nothing (the note says why).

Results from the host (:attr:`Classification.host`, :func:`host_evidence`),
each with the measurement that shows it, and left out of the comparisons:
an instruction the host intercepted in ring 3 and KVM emulated (the vCPU stat
``insn_emulation`` grows against the run without it: PVM's host UMIP and
``sgdt``, ``smsw``, ...), a ring-3 selector that does not follow the guest's
GDT layout (PVM runs ring 3 on the host's CS and SS), a stored IF = 1 where
the guest runs with IF = 0 (the host's IF), and descriptor-table lookups where
ring 3 does not use the guest's GDT (:func:`ring3_tables`).  None of them
names a host: on the emulator and on VT-x they find nothing.

RFLAGS.RF (bit 16) is ignored in comparisons: KVM sets it in the frame of
every fault, Unicorn does not.  A run is one :class:`labkit.Machine`: a few
ms on KVM, a few tens of ms on the emulator (a forked worker);
benchmarks/bench_classify.py measures a whole classification.

The package: :mod:`~labkit.classify.guest` (the guest program),
:mod:`~labkit.classify.runner` (running it, :func:`classify`),
:mod:`~labkit.classify.rules` (outcomes and verdicts, :class:`Verdict`) and
:mod:`~labkit.classify.robin_irvine` (the paper's list).
"""

from labkit.classify.guest import RUN_RSP, RUNS, SCRATCH, SCRATCH_SIZE, guest_source
from labkit.classify.rules import (BOTH_FAULT, HOST_DEPENDENT, INNOCUOUS, NONDETERMINISTIC, PRIVILEGED, SENSITIVE,
                                   UNDETERMINED, VERDICTS, Classification, HostEvidence, HostInfluence, Outcome,
                                   RingRun, RingTables, Verdict, decide, host_evidence)
from labkit.classify.runner import TIMEOUT_S, classify, ring3_tables
from labkit.classify.robin_irvine import PAPER_COUNT, PAPER_VERDICT, ROBIN_IRVINE, Experiment, robin_irvine_table

__all__ = ["BOTH_FAULT", "HOST_DEPENDENT", "INNOCUOUS", "NONDETERMINISTIC", "PRIVILEGED", "SENSITIVE", "UNDETERMINED",
           "VERDICTS", "PAPER_COUNT", "PAPER_VERDICT", "ROBIN_IRVINE", "RUNS", "RUN_RSP", "SCRATCH", "SCRATCH_SIZE",
           "TIMEOUT_S", "Classification", "Experiment", "HostEvidence", "HostInfluence", "Outcome", "RingRun",
           "RingTables", "Verdict", "classify", "decide", "guest_source", "host_evidence", "ring3_tables",
           "robin_irvine_table"]
