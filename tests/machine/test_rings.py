"""rings64 on every backend: its kernel's events, #PF error codes with CR2, and what PVM changes."""

from __future__ import annotations

import pytest

from labkit.errors import AssemblyError
from labkit.rings import ring_events, run_rings
from labkit.viz import ring_timeline


def is_pvm(backend: str) -> bool:
    if backend != "kvm":
        return False
    from labkit.kvm.system import kvm_flavour

    return kvm_flavour() == "kvm_pvm"


def entries(events):
    return [event for event in events if event.kind in ("entry", "syscall")]


def test_rings64_runs_its_task_and_reports_every_transition(backend_name):
    result = run_rings(backend_name)
    assert str(result.status) == "exited with code 0" and result.console == "hello from ring 3\n"
    events = ring_events(result)
    assert events[0].kind == "start" and events[-1].kind == "exit"
    assert events[-2].kind == "entry" and events[-2].from_cpl == 3  # the exit system call
    # Every entry is followed by a return to ring 3 (except the final exit); every entry from ring 0
    # is PVM's #GP at the kernel's own sysretq, and the return reported before it did not happen.
    for before, entry, after in zip(events[0:-3], events[1:-2], events[2:-1]):
        if entry.kind in ("entry", "syscall"):
            assert after.kind == "return", (entry.label, after.label)
            assert after.completed or (is_pvm(backend_name) and entry.kind == "syscall"), after.label
            if entry.from_cpl == 0:
                assert is_pvm(backend_name) and entry.vector == 13, entry.label
                assert before.kind == "return" and not before.completed
            else:
                assert entry.from_cpl == 3, entry.label
    faults = [(e.vector, e.error_code, e.cr2) for e in entries(events) if e.vector == 14]
    assert faults == [(14, 0x5, 0x30000), (14, 0x7, 0x30000), (14, 0x7, 0x31000), (14, 0x4, 0x40000000)]
    assert any(event.kind == "syscall" for event in events)


def test_system_calls_and_privileged_instructions_per_backend(backend_name):
    events = entries(ring_events(run_rings(backend_name)))
    vectors = [event.vector for event in events if event.kind == "entry"]
    gp = [event.rip for event in events if event.vector == 13]
    if is_pvm(backend_name):
        # PVM: ring-3 `int 0x80` is #UD (the kernel emulates it); sysretq in PVM's syscall mode is #GP.
        assert vectors.count(6) == 2 and 0x80 not in vectors
        assert len(gp) == 4
    else:
        assert vectors.count(0x80) == 2 and 6 not in vectors
        assert len(gp) == 3  # cli, mov rax, cr3, hlt


def test_each_event_names_the_instruction_that_caused_it(backend_name):
    """Faults name the faulting instruction, traps (int 0x80, syscall) the one before the saved RIP."""
    from labkit.rings import instruction_of, rings_guest

    guest = rings_guest()
    events = [event for event in ring_events(run_rings(backend_name)) if event.kind in ("entry", "syscall")]
    named = [instruction_of(event, guest.code, guest.load_address)[1] for event in events]
    task = ["int 0x80", "syscall", "cli", "mov rax, cr3", "hlt", "mov rax, qword ptr [0x30000]",
            "mov byte ptr [0x30000], 1", "mov byte ptr [0x31000], 1", "mov rax, qword ptr [0x40000000]", "int 0x80"]
    if is_pvm(backend_name):  # PVM: the kernel's sysretq faults, in ring 0, after the syscall
        task.insert(2, "sysretq")
    assert named == task
    assert [event.from_cpl for event in events] == [0 if name == "sysretq" else 3 for name in named]


def test_the_timeline_never_draws_ring_3_that_did_not_happen(backend_name):
    """Between the syscall and the next return that completed the CPL line stays at 0 (PVM's faulting sysretq)."""
    figure = ring_timeline(run_rings(backend_name))
    xs, ys = figure.axes[0].lines[0].get_data()
    events = ring_events(run_rings(backend_name))
    assert list(ys[1:-1]) == [event.cpl_after for event in events]
    syscall = next(index for index, event in enumerate(events) if event.kind == "syscall")
    resumed = next(index for index in range(syscall + 1, len(events))
                   if events[index].kind == "return" and events[index].completed)
    assert set(ys[syscall + 1:resumed + 1]) == {0}


def test_the_timeline_is_readable_at_a_projector(backend_name):
    from labkit.viz.style import readability_problems

    assert readability_problems(ring_timeline(run_rings(backend_name))) == []


def test_the_students_experiments_replace_the_task():
    result = run_rings("emu", experiments="""
        lea r15, [rip + 1f]
        mov rax, cr0
1:      lea r15, [rip + 1f]
        mov byte ptr [READ_ONLY], 7
1:
""")
    labels = [event.label for event in entries(ring_events(result))]
    assert labels == ["#GP (error 0x0) from ring 3", "#PF (error 0x7, cr2 0x31000) from ring 3",
                      "int 0x80 from ring 3"]
    assert result.console == ""


def test_experiments_that_do_not_assemble_say_why():
    with pytest.raises(AssemblyError, match="line"):
        run_rings("emu", experiments="mov rax, [nowhere")


def test_the_timeline_figure_says_what_measured_it(backend_name):
    figure = ring_timeline(run_rings(backend_name))
    ax, lane = figure.axes[:2]
    assert "measured on" in figure.get_suptitle()
    assert "µs" in lane.get_xlabel() or "ms" in lane.get_xlabel()
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["ring 0\n(kernel)", "ring 3\n(task)"]


def test_the_entries_table_lines_up_backends_by_instruction(backend_name):
    from labkit.viz.rings import entries_differ, kernel_entries_table

    alone = kernel_entries_table({backend_name: run_rings(backend_name)})
    assert [row[0].split(" (")[0] for row in alone.rows][:2] == ["int 0x80", "syscall"]
    assert entries_differ(alone) == []
    both = kernel_entries_table({"emu": run_rings("emu"), backend_name: run_rings(backend_name)})
    differ = [name.split(" (")[0] for name in entries_differ(both)]
    assert differ == (["int 0x80", "sysretq", "int 0x80"] if is_pvm(backend_name) else [])


def test_the_timeline_draws_into_given_axes_without_its_label_lane():
    from labkit.viz.style import new_figure

    figure = new_figure(7.5, 3.5)
    ax = figure.add_subplot()
    assert ring_timeline(run_rings("emu"), ax=ax) is figure and figure.axes == [ax]
    assert "measured on the emulator" in ax.get_title() and ax.get_xlabel().startswith("host time since")
