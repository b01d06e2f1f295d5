"""The notebooks open as RISE slideshows: every cell has its slide type, set by scripts/slides' rules."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
PATHS = sorted((REPO / "notebooks").glob("*.ipynb"))
SLIDE_TYPES = {"slide", "subslide", "fragment", "skip", "notes", "-"}

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("path", PATHS, ids=[path.name for path in PATHS])
def test_every_cell_has_its_slide_type(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata.get("rise", {}).get("scroll") is True, f"{path.name}: run scripts/slides"
    kinds = []
    for index, cell in enumerate(notebook.cells):
        kind = cell.metadata.get("slideshow", {}).get("slide_type")
        assert kind in SLIDE_TYPES, f"{path.name} cell {index} has no slide type (run scripts/slides): {kind!r}"
        kinds.append(kind)
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith(("# ", "## ")):
            assert kind == "slide", f"{path.name} cell {index}: a section heading must start a slide"
    assert kinds[0] == "slide"
    slides = kinds.count("slide")
    assert 3 <= slides <= len(kinds) // 2, f"{path.name}: {slides} slides for {len(kinds)} cells"


def test_the_script_is_what_marked_them(tmp_path):
    """Running scripts/slides over the stored notebooks changes nothing: they carry exactly its rules."""
    for path in PATHS:
        shutil.copy(path, tmp_path / path.name)
    copies = sorted(tmp_path.glob("*.ipynb"))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "slides"), *map(str, copies)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.count("unchanged") == len(PATHS), done.stdout
    for path, copy in zip(PATHS, copies):
        assert copy.read_text() == path.read_text()


def test_jupyterlab_rise_is_installed():
    assert importlib.util.find_spec("jupyterlab_rise") is not None, \
        "jupyterlab-rise is missing: pip install -e '.[classroom]' (scripts/setup classroom)"
