"""Every figure the notebooks show says what measured it and passes labkit.viz.style's readability check.

Each notebook runs on the emulator with a hidden first cell that wraps IPython's PNG
formatter for matplotlib figures: every figure a cell displays is checked as it is shown
(its texts, ``readability_problems``) and the findings are printed by a hidden last cell.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
from notebook_execution import NOTEBOOKS, execute  # noqa: E402

PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
MARK = "labkit-figures:"
WATCH = """
from matplotlib.figure import Figure as _Figure
from labkit.viz.style import readability_problems as _problems
_seen, _printer = [], []
_formatter = get_ipython().display_formatter.formatters["image/png"]
def _watch(figure, *args, **kwargs):
    texts = [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))
             if text.get_text()]
    _seen.append({"texts": texts, "problems": _problems(figure)})
    return _printer[-1](figure, *args, **kwargs)
def _wrap(*args):  # `%matplotlib inline` (re)registers the PNG printer: wrap whatever is registered
    try:
        printer = _formatter.lookup_by_type(_Figure)
    except KeyError:
        return
    if printer is not _watch:
        _printer.append(printer)
        _formatter.for_type(_Figure, _watch)
get_ipython().events.register("pre_run_cell", _wrap)
get_ipython().events.register("post_run_cell", _wrap)
"""
REPORT = f"import json as _json\nprint({MARK!r}, _json.dumps(_seen))"
LABELS = ("measured on KVM (", "measured on the emulator", "emulator (Unicorn)", "on the emulator (Unicorn", "KVM (kvm_",
          "measured on this host (no VM)")  # host work only: notebook 09's chain reads
# Notebooks whose figures do not pass yet, each with what is wrong (a strict xfail: the test fails once
# one passes, so the entry goes).  Empty since 2026-11-30: notebooks 03-08's figures were redrawn.
NOT_YET_READABLE: dict[str, str] = {}

pytestmark = [pytest.mark.slow, pytest.mark.notebooks, pytest.mark.emu]


@pytest.mark.parametrize("path", [pytest.param(path, marks=pytest.mark.xfail(
    reason=NOT_YET_READABLE[path.name], strict=True)) if path.name in NOT_YET_READABLE else path
    for path in PATHS], ids=[path.name for path in PATHS])
def test_every_figure_is_labelled_and_readable(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT))
    copy = path.parent / f".figures-{path.name}.tmp"  # beside it: the notebook reads its own folder
    nbformat.write(notebook, copy)
    try:
        run = execute(copy, "emu", prelude=WATCH)
    finally:
        copy.unlink()
    assert not run.problems, "\n".join(run.problems)
    line = next(line for line in run.text().splitlines() if line.startswith(MARK))
    figures = json.loads(line[len(MARK):])
    assert len(figures) == len(run.images()), "a figure was shown without passing the PNG formatter"
    wrong = []
    for index, figure in enumerate(figures):
        if not any(label in text for text in figure["texts"] for label in LABELS):
            wrong.append(f"figure {index + 1} does not say what measured it: {figure['texts'][:6]}")
        if figure["problems"]:
            wrong.append(f"figure {index + 1} ({figure['texts'][:2]}): {figure['problems'][:3]}")
    assert not wrong, f"{path.name}:\n" + "\n".join(wrong)
