"""``seeds/`` stands on its own in a fresh clone.

Every path it names lies inside the repository, and every notebook number in its
claim table either has a file in ``notebooks/`` or is marked "(planned)" (and a
notebook marked planned does not exist yet).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "seeds"

# A path-like token: in backticks, a markdown link target, or a bare absolute/home/parent path.
_BACKTICKED = re.compile(r"`([^`\s]+)`")
_LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")
_BARE_OUTSIDE = re.compile(r"(?:^|[\s(\"'])((?:\.\./|~/|/)[\w.\-/]+)")
_NOTEBOOK_REF = re.compile(r"\b(\d{2})\b(\s*\(planned\))?")


def _seed_files() -> list[Path]:
    files = sorted(p for p in SEEDS.rglob("*") if p.is_file())
    assert files, "seeds/ is empty"
    return files


def outside_paths(text: str, base: Path) -> list[str]:
    """Paths in ``text`` that lie outside the repository.

    A link target is resolved from ``base`` (the file's folder), as markdown does; a
    path in prose or backticks must stay inside whether read from ``base`` or from the
    repository's root, since a reader may take it either way.
    """
    found = []
    for pattern, starts in ((_LINK_TARGET, [base]), (_BACKTICKED, [base, ROOT]), (_BARE_OUTSIDE, [base, ROOT])):
        for token in pattern.findall(text):
            if "://" in token or "/" not in token:
                continue
            if token.startswith(("/", "~")) or any(
                    not (start / token).resolve().is_relative_to(ROOT) for start in starts):
                found.append(token)
    return sorted(set(found), key=found.index)


def notebook_problems(table_text: str, notebooks: Path) -> list[str]:
    """Notebook numbers in the claim table's last column that are missing and not marked planned."""
    problems = []
    rows = [line for line in table_text.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    assert rows, "no claim rows found in the table"
    for row in rows:
        cell = row.strip().strip("|").split("|")[-1]
        refs = _NOTEBOOK_REF.findall(cell)
        if not refs:
            problems.append(f"row without a notebook: {row}")
        for number, planned in refs:
            exists = any(notebooks.glob(f"{number}-*.ipynb"))
            if not exists and not planned:
                problems.append(f"notebook {number} does not exist and is not marked planned")
            if exists and planned:
                problems.append(f"notebook {number} exists but is marked planned")
    return problems


def test_seeds_name_no_path_outside_the_repository():
    for path in _seed_files():
        assert outside_paths(path.read_text(), path.parent) == [], path


def test_claim_table_names_existing_or_planned_notebooks():
    assert notebook_problems((SEEDS / "claims.md").read_text(), ROOT / "notebooks") == []


def test_claims_cite_the_source_by_title_and_date():
    text = (SEEDS / "claims.md").read_text()
    assert "FAQ: Alles über Virtualisierung" in text
    assert "3 August 2015" in text


def test_checks_catch_what_they_guard(tmp_path):
    # The checks themselves fail on the faults they guard against.
    assert outside_paths("see `../shared/seeds/faq.txt`", SEEDS) == ["../shared/seeds/faq.txt"]
    assert outside_paths("see /work/shared/seeds/faq.txt", SEEDS) == ["/work/shared/seeds/faq.txt"]
    assert outside_paths("see [faq](../../elsewhere.txt)", SEEDS) == ["../../elsewhere.txt"]
    assert outside_paths("see `notebooks/` and `tests/unit/test_seeds.py`", SEEDS) == []
    (tmp_path / "01-rings.ipynb").write_text("{}")
    table = "| # | c | e | n |\n|---|---|---|---|\n| 1 | c | e | 01, 04 |\n| 2 | c | e | 01 (planned) |\n"
    assert notebook_problems(table, tmp_path) == [
        "notebook 04 does not exist and is not marked planned",
        "notebook 01 exists but is marked planned",
    ]
