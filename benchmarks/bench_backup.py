"""How long each host-level backup stops a running VM, and how fast the in-guest agent sends files.

- **VM stopped**: ``labkit.backup.lesson.stop_times`` (notebook 09's function) at ``--sizes`` MiB per backend:
  a VADP-style backup (two stuns: snapshot, commit) against a cold copy (the VM stopped for the whole copy) of
  the same running VM's disk. Reported: each, and the ratio cold copy / VADP (above 1: VADP stops the VM less).
- **Agent rate**: ``labkit.backup.agent.agent_backup`` sending ``--files`` files of 2 MiB (LKFS, a raw disk)
  over the virtio console, against ``shutil.copyfile`` of a file holding the same bytes (the host copying
  them itself), same folder, same run. Reported: MB/s (10**6 bytes) of each, medians of ``--repeat``.

``python benchmarks/bench_backup.py [--sizes 64 256] [--files 8] [--repeat 3] [--backend kvm emu]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.backup.agent import agent_backup  # noqa: E402
from labkit.backup.files import format_files  # noqa: E402
from labkit.backup.lesson import sample_files, stop_times  # noqa: E402
from labkit.storage import RawImage  # noqa: E402

MIB = 1 << 20


def agent_rate(folder: str, files: int, repeat: int, backend: str) -> tuple[float, float]:
    data = sample_files({f"file{i}.bin": 2 * MIB for i in range(files)})
    disk = os.path.join(folder, "agent.raw")
    RawImage.create(disk, (2 * files + 2) * MIB).close()
    with RawImage.open(disk, writable=True) as image:
        format_files(image, data)
    plain = os.path.join(folder, "plain.bin")
    with open(plain, "wb") as handle:
        handle.write(b"".join(data.values()))
    agent_s, copy_s = [], []
    for number in range(repeat):
        backup = agent_backup(disk, os.path.join(folder, f"agent-{number}.lkfs"), backend=backend)
        agent_s.append(backup.elapsed_s)
        started = time.perf_counter()
        shutil.copyfile(plain, os.path.join(folder, f"copy-{number}.bin"))
        copy_s.append(time.perf_counter() - started)
    total = files * 2 * MIB
    return total / statistics.median(agent_s) / 1e6, total / statistics.median(copy_s) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", nargs="+", default=["kvm", "emu"])
    arguments = parser.parse_args()
    for backend in arguments.backend:
        folder = tempfile.mkdtemp(prefix="labkit-bench-backup-")
        try:
            stops = stop_times(os.path.join(folder, "stops"), tuple(size * MIB for size in arguments.sizes),
                               backend=backend)
            for stop in stops:
                vadp, cold = stop.vadp.stopped_s, stop.cold.stopped_s
                print(f"{backend}: {stop.disk_bytes // MIB} MiB disk: VADP stopped the VM {vadp * 1e3:.0f} ms "
                      f"(stuns {', '.join(f'{s * 1e3:.0f}' for s in stop.vadp.stuns_s)} ms; copy "
                      f"{stop.vadp.copy_s * 1e3:.0f} ms with {stop.vadp.writes_during_copy} guest writes into the "
                      f"delta), cold copy {cold * 1e3:.0f} ms: cold/VADP {cold / vadp:.2f}x")
            agent, copy = agent_rate(folder, arguments.files, arguments.repeat, backend)
            print(f"{backend}: agent {agent:.0f} MB/s over the virtio console, shutil.copyfile {copy:.0f} MB/s: "
                  f"{agent / copy:.2f}x")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
