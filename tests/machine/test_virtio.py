"""The virtio console on real machines: same text as the UART, far fewer exits, hostile rings refused (both backends)."""

from __future__ import annotations

import random
import struct

import pytest

from labkit import Guest, Machine
from labkit.errors import ConfigError
from labkit.virtio import console_devices, expected_console, measure_console
from labkit.virtio.console import DEVICE_NAME
from labkit.virtio.hostile import QUEUE_BASE, RAM_SIZE, RING_FAULTS, random_ring
from labkit.virtio.measure import PARAMS_ADDRESS
from labkit.vmm.status import StatusKind

SETUP_MMIO = 27
"""ring_console64's virtio-mmio accesses: 26 to find and set up the device (3.1.1, 4.2.3), 1 status read at the end."""


def test_both_paths_print_the_same_text_with_the_exits_each_path_predicts(backend_name):
    for kib in (1, 4):
        uart = measure_console(kib, "uart", backend=backend_name)
        ring = measure_console(kib, "ring", batch=4, buffer_bytes=256, backend=backend_name)
        assert uart.console_ok and ring.console_ok, (uart.status, ring.status)
        assert uart.bytes == ring.bytes == 1024 * kib
        assert uart.exits_by_reason == {"IO": 2 * 1024 * kib + 1}  # LSR poll + THR write per byte, the exit
        assert ring.notifications == kib * 4 // 4  # 4 buffers of 256 bytes per notification
        assert ring.exits_by_reason == {"MMIO": SETUP_MMIO, "IO": ring.notifications + 1}
        assert ring.device["bytes"] == 1024 * kib and ring.device["error"] is None
        assert uart.backend == ring.backend == backend_name


def test_ring_io_needs_at_least_50x_fewer_exits_per_kib(backend_name):
    for kib in (1, 16):
        uart = measure_console(kib, "uart", backend=backend_name)
        ring = measure_console(kib, "ring", backend=backend_name)  # 256-byte buffers, 16 per notification
        assert uart.console_ok and ring.console_ok
        ratio = uart.exits_per_kib / ring.exits_per_kib
        assert ratio >= 50, f"{kib} KiB on {backend_name}: {uart.exits} against {ring.exits} exits ({ratio:.1f}x)"


def test_the_batch_size_sets_the_notifications(backend_name):
    for batch, buffer_bytes, notifications in ((1, 256, 16), (16, 256, 1), (3, 100, 14), (256, 16, 1)):
        ring = measure_console(4, "ring", batch=batch, buffer_bytes=buffer_bytes, backend=backend_name)
        assert ring.console_ok, ring.status
        assert ring.notifications == notifications, (batch, buffer_bytes)
        assert ring.device["chains"] == -(-4096 // buffer_bytes)


def test_repeat_posts_each_batch_again(backend_name):
    ring = measure_console(4, "ring", batch=1, buffer_bytes=4096, repeat=5, backend=backend_name)
    assert ring.console_ok and ring.notifications == 5 and ring.bytes == 5 * 4096


def test_measure_console_refuses_bad_arguments():
    for arguments, message in (((0, "ring"), "kib"), ((1025, "uart"), "kib"), ((1, "tcp"), "path"),
                               ((1, "ring", 0), "batch"), ((1, "ring", 257), "batch"), ((True, "ring"), "kib")):
        with pytest.raises(ConfigError, match=message):
            measure_console(*arguments)
    with pytest.raises(ConfigError, match="buffer_bytes"):
        measure_console(1, "ring", buffer_bytes=0)
    with pytest.raises(ConfigError, match="repeat is for the ring path"):
        measure_console(1, "uart", repeat=2)


def test_the_notify_spec_needs_the_device_listed_first():
    registers, notify = console_devices()
    with pytest.raises(ConfigError, match="no device named 'virtio-console' is built yet"):
        Machine("exit64", backend="emu", isolate=False, devices=[notify, registers])


# A driver that sets the queue up from a parameter block and notifies once: the ring itself is
# written by the host (labkit.virtio.hostile), so every kind of bad ring reaches the real device.
HOSTILE_DRIVER = f"""
        .equ MMIO, 0x3FFFF000
        .equ P, {PARAMS_ADDRESS:#x}     # u32 size, u32 features 0-31, u64 desc, u64 avail, u64 used
        mov ebp, MMIO
        mov dword ptr [rbp + 0x70], 0
        mov dword ptr [rbp + 0x70], 3
        mov dword ptr [rbp + 0x24], 0
        mov eax, [P + 4]
        mov [rbp + 0x20], eax
        mov dword ptr [rbp + 0x24], 1
        mov dword ptr [rbp + 0x20], 1
        mov dword ptr [rbp + 0x70], 11
        mov dword ptr [rbp + 0x30], 1
        mov eax, [P]
        mov [rbp + 0x38], eax
        mov eax, [P + 8]
        mov [rbp + 0x80], eax
        mov eax, [P + 12]
        mov [rbp + 0x84], eax
        mov eax, [P + 16]
        mov [rbp + 0x90], eax
        mov eax, [P + 20]
        mov [rbp + 0x94], eax
        mov eax, [P + 24]
        mov [rbp + 0xA0], eax
        mov eax, [P + 28]
        mov [rbp + 0xA4], eax
        mov dword ptr [rbp + 0x44], 1
        mov dword ptr [rbp + 0x70], 15
        mov dx, 0xF6
        mov ax, 1
        out dx, ax
        mov eax, [rbp + 0x70]
        out 0xF4, al
        hlt
"""


@pytest.fixture(scope="module")
def hostile_driver() -> Guest:
    return Guest.from_asm(HOSTILE_DRIVER, name="hostile_driver")


def test_hostile_rings_through_a_real_machine(backend_name, hostile_driver):
    rng = random.Random(7)
    for number in range(24):
        case = random_ring(rng, start_at_zero=True)
        with Machine(hostile_driver, backend=backend_name, memory=RAM_SIZE, devices=console_devices()) as machine:
            for address, data in case.writes:
                machine.write_memory(address, data)
            machine.write_memory(PARAMS_ADDRESS, struct.pack(
                "<IIQQQ", case.layout.size & 0xFFFFFFFF, (1 << 28) if case.indirect else 0,
                case.layout.desc, case.layout.avail, case.layout.used))
            before = machine.read_memory(QUEUE_BASE, RAM_SIZE - QUEUE_BASE)
            result = machine.run(timeout=10)
            after = machine.read_memory(QUEUE_BASE, RAM_SIZE - QUEUE_BASE)
            device = machine.device_state(DEVICE_NAME)
            console = machine.device_state("console")["output"]
        what = f"case {number} ({case.fault}) on {backend_name}"
        assert result.status.kind is StatusKind.EXITED, what
        assert bool(result.status.code & 0x40) is case.bad, f"{what}: status {result.status.code:#x}, {device['error']}"
        assert console == case.expected_console, what
        may_write = case.used_area if case.fault not in RING_FAULTS or case.fault == "avail_idx_too_far" else (0, 0)
        start, end = (max(address - QUEUE_BASE, 0) for address in may_write)
        assert before[:start] == after[:start] and before[end:] == after[end:], f"{what}: RAM outside the used ring"


def test_the_ring_guest_without_the_device_says_so(backend_name):
    result = Machine("ring_console64", backend=backend_name).run()
    assert (result.status.kind, result.status.code, result.console) == (StatusKind.EXITED, 2, "")


def test_the_guests_defaults_without_a_parameter_block(backend_name):
    with Machine("ring_console64", backend=backend_name, devices=console_devices()) as machine:
        ring = machine.run()
    uart = Machine("uart_console64", backend=backend_name).run()
    assert ring.console == uart.console == expected_console(1024)
    assert ring.status.code == uart.status.code == 0
