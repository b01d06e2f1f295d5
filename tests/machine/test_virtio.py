"""The virtio console on real machines: same text as the UART, far fewer exits, hostile rings refused (both backends)."""

from __future__ import annotations

import random

import pytest
from backends import HAS_KVM, NO_KVM_REASON
from test_guests import differences

from labkit import Guest, Machine
from labkit.errors import ConfigError
from labkit.virtio import console_devices, expected_console, measure_console
from labkit.virtio.hostile import HOSTILE_DRIVER, random_ring, run_on_machine
from labkit.virtio.measure import PARAMS_ADDRESS, parameter_block
from labkit.x86.layout import DEFAULT_MEMORY as RAM
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


@pytest.fixture(scope="module")
def hostile_driver() -> Guest:
    return Guest.from_asm(HOSTILE_DRIVER, name="hostile_driver")


def test_hostile_rings_through_a_real_machine(backend_name, hostile_driver):
    """Random rings (a quarter valid), written into a real guest's RAM: the guest sets the queue up and
    notifies; the device, where the guest runs, must answer as the generator knows it should."""
    rng = random.Random(7)
    failures = []
    for number in range(24):
        case = random_ring(rng, start_at_zero=True)
        problems = run_on_machine(case, backend_name, hostile_driver)
        if problems:
            failures.append(f"case {number} ({case.fault}): {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_the_ring_guest_without_the_device_says_so(backend_name):
    result = Machine("ring_console64", backend=backend_name).run()
    assert (result.status.kind, result.status.code, result.console) == (StatusKind.EXITED, 2, "")


def test_the_guests_defaults_without_a_parameter_block(backend_name):
    with Machine("ring_console64", backend=backend_name, devices=console_devices()) as machine:
        ring = machine.run()
    uart = Machine("uart_console64", backend=backend_name).run()
    assert ring.console == uart.console == expected_console(1024)
    assert ring.status.code == uart.status.code == 0


@pytest.mark.kvm
@pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)
@pytest.mark.parametrize("path", ["uart", "ring"])
def test_both_backends_end_in_the_same_state(path):
    """Differential: with parameters (2 KiB, 100-byte buffers, 3 per notification), console, status, every
    register and every byte of RAM (rings and buffers included) are the same on KVM and on the emulator."""
    def final_state(backend):
        devices = console_devices() if path == "ring" else ()
        with Machine(f"{path}_console64", backend=backend, memory=RAM, devices=devices) as machine:
            machine.write_memory(PARAMS_ADDRESS, parameter_block(2048, 100, 3))
            result = machine.run(timeout=30)
            return result, machine.sregs(), machine.read_memory(0, RAM)

    kvm, emu = final_state("kvm"), final_state("emu")
    assert kvm[0].console == expected_console(2048)
    assert differences(kvm, emu) == {}
