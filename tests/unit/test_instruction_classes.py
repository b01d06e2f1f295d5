"""Privileged, sensitive, innocuous: the one definition (labkit.x86.instructions) and who uses it."""

from __future__ import annotations

import pytest

from labkit.x86.disasm import disassemble
from labkit.x86.instructions import (PRIVILEGED, PRIVILEGED_ALWAYS, SENSITIVE, SENSITIVE_ALWAYS, InstructionClass,
                                     instruction_class)

pytestmark = pytest.mark.unit


def test_the_sets_do_not_overlap():
    assert not PRIVILEGED & SENSITIVE
    assert PRIVILEGED_ALWAYS < PRIVILEGED and SENSITIVE_ALWAYS < SENSITIVE


@pytest.mark.parametrize("code, mode, expected", [
    (bytes.fromhex("fa"), 64, "privileged"),            # cli
    (bytes.fromhex("0f20d8"), 64, "privileged"),        # mov rax, cr3
    (bytes.fromhex("0f21c0"), 64, "privileged"),        # mov rax, dr0
    (bytes.fromhex("f4"), 64, "privileged"),            # hlt
    (bytes.fromhex("48cf"), 64, "privileged"),          # iretq
    (bytes.fromhex("e680"), 64, "privileged"),          # out 0x80, al
    (bytes.fromhex("9c"), 64, "sensitive"),             # pushfq
    (bytes.fromhex("9d"), 64, "sensitive"),             # popfq
    (bytes.fromhex("0f0100"), 64, "sensitive"),         # sgdt [rax]
    (bytes.fromhex("0f01e0"), 64, "sensitive"),         # smsw eax
    (bytes.fromhex("0f02c1"), 64, "sensitive"),         # lar eax, ecx
    (bytes.fromhex("8cc8"), 64, "sensitive"),           # mov eax, cs
    (bytes.fromhex("0e"), 32, "sensitive"),             # push cs
    (bytes.fromhex("17"), 32, "sensitive"),             # pop ss
    (bytes.fromhex("9a000000001800"), 32, "sensitive"),  # call far 0x18:0
    (bytes.fromhex("cb"), 32, "sensitive"),             # retf
    (bytes.fromhex("cd80"), 64, "sensitive"),           # int 0x80
    (bytes.fromhex("0f31"), 64, "innocuous"),           # rdtsc (privileged only with CR4.TSD = 1)
    (bytes.fromhex("0fa2"), 64, "innocuous"),           # cpuid
    (bytes.fromhex("90"), 64, "innocuous"),             # nop
    (bytes.fromhex("648b00"), 64, "innocuous"),         # mov eax, fs:[rax]: a segment override is no segment read
    (bytes.fromhex("89c8"), 64, "innocuous"),           # mov eax, ecx
])
def test_decoded_instructions_fall_in_the_lessons_classes(code, mode, expected):
    (_, _, text), = disassemble(code, 0x1000, mode)
    mnemonic, _, operands = text.partition(" ")
    assert instruction_class(mnemonic, operands) == expected, text
    assert instruction_class(mnemonic, operands) is InstructionClass(expected)


def test_robin_and_irvines_instructions_are_all_sensitive():
    """The paper's list, as the classifier runs it, is exactly what the definition calls sensitive."""
    from labkit.classify import ROBIN_IRVINE
    from labkit.classify.guest import assemble_guest

    for experiment in ROBIN_IRVINE:
        code, _, start, after = assemble_guest(experiment.instruction, experiment.setup, experiment.mode)
        base = 0x8000  # the guest's load address: start and after are absolute
        (_, _, text), = disassemble(code[start - base:after - base], start, experiment.mode)
        mnemonic, _, operands = text.partition(" ")
        assert instruction_class(mnemonic, operands) is InstructionClass.SENSITIVE, (experiment.name, text)


def test_the_classifier_and_the_monitor_use_these_names():
    from labkit.classify import Verdict
    from labkit.monitor import vcpu

    for kind in InstructionClass:
        assert Verdict(kind.value).value == kind.value
    assert vcpu.PRIVILEGED is PRIVILEGED and vcpu.SENSITIVE is SENSITIVE
    assert not {"pushfq", "popfq", "sgdt", "sidt", "sldt", "str", "smsw"} & vcpu.PRIVILEGED
