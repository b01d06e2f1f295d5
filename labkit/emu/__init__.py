"""Emulation backend: the guest runs in Unicorn (QEMU's TCG), Capstone disassembles.

Used where ``/dev/kvm`` is missing (Binder, laptops).  See
:mod:`labkit.emu.unicorn_backend` for how Unicorn's hooks become labkit exits and
:mod:`labkit.emu.cpu_state` for the one internal field it has to patch.
"""

import gc

from labkit.emu.cpu_state import find_deep_fields
from labkit.emu.halted import find_halted_offset
from labkit.emu.intercepts import find_intercept_fields
from labkit.emu.native import load as load_native
from labkit.emu.unicorn_backend import EmuBackend

__all__ = ["EmuBackend", "prepare"]


_prepared = False


def prepare() -> None:
    """Import Unicorn, find its CPU-state offsets (the deep fields, CPUState.halted, the SVM intercept
    fields) and load the C trap replay once, in this process.

    ``Machine`` calls it before forking an emulation worker, so each worker
    inherits the work (about 0.2 s; building the C replay the first time on a
    machine, about 0.3 s more) instead of repeating it.  The probes run fixed,
    known code in scratch engines, never a guest's.

    The scratch engines are then collected at once.  Unicorn's Python binding keeps
    each engine in a reference cycle (its hooks' C callbacks hold bound methods of
    the engine), so an engine is closed only by the cycle collector; a worker forked
    before that inherited the probes' engines (two translation buffers, each a
    2 MiB transparent huge page once touched, and their CPU state) and, with the
    caller's objects frozen (``labkit.vmm.worker``), kept them to its end: about 5 MB
    in every worker, 16 times over for notebook 07's sixteen VMs (DECISIONS).
    """
    global _prepared
    if _prepared:
        return
    find_deep_fields()
    find_halted_offset()
    find_intercept_fields()
    load_native()
    gc.collect()
    _prepared = True
