"""Kill a writer (``crash_writer.py``) at a random moment and judge what it leaves (the test and the benchmark)."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import crash_writer
from qemu_tools import qemu_check

from labkit.storage import RawImage, check_image, create_overlay, open_image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclasses.dataclass(frozen=True)
class KillRun:
    seed: int
    cluster_size: int
    delay: float
    acknowledged: int        # writes and discards that returned before the kill
    qemu_exit: int           # qemu-img check: 0 clean, 3 leaks, 2 corrupt
    labkit_exit: int
    lost: int                # acknowledged blocks that did not read back


def base_image(folder: Path) -> Path:
    path = folder / "base.raw"
    if not path.exists():
        image = RawImage.create(path, crash_writer.DISK)
        image.write(0, random.Random(99).randbytes(crash_writer.DISK))
        image.close()
    return path


def kill_run(folder: Path, seed: int, rng: random.Random) -> KillRun:
    """One writer killed with SIGKILL after a random delay (0-0.8 s after its first write returned)."""
    base = base_image(folder)
    cluster_size = rng.choice([512, 4096, 65536])
    image = folder / f"overlay{seed}.qcow2"
    log = folder / f"overlay{seed}.log"
    create_overlay(image, base, cluster_size=cluster_size)
    log.write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    writer = subprocess.Popen([sys.executable, str(HERE / "crash_writer.py"), str(image), str(log), str(seed)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while log.stat().st_size == 0:  # let it start (imports) and write once
            if writer.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the writer did not start: {writer.stderr.read().decode() if writer.stderr else ''}")
            time.sleep(0.005)
        delay = rng.uniform(0, 0.8)
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
        if writer.stderr:
            writer.stderr.close()
    acknowledged = log.stat().st_size
    qemu_exit, _ = qemu_check(str(image))
    labkit_exit = check_image(image).exit_code
    lost = count_lost(image, base, seed, acknowledged, cluster_size) if labkit_exit in (0, 3) else -1
    return KillRun(seed, cluster_size, delay, acknowledged, qemu_exit, labkit_exit, lost)


def count_lost(image: Path, base: Path, seed: int, acknowledged: int, cluster_size: int) -> int:
    """Replay the acknowledged operations on a model; blocks the in-flight operation touches are not judged."""
    model = bytearray(base.read_bytes())
    unknown: set[int] = set()
    for index, (kind, offset, length, data_seed) in enumerate(crash_writer.operations(seed)):
        blocks = range(offset // crash_writer.BLOCK, (offset + length) // crash_writer.BLOCK)
        if index == acknowledged:
            unknown.update(blocks)
            break
        if kind == "write":
            model[offset:offset + length] = crash_writer.data(data_seed, length)
        else:  # a discard frees the whole clusters inside its range; they read as zeros (over the backing too)
            first, end = -(-offset // cluster_size) * cluster_size, (offset + length) // cluster_size * cluster_size
            if end > first:
                model[first:end] = bytes(end - first)
    with open_image(image) as opened:  # type: ignore[attr-defined]
        current = opened.read(0, crash_writer.DISK)
    lost = 0
    for block in range(crash_writer.DISK // crash_writer.BLOCK):
        if block in unknown:
            continue
        start = block * crash_writer.BLOCK
        if current[start:start + crash_writer.BLOCK] != model[start:start + crash_writer.BLOCK]:
            lost += 1
    return lost
