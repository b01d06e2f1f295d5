"""Emulation backend: the guest runs in Unicorn (QEMU's TCG), Capstone disassembles.

Used where ``/dev/kvm`` is missing (Binder, laptops).  See
:mod:`labkit.emu.unicorn_backend` for how Unicorn's hooks become labkit exits and
:mod:`labkit.emu.cpu_state` for the one internal field it has to patch.
"""

from labkit.emu.cpu_state import find_deep_fields
from labkit.emu.halted import find_halted_offset
from labkit.emu.intercepts import find_intercept_fields
from labkit.emu.native import load as load_native
from labkit.emu.unicorn_backend import EmuBackend

__all__ = ["EmuBackend", "prepare"]


def prepare() -> None:
    """Import Unicorn, find its CPU-state offsets (the deep fields, CPUState.halted, the SVM intercept
    fields) and load the C trap replay once, in this process.

    ``Machine`` calls it before forking an emulation worker, so each worker
    inherits the work (about 0.2 s; building the C replay the first time on a
    machine, about 0.3 s more) instead of repeating it.  The probes run fixed,
    known code in scratch engines, never a guest's.
    """
    find_deep_fields()
    find_halted_offset()
    find_intercept_fields()
    load_native()
