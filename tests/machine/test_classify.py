"""The classifier on real guests: each backend's verdicts, Robin & Irvine's table, UMIP, bad input.

Where the backend is KVM under PVM (kvm_pvm), the tests assert what PVM really
does, which differs from VT-x/AMD-V and the emulator in documented ways.
"""

from __future__ import annotations

import pytest

from labkit.classify import (BOTH_FAULT, INNOCUOUS, PAPER_VERDICT, PRIVILEGED, ROBIN_IRVINE,
                             UNDETERMINED, classify, robin_irvine_table)
from labkit.errors import AssemblyError

# Ring-0 instructions KVM's instruction emulator cannot run under PVM (measured, kernel 6.x kvm_pvm).
PVM_NO_RING0 = {"LAR", "LSL", "VERR", "VERW", "INT n", "RET"}


def is_pvm(backend: str) -> bool:
    if backend != "kvm":
        return False
    from labkit.kvm.system import kvm_flavour

    return kvm_flavour() == "kvm_pvm"


@pytest.fixture(scope="module")
def tables():
    return {}


def table_for(backend: str, tables: dict):
    if backend not in tables:
        tables[backend] = robin_irvine_table(backend)
    return tables[backend]


def test_robin_irvine_table_agrees_with_the_paper(backend_name, tables):
    table = table_for(backend_name, tables)
    assert len(table) == len(ROBIN_IRVINE)
    for experiment, result in zip(ROBIN_IRVINE, table):
        assert result.run("ring 3").outcome in ("completed", "entered"), (experiment.name, str(result))
        if is_pvm(backend_name) and experiment.name in PVM_NO_RING0:
            assert result.verdict == UNDETERMINED, str(result)
            assert result.run("ring 0").outcome == "not run"
            assert "KVM_EXIT_INTERNAL_ERROR" in result.run("ring 0").status
            assert any("instruction emulator" in note for note in result.notes)
        else:
            assert result.verdict == PAPER_VERDICT, (experiment.name, str(result))
            assert result.differences, experiment.name


def test_the_evidence_is_what_each_instruction_reveals(backend_name, tables):
    results = {experiment.name: result for experiment, result in zip(ROBIN_IRVINE, table_for(backend_name, tables))}
    assert any("0x50 (ring 3 altered)" in text for text in results["SLDT"].differences)
    assert any("0x60 (ring 3 altered)" in text for text in results["STR"].differences)
    assert any("0x80010039" in text for text in results["SMSW"].differences), "CR0.TS is visible to SMSW"
    assert any(text.startswith("rflags: 0x2 (ring 0)") for text in results["POPF"].differences)
    assert any("0x30 (ring 0) vs 0x1b (ring 3)" in text for text in results["PUSH"].differences)
    assert results["POP"].run("ring 0").vector == 13 and results["POP"].run("ring 0").error_code == 0x20
    ring3_cs = results["MOV"].run("ring 3").reg("rax")
    if is_pvm(backend_name):
        assert ring3_cs == 0x33, "PVM runs ring 3 on the host's user code segment"
        assert any("(ring 0 altered) vs 0x202" in text for text in results["PUSHF"].differences), \
            "PVM's native PUSHF shows the host's IF = 1, not the guest's IF = 0"
    else:
        assert ring3_cs == 0x2B
        assert any("0x202 0x0 (ring 3) vs 0x2 0x0 (ring 3 altered)" in text
                   for text in results["PUSHF"].differences)
        assert any("RSP0" in text for text in results["INT n"].differences)


def test_umip_where_the_backend_models_it(backend_name, tables):
    for experiment, result in zip(ROBIN_IRVINE, table_for(backend_name, tables)):
        if not experiment.umip:
            assert result.run("ring 3 umip") is None
            continue
        umip = result.run("ring 3 umip")
        if backend_name == "kvm":
            assert umip.outcome == "trapped" and umip.vector == 13, str(result)
            assert "traps in ring 3" in result.umip and "CPUID.7:ECX.UMIP = 1" in result.umip
        else:
            # The emulated CPU has no UMIP (CPUID.7:ECX.UMIP = 0), so setting CR4.UMIP is #GP, as on such a CPU.
            assert umip.outcome == "not run", str(result)
            assert "does not let the guest set CR4.UMIP" in result.umip and "#GP" in result.umip


@pytest.mark.parametrize("instruction, setup", [
    ("cli", ""), ("hlt", ""), ("mov rax, cr3", ""), ("lgdt [scratch]", ""), ("rdmsr", "mov ecx, 0xc0000080"),
])
def test_privileged_instructions_trap_in_ring_3(instruction, setup, backend_name):
    result = classify(instruction, backend=backend_name, setup=setup)
    assert result.verdict == PRIVILEGED, str(result)
    assert result.run("ring 3").vector == 13 and result.run("ring 3").error_code == 0


@pytest.mark.parametrize("instruction", ["nop", "add eax, 1", "xchg rbx, rcx"])
def test_innocuous_instructions(instruction, backend_name):
    result = classify(instruction, backend=backend_name)
    assert result.verdict == INNOCUOUS, str(result)
    assert result.differences == ()


def test_an_invalid_instruction_faults_in_both_rings(backend_name):
    result = classify("ud2", backend=backend_name)
    assert result.verdict == BOTH_FAULT, str(result)


def test_int_0x80_traps_in_ring_3_as_gp_or_as_pvms_ud(backend_name):
    result = classify("int 0x80", backend=backend_name)
    assert result.verdict == PRIVILEGED, str(result)
    ring3 = result.run("ring 3")
    if is_pvm(backend_name):
        assert ring3.vector == 6
        assert any("#UD" in note for note in result.notes)
    else:
        assert (ring3.vector, ring3.error_code) == (13, 0x80 * 8 + 2)


def test_port_io_in_ring_3(backend_name):
    """A #GP on every backend; under PVM too, as long as the guest's IDT can deliver it."""
    result = classify("in al, 0x80", backend=backend_name)
    assert result.verdict == PRIVILEGED, str(result)
    assert result.run("ring 3").vector == 13
    assert result.run("ring 0").outcome == "completed" and result.run("ring 0").reg("rax") & 0xFF == 0xFF


def test_an_instruction_that_does_not_assemble_says_why():
    with pytest.raises(AssemblyError, match="(?s)cannot assemble 'movv eax, 1'.*no such instruction"):
        classify("movv eax, 1", backend="emu")


def test_a_hanging_instruction_is_stopped_and_said_so(backend_name):
    result = classify("jmp .", backend=backend_name, timeout=0.3)
    assert result.verdict == UNDETERMINED
    assert "within 0.3 s" in result.reason
