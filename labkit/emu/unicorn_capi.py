"""Unicorn 2.1.4's C API, called directly through ctypes: the prototypes labkit uses, its callback types.

The Python binding's wrappers cost a few Python frames per call; the
emulation backend calls ``uc_emu_start``, ``uc_emu_stop``, ``uc_reg_read``,
``uc_mem_protect`` and the hook functions on every exit, so it goes to the
library the binding loaded (the same ``uc_engine`` handles).  Names follow
``unicorn/unicorn.h``; callback types follow its ``uc_cb_*`` typedefs.
"""

from __future__ import annotations

import ctypes
from typing import Any

import unicorn
from unicorn import unicorn_const as UC
from unicorn import x86_const as X86

from labkit.errors import EmulatorError

lib = ctypes.CDLL(unicorn.unicorn_py3.unicorn.uclib._name)
c_void_p, u64, u32, i32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
lib.uc_emu_start.argtypes = (c_void_p, u64, u64, u64, ctypes.c_size_t)
lib.uc_emu_start.restype = i32
lib.uc_emu_stop.argtypes = (c_void_p,)
lib.uc_emu_stop.restype = i32
lib.uc_reg_read.argtypes = (c_void_p, i32, c_void_p)
lib.uc_reg_read.restype = i32
lib.uc_reg_read_batch.argtypes = (c_void_p, ctypes.POINTER(i32), ctypes.POINTER(c_void_p), i32)
lib.uc_reg_read_batch.restype = i32
lib.uc_mem_protect.argtypes = (c_void_p, u64, u64, u32)
lib.uc_mem_protect.restype = i32
lib.uc_strerror.argtypes = (i32,)
lib.uc_strerror.restype = ctypes.c_char_p
lib.uc_hook_add.restype = i32  # variadic: argument types given per call
lib.uc_hook_del.argtypes = (c_void_p, ctypes.c_size_t)
lib.uc_hook_del.restype = i32
lib.uc_mmio_map.argtypes = (c_void_p, u64, u64, c_void_p, c_void_p, c_void_p, c_void_p)
lib.uc_mmio_map.restype = i32
lib.uc_mem_map_ptr.argtypes = (c_void_p, u64, ctypes.c_size_t, u32, c_void_p)
lib.uc_mem_map_ptr.restype = i32
lib.uc_ctl.restype = i32  # variadic

HOOK_INTR = ctypes.CFUNCTYPE(None, c_void_p, u32, c_void_p)  # uc_cb_hookintr_t
HOOK_SYSCALL = ctypes.CFUNCTYPE(None, c_void_p, c_void_p)  # uc_cb_insn_syscall_t
HOOK_IN = ctypes.CFUNCTYPE(u32, c_void_p, u32, i32, c_void_p)  # uc_cb_insn_in_t
HOOK_OUT = ctypes.CFUNCTYPE(None, c_void_p, u32, i32, u32, c_void_p)  # uc_cb_insn_out_t
HOOK_BLOCK = ctypes.CFUNCTYPE(None, c_void_p, u64, u32, c_void_p)  # uc_cb_hookcode_t
HOOK_MEM = ctypes.CFUNCTYPE(None, c_void_p, i32, u64, i32, ctypes.c_int64, c_void_p)  # uc_cb_hookmem_t
HOOK_WRITE_PROT = ctypes.CFUNCTYPE(ctypes.c_bool, c_void_p, i32, u64, i32, ctypes.c_int64, c_void_p)  # uc_cb_eventmem_t
MMIO_READ = ctypes.CFUNCTYPE(u64, c_void_p, u64, ctypes.c_uint, c_void_p)  # uc_cb_mmio_read_t
MMIO_WRITE = ctypes.CFUNCTYPE(None, c_void_p, u64, ctypes.c_uint, u64, c_void_p)  # uc_cb_mmio_write_t

UC_CTL_TLB_FLUSH = (UC.UC_CTL_IO_WRITE << 30) | UC.UC_CTL_TLB_FLUSH  # UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0)
UC_CTL_TB_FLUSH = (UC.UC_CTL_IO_WRITE << 30) | UC.UC_CTL_TB_FLUSH  # UC_CTL_WRITE(UC_CTL_TB_FLUSH, 0)


def check(status: int, what: str) -> None:
    """Raise :class:`~labkit.errors.EmulatorError` naming ``what`` and Unicorn's message unless ``status`` is OK."""
    if status != UC.UC_ERR_OK:
        raise EmulatorError(f"{what} failed: {lib.uc_strerror(status).decode()}")


class RegisterBatch:
    """Registers read by one ``uc_reg_read_batch`` call into buffers made once.

    The binding's ``reg_read`` builds its ctypes objects and a few Python frames anew for each
    register (about 7 µs each: 221 µs for the x87/SSE state); here a read is one C call.  Each
    register gets a zeroed 16-byte buffer (the widest value Unicorn writes for them: an XMM
    register, an x87 register's 64-bit significand and 16-bit sign and exponent); :meth:`read`
    returns each as an unsigned little-endian integer of the given width in bytes.  Each of
    ``msrs`` is read as a ``UC_X86_REG_MSR`` entry after the registers: its buffer is Unicorn's
    ``uc_x86_msr``, the MSR's index at offset 0 (written once here), its value at offset 8.
    """

    def __init__(self, handle: Any, registers: list[tuple[int, int]], msrs: tuple[int, ...] = ()):  # a uc_engine *
        entries = list(registers) + [(X86.UC_X86_REG_MSR, 0)] * len(msrs)
        self.handle = handle
        self.msrs = msrs
        self.count = len(entries)
        self.ids = (i32 * self.count)(*(register for register, _ in entries))
        self.buffers = [ctypes.create_string_buffer(16) for _ in entries]
        for buffer, msr in zip(self.buffers[len(registers):], msrs):
            ctypes.c_uint32.from_buffer(buffer).value = msr
        self.pointers = (c_void_p * self.count)(*(ctypes.addressof(buffer) for buffer in self.buffers))
        self.slices = [(0, width) for _, width in registers] + [(8, 16)] * len(msrs)

    def read(self) -> list[int]:
        check(lib.uc_reg_read_batch(self.handle, self.ids, self.pointers, self.count), "uc_reg_read_batch")
        return [int.from_bytes(buffer.raw[start:end], "little") for buffer, (start, end) in zip(self.buffers, self.slices)]
