"""Progress for work that takes longer than about two seconds: a bar appears, shorter work shows nothing.

:func:`tracked` wraps the loops a notebook waits on (the classifier's table, the
probes of notebook 03, the kernel and technique comparisons), one step per run.
With tqdm installed (labkit's ``lab`` extra) it is ``tqdm.auto``'s bar: a widget
in a notebook, a text line on stderr in a terminal, shown only once the loop has
run :data:`DELAY_S` seconds.  Without tqdm the items pass through unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Iterable, Iterator, TypeVar

Item = TypeVar("Item")

DELAY_S = 2.0
"""A loop shows its bar after this many seconds (shorter ones show nothing)."""


def tracked(items: Iterable[Item], description: str, total: int | None = None, *,
            delay_s: float = DELAY_S) -> Iterator[Item]:
    """``items``, one by one, with a progress bar labelled ``description`` once ``delay_s`` seconds have passed."""
    if importlib.util.find_spec("tqdm") is None:
        yield from items
        return
    from tqdm.auto import tqdm

    with tqdm(items, desc=description, total=total, delay=delay_s, leave=False, unit="run") as bar:
        yield from bar
