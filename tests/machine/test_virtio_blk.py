"""The virtio block device on real machines: blk64's patterns on both backends, and a full datastore that pauses."""

from __future__ import annotations

import os

import pytest
from backends import HAS_KVM

from labkit import Machine
from labkit.storage import Datastore, RawImage, open_image
from labkit.virtio.blk import (PARAMS_ADDRESS, PATTERNS, SECTOR_SIZE, blk64_console, blk64_parameters, blk64_qword,
                               blk64_sectors, block_devices)
from labkit.vmm.status import StatusKind

DISK = 1 << 20
CAPACITY = DISK // SECTOR_SIZE


def sector_ok(data: bytes, sector: int, seed: int) -> bool:
    return data == b"".join(blk64_qword(64 * sector + j, seed).to_bytes(8, "little") for j in range(64))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_blk64_writes_verifies_and_prints_the_same_checksum_on_every_backend(backend_name, pattern, tmp_path):
    path = tmp_path / "disk.raw"
    RawImage.create(path, DISK).close()
    with Machine("blk64", backend=backend_name, devices=block_devices(path)) as machine:
        machine.write_memory(PARAMS_ADDRESS, blk64_parameters(pattern, 8, 8, 7))
        result = machine.run(timeout=30)
        state = machine.device_state("virtio-blk")
    assert (result.status.kind, result.status.code) == (StatusKind.EXITED, 0), result.status
    assert result.console == blk64_console(pattern, 8, 8, 7, capacity=CAPACITY)
    assert (state["requests"], state["writes"], state["reads"], state["flushes"], state["errors"]) == (17, 8, 8, 1, 0)
    written = {first + offset for first in blk64_sectors(pattern, 8, 8, 7, CAPACITY) for offset in range(8)}
    data = path.read_bytes()
    for sector in range(CAPACITY):
        chunk = data[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE]
        assert sector_ok(chunk, sector, 7) if sector in written else chunk == bytes(SECTOR_SIZE), sector


def test_without_the_device_blk64_says_so(backend_name):
    with Machine("blk64", backend=backend_name) as machine:
        result = machine.run(timeout=10)
    assert (result.status.kind, result.status.code, result.console) == (StatusKind.EXITED, 2, "")


def fill_and_resume(backend_name: str, folder, requests: int = 48, fillers: int = 4, seed: int = 3) -> list[str]:
    """blk64 writes ``requests`` clusters into a qcow2 overlay on a datastore with room for a few: every pause
    is met by deleting one filler file from the datastore, until the guest has verified all it wrote (it reads
    every sector back).  Returns the pause messages; the overlay is then checked sector by sector."""
    store = Datastore(folder, capacity=64 << 20)
    store.create_raw("base.raw", DISK)
    store.create_overlay("vm.qcow2", "base.raw", cluster_size=4096)
    for number in range(fillers):
        with open(store.file(f"filler{number}"), "wb") as filler:
            filler.write(bytes(64 << 10))
    store.set_capacity(store.used() + (32 << 10))  # before the machine exists: its worker's copy sees it
    messages: list[str] = []
    answered: list[int] = []
    with Machine("blk64", backend=backend_name, devices=block_devices(lambda: store.open("vm.qcow2"))) as machine:
        machine.write_memory(PARAMS_ADDRESS, blk64_parameters("sequential", 8, requests, seed))
        for _attempt in range(fillers + 1):
            result = machine.run(timeout=60)
            if result.status.kind is not StatusKind.PAUSED:
                break
            messages.append(result.status.message)
            state = machine.device_state("virtio-blk")
            assert state["stalled"] == result.status.message
            answered.append(state["requests"])  # the first answers are the writes, in order
            os.unlink(store.file(f"filler{len(messages) - 1}"))  # free space
    assert (result.status.kind, result.status.code) == (StatusKind.EXITED, 0), result.status
    assert result.console == blk64_console("sequential", 8, requests, seed, capacity=CAPACITY)
    assert answered == sorted(set(answered)) and answered[-1] < requests  # each pause came later, mid-writes
    with open_image(store.file("vm.qcow2"), writable=False) as overlay:  # every write the guest was told of
        for sector in range(8 * requests):
            assert sector_ok(overlay.read(sector * SECTOR_SIZE, SECTOR_SIZE), sector, seed), sector
    return messages


def test_a_full_datastore_pauses_the_vm_and_it_resumes_losing_nothing(backend_name, tmp_path):
    messages = fill_and_resume(backend_name, tmp_path / "lun")
    assert len(messages) >= 2
    assert all("virtio-blk: a guest write to vm.qcow2 cannot be stored" in m and "datastore" in m
               and "free space and run it again" in m for m in messages)


def test_a_vm_paused_on_a_full_datastore_moves_to_the_other_backend_and_retries_there(backend_name, tmp_path):
    store = Datastore(tmp_path / "lun", capacity=64 << 20)
    store.create_raw("base.raw", DISK)
    store.create_overlay("vm.qcow2", "base.raw", cluster_size=4096)
    with open(store.file("filler"), "wb") as filler:
        filler.write(bytes(256 << 10))
    store.set_capacity(store.used() + (32 << 10))
    devices = block_devices(lambda: store.open("vm.qcow2"))
    with Machine("blk64", backend=backend_name, devices=devices) as machine:
        machine.write_memory(PARAMS_ADDRESS, blk64_parameters("sequential", 8, 24, 5))
        paused = machine.run(timeout=60)
        assert paused.status.kind is StatusKind.PAUSED and "vm.qcow2" in paused.status.message
        snapshot = machine.snapshot()
    os.unlink(store.file("filler"))
    other = {"kvm": "emu", "emu": "kvm" if HAS_KVM else "emu"}[backend_name]
    with Machine.from_snapshot(snapshot, backend=other, devices=devices) as moved:
        result = moved.run(timeout=60)
    assert (result.status.kind, result.status.code) == (StatusKind.EXITED, 0), result.status
    assert result.console == blk64_console("sequential", 8, 24, 5, capacity=CAPACITY)


def test_capacity_raised_after_the_machine_exists_reaches_its_disk_on_every_backend(backend_name, tmp_path):
    """The emulator opens the disk in its worker process: the capacity lives in the datastore's folder, so a
    ``set_capacity`` (and a delete) in the caller's process is what the worker's writes are checked against."""
    store = Datastore(tmp_path / "lun", capacity=64 << 20)
    store.create_raw("base.raw", DISK)
    store.create_overlay("vm.qcow2", "base.raw", cluster_size=4096)
    with open(store.file("filler"), "wb") as filler:
        filler.write(bytes(64 << 10))
    store.set_capacity(store.used() + (32 << 10))
    with Machine("blk64", backend=backend_name, devices=block_devices(lambda: store.open("vm.qcow2"))) as machine:
        machine.write_memory(PARAMS_ADDRESS, blk64_parameters("sequential", 8, 40, 9))
        first = machine.run(timeout=60)
        assert first.status.kind is StatusKind.PAUSED, first.status
        store.delete("filler")  # 64 KiB freed: the VM gets further, then stops again
        second = machine.run(timeout=60)
        assert second.status.kind is StatusKind.PAUSED, second.status
        assert machine.device_state("virtio-blk")["requests"] > 0
        store.set_capacity(store.capacity + (1 << 20))  # after the machine (and its worker) exists
        assert store.wait_for_space(4096, timeout=1)
        result = machine.run(timeout=60)
    assert (result.status.kind, result.status.code) == (StatusKind.EXITED, 0), result.status
    assert result.console == blk64_console("sequential", 8, 40, 9, capacity=CAPACITY)
