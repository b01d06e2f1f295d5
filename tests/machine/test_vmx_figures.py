"""Notebook 05's figures say what measured them and stay readable on a projector (150 dpi, 11 pt, 8 in)."""

from __future__ import annotations

from matplotlib.text import Text

from labkit.monitor.techniques import compare_techniques
from labkit.monitor.vmx import Vmcs
from labkit.monitor.vmx.model import run_vmx
from labkit.monitor.vmx.vmcs import every_exit
from labkit.viz.vmx import technique_entries, vmx_exits


def drawn(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()  # tick labels exist once drawn
    return figure


def readable(figure) -> list[str]:
    problems = []
    if figure.dpi < 150:
        problems.append(f"dpi {figure.dpi}")
    if figure.get_figwidth() > 8.0:
        problems.append(f"{figure.get_figwidth()} in wide")
    for text in figure.findobj(Text):
        if text.get_visible() and text.get_text().strip() and text.get_fontsize() < 11:
            problems.append(f"{text.get_text()!r} at {text.get_fontsize()} pt")
    return problems


def titles(figure) -> str:
    return " ".join(" ".join(text.get_text().split()) for text in drawn(figure).findobj(Text))


def test_the_exit_figure_is_labelled_a_model_and_readable():
    figure = vmx_exits(run_vmx("minikernel64", every_exit(), "emu"))
    assert "A model of VMX run on the emulator (Unicorn 2.1.4): not VT-x" in titles(figure)
    assert "30 I/O" in titles(figure) and "1028" in titles(figure)
    assert readable(figure) == []
    empty = vmx_exits(run_vmx("minikernel64", Vmcs(), "emu"))
    assert "no VM exits under these controls" in titles(empty) and readable(empty) == []


def test_the_technique_figure_names_the_backend_and_the_console_apart():
    comparison = compare_techniques("emu", techniques=("native", "trap-and-emulate", "VMX model"))
    figure = technique_entries(comparison)
    text = titles(figure)
    assert "measured on the emulator (Unicorn 2.1.4)" in text and "emulator time, not hardware time" in text
    assert "besides the console" in text and "23" in text  # trap-and-emulate's entries besides the console
    assert readable(figure) == []
