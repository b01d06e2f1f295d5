"""Finding processes from /proc, for tests that check nothing is left behind."""

from __future__ import annotations

import os


def session_processes(session: int) -> list[int]:
    """Processes whose session id is ``session`` (a server started with ``start_new_session`` and its children)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat_file:
                    stat = stat_file.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[4]) == session:
                found.append(int(name))
    return found
