"""A titled table that a notebook shows as HTML and ``print`` shows as plain text.

It sits at the bottom of labkit's layers (next to ``errors``) because both the
monitors (a translated block beside its guest code, consoles line by line) and
the figures (``labkit.viz``) make tables; ``rows`` holds the plain data for tests.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any


@dataclass
class Table:
    """A titled table: shown as HTML in a notebook, as text by ``print``."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    code_rows: tuple[str, ...] = ()
    """Rows (named by their first cell) shown in a monospace font, line breaks kept: console output."""

    def __str__(self) -> str:
        lines = [self.title]
        widths = [max(len(line) for cell in column for line in (cell.splitlines() or [""]))
                  for column in zip(self.header, *self.rows)]
        for row in [self.header, *self.rows]:
            cells = [cell.splitlines() or [""] for cell in row]
            for depth in range(max(len(cell) for cell in cells)):
                parts = [(cell[depth] if depth < len(cell) else "").ljust(width)
                         for cell, width in zip(cells, widths)]
                lines.append("  ".join(parts).rstrip())
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's text/plain
        printer.text(str(self))

    def _repr_html_(self) -> str:
        def cell(text: str, tag: str, code: bool = False) -> str:
            body = html.escape(text)
            if code:
                body = f"<pre style='margin:0;text-align:left'>{body}</pre>"
            return f"<{tag} style='text-align:left;vertical-align:top'>{body}</{tag}>"

        head = "".join(cell(text, "th") for text in self.header)
        body = "".join("<tr>" + "".join(cell(text, "td", index > 0 and row[0] in self.code_rows)
                                        for index, text in enumerate(row)) + "</tr>"
                       for row in self.rows)
        note = f"<p style='font-size:90%'>{html.escape(self.note)}</p>" if self.note else ""
        return (f"<div class='labkit-table'><b>{html.escape(self.title)}</b>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}</div>")
