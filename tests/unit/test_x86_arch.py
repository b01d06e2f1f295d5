"""x86/arch.py: the architectural constants, defined once and matching the SDM's numbers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from labkit.x86 import arch, boot, gdt, idt, paging

pytestmark = pytest.mark.unit

LABKIT = Path(__file__).resolve().parents[2] / "labkit"
ARCH_NAME = re.compile(r"(RFLAGS|CR0|CR4|EFER|MSR|PF|PTE|DESC|SELECTOR)_[A-Z0-9_]+$")
LABKIT_POLICY = {"labkit/monitor/vcpu/emulation.py RFLAGS_GUEST_SETTABLE"}
"""Composed from arch's bits: what the monitor lets a popped RFLAGS change."""
LEFT_IN_OTHER_FILES: set[str] = set()


def test_composed_masks_are_the_sdm_numbers():
    assert arch.RFLAGS_IF == 0x200 and arch.RFLAGS_RF == 0x10000 and arch.RFLAGS_IOPL == 0x3000
    assert boot.SFMASK_VALUE == 0x47700  # TF IF DF IOPL NT AC, as Linux sets IA32_FMASK
    from labkit.monitor.vcpu import RFLAGS_GUEST_SETTABLE

    assert RFLAGS_GUEST_SETTABLE == 0x240DD5
    assert arch.RFLAGS_ARITHMETIC == 0x8D5
    assert (arch.CR0_PG, arch.CR4_UMIP, arch.EFER_LMA) == (0x8000_0000, 0x800, 0x400)
    assert (arch.MSR_EFER, arch.MSR_STAR, arch.MSR_SFMASK) == (0xC000_0080, 0xC000_0081, 0xC000_0084)


def test_vectors_and_error_codes():
    assert (arch.Vector.UD, arch.Vector.GP, arch.Vector.PF) == (6, 13, 14)
    assert sorted(arch.ERROR_CODE_VECTORS) == [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]
    assert 13 in arch.ERROR_CODE_VECTORS and 6 not in arch.ERROR_CODE_VECTORS
    assert all(arch.EXCEPTION_NAMES[vector][0].lstrip("#") == vector.name or vector.name == "NMI"
               for vector in arch.Vector if vector in arch.EXCEPTION_NAMES)


def test_the_table_modules_re_export_the_same_objects():
    assert boot.CR0_PG is arch.CR0_PG and boot.MSR_EFER is arch.MSR_EFER and boot.RFLAGS_IF is arch.RFLAGS_IF
    assert idt.ERROR_CODE_VECTORS is arch.ERROR_CODE_VECTORS and idt.INTERRUPT_GATE == arch.INTERRUPT_GATE
    assert gdt.TSS_BUSY == arch.TSS_BUSY and paging.PF_USER == arch.PF_USER and paging.PRESENT == arch.PTE_PRESENT


def test_architectural_constants_are_defined_only_in_arch():
    """No module but x86/arch.py assigns an RFLAGS_/CR0_/CR4_/EFER_/MSR_/PF_/... name (it imports them)."""
    defined = []
    for path in sorted(LABKIT.rglob("*.py")):
        if path.name == "arch.py" and path.parent.name == "x86":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            while any(isinstance(target, (ast.Tuple, ast.List)) for target in targets):  # `A, B = 1, 2` too
                targets = [part for target in targets
                           for part in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target])]
            for target in targets:
                if isinstance(target, ast.Name) and ARCH_NAME.match(target.id):
                    defined.append(f"{path.relative_to(LABKIT.parent)} {target.id}")
    assert set(defined) - LABKIT_POLICY - LEFT_IN_OTHER_FILES == set(), defined
