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


# -- noise and the host ------------------------------------------------------------------------------

from labkit.classify import HOST_DEPENDENT, NONDETERMINISTIC, HostInfluence, RingTables, host_evidence  # noqa: E402
from labkit.classify.guest import RELOCATION, relocate, relocated_gdt  # noqa: E402
from labkit.classify.rules import AGAIN, RELOCATED, WITHOUT  # noqa: E402


def test_a_result_that_differs_between_two_ring_0_runs_is_nondeterministic_not_sensitive():
    """rdtsc: every run reads another time; ring 0 against ring 3 would call that sensitive."""
    runs = {"ring 0": run("ring 0", "completed", regs=with_reg("rax", 0x1000)),
            AGAIN["ring 0"]: run(AGAIN["ring 0"], "completed", regs=with_reg("rax", 0x2000)),
            "ring 3": run("ring 3", "completed", regs=with_reg("rax", 0x1800)),
            AGAIN["ring 3"]: run(AGAIN["ring 3"], "completed", regs=with_reg("rax", 0x2800))}
    verdict, reason, differences, _ = decide(runs, "emu", None)
    assert verdict == NONDETERMINISTIC and "same ring" in reason
    assert differences == ["rax: 0x1000 (ring 0) vs 0x2000 (ring 0 again)",
                           "rax: 0x1800 (ring 3) vs 0x2800 (ring 3 again)"]


def test_a_trap_in_both_ring_3_runs_stays_privileged_whatever_ring_0_reads():
    runs = {"ring 0": run("ring 0", "completed", regs=with_reg("rax", 1)),
            AGAIN["ring 0"]: run(AGAIN["ring 0"], "completed", regs=with_reg("rax", 2)),
            "ring 3": run("ring 3", "trapped", 13, error_code=0),
            AGAIN["ring 3"]: run(AGAIN["ring 3"], "trapped", 13, error_code=0)}
    assert decide(runs, "emu", None)[0] == PRIVILEGED


def selector_runs(ring3_a, ring3_b):
    return {"ring 0": run("ring 0", "completed", regs=with_reg("rax", 0x8)),
            "ring 3": run("ring 3", "completed", regs=with_reg("rax", ring3_a)),
            RELOCATED["ring 0"]: run(RELOCATED["ring 0"], "completed", regs=with_reg("rax", 0x8 + RELOCATION)),
            RELOCATED["ring 3"]: run(RELOCATED["ring 3"], "completed", regs=with_reg("rax", ring3_b))}


def test_a_ring_3_selector_that_ignores_the_guests_layout_is_the_hosts():
    """mov eax, cs under PVM: ring 0 reads 0x8, then 0x50; ring 3 reads 0x33 under both layouts."""
    runs = selector_runs(0x33, 0x33)
    (evidence,) = host_evidence(runs)
    assert evidence.kind is HostInfluence.HOST_SELECTORS and evidence.fields == ("rax",)
    assert "rax = 0x33 in ring 3 under both layouts, while ring 0 read 0x8, then 0x50" in evidence.evidence
    verdict, reason, _, _ = decide(runs, "kvm", "kvm_pvm", (evidence,))
    assert verdict == HOST_DEPENDENT and "from the host" in reason


def test_a_ring_3_selector_that_follows_the_layout_is_the_guests():
    runs = selector_runs(0x2B, 0x2B + RELOCATION)
    assert host_evidence(runs) == ()
    assert decide(runs, "emu", None)[0] == SENSITIVE


def test_an_instruction_kvm_emulated_in_ring_3_was_intercepted_by_the_host():
    """sgdt under PVM: the host's UMIP traps it; KVM's emulator runs one more instruction than with nop."""
    scratch = b"\x4f\x00\x00\x10"
    runs = {"ring 0": run("ring 0", "completed", scratch=scratch, emulated=37),
            "ring 3": run("ring 3", "completed", scratch=scratch, emulated=36),
            AGAIN["ring 3"]: run(AGAIN["ring 3"], "completed", scratch=scratch, emulated=36),
            WITHOUT: run(WITHOUT, "completed", emulated=35)}
    (evidence,) = host_evidence(runs)
    assert evidence.kind is HostInfluence.INTERCEPTED and evidence.fields == ()
    assert "1 more instruction" in evidence.evidence and "36 vs 35" in evidence.evidence
    assert "with the guest's values" in evidence.evidence
    runs[WITHOUT] = run(WITHOUT, "completed", emulated=36)
    assert host_evidence(runs) == (), "no extra emulation, no interception"
    runs[WITHOUT] = run(WITHOUT, "completed")
    assert host_evidence(runs) == (), "the emulator counts nothing: no claim either way"


def test_ring_3_storing_if_1_while_the_guest_runs_it_with_if_0_shows_the_hosts_if():
    """pushfq under PVM: ring 3 entered with IF = 0 pushes IF = 1."""
    closed = with_reg("rflags", 0x2)
    runs = {"ring 0": run("ring 0", "completed", pushed=b"\x02\x02" + bytes(6)),
            "ring 3": run("ring 3", "completed", pushed=b"\x02\x02" + bytes(6)),
            "ring 0 altered": run("ring 0 altered", "completed", regs=closed, pushed=b"\x02" + bytes(7)),
            "ring 3 altered": run("ring 3 altered", "completed", regs=closed, pushed=b"\x02\x02" + bytes(6))}
    (evidence,) = host_evidence(runs)
    assert evidence.kind is HostInfluence.HOST_IF and evidence.fields == ("pushed",)
    assert decide(runs, "kvm", "kvm_pvm", (evidence,))[0] == HOST_DEPENDENT
    assert decide(runs, "kvm", "kvm_pvm")[0] == SENSITIVE, "without the evidence the host's IF looks sensitive"


def test_descriptor_lookups_are_the_hosts_only_where_ring_3_does_not_use_the_guests_gdt():
    runs = {"ring 0": run("ring 0", "not run"), "ring 3": run("ring 3", "completed")}
    foreign = RingTables("kvm", False, "in ring 3, lar of the guest's own code selector 0x2b gives 0xcff300")
    own = RingTables("emu", True, "the guest's")
    (evidence,) = host_evidence(runs, foreign, reads_tables=True)
    assert evidence.kind is HostInfluence.HOST_TABLES and "0xcff300" in evidence.evidence
    assert host_evidence(runs, foreign, reads_tables=False) == ()
    assert host_evidence(runs, own, reads_tables=True) == ()


def test_the_relocated_layout_moves_every_code_and_data_descriptor():
    table = relocated_gdt()
    for selector in (layout.KERNEL_CS64, layout.KERNEL_DS, layout.USER_CS32, layout.USER_DS, layout.USER_CS64):
        moved = relocate(selector)
        assert moved == selector + RELOCATION and moved & 3 == selector & 3
        index, copy = selector & ~7, moved & ~7
        assert table[copy:copy + 8] == table[index:index + 8], hex(selector)
    assert relocate(layout.TSS_SELECTOR) == layout.TSS_SELECTOR, "the TSS stays: labkit's TR names it"
    source = guest_source("mov eax, cs", relocated=True)
    assert f".set USER_CS64, {layout.USER_CS64 + RELOCATION:#x}" in source
    assert source.count("lgdt [rip + relocated_gdtr]") == 2
    assert "relocated_gdtr]" not in guest_source("mov eax, cs")
