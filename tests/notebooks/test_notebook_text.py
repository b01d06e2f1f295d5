"""What the notebooks' own text may say, checked without running them: numbers and references.

* A number in a markdown cell is either a constant (a ring, a bit, a vector, a year, a port in a
  code span, ...: the contexts and per-notebook constants below, each with its reason) or it came
  from a run, and then it belongs in a code cell's output (``display(Markdown(f"... {n} ..."))``),
  where every run fills it anew.  Every notebook in ``notebooks/`` is checked, so a new one is too.
* A notebook names only notebooks that exist ("notebook 04", ``04-name.ipynb``), in markdown and code.
"""

from __future__ import annotations

import re

import nbformat
import pytest
from notebook_execution import NOTEBOOKS

pytestmark = pytest.mark.unit

PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))

CONSTANT_CONTEXTS = {
    r"^#+ \d\d ·": "the notebook's own number in its title",
    r"\brings?(?: below| above)? -?\d(?:(?: to|,| and| or) \d)*": "ring numbers (architectural)",
    r"\b[Tt]ime 0\b": "the origin of a time axis",
    r"\b(?:CPL|DPL|RPL|IOPL)\b[^.\n]{0,12}?\d": "privilege levels (architectural)",
    r"\b[Nn]otebooks? \d\d(?:(?:,| and| or) \d\d)*": "notebook numbers (checked by the references test below)",
    r"\bbits? \d+(?::\d+)?(?:(?: to|,| and| or) \d+)*": "bit positions (Intel SDM)",
    r"\bbits \d+:\d+": "bit ranges (Intel SDM)",
    r"\b(?:low|high) (?:two|\d+) bits": "field widths (Intel SDM)",
    r"\bvector \d+": "exception and interrupt vectors (Intel SDM)",
    r"\bleaf \d+": "CPUID leaves (Intel SDM)",
    r"\b[Vv]ol\. \d[A-D]?(?:, (?:\d+(?:\.\d+)*|chapters? \d+(?: and \d+)?))?": "Intel SDM volume and section numbers",
    r"\bchapters? \d+(?: and \d+)?": "Intel SDM chapters",
    r"\b\d+-(?:bit|byte)\b": "operand, mode and field widths",
    r"\b\d+ (?:bits|bytes) of\b": "operand widths",
    r"(?<![\d.])(?:19[6-9]\d|20[0-4]\d)(?![\d.])": "years of papers and products",
    r"^\s*\d+\. ": "numbered list items",
    r"(?:\b[A-Z][A-Z/.]*\d?|\bbit)\s*=\s*[01]\b": "flag and bit values (IF = 0, P=1)",
    r"\b(?:IF|TF|TS|RF|AC|UMIP)\s+(?:is|was|stays|stayed|becomes)(?:\s+(?:still|back to|set to))?\s+[01]\b":
        "flag values in words (IF is still 1)",
    r"(?:^|\s)[01] = ": "a bit's two values, defined in a list",
    r"\b(?:Unicorn|unicorn) \d+\.\d+\.\d+": "the pinned emulator version",
    r"\bsteps \d+ to \d+": "steps of the numbered list above it",
    r"\bSOSP \d{4}": "a conference year",
    r"\b\d+(?:, \d+)*(?:,? and \d+)? (?:KiB|MiB|GiB)\b": "sizes an experiment asks for, or the machine's",
    r"\bLinux \d+\.\d+": "a Linux version",
    r"\bexit reason \d+": "basic exit reasons (Intel SDM vol. 3C, appendix C)",
    r"\bqueue \d+": "a virtqueue's index (virtio 1.x, 5.3.2)",
    r"\b1:1\b": "an identity mapping",
    r"\bat byte \d+": "a field's offset in a file format's header (qcow2.rst)",
}
"""Where a number is a constant, whatever the run: a regular expression for its context, and why."""

CONSTANTS: dict[str, dict[str, str]] = {
    "02-trap-and-emulate.ipynb": {"16": "the size of the kernel's data structure in bytes (a constant of the guest)"},
    "03-binary-translation.ipynb": {"8": "the size of a translation slot in bytes (a constant of the translator)"},
    "04-paravirtualization.ipynb": {
        "3": "int 3 and int 4: the vectors PVM lets ring 3 raise (DECISIONS)",
        "4": "int 3 and int 4: the vectors PVM lets ring 3 raise (DECISIONS)",
        "1": "a batch size named as an example (the control's smallest)",
        "64": "a batch size named as an example (the control's largest)",
    },
    "07-isolation.ipynb": {
        "8": "the secret's length in bytes (TOPSECRT, a constant of secret64)",
        "2": "2^27, the qwords between RAM and 1 GiB (arithmetic on the guest's constants)",
        "27": "2^27, the qwords between RAM and 1 GiB (arithmetic on the guest's constants)",
        "0": "a bit's value in the #PF error code (Intel SDM)",
        "17": "the length of venom64's payload, one byte past the 16-byte FIFO (a constant of the guest)",
    },
    "08-snapshots.ipynb": {
        "10": "the slice length in ms and a link speed in MB/s the notebook's code chooses",
        "8": "how many bytes the host writes into the paused guest (the experiment's parameter)",
        "0": "labkit snapshot check's exit status for a good file (the CLI's constant)",
        "2": "labkit snapshot check's exit status for a corrupt file (the CLI's constant)",
        "20": "how many slices the heat map runs (the experiment's parameter)",
        "64": "the small working set in pages (memtouch64's parameter)",
        "1,024": "the large working set in pages (memtouch64's parameter)",
        "200": "memtouch64's spin parameter",
        "256": "pages a diff holds in the cost experiment (its parameter) and the fast writer's working set",
        "16": "the converging guest's working set in pages (its parameter)",
        "1": "a link speed in GB/s the migration uses (its parameter)",
    },
    "06-memory-virtualization.ipynb": {
        "100": "how many random page-table edits the notebook asks the kernel for (its parameter)",
        "24": "the nested walk's references for 4-level paging under 4-level EPT, 4 x (4 + 1) + 4 (a formula; "
              "the model's count is printed by a code cell)",
        "4": "the references of a 4-level walk, and the levels of one",
    },
    "09-disks-and-backups.ipynb": {
        "1": "the virtio standard's version (virtio 1.x)",
        "5.2": "the virtio 1.x section of the block device",
        "3": "the qcow2 format version labkit writes",
    },
}
"""Numbers that are constants of one notebook's guest or machinery, with the reason."""

NUMBER = re.compile(r"(?<![\w.#$-])\d+(?:[.,]\d+)*(?![\w])")
CODE_SPAN = re.compile(r"`[^`\n]*`|```.*?```", re.S)


def blank(text: str, pattern: str) -> str:
    return re.sub(pattern, lambda match: " " * len(match.group(0)), text, flags=re.M)


def numbers_in_markdown(source: str) -> list[str]:
    """The numbers of a markdown cell that no constant context explains, with a little context each."""
    source = source.replace("*", "")  # emphasis: "**rings** 0 to 3" reads "rings 0 to 3"
    text = CODE_SPAN.sub(lambda match: " " * len(match.group(0)), source)
    text = re.sub(r"<!--.*?-->", lambda match: " " * len(match.group(0)), text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", lambda match: " " * len(match.group(0)), text)  # link targets
    for pattern in CONSTANT_CONTEXTS:
        text = blank(text, pattern.replace(" ", r"\s+"))  # a context may wrap onto the next line
    return [f"{match.group(0)} in “…{source[max(0, match.start() - 30):match.end() + 20]}…”".replace("\n", " ")
            for match in NUMBER.finditer(text)]


@pytest.mark.parametrize("path", PATHS, ids=[path.name for path in PATHS])
def test_markdown_holds_no_number_from_a_run(path):
    """A number a run produced is printed by a code cell; markdown holds only constants."""
    notebook = nbformat.read(path, as_version=4)
    allowed = CONSTANTS.get(path.name, {})
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "markdown":
            continue
        for number in numbers_in_markdown(cell.source):
            if number.split(" ", 1)[0] not in allowed:
                found.append(f"cell {index}: {number}")
    assert not found, (
        f"{path.name}: numbers in markdown cells. If a run produced it, print it from a code cell "
        "(display(Markdown(f'... {n} ...'))); if it is a constant, add its context to CONSTANT_CONTEXTS or "
        "the number to CONSTANTS in tests/notebooks/test_notebook_text.py, with the reason:\n" + "\n".join(found))


def test_the_number_check_finds_numbers_from_a_run_and_passes_constants():
    found = numbers_in_markdown("the trap-and-emulate run's 1,051 traps took 3.2 ms")
    assert [number.split(" ")[0] for number in found] == ["1,051", "3.2"]
    constants = ("In ring 3, `out 0x3f8` raises #GP (vector 13); CR4 bit 11 is UMIP (Intel SDM vol. 3, 2.5); "
                 "hello64 runs in 64-bit mode; Popek and Goldberg (1974); IF = 0; IF is still 1; notebook 02 and 03; "
                 "the **rings** 0 to 3; not a ring below 0.")
    assert numbers_in_markdown(constants) == []
    assert numbers_in_markdown("The message has 24 characters.") != []


REFERENCE = re.compile(r"\b[Nn]otebooks? (\d\d(?:(?:,| and| or) \d\d)*)|\b(\d\d)-[a-z][\w-]*\.ipynb")


def referenced(text: str) -> set[str]:
    numbers = set()
    for match in REFERENCE.finditer(text):
        numbers.update(re.findall(r"\d\d", match.group(1) or match.group(2)))
    return numbers


@pytest.mark.parametrize("path", PATHS, ids=[path.name for path in PATHS])
def test_notebooks_refer_only_to_notebooks_that_exist(path):
    existing = {other.name[:2] for other in PATHS}
    notebook = nbformat.read(path, as_version=4)
    missing = {f"cell {index}: notebook {number}" for index, cell in enumerate(notebook.cells)
               for number in referenced(cell.source) if number not in existing}
    assert not missing, f"{path.name} refers to notebooks that do not exist: {sorted(missing)}"


def test_references_are_found_in_their_usual_forms():
    assert referenced("notebook 02 builds it; notebooks 04 and 05; see 06-memory.ipynb; Notebook 07, 08 or 09") == {
        "02", "04", "05", "06", "07", "08", "09"}
    assert referenced("ring 03 and 2000 hello64") == set()
