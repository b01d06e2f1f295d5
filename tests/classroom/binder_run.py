"""Run every notebook as a Binder user would, inside the environment built from ``binder/``; report memory.

Run by tests/classroom/test_binder.py with the fresh virtual environment's Python,
through ``binder/start`` (which sets ``LABKIT_BACKEND=emu``):

    binder/start VENV/bin/python tests/classroom/binder_run.py NOTEBOOKS_DIR OUT_DIR

Each notebook runs top to bottom in its own kernel, one after another, and its kernel is
shut down before the next one starts, as when a student works through the notebooks one
at a time and closes each (Binder's idle culling does the same to a forgotten one).  With
every kernel kept alive to the end, notebooks 00-08 together peaked at 2.44 GB on
2026-11-30, and one at a time the heaviest still peaks at about 2.0 GB: the open limit.  A thread samples /proc every
50 ms: the resident memory of this process's descendants (the kernels and their
labkit worker processes), summed.  Writes the executed notebooks and
``report.json`` (peak bytes, seconds per notebook) to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

SAMPLE_S = 0.05


def children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat_file:
                    stat = stat_file.read()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(parent, []).append(int(name))
    return children


def descendants(root: int) -> list[int]:
    children, found, todo = children_of(), [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory(threading.Thread):
    """The largest sum of VmRSS over this process's descendants seen so far (an upper bound: shared pages count twice)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.processes_at_peak = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_S):
            pids = descendants(os.getpid())
            total = sum(rss_bytes(pid) for pid in pids)
            if total > self.peak:
                self.peak, self.processes_at_peak = total, len(pids)


def main(notebooks: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meter = PeakMemory()
    meter.start()
    clients, seconds = [], {}
    try:
        for path in sorted(notebooks.glob("*.ipynb")):
            notebook = nbformat.read(path, as_version=4)
            client = NotebookClient(notebook, kernel_name="python3", timeout=120, allow_errors=True,
                                    resources={"metadata": {"path": str(path.parent)}})
            started = time.perf_counter()
            client.execute(cleanup_kc=False)
            seconds[path.name] = time.perf_counter() - started
            nbformat.write(notebook, out / path.name)
            client.km.shutdown_kernel(now=True)
        time.sleep(4 * SAMPLE_S)
    finally:
        meter.stopping.set()
        meter.join()
        for client in clients:
            client.km.shutdown_kernel(now=True)
    report = {"peak_bytes": meter.peak, "processes_at_peak": meter.processes_at_peak, "seconds": seconds,
              "backend": os.environ.get("LABKIT_BACKEND"), "python": sys.executable}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
