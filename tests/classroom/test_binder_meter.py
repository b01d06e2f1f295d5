"""The Binder check's meter counts a page shared after ``fork`` once, as a container's cgroup does.

tests/classroom/test_binder.py asserts on summed Pss (plus the pages shared with processes
outside the run) because summed VmRSS counts a page once per process that maps it; labkit's
emulator workers are forked from the kernel.  This checks that claim on a process of known
size: a parent with 64 MiB of its own touched memory forks two children that only read it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from binder_run import descendants, pss_bytes, rss_bytes, unique_bytes  # noqa: E402

pytestmark = pytest.mark.unit

MiB = 1 << 20
SHARED = 64 * MiB


def test_pss_and_distinct_pages_count_a_forked_page_once_and_rss_counts_it_per_process():
    data = bytearray(b"\x5a") * SHARED  # written, so resident, and private to this process until it forks
    readers = []
    try:
        for _ in range(2):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: read every page (no copy), say so, wait to be killed
                os.close(read)
                checksum = sum(data[::4096])
                os.write(write, checksum.to_bytes(8, "little"))
                signal.pause()
                os._exit(0)
            os.close(write)
            assert int.from_bytes(os.read(read, 8), "little") == sum(data[::4096])
            os.close(read)
            readers.append(pid)
        pids = [os.getpid(), *readers]
        assert set(readers) <= set(descendants(os.getpid()))
        rss = sum(rss_bytes(pid) for pid in pids)
        pss = sum(pss_bytes(pid) for pid in pids)
        unique = unique_bytes(pids)
        own = rss_bytes(os.getpid())
        # Each child maps the 64 MiB too: summed VmRSS has them three times, Pss and distinct pages once.
        assert rss >= 3 * SHARED
        assert SHARED <= pss < own + 16 * MiB, f"Pss {pss / MiB:.0f} MiB for {own / MiB:.0f} MiB of this process"
        assert unique is not None, "run as root: /proc/PID/pagemap shows frame numbers to root only"
        assert pss <= unique < own + 16 * MiB, f"{unique / MiB:.0f} MiB of distinct pages, Pss {pss / MiB:.0f} MiB"
    finally:
        for pid in readers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
