"""The classifier's decision rules and building blocks, without running a guest."""

from __future__ import annotations

import pytest

from labkit.classify import (BOTH_FAULT, INNOCUOUS, PAPER_VERDICT, PRIVILEGED, ROBIN_IRVINE, SENSITIVE,
                             UNDETERMINED, Classification, Outcome, RingRun, Verdict, classify, decide, guest_source)
from labkit.classify.guest import altered_gdt
from labkit.errors import ConfigError
from labkit.rings import decode_page_fault_error
from labkit.viz.rings import classification_table
from labkit.x86 import layout
from labkit.x86.gdt import decode_system_descriptor64

pytestmark = pytest.mark.unit

REGS = tuple((name, 0) for name in ("rax", "rbx")) + (("rflags", 0x202),)


def run(name, outcome, vector=None, regs=REGS, **extra) -> RingRun:
    return RingRun(name, outcome, "status", vector=vector, regs=regs, **extra)


def with_reg(name, value):
    return tuple((key, value if key == name else old) for key, old in REGS)


def test_trap_in_ring_3_only_is_privileged():
    runs = {"ring 0": run("ring 0", "completed"), "ring 3": run("ring 3", "trapped", 13, error_code=0)}
    verdict, reason, _, _ = decide(runs, "emu", None)
    assert verdict == PRIVILEGED and "#GP(0x0)" in reason


def test_same_fault_in_both_rings_is_not_privilege():
    runs = {"ring 0": run("ring 0", "trapped", 6), "ring 3": run("ring 3", "trapped", 6)}
    assert decide(runs, "emu", None)[0] == BOTH_FAULT


def test_a_register_that_differs_by_ring_makes_it_sensitive():
    runs = {"ring 0": run("ring 0", "completed", regs=with_reg("rax", 8)),
            "ring 3": run("ring 3", "completed", regs=with_reg("rax", 0x2B)),
            "ring 3 altered": run("ring 3 altered", "completed", regs=with_reg("rax", 0x2B))}
    verdict, _, differences, _ = decide(runs, "emu", None)
    assert verdict == SENSITIVE
    assert differences == ["rax: 0x8 (ring 0) vs 0x2b (ring 3)"]


def test_reading_privileged_state_makes_it_sensitive():
    runs = {"ring 0": run("ring 0", "completed", scratch=b"\x4f\x00"),
            "ring 3": run("ring 3", "completed", scratch=b"\x4f\x00"),
            "ring 3 altered": run("ring 3 altered", "completed", scratch=b"\x6f\x00")}
    verdict, reason, differences, _ = decide(runs, "emu", None)
    assert verdict == SENSITIVE and "privileged state" in reason
    assert differences and "scratch" in differences[0]


def test_the_altered_runs_own_if_flag_is_not_a_difference():
    """The altered run enters ring 3 with IF = 0 on purpose: that alone must not make `nop` sensitive."""
    runs = {"ring 0": run("ring 0", "completed"), "ring 3": run("ring 3", "completed"),
            "ring 3 altered": run("ring 3 altered", "completed", regs=with_reg("rflags", 0x2))}
    assert decide(runs, "emu", None)[0] == INNOCUOUS


def test_a_trap_in_ring_0_only_is_a_difference_by_ring():
    runs = {"ring 0": run("ring 0", "trapped", 13, error_code=0x20), "ring 3": run("ring 3", "completed"),
            "ring 3 altered": run("ring 3 altered", "completed")}
    verdict, reason, _, _ = decide(runs, "emu", None)
    assert verdict == SENSITIVE and "ring 0" in reason


def test_no_ring_0_run_and_nothing_seen_is_undetermined_with_a_pvm_note():
    runs = {"ring 0": run("ring 0", "not run", note="error: KVM_EXIT_INTERNAL_ERROR ..."),
            "ring 3": run("ring 3", "completed"), "ring 3 altered": run("ring 3 altered", "completed")}
    runs["ring 0"] = RingRun("ring 0", Outcome.NOT_RUN, "error: KVM_EXIT_INTERNAL_ERROR (...)", emulation_failed=True)
    verdict, _, _, notes = decide(runs, "kvm", "kvm_pvm")
    assert verdict == UNDETERMINED
    assert any("instruction emulator" in note for note in notes)


def test_a_hang_in_ring_3_is_undetermined():
    runs = {"ring 0": run("ring 0", "not run", note="timeout"),
            "ring 3": run("ring 3", "not run", note="did not reach the ud2 after it within 0.3 s")}
    verdict, reason, _, _ = decide(runs, "emu", None)
    assert verdict == UNDETERMINED and "0.3 s" in reason


@pytest.mark.parametrize("bad", ["", "   ", None, 42])
def test_an_instruction_must_be_text(bad):
    with pytest.raises(ConfigError, match="assembly text"):
        classify(bad, backend="emu")


def test_mode_must_be_32_or_64():
    with pytest.raises(ConfigError, match="mode must be 64"):
        classify("nop", backend="emu", mode=16)


def test_the_guest_source_holds_setup_and_instruction_in_the_right_mode():
    source = guest_source("push cs", "push USER_DS", 32)
    assert source.index("push USER_DS") < source.index("instruction:") < source.index("push cs") \
        < source.index("after:")
    assert ".code32" in source and f"mov eax, {layout.USER_CS32}" in source


def test_the_altered_gdt_adds_an_ldt_and_an_available_tss():
    table = altered_gdt()
    ldt = decode_system_descriptor64(table[0x50:0x60], 0x50)
    tss = decode_system_descriptor64(table[0x60:0x70], 0x60)
    assert (ldt.type, ldt.present, ldt.s) == (0x2, 1, 0)
    assert (tss.type, tss.base) == (0x9, layout.TSS_ADDRESS)


def test_the_paper_list_is_complete():
    names = [experiment.name for experiment in ROBIN_IRVINE]
    assert names == ["SGDT", "SIDT", "SLDT", "SMSW", "PUSHF", "POPF", "LAR", "LSL", "VERR", "VERW", "PUSH",
                     "POP", "CALL", "JMP", "INT n", "RET", "STR", "MOV"]
    assert PAPER_VERDICT == SENSITIVE
    assert {e.name for e in ROBIN_IRVINE if e.umip} == {"SGDT", "SIDT", "SLDT", "SMSW", "STR"}


@pytest.mark.parametrize("code, words", [
    (0x5, ["P=1", "W/R=0 read", "U/S=1"]),
    (0x7, ["P=1", "W/R=1 write", "U/S=1"]),
    (0x4, ["P=0 page not present", "W/R=0", "U/S=1"]),
    (0x2, ["P=0", "W/R=1", "U/S=0 from supervisor"]),
    (0x14, ["I/D=1 instruction fetch"]),
])
def test_page_fault_error_codes_in_words(code, words):
    text = decode_page_fault_error(code)
    assert all(word in text for word in words), text


def test_a_page_fault_error_code_is_a_number():
    with pytest.raises(ConfigError):
        decode_page_fault_error(-1)


def test_the_table_marks_verdicts_that_differ_from_the_paper():
    def result(verdict):
        return Classification("sgdt [scratch]", "", 64, "emu", None, verdict, "why", ())

    table = classification_table({"emulator": [result(SENSITIVE), result(INNOCUOUS), result(UNDETERMINED)]},
                                 names=["A", "B", "C"], paper=SENSITIVE)
    verdicts = [row[3] for row in table.rows]
    assert verdicts == ["sensitive", "innocuous  ≠ paper", "undetermined (no ring-0 run here)"]
    with pytest.raises(ConfigError):
        classification_table({"a": [result(SENSITIVE)], "b": []})


def test_verdicts_and_outcomes_are_enums_that_read_as_their_text():
    runs = {"ring 0": run("ring 0", "completed"), "ring 3": run("ring 3", "trapped", 13, error_code=0)}
    assert runs["ring 3"].outcome is Outcome.TRAPPED
    verdict = decide(runs, "emu", None)[0]
    assert verdict is Verdict.PRIVILEGED and verdict == "privileged" and f"{verdict}" == "privileged"
    result = Classification("cli", "", 64, "emu", None, "sensitive", "why", ())
    assert result.verdict is Verdict.SENSITIVE and "cli (64-bit) on emulator (Unicorn): SENSITIVE" in str(result)
    with pytest.raises(ValueError):
        run("ring 3", "exploded")


def test_a_kvm_emulation_failure_is_a_flag_not_a_message():
    """Only a run KVM could not emulate gets the PVM note, whatever its text says."""
    said = {"ring 0": RingRun("ring 0", Outcome.NOT_RUN, "error: KVM_EXIT_INTERNAL_ERROR (...)"),
            "ring 3": run("ring 3", "completed"), "ring 3 altered": run("ring 3 altered", "completed")}
    assert not any("instruction emulator" in note for note in decide(said, "kvm", "kvm_pvm")[3])
