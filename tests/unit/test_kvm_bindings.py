"""labkit.kvm.bindings against the kernel header: sizes, field offsets, ioctl numbers; the ioctl error.

The layout check compiles a C program with gcc against the installed
linux/kvm.h; it is skipped only where gcc or the header is missing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from labkit.errors import KvmError
from labkit.kvm import bindings as kb
from labkit.kvm.ioctl import ioctl

pytestmark = pytest.mark.unit

HEADER = "/usr/include/linux/kvm.h"

STRUCTS = [
    kb.kvm_regs, kb.kvm_segment, kb.kvm_dtable, kb.kvm_sregs, kb.kvm_fpu, kb.kvm_msr_entry,
    kb.kvm_msrs, kb.kvm_cpuid_entry2, kb.kvm_cpuid2, kb.kvm_debug_exit_arch, kb.kvm_vcpu_events,
    kb.kvm_sync_regs, kb.kvm_userspace_memory_region, kb.kvm_dirty_log, kb.kvm_interrupt, kb.kvm_enable_cap,
    kb.kvm_signal_mask, kb.kvm_debugregs, kb.kvm_xsave, kb.kvm_stats_header, kb.kvm_stats_desc, kb.kvm_run,
]

IOCTLS = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_ENABLE_CAP", "KVM_GET_STATS_FD", "KVM_RUN",
    "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_INTERRUPT", "KVM_GET_MSRS", "KVM_SET_MSRS",
    "KVM_SET_SIGNAL_MASK", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_SET_CPUID2", "KVM_GET_CPUID2",
    "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
    "KVM_GET_XSAVE", "KVM_SET_XSAVE",
]

CONSTANTS = [
    "KVM_API_VERSION", "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_HLT", "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_NOTIFY", "KVM_CAP_SYNC_REGS", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_BINARY_STATS_FD",
    "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_READONLY_MEM", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_NR_MEMSLOTS", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_EXIT_IRQ_WINDOW_OPEN", "KVM_SYNC_X86_REGS", "KVM_STATS_TYPE_LOG_HIST",
]


def _field_paths(struct, prefix: str = ""):
    """(C member designator, ctypes offset, ctypes size) for every field, recursively.

    Anonymous members (``_anonymous_``) are left out of the designator, as in C.
    """
    anonymous = set(getattr(struct, "_anonymous_", ()))
    for name, ctype, *_ in struct._fields_:
        descriptor = getattr(struct, name)
        path = prefix if name in anonymous else f"{prefix}{name}."
        if name not in anonymous:
            yield path.rstrip("."), descriptor.offset, descriptor.size
        if isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            for sub_path, sub_offset, sub_size in _field_paths(ctype, path):
                yield sub_path, descriptor.offset + sub_offset, sub_size


def _expected():
    """Python's view: {C expression: number}."""
    values = {}
    for struct in STRUCTS:
        cname = f"struct {struct.__name__}"
        values[f"sizeof({cname})"] = ctypes.sizeof(struct)
        for path, offset, size in _field_paths(struct):
            if not path:
                continue
            values[f"offsetof({cname}, {path})"] = offset
            values[f"sizeof((({cname} *)0)->{path})"] = size
    for name in IOCTLS + CONSTANTS:
        values[name] = getattr(kb, name)
    return values


@pytest.fixture(scope="module")
def kernel_numbers(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None or not os.path.exists(HEADER):
        pytest.skip("needs gcc and linux/kvm.h to compare layouts with the kernel header")
    expressions = list(_expected())
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for expression in expressions:
        lines.append(f'    printf("%llu\\n", (unsigned long long)({expression}));')
    lines.append("    return 0;\n}")
    directory = tmp_path_factory.mktemp("kvm_layout")
    source = directory / "layout.c"
    source.write_text("\n".join(lines))
    binary = directory / "layout"
    subprocess.run([gcc, "-O0", "-o", str(binary), str(source)], check=True, capture_output=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(expressions, (int(value) for value in output)))


def test_struct_sizes_match_the_header(kernel_numbers):
    expected = _expected()
    sizes = {key: value for key, value in expected.items() if key.startswith("sizeof(struct")}
    assert sizes, "no structures checked"
    assert {key: kernel_numbers[key] for key in sizes} == sizes
    assert kernel_numbers["sizeof(struct kvm_regs)"] == 144
    assert kernel_numbers["sizeof(struct kvm_run)"] == ctypes.sizeof(kb.kvm_run)


def test_field_offsets_and_sizes_match_the_header(kernel_numbers):
    expected = _expected()
    fields = {key: value for key, value in expected.items() if not key.startswith("sizeof(struct")}
    mismatches = {key: (value, kernel_numbers[key]) for key, value in fields.items()
                  if kernel_numbers[key] != value}
    assert mismatches == {}
    assert len(fields) > 300  # every structure's fields, nested ones included


def test_ioctl_numbers_and_constants_match_the_header(kernel_numbers):
    for name in IOCTLS + CONSTANTS:
        assert getattr(kb, name) == kernel_numbers[name], name


def test_every_ioctl_encodes_its_argument_size():
    for name, struct in kb.IOCTL_ARGUMENTS.items():
        assert kb._IOC_SIZE(getattr(kb, name)) == ctypes.sizeof(struct), name
    assert kb._IOC_SIZE(kb.KVM_RUN) == 0
    assert kb._IOC_SIZE(kb.KVM_SET_USER_MEMORY_REGION) == 32
    assert kb.KVM_RUN == 0xAE80
    assert kb._IOC_SIZE(kb.KVM_INTERRUPT) == ctypes.sizeof(kb.kvm_interrupt) == 4


def test_kvm_run_fits_its_documented_areas():
    assert kb.kvm_run.u.size == 256
    assert kb.kvm_run.s.size == kb.SYNC_REGS_SIZE_BYTES
    assert ctypes.sizeof(kb.kvm_sync_regs) <= kb.SYNC_REGS_SIZE_BYTES


def test_flexible_array_builders():
    msrs = kb.kvm_msrs_with(3)
    assert msrs.nmsrs == 3 and ctypes.sizeof(msrs) == 8 + 3 * 16
    cpuid = kb.kvm_cpuid2_with(5)
    assert cpuid.nent == 5 and ctypes.sizeof(cpuid) == 8 + 5 * 40
    mask = kb.kvm_signal_mask_with(b"\x01\0\0\0\0\0\0\0")
    assert mask.len == 8 and bytes(mask.sigset) == b"\x01" + b"\0" * 7


def test_kvm_error_message():
    error = KvmError("KVM_SET_USER_MEMORY_REGION", 22)
    assert str(error) == "KVM_SET_USER_MEMORY_REGION failed: errno 22 (EINVAL)"
    assert error.errno == 22 and error.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert isinstance(error, OSError)


def test_ioctl_choke_point_raises_with_name_and_errno():
    with pytest.raises(KvmError) as caught:
        ioctl(-1, kb.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")
    assert str(caught.value) == "KVM_GET_API_VERSION failed: errno 9 (EBADF)"
