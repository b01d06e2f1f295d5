"""The figures and tables of labkit.viz, fed with hand-made exit traces."""

import subprocess
import sys

import matplotlib
import pytest

matplotlib.use("Agg")

from labkit.errors import ConfigError  # noqa: E402
from labkit.exits import ExitReason  # noqa: E402
from labkit.trace import ExitTrace  # noqa: E402
from labkit.viz import (Skipped, backends_to_compare, capability_table, exit_counts, exit_table,  # noqa: E402
                        exit_timeline, exits_side_by_side, measured_on, runs_side_by_side)
from labkit.vmm.status import RunResult, Status, StatusKind  # noqa: E402
from labkit.x86.state import Regs  # noqa: E402

pytestmark = pytest.mark.unit

EMU_LABEL = "measured on the emulator (Unicorn): emulator time, not hardware time"


def hello_trace() -> ExitTrace:
    """Three UART writes 10 µs apart, then a HLT 5 µs later: exits end at 10, 20, 30, 35 µs."""
    trace = ExitTrace()
    for handling, char in enumerate(b"Hi\n", start=1):  # labkit handled them in 1, 2 and 3 µs
        trace.add(ExitReason.IO, 0x8000, 0x3F8, 1, True, char, 10_000, handling * 1000)
    trace.add(ExitReason.HLT, 0x8010, None, None, None, None, 5_000, 4_000)
    return trace


def hello_result(backend: str) -> RunResult:
    return RunResult(status=Status(StatusKind.HALTED), console="Hi\n", regs=Regs(), trace=hello_trace(),
                     backend=backend, elapsed_s=35e-6)


def title_text(ax) -> str:
    return " ".join(ax.get_title().split())  # the label is wrapped onto lines


def scatter_points(ax) -> dict[str, list[tuple[float, float]]]:
    return {collection.get_label(): [tuple(point) for point in collection.get_offsets()]
            for collection in ax.collections}


def test_measured_on_says_what_measured():
    assert measured_on("kvm", "kvm_pvm") == "measured on KVM (kvm_pvm)"
    assert measured_on("kvm", "kvm_intel") == "measured on KVM (kvm_intel)"
    assert measured_on("emu") == EMU_LABEL
    assert "not a measurement" in measured_on("fake")


def test_timeline_staircases_times_and_labels():
    figure = exit_timeline(hello_trace(), backend="kvm_pvm", guest="hello")
    ax = figure.axes[0]
    assert title_text(ax) == "VM exits over time: hello measured on KVM (kvm_pvm)"
    assert ax.get_xlabel() == "host time since the run started (µs)"
    assert ax.get_ylabel() == "exits so far (count)"
    points = scatter_points(ax)
    # One staircase per reason: x is the running sum of host_ns in µs, y the exits of that reason so far.
    assert points["IO"] == [(10.0, 1.0), (20.0, 2.0), (30.0, 3.0)]
    assert points["HLT"] == [(35.0, 1.0)]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["IO (3)", "HLT (1)"]
    assert ax.collections[0].get_facecolor()[0].tolist() != ax.collections[1].get_facecolor()[0].tolist()


def test_a_burst_of_exits_is_one_step_per_exit_not_one_block():
    trace = ExitTrace()
    for _ in range(48):
        trace.add(ExitReason.IO, 0x8000, 0x3F8, 1, True, 0x41, 100)  # 48 exits 0.1 µs apart
    line = exit_timeline(trace, "emu").axes[0].get_lines()[0]
    xs, ys = line.get_data()
    assert list(ys[1:-1]) == list(range(1, 49)) and len(set(xs[1:-1])) == 48


def test_timeline_units_and_emulator_label():
    ax = exit_timeline(hello_result("emu"), unit="ms").axes[0]
    assert EMU_LABEL in title_text(ax)
    assert ax.get_xlabel() == "host time since the run started (ms)"
    assert scatter_points(ax)["HLT"] == [(pytest.approx(0.035), 1.0)]
    long = ExitTrace()
    long.add(ExitReason.IO, 0, 0x3F8, 1, True, 0, 50_000_000)  # 50 ms: picked unit is ms
    assert exit_timeline(long, "emu").axes[0].get_xlabel().endswith("(ms)")
    with pytest.raises(ConfigError, match="unit"):
        exit_timeline(long, "emu", unit="hours")


def test_timeline_notes_dropped_exits_and_empty_trace():
    trace = ExitTrace(limit=2)
    for _ in range(5):
        trace.add(ExitReason.IO, 0, 0x3F8, 1, True, 0, 1000)
    ax = exit_timeline(trace, "emu").axes[0]
    assert len(scatter_points(ax)["IO"]) == 2
    assert any("3 later exits counted" in text.get_text() for text in ax.texts)
    empty = exit_timeline(ExitTrace(), "emu").axes[0]
    assert any(text.get_text() == "no exits recorded" for text in empty.texts)


def test_counts_bars():
    ax = exit_counts(hello_result("kvm"), flavour="kvm_pvm").axes[0]
    assert title_text(ax) == "VM exits by reason measured on KVM (kvm_pvm)"
    assert ax.get_xlabel() == "exit reason"
    assert ax.get_ylabel() == "exits (count)"
    assert [label.get_text() for label in ax.get_xticklabels()] == ["IO", "HLT"]
    assert [patch.get_height() for patch in ax.patches] == [3, 1]
    assert ax.get_yscale() == "linear"
    assert exit_counts(hello_trace(), "emu", log=True).axes[0].get_yscale() == "log"


def test_draws_into_given_axes():
    from matplotlib.figure import Figure

    figure = Figure()
    left, right = figure.subplots(1, 2)
    assert exit_counts(hello_trace(), "emu", ax=right) is figure
    assert len(left.patches) == 0 and len(right.patches) == 2


def test_side_by_side_one_row_per_backend():
    figure = exits_side_by_side([hello_result("kvm"), hello_result("emu")], guest="hello")
    assert len(figure.axes) == 4
    timeline_kvm, counts_kvm, timeline_emu, counts_emu = figure.axes
    kvm_row, emu_row = figure.subfigs
    assert "KVM" in kvm_row.get_suptitle() and EMU_LABEL in " ".join(emu_row.get_suptitle().split())
    assert counts_kvm.get_ylim() == counts_emu.get_ylim()
    assert figure.get_suptitle() == "VM exits of the same hello on 2 backends"
    figure.savefig(__import__("io").BytesIO(), format="png")  # renders with Agg


def test_figures_are_readable_at_a_projector():
    """At most 8 in wide, 150 dpi, no text under 11 pt, no overlapping text, no legend over a label."""
    from labkit.viz import exit_costs
    from labkit.viz.style import readability_problems

    burst = ExitTrace()
    for index in range(48):
        burst.add(ExitReason.IO, 0x8000, 0x3F8 + index % 2 * 5, 1, index % 2 == 0, 0x41, 2_000)
    burst.add(ExitReason.HLT, 0x8010, None, None, None, None, 5_000)
    for figure in (exit_timeline(burst, "emu", guest="hello64"), exit_counts(burst, "kvm_pvm"),
                   exits_side_by_side([hello_result("kvm"), hello_result("emu")], guest="hello"),
                   exits_side_by_side([hello_result("emu")]), exit_costs([hello_result("kvm"), hello_result("emu")])):
        assert readability_problems(figure) == []


def test_the_readability_check_finds_what_it_is_for():
    from labkit.viz.style import new_figure, readability_problems

    figure = new_figure(6, 3)
    ax = figure.add_subplot()
    ax.bar(["a", "b"], [1, 2])
    ax.text(0, 1, "pile", fontsize=12)
    ax.text(0, 1, "up", fontsize=12)
    ax.set_xlabel("tiny", fontsize=6)
    ax.plot([0, 1], [1, 2], label="a long legend entry")
    ax.legend(loc="upper left")
    ax.text(0.05, 0.97, "hidden", transform=ax.transAxes, fontsize=12, va="top")
    problems = readability_problems(figure)
    assert "text 'tiny' is 6 pt (at least 11 pt)" in problems
    assert "texts overlap: 'pile' and 'up'" in problems
    assert "the legend hides text 'hidden'" in problems
    from matplotlib.figure import Figure

    stacked = new_figure(4, 3)
    ax = stacked.add_subplot()
    ax.bar(["T&E"], [1000], label="emulated")
    ax.bar(["T&E"], [1], bottom=[1000], label="reflected")  # 1 on top of 1000: under a pixel
    ax.bar(["BT"], [0], label="none")                         # a bar of 0 is flat on purpose
    invisible = [problem for problem in readability_problems(stacked) if "invisible" in problem]
    assert len(invisible) == 1 and invisible[0].startswith("reflected (1) is drawn 0.")
    assert readability_problems(Figure(figsize=(10, 3), dpi=100))[:2] == [
        "figure is 10.0 in wide (at most 8.0 in)", "figure is drawn at 100 dpi (at least 150)"]


def test_bare_trace_needs_a_backend():
    with pytest.raises(ConfigError, match="backend='kvm'"):
        exit_timeline(hello_trace())
    with pytest.raises(ConfigError, match="ExitTrace or a RunResult"):
        exit_counts([1, 2, 3], "emu")
    with pytest.raises(ConfigError, match="2 runs but 1 backends"):
        exits_side_by_side([hello_trace(), hello_trace()], ["emu"])


def test_exit_table_rows_and_label():
    table = exit_table(hello_result("emu"))
    assert table.header == ["reason", "count", "share", "handling min", "handling median", "handling max",
                            "handling total", "since previous (total)"]
    assert table.rows == [["IO", "3", "75.0%", "1.00 µs", "2.00 µs", "3.00 µs", "6.00 µs", "30.00 µs"],
                          ["HLT", "1", "25.0%", "4.00 µs", "4.00 µs", "4.00 µs", "4.00 µs", "5.00 µs"],
                          ["total", "4", "", "", "", "", "10.00 µs", "35.00 µs"]]
    assert table.note.startswith(EMU_LABEL)
    assert "not the kernel's exit and re-entry" in table.note and "the guest running" in table.note
    assert "<td style='text-align:left;vertical-align:top'>IO</td>" in table._repr_html_()
    assert "75.0%" in str(table)


def test_exit_table_keeps_labkit_events_apart_from_exits():
    trace = hello_trace()
    trace.add(ExitReason.INTERRUPT, None, None, None, None, 0x20, 7_000, 500)
    trace.add(ExitReason.TIMEOUT, 0x8010, None, None, None, None, 2_000_000, 300)
    table = exit_table(trace, "emu")
    reasons = [row[0] for row in table.rows]
    assert reasons == ["IO", "HLT", "labkit events, not VM exits:", "INTERRUPT", "TIMEOUT", "total"]
    assert table.title == "VM exits (4) and labkit events (2)"
    shares = {row[0]: row[2] for row in table.rows}
    assert shares["IO"] == "75.0%" and shares["TIMEOUT"] == "50.0%"  # each share is of its own kind


def test_runs_side_by_side_with_a_skipped_backend():
    table = runs_side_by_side([Skipped("kvm", "no <kvm> here"), hello_result("emu")])
    assert table.header == ["", "kvm: skipped", "emulator (Unicorn)"]
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["status"] == ["skipped", "halted"]
    assert rows["measured on"] == ["no <kvm> here", EMU_LABEL]
    assert rows["console"][1] == "Hi"
    assert rows["exits"][1] == "IO 3, HLT 1"
    page = table._repr_html_()
    assert "no &lt;kvm&gt; here" in page and "<pre" in page


def test_capability_table_from_a_report():
    report = {
        "python": "3.11", "labkit": "0.1.0",
        "kvm": {"usable": False, "problem": "/dev/kvm does not exist", "flavour": "unknown"},
        "unicorn": "2.1.4", "capstone": "5.0.7", "binutils": None,
        "auto": {"backend": "emu", "reason": "KVM is not usable"}, "fixes": ["install binutils"],
    }
    table = capability_table(report)
    rows = dict((row[0], row[1]) for row in table.rows)
    assert rows["KVM (/dev/kvm)"] == "not usable: /dev/kvm does not exist"
    assert rows["GNU binutils (assembler)"].startswith("missing")
    assert rows["backend='auto' picks"] == "emu: KVM is not usable"
    assert table.note == "To fix: install binutils"


def test_backends_to_compare_respects_labkit_backend(monkeypatch):
    import labkit.backend

    monkeypatch.setattr(labkit.backend, "kvm_problem", lambda: None)
    assert backends_to_compare({}) == [("kvm", None), ("emu", None)]
    kvm, emu = backends_to_compare({"LABKIT_BACKEND": "emu"})
    assert kvm[1].startswith("KVM is usable here, but LABKIT_BACKEND=emu is set") and emu == ("emu", None)
    monkeypatch.setattr(labkit.backend, "kvm_problem", lambda: "/dev/kvm does not exist")
    assert backends_to_compare({"LABKIT_BACKEND": "emu"})[0] == ("kvm", "/dev/kvm does not exist")


def test_import_stays_light():
    code = "import sys, labkit.viz; import labkit.viz.exits; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_exit_costs_one_series_per_backend():
    from labkit.viz import exit_costs

    ax = exit_costs([hello_result("kvm"), hello_result("emu")], guest="hello").axes[0]
    kvm, emu = ax.get_lines()
    assert list(kvm.get_xdata()) == [0, 1, 2, 3] and list(kvm.get_ydata()) == [10.0, 10.0, 10.0, 5.0]
    assert kvm.get_label().startswith("KVM") and emu.get_label() == "emulator (Unicorn)"
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "exit number (in the order they happened)"
    assert ax.get_ylabel() == "host time since the previous exit\n(µs, log scale)"
    title = " ".join(ax.figure.get_suptitle().split())
    assert "(guest run + exit + handling)" in title and "measured on KVM" in title and EMU_LABEL in title


def test_table_plain_text_in_ipython():
    from IPython.lib.pretty import pretty

    assert pretty(exit_table(hello_trace(), "emu")).startswith("VM exits (4) and labkit events (0)\nreason")


def result_from(origin) -> RunResult:
    return RunResult(status=Status(StatusKind.HALTED), console="Hi\n", regs=Regs(), trace=hello_trace(),
                     backend=origin.backend, elapsed_s=35e-6, origin=origin)


def test_a_result_is_labelled_from_where_it_ran_not_from_this_host(monkeypatch):
    """A result made on a VT-x host says kvm_intel here too, and the host is never asked."""
    from labkit.viz import labels
    from labkit.vmm.status import Origin

    def probe():
        raise AssertionError("a result with an origin must not re-probe the host")

    monkeypatch.setattr(labels, "_local_flavour", probe)
    intel = result_from(Origin("kvm", "kvm_intel", None, "0.1.0", "lab-pc-07"))
    assert labels.label(intel) == "measured on KVM (kvm_intel)"
    assert labels.short_label(intel) == "KVM (kvm_intel)"
    assert title_text(exit_timeline(intel).axes[0]).endswith("measured on KVM (kvm_intel)")
    unknown = result_from(Origin("kvm", None, None, "0.1.0", "elsewhere"))
    assert labels.label(unknown) == "measured on KVM"
    emu = result_from(Origin("emu", None, "2.1.4", "0.1.0", "binder"))
    assert labels.label(emu) == EMU_LABEL
    assert runs_side_by_side([intel, emu]).header == ["", "KVM (kvm_intel)", "emulator (Unicorn)"]


def test_a_result_without_an_origin_falls_back_to_this_hosts_kvm(monkeypatch):
    from labkit.viz import labels

    monkeypatch.setattr(labels, "_local_flavour", lambda: "kvm_amd")
    assert labels.label(hello_result("kvm")) == "measured on KVM (kvm_amd)"
    assert labels.label(hello_result("emu")) == EMU_LABEL


def test_exit_costs_quote_the_trace():
    from labkit.viz import exit_cost_table, exit_costs_of

    trace = hello_trace()
    trace.add(ExitReason.TIMEOUT, 0x8010, None, None, None, None, 9_000_000, 100)  # no exit: left out
    costs = exit_costs_of(trace, "emu")
    assert costs.exits == 4 and costs.first_since_start_ns == 10_000
    assert costs.median_since_previous_ns == 10_000  # of 10, 10, 5 µs after the first
    assert costs.median_handling_ns == 2_500  # of 1, 2, 3, 4 µs
    table = exit_cost_table([hello_result("emu")])
    assert table.rows == [[EMU_LABEL, "4", "10.00 µs", "10.00 µs", "2.50 µs", "29%"]]  # 10 of 35 µs handling


def test_runs_side_by_side_does_not_count_a_timeout_as_an_exit():
    trace = hello_trace()
    trace.add(ExitReason.TIMEOUT, 0x8010, None, None, None, None, 1_000_000, 100)
    run = RunResult(status=Status(StatusKind.TIMEOUT), console="Hi\n", regs=Regs(), trace=trace,
                    backend="emu", elapsed_s=1.0)
    rows = {row[0]: row[1:] for row in runs_side_by_side([run]).rows}
    assert rows["exits"] == ["IO 3, HLT 1; not exits: TIMEOUT 1"]


def test_a_note_repeated_in_rows_becomes_one_footnote():
    from labkit.classify.rules import Classification
    from labkit.viz.rings import classification_table, umip_table

    pvm = "under PVM, ring-0 code is run by KVM's instruction emulator"

    def result(instruction, notes=(), umip=""):
        return Classification(instruction, "", 64, "kvm", "kvm_pvm", "undetermined", "ring 0 could not run", (),
                              notes=notes, umip=umip)

    table = classification_table({"KVM": [result("lar eax, ecx", (pvm,)), result("lsl eax, ecx", (pvm,)),
                                          result("nop", ("only here",))]})
    evidence = [row[-1] for row in table.rows]
    assert evidence == ["ring 0 could not run\n[1]", "ring 0 could not run\n[1]",
                        "ring 0 could not run\nnote: only here"]
    assert table.note.endswith(f"[1] note: {pvm}") and table.note.count(pvm) == 1
    umip = umip_table({"KVM": [result("sgdt", umip="traps"), result("sidt", umip="traps"), result("nop")],
                       "emu": [result("sgdt", umip="refused"), result("sidt", umip="refused"), result("nop")]},
                      ["SGDT", "SIDT", "NOP"])
    assert umip.rows == [["SGDT, SIDT", "traps", "refused"]]


def test_the_notebook_list_names_the_notebooks_that_exist(tmp_path):
    import json

    from labkit.viz import notebooks_table

    def notebook(name, heading):
        cells = [{"cell_type": "markdown", "source": [heading, "\n", "text"], "metadata": {}}]
        (tmp_path / name).write_text(json.dumps({"cells": cells}))

    notebook("01-rings.ipynb", "# 01 · Protection rings")
    notebook("00-welcome.ipynb", "# 00 · Welcome")
    (tmp_path / "notes.ipynb").write_text("{}")
    (tmp_path / "02-broken.ipynb").write_text("not json")
    rows = notebooks_table(tmp_path).rows
    assert [row[0] for row in rows] == ["00-welcome.ipynb", "01-rings.ipynb", "02-broken.ipynb"]
    assert rows[0][1] == "00 · Welcome" and rows[2][1].startswith("(cannot read it:")


def test_counts_far_apart_get_a_log_axis_so_no_bar_is_invisible():
    from labkit.viz.style import readability_problems

    trace = ExitTrace()
    for _ in range(1000):
        trace.add(ExitReason.IO, 0x8000, 0x3F8, 1, True, 0x41, 100)
    trace.add(ExitReason.HLT, 0x8010, None, None, None, None, 100)
    figure = exit_counts(trace, "emu")
    assert figure.axes[0].get_yscale() == "log" and readability_problems(figure) == []
    linear = exit_counts(trace, "emu", log=False)
    assert any("invisible" in problem for problem in readability_problems(linear))


def test_a_lazily_drawn_minor_tick_label_under_11_pt_is_found_before_a_run_shows_it():
    """A log axis labels its minor ticks only when its data spans less than a decade; made at draw time at
    matplotlib's 10 pt they are found whatever the data (even drawn empty), also when the check runs inside
    readable_fonts() (a notebook draws the figure outside it)."""
    from matplotlib.figure import Figure

    from labkit.viz.style import new_figure, readability_problems, readable_fonts

    def log_plot(figure, span: float, which: str | None = "major"):
        ax = figure.add_subplot()
        ax.plot([1, 2], [20, 20 * span])
        ax.set_yscale("log")
        ax.set_xlabel("x", fontsize=12)
        ax.set_ylabel("y", fontsize=12)
        if which:
            ax.tick_params(which=which, labelsize=12)
        return figure

    minor = "the y axis draws its minor tick labels at 10 pt"
    for span in (3.0, 1000.0):  # minor labels shown (2x10^1, 3x10^1, ...), then drawn empty
        problems = readability_problems(log_plot(Figure(figsize=(6, 3), dpi=150), span))
        assert any(problem.startswith(minor) for problem in problems), (span, problems)
        assert readability_problems(log_plot(Figure(figsize=(6, 3), dpi=150), span, "both")) == []
        figure = log_plot(Figure(figsize=(6, 3), dpi=150), span)
        with readable_fonts():  # the check draws with matplotlib's defaults, as a notebook does, even in here
            problems = readability_problems(figure)
        assert any(problem.startswith(minor) for problem in problems), (span, problems)
        # A labkit figure draws at labkit's sizes: nothing to remember.
        assert readability_problems(log_plot(new_figure(6, 3), span, None)) == []


def test_every_labkit_figure_is_made_by_labkit_viz_style():
    """No module but labkit.viz.style makes a matplotlib Figure: every figure draws at labkit's sizes."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "labkit"
    making = re.compile(r"\bFigure\(|\bplt\.(figure|subplots)\(|pyplot\.(figure|subplots)\(")
    found = [f"{path.relative_to(package)}:{number}: {line.strip()}"
             for path in sorted(package.rglob("*.py")) if path.name != "style.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if making.search(line) and not line.lstrip().startswith(("#", ">>>"))]
    assert found == [], "make figures with labkit.viz.style.new_figure:\n" + "\n".join(found)
