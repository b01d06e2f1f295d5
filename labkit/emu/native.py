"""The trap replay in C (``trap_replay.c``): built once per machine, loaded with ctypes.

A trap round trip through Python costs about 2.2 us on the development machine,
1.5 us of which is the delivery's Python; the same replay in C leaves Unicorn's
fault path and the guest's own handler.  Built by :func:`labkit.native.build`
(the system compiler, a per-user cache).  Where it is not built (no compiler, a
failed build, ``LABKIT_NATIVE=0``), :func:`load` returns None, :func:`status`
says why, and the backend delivers every exception in Python (same results, slower).
"""

from __future__ import annotations

import ctypes
from _ctypes import CFuncPtr  # the type of a ctypes callback (CFUNCTYPE(...)(function))
from pathlib import Path

from labkit.native import Library

SOURCE = Path(__file__).with_name("trap_replay.c")
PLAN_SLOTS = 64
SYSTEM_BYTES = 136
CACHE_BYTES = 48
U64 = (1 << 64) - 1
NO_STACK_SWITCH = U64

_u8, _u32, _i32, _u64, _void_p = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_void_p


class Plan(ctypes.Structure):
    """``struct plan`` of trap_replay.c."""

    _fields_ = [
        ("key", _u64), ("gate_at", _u64), ("gate", _u64 * 2), ("descriptor_at", _u64), ("descriptor", _u64),
        ("stack_at", _u64), ("stack_page", _u64), ("stack_frame", _u64), ("target", _u64), ("keep_mask", _u64),
        ("frame_size", _u32), ("hflags_after", _u32), ("caches_size", _u32), ("error", _u32),
        ("caches", _u8 * CACHE_BYTES), ("system", _u8 * SYSTEM_BYTES),
    ]


class TrapReplayState(ctypes.Structure):
    """``struct trap_replay`` of trap_replay.c."""

    _fields_ = [
        ("cpu", _void_p), ("ram", _void_p), ("ram_size", _u64), ("reg_read", _void_p), ("slow", _void_p),
        ("rflags_reg", _i32), ("stopping", _i32),
        ("eip", _u32), ("eflags", _u32), ("hflags", _u32), ("rsp", _u32), ("cs", _u32), ("ss", _u32),
        ("system", _u32), ("cr2_in_system", _u32),
        ("old_exception", _u32), ("error_code", _u32), ("exception_is_int", _u32), ("unused", _u32),
        ("replayed", _u64), ("passed_on", _u64),
        ("plans", Plan * PLAN_SLOTS),
        ("dirty_bitmap", _void_p), ("dirty_pages", _u64),
        ("vmem_read", _void_p), ("cs_base", _u32), ("cs64_mask", _u32),
    ]


def _check(library: ctypes.CDLL) -> str | None:
    library.trap_replay_layout.argtypes = (ctypes.POINTER(_u64 * 6),)
    library.trap_replay_layout.restype = None
    library.trap_replay_slot.argtypes = (_u64,)
    library.trap_replay_slot.restype = ctypes.c_uint
    if layout_of(library) != expected_layout():
        return f"{library._name} does not match labkit's ctypes mirror of struct trap_replay"
    return None


_LIBRARY = Library(SOURCE, _check, "C trap replay")


def load() -> ctypes.CDLL | None:
    """The built trap-replay library, or None (see :func:`status`).  Built at most once per process."""
    return _LIBRARY.load()


def status() -> str:
    """One line for ``labkit doctor``: which trap delivery the emulation backend uses, and why."""
    return _LIBRARY.status()


def layout_of(library: ctypes.CDLL) -> tuple[int, ...]:
    """(sizeof trap_replay, sizeof plan, offsetof replayed, offsetof plans, offsetof caches, offsetof system)."""
    out = (_u64 * 6)()
    library.trap_replay_layout(ctypes.byref(out))
    return tuple(out)


def expected_layout() -> tuple[int, ...]:
    return (ctypes.sizeof(TrapReplayState), ctypes.sizeof(Plan), TrapReplayState.replayed.offset,
            TrapReplayState.plans.offset, Plan.caches.offset, Plan.system.offset)


class NativeTrapReplay:
    """One engine's ``struct trap_replay``: the C hook's address and user data, and its plan table.

    ``slow`` is the Python UC_HOOK_INTR callback the C hook passes on to; it is
    kept referenced here, as is the state the C code points into.
    """

    def __init__(self, library: ctypes.CDLL, *, cpu_address: int, ram_address: int, ram_size: int,
                 reg_read_address: int, rflags_reg: int, slow: CFuncPtr, offsets: dict[str, int],
                 vmem_read_address: int | None = None):
        self.state = TrapReplayState(cpu=cpu_address, ram=ram_address, ram_size=ram_size,
                                     reg_read=reg_read_address, slow=ctypes.cast(slow, _void_p).value,
                                     rflags_reg=rflags_reg, vmem_read=vmem_read_address, **offsets)
        self._slow = slow
        self.hook_address = ctypes.cast(library.trap_replay_hook, _void_p).value
        self.user_data = ctypes.addressof(self.state)
        self._slot = library.trap_replay_slot
        self._plans_size = ctypes.sizeof(self.state.plans)

    def set_dirty_log(self, bitmap_address: int | None, pages: int) -> None:
        """Log the page of every frame the replay pushes in the dirty log's bitmap (``None``: stop)."""
        self.state.dirty_bitmap = bitmap_address
        self.state.dirty_pages = pages if bitmap_address is not None else 0

    def set_stopping(self, stopping: bool) -> None:
        self.state.stopping = int(stopping)

    @property
    def replayed(self) -> int:
        """Exceptions the C hook delivered."""
        return self.state.replayed

    @property
    def passed_on(self) -> int:
        """Exceptions the C hook handed to Python."""
        return self.state.passed_on

    def flush(self) -> None:
        ctypes.memset(ctypes.addressof(self.state.plans), 0, self._plans_size)

    def keep(self, key: int, *, gate_at: int, gate: tuple[int, int], descriptor_at: int, descriptor: int,
             stack_at: int | None, stack_page: int, stack_frame: int, target: int, keep_mask: int,
             frame_size: int, hflags_after: int, caches: bytes, system: bytes, error: bool) -> None:
        """Store a plan in its slot (evicting the one there)."""
        if len(system) != SYSTEM_BYTES or len(caches) > CACHE_BYTES:
            raise ValueError("a plan's system block or segment caches have the wrong size")
        plan = self.state.plans[self._slot(key)]
        plan.key = 0  # the slot holds no plan until it is whole
        plan.gate_at, plan.gate[0], plan.gate[1] = gate_at, *gate
        plan.descriptor_at, plan.descriptor = descriptor_at, descriptor
        plan.stack_at = NO_STACK_SWITCH if stack_at is None else stack_at
        plan.stack_page, plan.stack_frame = stack_page, stack_frame
        plan.target, plan.keep_mask = target, keep_mask & U64
        plan.frame_size, plan.hflags_after, plan.caches_size, plan.error = frame_size, hflags_after, len(caches), error
        ctypes.memmove(plan.caches, caches, len(caches))
        ctypes.memmove(plan.system, system, SYSTEM_BYTES)
        plan.key = key
