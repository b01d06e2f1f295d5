"""Tiny guests for the emulation-backend tests: assembled with GNU as, loaded with boot_state.

Each test writes its guest in Intel syntax beside the assertions; ``assemble``
turns it into flat machine code placed at ``ENTRY`` (``.org`` and labels work).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from labkit.emu import EmuBackend
from labkit.x86 import layout
from labkit.x86.boot import boot_state, load_boot_state

ENTRY = layout.LOAD_ADDRESS
MEMORY = 2 << 20
HAVE_BINUTILS = shutil.which("as") is not None and shutil.which("objcopy") is not None
needs_binutils = pytest.mark.skipif(not HAVE_BINUTILS, reason="GNU as/objcopy are not installed")


def assemble(source: str, bits: int = 64, origin: int = ENTRY) -> bytes:
    """Flat machine code for ``source`` (Intel syntax), linked to run at ``origin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "g.s").write_text(f".intel_syntax noprefix\n.code{bits}\n{source}\n")
        subprocess.run(["as", "--64", "-o", str(path / "g.o"), str(path / "g.s")], check=True,
                       capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(origin), "-e", hex(origin), "-o",
                        str(path / "g.elf"), str(path / "g.o")], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(path / "g.elf"), str(path / "g.bin")],
                       check=True, capture_output=True)
        return (path / "g.bin").read_bytes()


def boot(mode: int, code: bytes, *, user: bool = False, memory: int = MEMORY, extra=()) -> EmuBackend:
    """A backend in labkit's boot state for ``mode`` with ``code`` at ENTRY."""
    backend = EmuBackend(memory, mode)
    load_boot_state(backend, boot_state(mode, ENTRY, memory, user=user), code)
    for address, data in extra:
        backend.memory[address:address + len(data)] = data
    return backend


@dataclass
class Recorder:
    """A dispatcher: records every access, answers reads from ``replies``, stops on ``stop_ports``."""

    replies: dict = field(default_factory=dict)
    stop_ports: tuple = (layout.DEBUG_EXIT_PORT, layout.FAULT_PORT)
    stop: bool = False
    trace: list = field(default_factory=list)

    def pio(self, port, size, is_write, value, rip):
        self.trace.append(("pio", port, size, is_write, value, rip))
        self.stop = port in self.stop_ports
        return value if is_write else self.replies.get(port, 0)

    def mmio(self, address, size, is_write, value, rip):
        self.trace.append(("mmio", address, size, is_write, value))
        self.stop = False
        return value if is_write else self.replies.get(address, 0)
