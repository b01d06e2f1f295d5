"""Emulation backend: the guest runs in Unicorn (QEMU's TCG), Capstone disassembles.

Used where ``/dev/kvm`` is missing (Binder, laptops).  See
:mod:`labkit.emu.unicorn_backend` for how Unicorn's hooks become labkit exits and
:mod:`labkit.emu.cpu_state` for the one internal field it has to patch.
"""

from labkit.emu.unicorn_backend import EmuBackend

__all__ = ["EmuBackend"]
