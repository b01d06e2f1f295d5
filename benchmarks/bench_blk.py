"""Sequential 1 MiB writes through the virtio block device, against plain ``os.pwrite`` and against ``qemu-io``.

Each case writes ``--mib`` MiB in 1 MiB requests from offset 0 upwards, then flushes (fsync), into a fresh
file in one temporary folder (the same file system for all):

- ``device -> raw``: a host-side driver (``labkit.virtio.blk_driver.BlockDriver``) puts each request on the
  virtqueue in a 2 MiB host "guest RAM" and notifies the device (``VirtioBlock``): the device's ring
  checks, header, bounds checks and the write into a raw image (``labkit.storage.RawImage``); then a
  FLUSH request.  No guest CPU: under PVM the guest's own ring-0 loop that fills 1 MiB would cost ~1 s
  of emulated instructions, which measures KVM's instruction emulator, not the device.
- ``os.pwrite -> raw``: the same bytes with ``os.pwrite`` into a preallocated file, then ``os.fsync``: the baseline.
- ``device -> qcow2``: as the first, into a labkit qcow2 overlay (64 KiB clusters) over a raw base.
- ``qemu-io -> qcow2``: ``qemu-io -t writeback`` writing the same 1 MiB requests into an overlay made by
  ``qemu-img create -b`` (one process; its start-up is timed too, as ``qemu-io -c 'open'`` alone, and
  subtracted), then ``flush``.

Reported: MB/s (10**6 bytes) of each, median of ``--repeat`` runs, and the ratios device/pwrite and
device/qemu-io.  ``python benchmarks/bench_blk.py [--mib 128] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.memory import GuestMemory  # noqa: E402
from labkit.storage import RawImage, create_overlay, open_image  # noqa: E402
from labkit.virtio.blk import VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT, VirtioBlock  # noqa: E402
from labkit.virtio.blk_driver import BlockDriver, Request  # noqa: E402

MIB = 1 << 20
DATA = 0x100000


def through_device(disk, mib: int) -> float:
    ram = bytearray(2 * MIB + 0x100000)
    memory = GuestMemory([(0, memoryview(ram), False)])
    ram[DATA:DATA + MIB] = os.urandom(MIB)
    device = VirtioBlock(memory, disk, pause=print, on_resume=print)
    driver = BlockDriver(memory, device)
    started = time.perf_counter()
    for index in range(mib):
        assert driver.submit([Request(VIRTIO_BLK_T_OUT, index * MIB // 512, DATA, MIB)]) == [0]
    assert driver.submit([Request(VIRTIO_BLK_T_FLUSH, 0)]) == [0]
    elapsed = time.perf_counter() - started
    device.close()
    return elapsed


def device_raw(folder: Path, mib: int) -> float:
    path = folder / "device.raw"
    RawImage.create(path, mib * MIB).close()
    try:
        return through_device(open_image(str(path), writable=True), mib)
    finally:
        path.unlink()


def pwrite_raw(folder: Path, mib: int) -> float:
    path = folder / "pwrite.raw"
    RawImage.create(path, mib * MIB).close()
    data = os.urandom(MIB)
    fd = os.open(path, os.O_WRONLY)
    try:
        started = time.perf_counter()
        for index in range(mib):
            os.pwrite(fd, data, index * MIB)
        os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()


def device_qcow2(folder: Path, mib: int) -> float:
    base, overlay = folder / "base.raw", folder / "device.qcow2"
    RawImage.create(base, mib * MIB).close()
    create_overlay(str(overlay), str(base))
    try:
        return through_device(open_image(str(overlay), writable=True), mib)
    finally:
        overlay.unlink()
        base.unlink()


def qemu_io_qcow2(folder: Path, mib: int) -> float:
    base, overlay = folder / "base.raw", folder / "qemu.qcow2"
    RawImage.create(base, mib * MIB).close()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", str(base),
                    "-F", "raw", str(overlay)], check=True)
    commands = [arg for index in range(mib) for arg in ("-c", f"write -P {index % 251} {index * MIB} 1M")]
    try:
        started = time.perf_counter()
        subprocess.run(["qemu-io", "-t", "writeback", "-f", "qcow2", *commands, "-c", "flush", str(overlay)],
                       check=True, stdout=subprocess.DEVNULL)
        whole = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "flush", str(overlay)], check=True,
                       stdout=subprocess.DEVNULL)
        return whole - (time.perf_counter() - started)  # without the process's start-up
    finally:
        overlay.unlink()
        base.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "blk.json"))
    args = parser.parse_args()
    cases = {"device -> raw": device_raw, "os.pwrite -> raw": pwrite_raw, "device -> qcow2": device_qcow2}
    if shutil.which("qemu-io") and shutil.which("qemu-img"):
        cases["qemu-io -> qcow2"] = qemu_io_qcow2
    times: dict[str, list[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory(prefix="labkit-bench-blk-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        for _ in range(args.repeat):  # interleaved, so a busy moment of the shared host hits every case
            for name, case in cases.items():
                times[name].append(case(Path(tmp), args.mib))
    rates = {name: args.mib * MIB / 1e6 / statistics.median(values) for name, values in times.items()}
    for name, rate in rates.items():
        print(f"{name:20} {rate:8.1f} MB/s   (runs: {', '.join(f'{t:.3f}' for t in times[name])} s)")
    ratios = {"device/pwrite (raw)": rates["device -> raw"] / rates["os.pwrite -> raw"]}
    if "qemu-io -> qcow2" in rates:
        ratios["device/qemu-io (qcow2)"] = rates["device -> qcow2"] / rates["qemu-io -> qcow2"]
    for name, ratio in ratios.items():
        print(f"{name:24} {ratio:.2f}")
    load = os.getloadavg()[0]
    print(f"load average {load:.1f}")
    Path(args.results).write_text(json.dumps({"mib": args.mib, "repeat": args.repeat, "mb_per_s": rates,
                                              "ratios": ratios, "seconds": times, "load": load}, indent=1) + "\n")


if __name__ == "__main__":
    main()
