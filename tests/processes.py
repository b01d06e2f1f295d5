"""Finding processes from /proc, for tests that check nothing is left behind."""

from __future__ import annotations

import os


def _stats() -> dict[int, list[str]]:
    """Each living process's ``/proc/PID/stat`` fields after its name (state, ppid, pgrp, session, ...)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat_file:
                    stat = stat_file.read()
            except OSError:
                continue  # it ended while we looked
            stats[int(name)] = stat[stat.rindex(")") + 2:].split()
    return stats


def session_processes(session: int) -> list[int]:
    """Processes whose session id is ``session`` (a server started with ``start_new_session`` and its children)."""
    return [pid for pid, fields in _stats().items() if int(fields[3]) == session]


def children_of() -> dict[int, list[int]]:
    """Parent pid -> the pids of its living children."""
    children: dict[int, list[int]] = {}
    for pid, fields in _stats().items():
        children.setdefault(int(fields[1]), []).append(pid)
    return children


def descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """Every living process below ``root`` (children, their children...)."""
    children = children_of() if children is None else children
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
