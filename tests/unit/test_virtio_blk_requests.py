"""labkit.virtio.blk: the virtio-blk request layout (virtio 1.x 5.2), its checks, and the pause on a full disk."""

from __future__ import annotations

import os
import random
import struct

import pytest

from labkit.errors import ConfigError, DatastoreFull
from labkit.memory import GuestMemory
from labkit.storage import Datastore
from labkit.virtio import transport as t
from labkit.virtio.blk import (DEVICE_ID_BLOCK, HEADER, REQUESTQ, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
                               VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
                               VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock, block_devices)
from labkit.virtio.blk_driver import BlockDriver, Request
from labkit.virtio.ring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Descriptor

pytestmark = pytest.mark.unit

RAM = 2 << 20
CASES = 100
DATA = 0x100000
DISK = 64 * SECTOR_SIZE


class MemoryDisk:
    """A disk in a bytearray; with ``limit``, a write reaching past ``limit`` bytes raises DatastoreFull
    (as a datastore refuses growth), leaving the disk unchanged."""

    filename = "memory.img"

    def __init__(self, size: int = DISK, limit: int | None = None, writable: bool = True):
        self.data = bytearray(size)
        self.size = size
        self.limit = limit
        self.writable = writable
        self.flushes = 0
        self.closed = False

    def read(self, offset: int, length: int) -> bytes:
        assert 0 <= offset <= offset + length <= self.size  # the device checked; a test fails if it did not
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data) -> None:
        assert 0 <= offset <= offset + len(data) <= self.size
        if self.limit is not None and offset + len(data) > self.limit:
            raise DatastoreFull(f"{self.filename}: full", needed=offset + len(data) - self.limit, available=0)
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


class Machine:
    """What a machine gives the device: pause and on_resume, recorded."""

    def __init__(self):
        self.pauses: list[str] = []
        self.resume: list = []

    def run(self) -> None:
        callbacks = list(self.resume)
        self.resume.clear()  # in place: the device holds self.resume.append
        for callback in callbacks:
            callback()


def setup(disk: MemoryDisk | None = None) -> tuple[bytearray, MemoryDisk, VirtioBlock, BlockDriver, Machine]:
    ram = bytearray(RAM)
    memory = GuestMemory([(0, memoryview(ram), False)])
    disk = disk or MemoryDisk()
    machine = Machine()
    device = VirtioBlock(memory, disk, serial=b"labkit-disk-0", pause=machine.pauses.append,
                         on_resume=machine.resume.append)
    return ram, disk, device, BlockDriver(memory, device), machine


def test_the_registers_say_block_device_with_its_capacity():
    _ram, _disk, device, _driver, _machine = setup()
    assert device.read(t.DEVICE_ID, 4) == DEVICE_ID_BLOCK == 2
    device.write(t.DEVICE_FEATURES_SEL, 4, 0)
    low = device.read(t.DEVICE_FEATURES, 4)
    assert low & VIRTIO_BLK_F_FLUSH and not low & VIRTIO_BLK_F_RO
    assert device.read(t.CONFIG, 8) == DISK // SECTOR_SIZE == 64  # capacity, le64, in 512-byte sectors
    assert (device.read(t.CONFIG, 4), device.read(t.CONFIG + 4, 4)) == (64, 0)
    assert device.read(t.CONFIG + 3, 4) == 0  # unaligned: not a field
    device.write(t.CONFIG, 4, 99)  # read-only
    assert device.read(t.CONFIG, 8) == 64
    ram = bytearray(RAM)
    read_only = VirtioBlock(GuestMemory([(0, memoryview(ram), False)]), MemoryDisk(writable=False),
                            pause=print, on_resume=print)
    assert read_only.read(t.DEVICE_FEATURES, 4) & VIRTIO_BLK_F_RO


def test_write_flush_read_and_get_id():
    ram, disk, device, driver, _machine = setup()
    pattern = bytes(random.Random(1).randrange(256) for _ in range(4 * SECTOR_SIZE))
    ram[DATA:DATA + len(pattern)] = pattern
    assert driver.submit([Request(VIRTIO_BLK_T_OUT, 3, DATA, len(pattern)), Request(VIRTIO_BLK_T_FLUSH, 0)]) == [0, 0]
    assert disk.data[3 * SECTOR_SIZE:7 * SECTOR_SIZE] == pattern and disk.flushes == 1
    assert driver.submit([Request(VIRTIO_BLK_T_IN, 3, DATA + 0x10000, len(pattern), into_guest=True),
                          Request(VIRTIO_BLK_T_GET_ID, 0, DATA + 0x20000, 20, into_guest=True)]) == [0, 0]
    assert ram[DATA + 0x10000:DATA + 0x10000 + len(pattern)] == pattern
    assert ram[DATA + 0x20000:DATA + 0x20000 + 20] == b"labkit-disk-0".ljust(20, b"\0")
    used = [driver.queue.used_element(slot) for slot in range(4)]
    assert [length for _head, length in used] == [1, 1, len(pattern) + 1, 21]  # bytes written into each chain
    assert (device.requests, device.writes, device.reads, device.flushes, device.errors) == (4, 1, 1, 1, 0)


@pytest.mark.parametrize("request_, status", [
    (Request(VIRTIO_BLK_T_OUT, 64, DATA, SECTOR_SIZE), VIRTIO_BLK_S_IOERR),           # first sector past the end
    (Request(VIRTIO_BLK_T_OUT, 63, DATA, 2 * SECTOR_SIZE), VIRTIO_BLK_S_IOERR),       # runs past the end
    (Request(VIRTIO_BLK_T_OUT, (1 << 64) - 1, DATA, SECTOR_SIZE), VIRTIO_BLK_S_IOERR),  # sector * 512 overflows
    (Request(VIRTIO_BLK_T_IN, (1 << 55), DATA, SECTOR_SIZE, True), VIRTIO_BLK_S_IOERR),
    (Request(VIRTIO_BLK_T_OUT, 0, DATA, 100), VIRTIO_BLK_S_IOERR),                    # not whole sectors
    (Request(VIRTIO_BLK_T_IN, 0, DATA, 513, True), VIRTIO_BLK_S_IOERR),
    (Request(VIRTIO_BLK_T_OUT, 0, DATA, SECTOR_SIZE, True), VIRTIO_BLK_S_IOERR),      # write data device-writable
    (Request(VIRTIO_BLK_T_IN, 0, DATA, SECTOR_SIZE, False), VIRTIO_BLK_S_IOERR),      # read data device-readable
    (Request(VIRTIO_BLK_T_FLUSH, 0, DATA, SECTOR_SIZE, True), VIRTIO_BLK_S_IOERR),    # flush with data
    (Request(VIRTIO_BLK_T_GET_ID, 0, DATA, 20, False), VIRTIO_BLK_S_IOERR),
    (Request(11, 0, DATA, 16), VIRTIO_BLK_S_UNSUPP),                                  # DISCARD: not offered
    (Request(0xDEADBEEF, 0), VIRTIO_BLK_S_UNSUPP),
])
def test_a_bad_request_gets_an_error_status_and_touches_nothing(request_, status):
    ram, disk, device, driver, _machine = setup()
    ram[DATA:DATA + 0x1000] = b"\xa5" * 0x1000
    disk.data[:] = b"\x5a" * DISK
    statuses = driver.post([request_])
    before_ram, before_disk = bytes(ram), bytes(disk.data)
    device.notify(REQUESTQ)
    assert driver.answers(statuses) == [status]
    assert bytes(disk.data) == before_disk
    changed = {i for i in range(0, RAM, 4096) if ram[i:i + 4096] != before_ram[i:i + 4096]}
    assert changed <= {(driver.layout.used // 4096) * 4096, 0x8C000}  # the used ring and the status byte only
    assert ram[DATA:DATA + 0x1000] == b"\xa5" * 0x1000
    assert not device.needs_reset and device.errors == 1
    assert driver.queue.used_element(0)[1] == 1  # only the status byte written


def test_a_read_only_disk_refuses_writes():
    _ram, disk, _device, driver, _machine = setup(MemoryDisk(writable=False))
    assert driver.submit([Request(VIRTIO_BLK_T_OUT, 0, DATA, SECTOR_SIZE),
                          Request(VIRTIO_BLK_T_IN, 0, DATA, SECTOR_SIZE, True)]) == [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    assert disk.data == bytes(DISK)


@pytest.mark.parametrize("chain, reason", [
    ([Descriptor(0x88000, 8, VIRTQ_DESC_F_NEXT, 1), Descriptor(0x8C000, 1, VIRTQ_DESC_F_WRITE)], "fewer than the 16"),
    ([Descriptor(0x88000, 16, 0)], "no device-writable byte"),
])
def test_a_chain_that_cannot_carry_a_request_needs_a_reset(chain, reason):
    ram, disk, device, driver, _machine = setup()
    ram[0x88000:0x88010] = HEADER.pack(VIRTIO_BLK_T_IN, 0, 0)
    for index, descriptor in enumerate(chain):
        driver.queue.set_descriptor(index, descriptor)
    driver.queue.set_avail_slot(0, 0)
    driver.queue.avail_idx = 1
    driver.queue.publish()
    device.notify(REQUESTQ)
    assert device.needs_reset and reason in device.error
    assert driver.queue.used_idx() == 0


def test_a_full_disk_pauses_and_the_retry_loses_nothing():
    ram, disk, device, driver, machine = setup(MemoryDisk(limit=8 * SECTOR_SIZE))
    for sector in range(12):
        ram[DATA + sector * SECTOR_SIZE:DATA + (sector + 1) * SECTOR_SIZE] = bytes([sector + 1]) * SECTOR_SIZE
    requests = [Request(VIRTIO_BLK_T_OUT, sector, DATA + sector * SECTOR_SIZE, SECTOR_SIZE) for sector in range(12)]
    statuses = driver.post(requests)
    device.notify(REQUESTQ)
    assert driver.answers(statuses) == [0] * 8 + [None] * 4  # the ninth is not answered, nor those after it
    assert driver.queue.used_idx() == 8 and device.stalls == 1 and device.stalled
    assert len(machine.pauses) == 1 and "memory.img" in machine.pauses[0] and "needs 512 bytes" in machine.pauses[0]
    device.notify(REQUESTQ)  # another notification while paused changes nothing
    assert driver.queue.used_idx() == 8
    machine.run()  # still full: the retry pauses again
    assert len(machine.pauses) == 2 and driver.queue.used_idx() == 8 and device.stalls == 2
    disk.limit = None  # space freed
    machine.run()
    assert driver.answers(statuses) == [0] * 12 and driver.queue.used_idx() == 12 and device.stalled is None
    assert [disk.data[s * SECTOR_SIZE] for s in range(12)] == list(range(1, 13))
    assert [head for head, _ in (driver.queue.used_element(i) for i in range(12))] == [3 * i for i in range(12)]


def test_a_full_datastore_pauses_the_device_and_a_commit_frees_it(tmp_path):
    store = Datastore(tmp_path / "lun", capacity=4 << 20)
    store.create_raw("base.raw", 1 << 20)
    store.create_overlay("vm.qcow2", "base.raw", cluster_size=4096)
    ram = bytearray(RAM)
    memory = GuestMemory([(0, memoryview(ram), False)])
    machine = Machine()
    device = VirtioBlock(memory, store.open("vm.qcow2"), pause=machine.pauses.append, on_resume=machine.resume.append)
    driver = BlockDriver(memory, device)
    store.set_capacity(store.used() + 6 * 4096)  # room for a few clusters of the overlay, not for 32
    acknowledged: dict[int, bytes] = {}
    for sector in range(0, 256, 8):  # one 4 KiB cluster each
        data = struct.pack("<I", sector) * 1024
        ram[DATA:DATA + 4096] = data
        [status] = driver.submit([Request(VIRTIO_BLK_T_OUT, sector, DATA, 4096)])
        if status is None:
            break
        acknowledged[sector] = data
    assert machine.pauses and "vm.qcow2" in machine.pauses[0] and "datastore" in machine.pauses[0]
    assert 0 < len(acknowledged) < 32
    machine.run()
    assert device.stalled is not None  # nothing freed yet
    store.set_capacity(64 << 20)
    machine.run()
    assert device.stalled is None and driver.queue.used_idx() == len(acknowledged) + 1
    acknowledged[sector] = data
    for sector, data in acknowledged.items():
        assert driver.submit([Request(VIRTIO_BLK_T_IN, sector, DATA + 0x10000, 4096, True)]) == [0]
        assert ram[DATA + 0x10000:DATA + 0x11000] == data
    device.close()


def fuzz_case(rng: random.Random, ram: bytearray, driver: BlockDriver) -> None:
    """A random request, or a random chain of descriptors with random flags, lengths and addresses."""
    size = driver.layout.size
    if rng.random() < 0.5:
        kind = rng.choice([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                           rng.randrange(1 << 32)])
        sector = rng.choice([0, 1, 63, 64, 65, (1 << 64) - 1, rng.randrange(1 << 64), rng.randrange(128)])
        length = rng.choice([0, 1, 511, 512, 1024, 4096, rng.randrange(1 << 16)])
        address = rng.choice([DATA, DATA + 1, RAM - length, RAM - 1, RAM, rng.randrange(1 << 64)])
        length = min(length, (1 << 32) - 1)
        driver.post([Request(kind, sector, address, length, rng.random() < 0.5)])
        return
    count = rng.randrange(1, 5)
    for index in range(count):
        address = rng.choice([0x88000, DATA, RAM - 16, RAM - 1, rng.randrange(1 << 64), 0x8C000])
        length = rng.choice([0, 1, 16, 17, 512, rng.randrange(1 << 32)])
        flags = rng.choice([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                            rng.randrange(1 << 16)])
        nxt = rng.choice([index + 1, rng.randrange(size), rng.randrange(1 << 16)])
        driver.queue.set_descriptor(index, Descriptor(address, length, flags, nxt))
    ram[0x88000:0x88010] = HEADER.pack(rng.choice([0, 1, 4, 8, 99]), 0, rng.choice([0, 63, 64, 1 << 63]))
    driver.queue.set_avail_slot(driver.queue.avail_idx % size, rng.choice([0, rng.randrange(1 << 16)]))
    driver.queue.avail_idx = (driver.queue.avail_idx + rng.choice([1, 1, 1, 2, size + 1])) & 0xFFFF
    driver.queue.publish()


def test_hostile_requests_and_rings_leave_the_host_ram_and_disk_as_they_must():
    """CASES random requests and chains: no exception, RAM changes only in device-writable buffers the chain
    named (checked against its own descriptors), the disk only inside a request's sectors."""
    rng = random.Random(13)
    for case in range(CASES):
        ram, disk, device, driver, _machine = setup()
        ram[DATA:DATA + 0x10000] = bytes(rng.randrange(256) for _ in range(16)) * 0x1000
        disk.data[:] = os.urandom(DISK)
        fuzz_case(rng, ram, driver)
        before_ram, before_disk = bytes(ram), bytes(disk.data)
        device.notify(REQUESTQ)  # must not raise
        allowed = writable_ranges(before_ram, driver) + [(driver.layout.used, driver.layout.end)]
        for start in range(0, RAM, 64):
            if ram[start:start + 64] != before_ram[start:start + 64]:
                for offset in range(start, start + 64):
                    if ram[offset] != before_ram[offset]:
                        assert any(low <= offset < high for low, high in allowed), (case, hex(offset))
        if disk.data != before_disk:
            changed = [i for i in range(0, DISK, SECTOR_SIZE) if disk.data[i:i + 512] != before_disk[i:i + 512]]
            assert device.writes == 1 and changed[-1] + SECTOR_SIZE - changed[0] <= device.bytes_written, case
        if device.needs_reset:
            assert device.error


def writable_ranges(ram: bytes, driver: BlockDriver) -> list[tuple[int, int]]:
    """Every device-writable buffer any descriptor of the table names, inside RAM (a superset of what a
    chain may write)."""
    ranges = []
    for index in range(driver.layout.size):
        address, length, flags, _next = struct.unpack_from("<QIHH", ram, driver.layout.desc + 16 * index)
        if flags & VIRTQ_DESC_F_WRITE and address + length <= RAM:
            ranges.append((address, address + length))
    return ranges


def test_block_devices_opens_the_disk_where_the_core_runs(tmp_path):
    with pytest.raises(ConfigError, match="an image path or a function that opens one"):
        block_devices(MemoryDisk())
    registers, notify = block_devices(tmp_path / "disk.raw")
    assert (registers.bus, notify.bus, notify.base, notify.length) == ("mmio", "pio", 0xF8, 2)
    assert registers.base != 0x3FFFF000  # not on the console's page
