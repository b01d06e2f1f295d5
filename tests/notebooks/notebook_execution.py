"""Execute a notebook headless, as a student's "Run all" would, and collect what went wrong.

Shared by tests/notebooks (every notebook on every backend) and tests/browser
(notebook 00 rendered in Chromium).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "python3"
CELL_TIMEOUT_S = 120
SHARED: dict[tuple[str, str | None], Execution] = {}
"""Runs kept by :func:`execute_shared`, by (notebook path, backend)."""
RUN_TIMES: dict[tuple[str, str | None], float] = {}
"""Seconds per (notebook file name, backend) executed in this test session."""
# A line a student would read as a failure: "ValueError: ...", "RuntimeWarning: ..."
PROBLEM_LINE = re.compile(r"^\s*(Traceback \(most recent call last\)|\w*(Error|Exception|Warning)\b.*:)", re.M)


@dataclass
class Execution:
    notebook: nbformat.NotebookNode
    seconds: float
    problems: list[str]
    """One entry per error output or stderr output that reads as a failure, naming its cell."""

    def text(self) -> str:
        """Everything the notebook printed or displayed as text, HTML or Markdown, in order."""
        parts = []
        for cell in self.notebook.cells:
            for output in cell.get("outputs", []):
                if "text" in output:
                    parts.append(output["text"])
                for mime in ("text/plain", "text/html", "text/markdown"):
                    if mime in output.get("data", {}):
                        parts.append(output["data"][mime])
        return "\n".join(parts)

    def images(self) -> list[str]:
        """The base64 PNGs the notebook displayed."""
        return [output["data"]["image/png"] for cell in self.notebook.cells
                for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


def check_kernel_is_this_python() -> None:
    """The ``python3`` kernel must be this venv's ipykernel, not some other Python on the machine."""
    argv = KernelSpecManager().get_kernel_spec(KERNEL).argv
    # jupyter_client runs argv[0] == "python" as sys.executable (this venv's Python).
    if argv[0] not in ("python", "python3", sys.executable):
        raise RuntimeError(f"kernel {KERNEL!r} would run {argv[0]}, not this venv's {sys.executable}: "
                           "reinstall ipykernel into the venv (pip install -e '.[test]')")


def problems_in(notebook: nbformat.NotebookNode) -> list[str]:
    problems = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                problems.append(f"cell {index}: {output['ename']}: {output['evalue']}")
            elif output["output_type"] == "stream" and output["name"] == "stderr" \
                    and PROBLEM_LINE.search(output["text"]):
                problems.append(f"cell {index} wrote to stderr: {output['text'].strip()[:500]}")
    return problems


def execute(path: Path, backend: str | None, *, prelude: str | None = None) -> Execution:
    """Run every cell of ``path`` in a fresh kernel, with ``LABKIT_BACKEND=backend`` when given.

    ``prelude`` is code run first in a hidden cell (removed from the result).
    Errors do not stop the run (``allow_errors``): every failing cell is reported.
    """
    check_kernel_is_this_python()
    notebook = nbformat.read(path, as_version=4)
    if prelude is not None:
        notebook.cells.insert(0, nbformat.v4.new_code_cell(prelude, id="test-prelude"))
    env = dict(os.environ)
    env.pop("LABKIT_BACKEND", None)
    if backend is not None:
        env["LABKIT_BACKEND"] = backend
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client = NotebookClient(notebook, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    started = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - started
    RUN_TIMES[(path.name + (" (prelude)" if prelude else ""), backend)] = seconds
    problems = problems_in(notebook)
    if prelude is not None:
        notebook.cells.pop(0)
    return Execution(notebook, seconds, problems)


def execute_shared(path: Path, backend: str | None) -> Execution:
    """:func:`execute`, once per test session: the browser tests render the very run the notebook tests check.

    Each caller gets its own copy of the notebook (rendering must not change what
    another test reads).  A whole-suite run thus executes each notebook once per
    backend for both tests/notebooks and tests/browser.
    """
    import copy

    key = (str(path), backend)
    if key not in SHARED:
        SHARED[key] = execute(path, backend)
    return copy.deepcopy(SHARED[key])
