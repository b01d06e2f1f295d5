"""Bad guests and bad input: every run ends with a classified status, nothing kills the caller."""

from __future__ import annotations

import os
import signal
import time

import pytest

from labkit import Guest, Machine
from labkit.backend import choose_backend
from labkit.errors import BackendUnavailable, ConfigError, GuestFileError
from labkit.vmm.devices import DeviceSpec
from labkit.vmm.machine import check_timeout
from random_guests import run_random_guests

RANDOM_GUESTS = int(os.environ.get("LABKIT_RANDOM_GUESTS", "300"))
"""A fixed sample (100 per mode) of the first guests of benchmarks/random_guests.py, which runs 1,000 per backend."""


@pytest.mark.slow
def test_random_guests_end_classified_within_budget(backend_name):
    statuses, worst = run_random_guests(backend_name, RANDOM_GUESTS)
    print(f"{backend_name}: {statuses}, slowest {worst:.3f} s")
    assert sum(statuses.values()) == RANDOM_GUESTS
    assert len(statuses) >= 2, "random code should end in more than one way"


def test_endless_loops_time_out_on_budget(backend_name):
    for name in ("forever64", "forever_user64"):
        with Machine(name, backend=backend_name) as machine:
            started = time.monotonic()
            result = machine.run(timeout=0.3)
            took = time.monotonic() - started
        assert result.status.kind == "timeout", (name, str(result.status))
        assert 0.25 <= took <= 1.3, (name, took)


class Crash:
    """A device whose port write kills the process it runs in."""

    def write(self, offset, size, value):
        os.kill(os.getpid(), signal.SIGSEGV)

    def read(self, offset, size):
        return 0


class Hang:
    def write(self, offset, size, value):
        time.sleep(3600)

    def read(self, offset, size):
        return 0


CRASH_PORT_GUEST = "mov al, 1\nout 0x80, al\nhlt\n"


@pytest.mark.emu
def test_an_emulator_crash_is_contained():
    guest = Guest.from_asm(CRASH_PORT_GUEST, mode=64)
    machine = Machine(guest, backend="emu", devices=[DeviceSpec("crash", "pio", 0x80, 1, lambda context: Crash())])
    result = machine.run(timeout=2)
    assert result.status.kind == "error"
    assert "crashed (SIGSEGV)" in result.status.message
    # the caller is alive and labkit still works
    assert Machine("hello64", backend="emu").run().console == "Hello from 64-bit mode!\n"


@pytest.mark.emu
def test_a_hung_emulator_is_stopped():
    guest = Guest.from_asm(CRASH_PORT_GUEST, mode=64)
    machine = Machine(guest, backend="emu", devices=[DeviceSpec("hang", "pio", 0x80, 1, lambda context: Hang())])
    started = time.monotonic()
    result = machine.run(timeout=0.5)
    assert time.monotonic() - started < 0.5 + 1.5
    assert result.status.kind == "error" and "did not answer" in result.status.message
    with pytest.raises(Exception, match="did not answer"):
        machine.regs()


@pytest.mark.unit
@pytest.mark.parametrize("memory, message", [
    (1_000_001, "multiple of the 4 KiB page size"),
    (4096, "between 1 MiB"),
    (64 << 30, "between 1 MiB"),
    ("2M", "whole number"),
])
def test_bad_memory_sizes_are_refused(memory, message):
    with pytest.raises(ConfigError, match=message):
        Machine(Guest.from_bytes(b"\xf4", mode=64), backend="emu", memory=memory)


@pytest.mark.unit
@pytest.mark.parametrize("timeout", [0, -1, float("nan"), 1e9, "5"])
def test_bad_timeouts_are_refused(timeout):
    with pytest.raises(ConfigError, match="timeout"):
        check_timeout(timeout)


@pytest.mark.unit
def test_malformed_guest_files_name_the_problem(tmp_path):
    metadata = tmp_path / "broken.json"
    binary = tmp_path / "broken.bin"
    binary.write_bytes(b"\xf4")
    metadata.write_text("{ not json")
    with pytest.raises(GuestFileError, match="broken.json"):
        Guest.from_file(binary)
    odd = tmp_path / "guest.exe"
    odd.write_bytes(b"MZ")
    with pytest.raises(GuestFileError, match=r"\.exe"):
        Guest.from_file(odd)
    with pytest.raises(GuestFileError):
        Guest.from_file(tmp_path / "missing.bin")


@pytest.mark.unit
def test_missing_kvm_falls_back_with_auto_and_fails_with_kvm(monkeypatch):
    import labkit.backend as backend

    monkeypatch.delenv("LABKIT_BACKEND", raising=False)
    monkeypatch.setattr(backend, "kvm_problem", lambda: "/dev/kvm does not exist")
    choice = choose_backend("auto")
    assert choice.name == "emu" and "/dev/kvm does not exist" in choice.reason
    with pytest.raises(BackendUnavailable, match="/dev/kvm does not exist"):
        choose_backend("kvm")
    with pytest.raises(ConfigError, match="unknown backend"):
        choose_backend("xen")


@pytest.mark.emu
def test_an_interrupt_stops_the_emulated_machine_and_reaches_the_caller():
    """Jupyter's "interrupt kernel" is SIGINT: the caller gets KeyboardInterrupt, the worker is stopped."""
    import threading

    machine = Machine("forever64", backend="emu")
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        machine.run(timeout=20)
    assert time.monotonic() - started < 5
    with pytest.raises(Exception, match="interrupted"):
        machine.regs()
    assert Machine("hello64", backend="emu").run().console == "Hello from 64-bit mode!\n"


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and friends so far (/proc/self/io ``rchar``)."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.unit
def test_guest_files_that_are_not_regular_files_fail_at_once(tmp_path):
    for name in ("x.bin", "x.S", "y.json"):
        os.mkfifo(tmp_path / name)  # opening a FIFO for reading blocks until a writer comes: never here
    with pytest.raises(GuestFileError, match=r"x\.bin: not a regular file but a FIFO"):
        Guest.from_file(tmp_path / "x.bin")
    with pytest.raises(GuestFileError, match=r"x\.S: not a regular file but a FIFO"):
        Guest.from_file(tmp_path / "x.S")
    (tmp_path / "y.bin").write_bytes(b"\xf4")
    with pytest.raises(GuestFileError, match=r"y\.json: not a regular file but a FIFO"):
        Guest.from_file(tmp_path / "y.bin")  # its metadata is the FIFO
    (tmp_path / "d.bin").mkdir()
    with pytest.raises(GuestFileError, match="a directory"):
        Guest.from_file(tmp_path / "d.bin")


@pytest.mark.unit
def test_a_huge_guest_file_is_refused_by_its_size_without_reading_it(tmp_path):
    from labkit.guest import largest_code

    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as sparse:
        sparse.truncate(100 << 20)
    before = _bytes_read()
    with pytest.raises(GuestFileError, match=f"{100 << 20} bytes is too large: at most {largest_code(64, 0x8000)}"):
        Guest.from_file(huge)
    assert _bytes_read() - before < 1 << 20, "the 100 MB file was read before being refused"
    largest = tmp_path / "largest.bin"
    largest.write_bytes(b"\xf4" * largest_code(64, 0x8000))
    assert len(Guest.from_file(largest).code) == largest_code(64, 0x8000)  # the limit is Guest's own
    largest.write_bytes(b"\xf4" * (largest_code(64, 0x8000) + 1))
    with pytest.raises(GuestFileError, match="too large"):
        Guest.from_file(largest)


@pytest.mark.unit
def test_guest_source_that_is_not_utf8_is_named(tmp_path):
    source = tmp_path / "latin1.S"
    source.write_bytes(b"nop\n; caf\xe9\nhlt\n")
    with pytest.raises(GuestFileError, match=r"latin1\.S: not UTF-8 text: byte 0xe9 on line 2"):
        Guest.from_file(source)
    metadata = tmp_path / "latin1.json"
    metadata.write_bytes(b'{"description": "caf\xe9"}')
    with pytest.raises(GuestFileError, match=r"latin1\.json: not UTF-8"):
        Guest.from_file(source)


@pytest.mark.unit
def test_assembly_source_must_be_text():
    with pytest.raises(ConfigError, match="must be text"):
        Guest.from_asm(b"hlt\n")
