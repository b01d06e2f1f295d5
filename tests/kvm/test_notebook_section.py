"""Notebook 05's KVM section (notebooks/sections/05-kvm.py, jupytext percent format) runs top to bottom.

Until the lead splices it into notebooks/05-hardware-assisted.ipynb it is checked here: converted to a
notebook and executed headless on KVM and on the emulator (where it must say there is no KVM and show
no numbers of its own).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
from notebook_execution import REPO, execute  # noqa: E402

SECTION = REPO / "notebooks" / "sections" / "05-kvm.py"
CELL = re.compile(r"^# %%(?P<markdown> \[markdown\])?[^\n]*$", re.M)

pytestmark = pytest.mark.notebooks


def percent_to_notebook(text: str) -> nbformat.NotebookNode:
    """jupytext's percent format: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose
    lines carry a ``# `` prefix.  Text before the first marker (the header) is dropped."""
    cells = []
    matches = list(CELL.finditer(text))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.end():end].strip("\n")
        if match.group("markdown"):
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines()]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        else:
            cells.append(nbformat.v4.new_code_cell(body))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


@pytest.fixture(scope="module")
def notebook_path(tmp_path_factory) -> Path:
    notebook = percent_to_notebook(SECTION.read_text())
    assert [cell.cell_type for cell in notebook.cells][:2] == ["markdown", "code"]
    assert notebook.cells[0].source.startswith("## What KVM handles itself")
    path = tmp_path_factory.mktemp("section") / "05-kvm.ipynb"
    nbformat.write(notebook, path)
    return path


def test_markdown_holds_no_measured_numbers():
    notebook = percent_to_notebook(SECTION.read_text())
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            # Hex constants of the guest and KVM's names are fine; a decimal number of 2+ digits is not.
            text = re.sub(r"0x[0-9A-Fa-f]+|`[^`]*`|Linux \d+\.\d+", "", cell.source)
            assert not re.search(r"\b\d{2,}\b", text), cell.source


@pytest.mark.kvm
def test_section_runs_on_kvm(notebook_path):
    from labkit.kvm.system import kvm_flavour

    run = execute(notebook_path, "kvm")
    assert run.problems == []
    assert run.seconds < 60
    text = run.text()
    assert f"This session runs on **KVM** (`{kvm_flavour()}`)" in text
    assert "What KVM counted and what reached labkit" in text
    assert "The exit-mix guest without and with each exit control" in text
    assert "Console, MMIO device and notifications were the same in every run." in text
    assert f"measured on KVM ({kvm_flavour()})" in text
    assert "KVM exit controls:" in text and "With KVM_IOEVENTFD (notify port):" in text
    if kvm_flavour() == "kvm_pvm":
        assert "This host's KVM is PVM" in text and "Under PVM the HLT control is accepted" in text
    assert len(run.images()) == 4  # kernel vs userspace, exit latency, the controls, the widget's figure


def test_section_says_so_on_the_emulator(notebook_path):
    run = execute(notebook_path, "emu")
    assert run.problems == []
    text = run.text()
    assert "**No KVM in this session**" in text
    assert "No KVM in this session (LABKIT_BACKEND=emu is set)" in text  # the widget's own note
    assert "What KVM counted" not in text and "measured on KVM" not in text
    assert run.images() == []
