"""DELIBERATELY VULNERABLE: a command FIFO whose index is not bounded, modelled on VENOM (CVE-2015-3456).

**Never give this device to a guest you do not control.**  It exists so that notebook 07 can
show where VM isolation really breaks: the boundary is only as strong as the device models
that run on the host side of it.  In VENOM, QEMU's floppy controller stored every byte a
guest wrote to its data port at ``fifo[data_pos++]`` and, for two commands, never checked
``data_pos`` against the FIFO's 512 bytes: a guest wrote on past the end, over the
controller's neighbouring host-side state and beyond (QEMU's ``hw/block/fdc.c``, fixed by
bounding the index).

What is modelled here (a teaching model of that bug, not of the Intel 82077AA):

- The device's host-side state is a real byte buffer laid out like a C struct
  (:data:`STATE_LAYOUT`): a 16-byte ``fifo``, then ``handler``, an index into the device's
  table of command handlers (:data:`HANDLERS`: the stand-in for a function pointer), then
  ``result_len`` and a 4-byte ``owner`` tag.
- Ports (offsets from :data:`BASE_PORT`, 0x3F4 as the PC's floppy controller):
  offset 0, write: 0x00 RESET (``data_pos = 0``, result cleared), 0x01 EXECUTE (calls
  ``HANDLERS[state.handler]`` on the FIFO and makes its answer readable); read: 0x80
  (RQM: ready), so a guest can tell the device is there.  Offset 1, write: a data byte,
  stored at ``fifo[data_pos++]``; read: the next byte of the answer (0 at its end).
- :class:`VulnerableFifo` stores at ``state[FIFO + data_pos]`` with no bound, as the buggy
  controller did: byte 16 lands in ``handler``, byte 17 in ``result_len``, ...  A handler
  index inside the table calls that handler, including ``host_debug_dump``, a host
  maintenance routine no command selects, which answers with host-side facts (the worker's
  process id and the device object's host address).  An index outside the table is an
  indirect call through garbage: in C a crash of the process or code execution; here the
  run ends with status ``error`` naming the device (:class:`labkit.errors.DeviceError`).
  A store past the whole state buffer (byte 24 on) ends the run the same way: in C it would
  overwrite whatever the allocator placed next.
- :class:`BoundedFifo` is the fixed twin: the same layout and ports, but a data byte with
  ``data_pos >= FIFO_SIZE`` is dropped and counted (``rejected``), as the VENOM fix does.

Containment: the factories (:func:`vulnerable_fifo_device`, :func:`bounded_fifo_device`)
refuse to build the device anywhere but in a machine's worker process (the emulation
backend's, or ``Machine(..., isolate=True)`` on KVM): whatever the guest corrupts is that
process's, and it ends with the machine.  The vulnerable one is also reachable only through
an explicit ``i_know_it_is_vulnerable=True``, and its device name says what it is.  Nothing
here touches real process memory: the "corruption" is confined to the modelled buffer.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

from labkit.errors import ConfigError, DeviceError
from labkit.vmm.devices.spec import DeviceContext, DeviceSpec

BASE_PORT = 0x3F4
"""Offset 0 (command/status) and offset 1 (data), at the PC floppy controller's MSR and FIFO ports."""
PORTS = 2

FIFO = 0
FIFO_SIZE = 16
HANDLER = 16
RESULT_LEN = 17
OWNER = 20
STATE_SIZE = 24
STATE_LAYOUT = (("fifo", FIFO, FIFO_SIZE), ("handler", HANDLER, 1), ("result_len", RESULT_LEN, 1),
                ("padding", 18, 2), ("owner", OWNER, 4))
"""The device's host-side state as a C struct: ``(field, offset, size)``."""

CMD_RESET = 0x00
CMD_EXECUTE = 0x01
STATUS_READY = 0x80
OWNER_TAG = 0x564D3037  # "70MV": which VM the device belongs to (a field the overflow can reach)

VULNERABLE_NAME = "VULNERABLE-fifo (CVE-2015-3456 model)"
BOUNDED_NAME = "bounded-fifo"


def _checksum(device: "FifoDevice") -> bytes:
    return f"checksum {sum(device.fifo_bytes()):#06x}".encode()


def _echo(device: "FifoDevice") -> bytes:
    return bytes(device.fifo_bytes()).rstrip(b"\0")


def _host_debug_dump(device: "FifoDevice") -> bytes:
    """The host maintenance routine no guest command selects: it tells host-side facts."""
    return f"host pid {os.getpid()}, device object at {id(device):#x}".encode()


HANDLERS: tuple[tuple[str, Callable[["FifoDevice"], bytes]], ...] = (
    ("checksum", _checksum), ("echo", _echo), ("host_debug_dump", _host_debug_dump))
"""The device's command-handler table; ``state.handler`` indexes it (0 after reset)."""


class FifoDevice:
    """The FIFO device's common part: state buffer, ports, handlers.  Subclasses decide how a data byte is stored."""

    vulnerable = False

    def __init__(self) -> None:
        self.state = bytearray(STATE_SIZE)
        self.data_pos = 0
        self.result = b""
        self.read_pos = 0
        self.rejected = 0
        self.calls: list[str] = []
        self.reset()

    def fifo_bytes(self) -> bytes:
        return bytes(self.state[FIFO:FIFO + FIFO_SIZE])

    def fields(self) -> dict[str, int | bytes]:
        """The state buffer decoded by :data:`STATE_LAYOUT`."""
        out: dict[str, int | bytes] = {}
        for name, offset, size in STATE_LAYOUT:
            raw = bytes(self.state[offset:offset + size])
            out[name] = raw if name == "fifo" else int.from_bytes(raw, "little")
        return out

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return STATUS_READY
        if self.read_pos < len(self.result):
            value = self.result[self.read_pos]
            self.read_pos += 1
            return value
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 1:
            self.store(value)
        elif value == CMD_RESET:
            self.data_pos = 0
            self.result, self.read_pos = b"", 0
        elif value == CMD_EXECUTE:
            self.execute()

    def store(self, value: int) -> None:
        raise NotImplementedError

    def execute(self) -> None:
        index = self.state[HANDLER]
        if index >= len(HANDLERS):
            raise DeviceError(f"{type(self).__name__}: handler index {index:#x} is outside the {len(HANDLERS)}-entry "
                              "handler table: in C an indirect call through garbage (a crash, or code execution)")
        name, handler = HANDLERS[index]
        self.calls.append(name)
        self.result = handler(self)[:255]
        self.state[RESULT_LEN] = len(self.result)
        self.read_pos = 0

    def reset(self) -> None:
        self.state[:] = bytes(STATE_SIZE)
        struct.pack_into("<I", self.state, OWNER, OWNER_TAG)
        self.data_pos = 0
        self.result, self.read_pos = b"", 0

    def save(self) -> dict[str, Any]:
        return {"state": bytes(self.state), "data_pos": self.data_pos, "result": self.result,
                "read_pos": self.read_pos, "rejected": self.rejected, "calls": list(self.calls),
                "vulnerable": self.vulnerable}

    def restore(self, state: dict[str, Any]) -> None:
        raw = state.get("state")
        if not isinstance(raw, bytes) or len(raw) != STATE_SIZE:
            raise ConfigError(f"{type(self).__name__}: a saved state needs {STATE_SIZE} state bytes")
        self.state[:] = raw
        self.data_pos = int(state["data_pos"])
        self.result = bytes(state["result"])
        self.read_pos = int(state["read_pos"])
        self.rejected = int(state["rejected"])
        self.calls = [str(name) for name in state["calls"]]


class VulnerableFifo(FifoDevice):
    """DELIBERATELY VULNERABLE: stores each data byte at ``state[FIFO + data_pos]``, never checking ``data_pos``."""

    vulnerable = True

    def store(self, value: int) -> None:
        where = FIFO + self.data_pos
        if where >= STATE_SIZE:
            raise DeviceError(f"VulnerableFifo: data byte {self.data_pos} is stored at offset {where}, past the "
                              f"device's {STATE_SIZE}-byte state: in C, over whatever the allocator put next")
        self.state[where] = value  # the bug: no bound against FIFO_SIZE
        self.data_pos += 1


class BoundedFifo(FifoDevice):
    """The fixed twin: a data byte beyond the FIFO is dropped and counted in ``rejected``."""

    def store(self, value: int) -> None:
        if self.data_pos >= FIFO_SIZE:
            self.rejected += 1
            return
        self.state[FIFO + self.data_pos] = value
        self.data_pos += 1


def _in_worker_only(cls: type[FifoDevice]) -> Callable[[DeviceContext], FifoDevice]:
    def build(context: DeviceContext) -> FifoDevice:
        from labkit.vmm.worker import in_worker

        if not in_worker():
            raise ConfigError(f"{cls.__name__} runs only in a machine's worker process, so that what the guest "
                              "corrupts stays there: use the emulation backend or Machine(..., isolate=True)")
        return cls()
    return build


def vulnerable_fifo_device(*, i_know_it_is_vulnerable: bool = False) -> list[DeviceSpec]:
    """The DELIBERATELY VULNERABLE FIFO (:class:`VulnerableFifo`) at ports 0x3F4-0x3F5, for notebook 07 only.

    Refuses without ``i_know_it_is_vulnerable=True``; the machine must run it in a worker
    process (emulation, or ``isolate=True`` on KVM), else building it raises ConfigError.
    """
    if i_know_it_is_vulnerable is not True:
        raise ConfigError("this device is deliberately vulnerable (a model of VENOM, CVE-2015-3456): pass "
                          "i_know_it_is_vulnerable=True to use it, and only with guests you wrote")
    return [DeviceSpec(VULNERABLE_NAME, "pio", BASE_PORT, PORTS, _in_worker_only(VulnerableFifo))]


def bounded_fifo_device() -> list[DeviceSpec]:
    """The bounds-checked twin (:class:`BoundedFifo`) at the same ports, in a worker process as well."""
    return [DeviceSpec(BOUNDED_NAME, "pio", BASE_PORT, PORTS, _in_worker_only(BoundedFifo))]
