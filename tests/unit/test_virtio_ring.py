"""labkit.virtio: the split virtqueue's layout (virtio 1.x 2.7), the device's checks, the console's registers."""

from __future__ import annotations

import struct

import pytest

from labkit.errors import ConfigError, VirtqueueError
from labkit.memory import GuestMemory
from labkit.virtio import transport as t
from labkit.virtio.console import (DEVICE_FEATURES, DEVICE_ID_CONSOLE, QUEUE_SIZE_MAX, TRANSMITQ, NotifyPort,
                                   VirtioConsole, console_devices)
from labkit.virtio.ring import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Descriptor,
                                DeviceQueue, DriverQueue, QueueLayout, avail_ring_size, desc_table_size,
                                is_queue_size, used_ring_size)
from labkit.vmm.devices.spec import DeviceContext
from labkit.x86 import layout

pytestmark = pytest.mark.unit

RAM = 1 << 20
BUF = 0x20000


def memory_of(size: int = RAM) -> tuple[bytearray, GuestMemory]:
    ram = bytearray(size)
    return ram, GuestMemory([(0, memoryview(ram), False)])


def queue_pair(size: int = 8, **device_args) -> tuple[bytearray, DriverQueue, DeviceQueue]:
    ram, memory = memory_of()
    ring = QueueLayout.packed(size, 0x1000)
    driver = DriverQueue(memory, ring)
    driver.clear()
    return ram, driver, DeviceQueue(memory, ring, **device_args)


def test_sizes_and_alignments_are_the_specs():
    assert (desc_table_size(256), avail_ring_size(256), used_ring_size(256)) == (4096, 518, 2054)
    assert Descriptor(0x1122334455667788, 0x99AABBCC, 3, 7).encode() == bytes.fromhex(
        "8877665544332211" "ccbbaa99" "0300" "0700")
    assert Descriptor.decode(Descriptor(1, 2, 4, 5).encode()) == Descriptor(1, 2, 4, 5)
    assert [is_queue_size(n) for n in (0, 1, 2, 3, 256, 32768, 65536)] == [False, True, True, False, True, True,
                                                                             False]
    packed = QueueLayout.packed(4, 0x1000)
    assert (packed.desc, packed.avail, packed.used) == (0x1000, 0x1040, 0x1050)  # used rounded up to 4


@pytest.mark.parametrize("ring, message", [
    (QueueLayout(6, 0x1000, 0x2000, 0x3000), "not a power of 2"),
    (QueueLayout(8, 0x1008, 0x2000, 0x3000), "descriptor table at 0x1008 is not 16-byte aligned"),
    (QueueLayout(8, 0x1000, 0x2001, 0x3000), "available ring at 0x2001 is not 2-byte aligned"),
    (QueueLayout(8, 0x1000, 0x2000, 0x3002), "used ring at 0x3002 is not 4-byte aligned"),
    (QueueLayout(8, 0x1000, 0x2000, RAM - 8), "used ring [0xffff8, 0x10003e) is not inside guest memory"),
    (QueueLayout(8, 1 << 63, 0x2000, 0x3000), "is not inside guest memory"),
])
def test_a_bad_layout_is_refused_with_its_reason(ring, message):
    _ram, memory = memory_of()
    with pytest.raises(VirtqueueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ring.check(memory)


def test_chains_go_through_and_come_back_on_the_used_ring():
    ram, driver, device = queue_pair()
    ram[BUF:BUF + 5] = b"hello"
    ram[BUF + 100:BUF + 107] = b", world"
    driver.add_chain([(BUF, 5), (BUF + 100, 7)], first=0)
    driver.add_chain([(BUF, 1)], first=2)
    driver.publish()
    assert device.pending() == 2
    first, second = device.pop(), device.pop()
    assert (first.head, first.readable, second.head) == (0, ((BUF, 5), (BUF + 100, 7)), 2)
    assert bytes(first.data) + bytes(second.data) == b"hello, worldh"
    device.put_used(first.head, 0)
    assert driver.used_idx() == 0  # not visible before publish_used
    device.put_used(second.head, 0)
    device.publish_used()
    assert driver.used_idx() == 2 and driver.used_element(0) == (0, 0) and driver.used_element(1) == (2, 0)
    assert device.pending() == 0


def test_the_free_running_indexes_wrap_at_65536():
    ram, driver, device = queue_pair(4, last_avail=0xFFFE, used_idx=0xFFFE)
    driver.avail_idx = 0xFFFE
    ram[BUF] = ord("x")
    for _ in range(3):
        driver.add_chain([(BUF, 1)], first=0)
    driver.publish()
    assert struct.unpack_from("<H", ram, driver.layout.avail + 2)[0] == 1  # 0xfffe + 3, modulo 2**16
    assert device.pending() == 3
    for _ in range(3):
        device.put_used(device.pop().head, 0)
    device.publish_used()
    assert (device.last_avail, device.used_idx, driver.used_idx()) == (1, 1, 1)
    assert driver.used_element(0xFFFF % 4) == (0, 0)  # slot idx % size


def descriptor_ring(*descriptors: Descriptor, size: int = 8, indirect: bool = False,
                    heads: tuple[int, ...] = (0,)) -> tuple[bytearray, DeviceQueue]:
    ram, driver, device = queue_pair(size, indirect=indirect, writable=False)
    for index, descriptor in enumerate(descriptors):
        driver.set_descriptor(index, descriptor)
    for slot, head in enumerate(heads):
        driver.set_avail_slot(slot, head)
    driver.set_avail_idx(len(heads))
    return ram, device


@pytest.mark.parametrize("descriptors, heads, indirect, message", [
    ([Descriptor(BUF, 1)], (8,), False, "slot 0 names descriptor 8, past the queue size 8"),
    ([Descriptor(BUF, 1, VIRTQ_DESC_F_NEXT, 9)], (0,), False, "descriptor 0's next is 9, past the 8 entries"),
    ([Descriptor(BUF, 1, VIRTQ_DESC_F_NEXT, 1), Descriptor(BUF, 1, VIRTQ_DESC_F_NEXT, 0)], (0,), False,
     "loops back to descriptor 0 after 2 descriptors"),
    ([Descriptor(BUF, 1, VIRTQ_DESC_F_NEXT, 0)], (0,), False, "loops back to descriptor 0 after 1"),
    ([Descriptor(RAM - 4, 8)], (0,), False, "buffer [0xffffc, 0x100004) is not inside guest memory"),
    ([Descriptor((1 << 64) - 2, 4)], (0,), False, "is not inside guest memory"),
    ([Descriptor(BUF, 0)], (0,), False, "has length 0"),
    ([Descriptor(BUF, 4, VIRTQ_DESC_F_WRITE)], (0,), False, "device-writable (WRITE) on a queue the device only reads"),
    ([Descriptor(BUF, 4, 0x80)], (0,), False, "flags 0x80"),
    ([Descriptor(0x3000, 16, VIRTQ_DESC_F_INDIRECT)], (0,), False, "VIRTIO_F_INDIRECT_DESC was not negotiated"),
    ([Descriptor(0x3000, 24, VIRTQ_DESC_F_INDIRECT)], (0,), True, "indirect table length 24"),
    ([Descriptor(0x3000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)], (0,), True, "both INDIRECT and NEXT"),
    ([Descriptor(RAM - 16, 32, VIRTQ_DESC_F_INDIRECT)], (0,), True, "indirect table [0xffff0, 0x100010)"),
])
def test_every_bad_chain_is_refused_with_its_reason(descriptors, heads, indirect, message):
    _ram, device = descriptor_ring(*descriptors, heads=heads, indirect=indirect)
    with pytest.raises(VirtqueueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        device.pop()
    assert device.last_avail == 0  # the bad chain was not taken


def test_indirect_tables_are_walked_and_checked():
    table = 0x3000
    ram, device = descriptor_ring(Descriptor(table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE), indirect=True)
    ram[table:table + 32] = Descriptor(BUF, 2, VIRTQ_DESC_F_NEXT, 1).encode() + Descriptor(BUF + 8, 3).encode()
    chain = device.pop()  # WRITE on the descriptor naming a table is ignored (2.7.5.3.2)
    assert chain.readable == ((BUF, 2), (BUF + 8, 3))
    ram, device = descriptor_ring(Descriptor(table, 32, VIRTQ_DESC_F_INDIRECT), indirect=True)
    ram[table:table + 32] = (Descriptor(BUF, 2, VIRTQ_DESC_F_NEXT, 1).encode()
                             + Descriptor(BUF, 3, VIRTQ_DESC_F_INDIRECT).encode())
    with pytest.raises(VirtqueueError, match="indirect descriptor 1 inside an indirect table is INDIRECT again"):
        device.pop()
    ram[table + 16:table + 32] = Descriptor(BUF, 3, VIRTQ_DESC_F_NEXT, 0).encode()
    with pytest.raises(VirtqueueError, match="loops back to indirect descriptor 0"):
        device.pop()


def test_more_pending_than_the_queue_holds_is_refused():
    _ram, driver, device = queue_pair(8)
    driver.set_avail_idx(9)
    with pytest.raises(VirtqueueError, match="9 ahead of the device's 0: more than the queue size 8"):
        device.pending()


# -- the console device through its virtio-mmio registers ---------------------


def live_console(size: int = 8, features: int = t.VIRTIO_F_VERSION_1):
    """A VirtioConsole set up by the 3.1.1 / 4.2.3 sequence, with its transmit queue at 0x1000."""
    ram, memory = memory_of()
    out = bytearray()
    device = VirtioConsole(memory, out.extend)
    ring = QueueLayout.packed(size, 0x1000)
    driver = DriverQueue(memory, ring)
    driver.clear()
    device.write(t.STATUS, 4, 0)
    device.write(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER)
    for word in (0, 1):
        device.write(t.DRIVER_FEATURES_SEL, 4, word)
        device.write(t.DRIVER_FEATURES, 4, (features >> (32 * word)) & 0xFFFFFFFF)
    device.write(t.STATUS, 4, t.STATUS_ACKNOWLEDGE | t.STATUS_DRIVER | t.STATUS_FEATURES_OK)
    device.write(t.QUEUE_SEL, 4, TRANSMITQ)
    device.write(t.QUEUE_SIZE, 4, size)
    for register, address in ((t.QUEUE_DESC_LOW, ring.desc), (t.QUEUE_DRIVER_LOW, ring.avail),
                              (t.QUEUE_DEVICE_LOW, ring.used)):
        device.write(register, 4, address)
    device.write(t.QUEUE_READY, 4, 1)
    device.write(t.STATUS, 4, 0x0F)
    return ram, out, device, driver


def test_the_registers_identify_a_version_2_console():
    _ram, memory = memory_of()
    device = VirtioConsole(memory, lambda data: None)
    assert [device.read(offset, 4) for offset in (t.MAGIC, t.VERSION, t.DEVICE_ID)] == [0x74726976, 2,
                                                                                          DEVICE_ID_CONSOLE]
    words = []
    for word in (0, 1):
        device.write(t.DEVICE_FEATURES_SEL, 4, word)
        words.append(device.read(t.DEVICE_FEATURES, 4))
    assert words[0] | words[1] << 32 == DEVICE_FEATURES == t.VIRTIO_F_VERSION_1 | t.VIRTIO_F_INDIRECT_DESC
    for queue, expected in ((0, QUEUE_SIZE_MAX), (1, QUEUE_SIZE_MAX), (2, 0)):
        device.write(t.QUEUE_SEL, 4, queue)
        assert device.read(t.QUEUE_SIZE_MAX, 4) == expected
    assert device.read(t.MAGIC, 2) == 0  # only aligned 32-bit accesses are registers


def test_features_ok_needs_version_1_and_nothing_unoffered():
    _ram, memory = memory_of()
    device = VirtioConsole(memory, lambda data: None)
    for features, accepted in ((0, False), (1 << 33 | t.VIRTIO_F_VERSION_1, False), (t.VIRTIO_F_VERSION_1, True)):
        device.write(t.STATUS, 4, 0)
        for word in (0, 1):
            device.write(t.DRIVER_FEATURES_SEL, 4, word)
            device.write(t.DRIVER_FEATURES, 4, (features >> (32 * word)) & 0xFFFFFFFF)
        device.write(t.STATUS, 4, 0x0B)
        assert bool(device.read(t.STATUS, 4) & t.STATUS_FEATURES_OK) is accepted


def test_one_notification_consumes_the_whole_batch():
    ram, out, device, driver = live_console()
    for index, text in enumerate((b"one ", b"two ", b"three")):
        ram[BUF + 64 * index:BUF + 64 * index + len(text)] = text
        driver.add_chain([(BUF + 64 * index, len(text))], first=index)
    driver.publish()
    NotifyPort(device).write(0, 2, TRANSMITQ)
    assert bytes(out) == b"one two three"
    assert (driver.used_idx(), device.notifications, device.chains, device.bytes) == (3, 1, 3, 13)
    device.notify(TRANSMITQ)  # nothing new: spurious notifications are harmless (2.7.10.2)
    assert bytes(out) == b"one two three" and device.notifications == 2
    assert device.ignored == 0
    device.notify(0)  # the receive queue: no input, nothing to do
    assert device.ignored == 1


def test_a_bad_ring_needs_a_reset_and_nothing_more_is_consumed_until_then():
    ram, out, device, driver = live_console()
    ram[BUF:BUF + 2] = b"ok"
    driver.add_chain([(BUF, 2)], first=0)
    driver.set_descriptor(1, Descriptor(BUF, 2, VIRTQ_DESC_F_NEXT, 1))  # a loop
    driver.set_avail_slot(1, 1)
    driver.avail_idx = 2
    driver.add_chain([(BUF, 2)], first=2)
    driver.publish()
    before = bytes(ram)
    device.notify(TRANSMITQ)
    assert bytes(out) == b"ok"  # the chain before the bad one, and nothing after
    assert device.read(t.STATUS, 4) & t.STATUS_DEVICE_NEEDS_RESET
    assert "loops back to descriptor 1" in device.error
    assert device.read(t.INTERRUPT_STATUS, 4) & 2  # a configuration change would be signalled
    assert driver.used_idx() == 1 and driver.used_element(0) == (0, 0)
    changed = [i for i in range(len(ram)) if ram[i] != before[i]]
    assert changed and all(driver.layout.used <= i < driver.layout.end for i in changed)
    driver.set_descriptor(1, Descriptor(BUF, 2))  # repaired, but the device waits for its reset
    device.notify(TRANSMITQ)
    assert bytes(out) == b"ok" and device.ignored == 1
    device.write(t.STATUS, 4, t.STATUS_DRIVER_OK | t.STATUS_DEVICE_NEEDS_RESET)  # the driver cannot clear it
    assert device.needs_reset
    device.write(t.STATUS, 4, 0)
    assert device.read(t.STATUS, 4) == 0 and device.error is None and device.resets == 2  # set-up + this one


def test_a_queue_made_ready_with_a_bad_layout_needs_a_reset():
    _ram, memory = memory_of()
    device = VirtioConsole(memory, lambda data: None)
    device.write(t.QUEUE_SEL, 4, TRANSMITQ)
    device.write(t.QUEUE_SIZE, 4, 512)
    device.write(t.QUEUE_READY, 4, 1)
    assert device.needs_reset and "above QueueSizeMax 256" in device.error
    assert device.read(t.QUEUE_READY, 4) == 0


def test_save_and_restore_keep_the_ring_positions():
    ram, out, device, driver = live_console()
    ram[BUF] = ord("a")
    driver.add_chain([(BUF, 1)], first=0)
    driver.publish()
    device.notify(TRANSMITQ)
    state = device.save()
    copy = VirtioConsole(device.memory, out.extend)
    copy.restore(state)
    assert copy.save() == state
    driver.add_chain([(BUF, 1)], first=1)
    driver.publish()
    copy.notify(TRANSMITQ)
    assert bytes(out) == b"aa" and driver.used_idx() == 2
    copy.reset()
    assert copy.save()["notifications"] == 0 and copy.status == 0
    with pytest.raises(ConfigError, match="needs error, queues"):
        copy.restore({key: value for key, value in state.items() if key not in ("queues", "error")})


def test_the_device_specs_share_one_device():
    _ram, memory = memory_of()
    out = bytearray()
    built: dict[str, object] = {}
    context = DeviceContext(memory=memory, regs=lambda: None, raise_irq=lambda line: False,
                            lower_irq=lambda line: None, kick=lambda: None, console=out.extend,
                            device=built.__getitem__)
    registers, notify = console_devices()
    assert layout.VIRTIO_NOTIFY_PORT == 0xF6
    assert (registers.bus, registers.base, notify.bus, notify.base) == ("mmio", layout.VIRTIO_MMIO_BASE, "pio", 0xF6)
    built[registers.name] = device = registers.factory(context)
    port = notify.factory(context)
    assert port.device is device
    with pytest.raises(ConfigError, match="needs a virtio device"):
        NotifyPort(object())


def test_the_used_ring_counts_as_written_by_the_host_while_pages_are_tracked():
    """The device keeps a view of the used ring from the moment the queue is ready; a diff snapshot or a
    migration round taken later must still carry the pages it writes (the guest never writes them)."""
    ram, out, device, driver = live_console(size=256)
    used_pages = set(range(driver.layout.used >> 12, (driver.layout.end - 1 >> 12) + 1))
    ram[BUF:BUF + 2] = b"hi"
    driver.add_chain([(BUF, 2)], first=0)
    driver.publish()
    device.memory.track_writes(True)
    device.notify(TRANSMITQ)
    assert bytes(out) == b"hi" and driver.used_idx() == 1
    assert used_pages <= device.memory.take_written()  # with the buffer's page: a view may be written through
    device.notify(TRANSMITQ)  # nothing available: nothing written
    assert device.memory.take_written() == set()


def test_buffers_in_another_region_are_read_and_a_buffer_in_no_region_is_refused():
    """The device looks buffers up in the ring's region first, then in every region, as GuestMemory does."""
    ram = bytearray(RAM)
    extra = bytearray(0x1000)
    memory = GuestMemory([(0, memoryview(ram), False), (0x200000, memoryview(extra), False)])
    ring = QueueLayout.packed(8, 0x1000)
    driver = DriverQueue(memory, ring)
    driver.clear()
    queue = DeviceQueue(memory, ring, writable=False)
    extra[0x10:0x13] = b"far"
    ram[BUF:BUF + 4] = b"near"
    driver.add_chain([(BUF, 4)], first=0)
    driver.add_chain([(0x200010, 3)], first=1)
    driver.add_chain([(RAM - 2, 4)], first=2)  # runs past RAM into the gap below the second region
    driver.publish()
    got: list[bytes] = []
    chains, moved, error = queue.drain(lambda data: got.append(bytes(data)))
    assert (got, chains, moved) == ([b"near", b"far"], 2, 7)
    assert isinstance(error, VirtqueueError) and "is not inside guest memory" in str(error)
    assert driver.used_idx() == 2 and queue.last_avail == 2, "the bad chain is not taken"
