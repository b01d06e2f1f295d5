"""Run every notebook as a Binder user would, inside the environment built from ``binder/``; report memory.

Run by tests/classroom/test_binder.py with the fresh virtual environment's Python,
through ``binder/start`` (which sets ``LABKIT_BACKEND=emu``):

    binder/start VENV/bin/python tests/classroom/binder_run.py NOTEBOOKS_DIR OUT_DIR

Each notebook runs top to bottom in its own kernel, one after another, and every kernel
stays alive until the last notebook has run: JupyterLab keeps a notebook's kernel running
when its tab is closed, so a student who works through the notebooks one by one ends with
all their kernels alive.  Then every kernel is shut down (and its labkit workers die with it).

What is measured: a container's memory limit (a cgroup's) charges each resident page
once, however many processes map it.  Summing each process's resident set (VmRSS)
counts a page shared after ``fork`` once per process that maps it: labkit's emulator
workers are forked from the kernel, so every worker's VmRSS repeats the kernel's
Python, numpy and matplotlib pages, and notebook 07's 16 workers made that sum about
five times what they use (DECISIONS).  So a thread samples, every 50 ms, the
proportional set size (``Pss`` of ``/proc/PID/smaps_rollup``: a page mapped by n
processes counts 1/n in each) of this process's descendants (the kernels and their
workers), summed: each page they share among themselves counts once in total.  The
summed VmRSS is sampled too and reported beside it, and at the end of each notebook
the distinct physical pages the kernels and workers map (``/proc/PID/pagemap``, which
shows page frame numbers to root only) are counted once each, as a cgroup would.

Writes the executed notebooks and ``report.json`` to OUT_DIR: the peaks of the whole
run (``pss_bytes``, ``rss_bytes``), each notebook's own peak while it ran (its kernel and
workers: ``notebooks``), the distinct pages after each notebook (``unique_bytes``, or
``None`` where page frame numbers are hidden), and the seconds per notebook.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import nbformat
import numpy  # matplotlib's dependency: in the lab's environment
from nbclient import NotebookClient
from nbclient.util import run_sync

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too
from processes import children_of, descendants  # noqa: E402

SAMPLE_S = 0.05
IDLE_SAMPLE_S = 1.0
PAGE = 4096
PRESENT = numpy.uint64(1 << 63)
PFN_MASK = numpy.uint64((1 << 55) - 1)
VSYSCALL = 0xFFFFFFFFFF600000


def _field_bytes(path: str, field: str) -> int:
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """VmRSS: every page the process maps, shared or not."""
    return _field_bytes(f"/proc/{pid}/status", "VmRSS:")


def pss_bytes(pid: int) -> int:
    """Pss: each page the process maps divided by the number of processes mapping it."""
    return _field_bytes(f"/proc/{pid}/smaps_rollup", "Pss:")


def page_frames(pid: int) -> list[numpy.ndarray]:
    """The physical page frame numbers of the pages ``pid`` has resident (all zero where the kernel hides them)."""
    frames = []
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
            for line in maps:
                start, end = (int(bound, 16) for bound in line.split(None, 1)[0].split("-"))
                if start >= VSYSCALL:
                    continue
                pagemap.seek(start // PAGE * 8)
                entries = numpy.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=numpy.uint64)
                frames.append(entries[(entries & PRESENT) != 0] & PFN_MASK)
    except OSError:
        pass  # the process ended while being read
    return frames


def unique_bytes(pids: list[int]) -> int | None:
    """Distinct resident physical pages of ``pids``, in bytes (a cgroup's count); None without root."""
    frames = numpy.unique(numpy.concatenate([numpy.zeros(0, numpy.uint64),
                                             *(part for pid in pids for part in page_frames(pid))]))
    if frames.size and not frames.any():
        return None  # page frame numbers read as 0: not root (CAP_SYS_ADMIN)
    return int(frames.size) * PAGE


class PeakMemory(threading.Thread):
    """The largest summed Pss (and summed VmRSS) over this process's descendants, overall and per kernel.

    Reading ``smaps_rollup`` walks a process's page tables, about 10 ms for a kernel here,
    so reading twenty processes every 50 ms would keep a core busy and slow the notebooks
    down.  The kernel now running and its workers are read every sample; the other
    kernels (their notebooks have run: idle) and anything below them are read again
    every :data:`IDLE_SAMPLE_S`, and their last values are added in between.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pss = self.rss = 0
        self.processes_at_peak = 0
        self.current_kernel = 0
        self.kernel_pss = self.kernel_rss = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def watch(self, kernel: int) -> None:
        """From now on, also keep the peaks of ``kernel`` and its workers alone."""
        with self.lock:
            self.current_kernel, self.kernel_pss, self.kernel_rss = kernel, 0, 0

    def run(self) -> None:
        idle: dict[int, tuple[int, int]] = {}
        idle_read = 0.0
        while not self.stopping.wait(SAMPLE_S):
            children = children_of()
            pids = descendants(os.getpid(), children)
            with self.lock:
                kernel = self.current_kernel
            mine = [kernel, *descendants(kernel, children)] if kernel else []
            if time.monotonic() - idle_read >= IDLE_SAMPLE_S:
                idle = {pid: (pss_bytes(pid), rss_bytes(pid)) for pid in pids if pid not in mine}
                idle_read = time.monotonic()
            idle = {pid: value for pid, value in idle.items() if pid in pids and pid not in mine}
            now = {pid: (pss_bytes(pid), rss_bytes(pid)) for pid in mine}
            with self.lock:
                total_pss = sum(pss for pss, _ in [*idle.values(), *now.values()])
                if total_pss > self.pss:
                    self.pss, self.processes_at_peak = total_pss, len(idle) + len(now)
                self.rss = max(self.rss, sum(rss for _, rss in [*idle.values(), *now.values()]))
                if kernel == self.current_kernel:
                    self.kernel_pss = max(self.kernel_pss, sum(pss for pss, _ in now.values()))
                    self.kernel_rss = max(self.kernel_rss, sum(rss for _, rss in now.values()))


def main(notebooks: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meter = PeakMemory()
    meter.start()
    clients, seconds, per_notebook, unique, pss_now = [], {}, {}, {}, {}
    try:
        for path in sorted(notebooks.glob("*.ipynb")):
            notebook = nbformat.read(path, as_version=4)
            client = NotebookClient(notebook, kernel_name="python3", timeout=120, allow_errors=True,
                                    resources={"metadata": {"path": str(path.parent)}})
            clients.append(client)
            started = time.perf_counter()
            client.km = client.create_kernel_manager()
            client.start_new_kernel()
            client.start_new_kernel_client()
            meter.watch(client.km.provisioner.pid)
            client.execute(cleanup_kc=False)  # the kernel stays alive; shut down at the end
            seconds[path.name] = time.perf_counter() - started
            time.sleep(4 * SAMPLE_S)
            with meter.lock:
                per_notebook[path.name] = {"pss_bytes": meter.kernel_pss, "rss_bytes": meter.kernel_rss}
            pids = descendants(os.getpid())
            unique[path.name] = unique_bytes(pids)
            pss_now[path.name] = sum(pss_bytes(pid) for pid in pids)
            nbformat.write(notebook, out / path.name)
            print(f"{path.name}: {seconds[path.name]:.1f} s, own peak Pss {meter.kernel_pss / 1e6:.0f} MB "
                  f"(VmRSS {meter.kernel_rss / 1e6:.0f} MB); all kernels now: {meter.pss / 1e6:.0f} MB peak Pss",
                  flush=True)
    finally:
        meter.stopping.set()
        meter.join()
        for client in clients:
            if client.km is not None:
                run_sync(client.km.shutdown_kernel)(now=True)
    report = {"pss_bytes": meter.pss, "rss_bytes": meter.rss, "processes_at_peak": meter.processes_at_peak,
              "notebooks": per_notebook, "unique_bytes": unique, "pss_bytes_then": pss_now, "seconds": seconds,
              "backend": os.environ.get("LABKIT_BACKEND"), "python": sys.executable}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
