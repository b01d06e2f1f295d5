"""Backups on real machines: the in-guest agent, VADP while the VM writes, a cold copy; a damaged base under a
snapshot; each backup restored and checked on the host and by the restored VM's agent. One lesson per backend,
shared by every assert here."""

from __future__ import annotations

import os

import pytest
from backends import HAS_KVM, NO_KVM_REASON

from labkit import Machine
from labkit.backup.agent import agent_backup
from labkit.backup.files import (METADATA_BYTES, SECTOR, encode_metadata, expected_scratch, format_files,
                                 read_files, scratch_numbers)
from labkit.backup.lesson import KINDS, lesson_table, run_backup_lesson, sample_files, stop_times
from labkit.errors import StorageError
from labkit.storage import Datastore, RawImage, open_image
from labkit.vmm.status import StatusKind

CHUNK = 64 << 10
DAMAGE = {"emu": "delete", "kvm": "corrupt"}  # one lesson per backend; the third damage is in the unit tests


@pytest.fixture(scope="module")
def lessons(tmp_path_factory):
    made = {}

    def lesson(backend):
        if backend not in made:
            made[backend] = run_backup_lesson(tmp_path_factory.mktemp(f"lesson-{backend}"), damage=DAMAGE[backend],
                                              backend=backend)
        return made[backend]

    return lesson


def test_the_agent_sends_every_file_over_the_console_in_64_kib_pieces(backend_name, lessons):
    lesson = lessons(backend_name)
    agent = lesson.agent
    files = sample_files()
    assert agent.report.ok and agent.report.good == tuple(files)
    with open(agent.path, "rb") as handle:
        assert handle.read() == encode_metadata(lesson.layout) + b"".join(files.values())
    pieces = sum(-(-len(data) // CHUNK) for data in files.values())
    assert (agent.chains, agent.disk_reads) == (1 + pieces, 1 + pieces)  # the metadata, then each piece
    assert agent.stream_bytes == METADATA_BYTES + sum(map(len, files.values()))
    assert agent.origin is not None and agent.origin.backend == backend_name


def test_vadp_backup_holds_the_disk_as_it_was_when_frozen_and_the_delta_is_committed(backend_name, lessons):
    lesson = lessons(backend_name)
    vadp, cold = lesson.vadp, lesson.cold
    assert vadp.kind == "vadp" and len(vadp.stuns_s) == 2 and vadp.report.ok
    with open_image(vadp.path) as image:
        frozen = scratch_numbers(image, lesson.layout)
    sectors = lesson.layout.scratch_sectors
    # every write the guest saw acknowledged before the stun, and at most the one the device had answered but
    # the guest not yet counted; nothing written on the delta afterwards
    assert frozen in (expected_scratch(vadp.writes_in_backup, sectors),
                      expected_scratch(vadp.writes_in_backup + 1, sectors))
    # the cold copy, taken after the commit, holds the delta's writes too: the commit carried them into the base
    assert cold.writes_in_backup >= vadp.writes_in_backup + vadp.writes_during_copy
    with open_image(cold.path) as image:
        assert scratch_numbers(image, lesson.layout) in (expected_scratch(cold.writes_in_backup, sectors),
                                                         expected_scratch(cold.writes_in_backup + 1, sectors))
    assert cold.kind == "cold copy" and len(cold.stuns_s) == 1 and cold.writes_during_copy == 0 and cold.report.ok
    assert vadp.delta_bytes > 0  # a qcow2 file existed and was committed ...
    store = os.listdir(os.path.join(lesson.folder, "datastore"))
    assert not [name for name in store if "backup-delta" in name]  # ... and deleted


def test_a_damaged_base_is_refused_and_every_backup_restores_files_that_check_out(backend_name, lessons):
    lesson = lessons(backend_name)
    if lesson.damage == "delete":
        assert lesson.refusal.startswith("StorageError:") and "does not exist" in lesson.refusal
        assert "a snapshot is not a backup" in lesson.refusal
    else:
        assert lesson.refusal.startswith("FilesDamaged:") and "SHA-256 differs" in lesson.refusal
    assert [item.kind for item in lesson.restored] == list(KINDS)
    files = sample_files()
    for item in lesson.restored:
        assert item.host_check.ok and item.vm_check.ok, (item.kind, item.host_check, item.vm_check)
        with open_image(os.path.join(lesson.folder, "datastore", item.image)) as image:
            assert read_files(image) == files
    table = lesson_table(lesson)
    assert [row[0] for row in table.rows] == list(KINDS)
    assert all(row[4] == row[5] == "all 5 files check out (SHA-256)" for row in table.rows)
    assert lesson.refusal in table.note


@pytest.mark.kvm
@pytest.mark.emu
@pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)
def test_the_agent_stream_is_the_same_on_both_backends(lessons):
    with open(lessons("kvm").agent.path, "rb") as kvm, open(lessons("emu").agent.path, "rb") as emu:
        assert kvm.read() == emu.read()


def test_the_agent_refuses_a_disk_without_files_and_a_directory_past_the_disk(backend_name, tmp_path):
    RawImage.create(tmp_path / "blank.raw", 1 << 20).close()
    with pytest.raises(StorageError, match="the disk's LKFS superblock or directory is bad"):
        agent_backup(tmp_path / "blank.raw", tmp_path / "blank.lkfs", backend=backend_name)
    # a directory whose CRCs are right but whose file reaches past the disk: the guest checks, not only the host
    store = Datastore(tmp_path / "store", capacity=8 << 20)
    store.create_raw("big.raw", 4 << 20)
    with store.open("big.raw") as big:
        layout = format_files(big, {"tail": bytes(1536 << 10)})  # sectors 9-3080: past a 1 MiB disk
        metadata = big.read(0, METADATA_BYTES)
    RawImage.create(tmp_path / "small.raw", 1 << 20).close()
    with RawImage.open(tmp_path / "small.raw", writable=True) as small:
        small.write(0, metadata)
    assert layout.disk_sectors * SECTOR == 4 << 20
    with pytest.raises(StorageError, match="superblock or directory is bad"):
        agent_backup(tmp_path / "small.raw", tmp_path / "small.lkfs", backend=backend_name)


def test_a_guest_cannot_fill_the_host_through_the_channel(backend_name, tmp_path):
    from labkit.backup.agent import CHANNEL_NAME, channel_devices
    from labkit.virtio.measure import PARAMS_ADDRESS, expected_console, parameter_block

    target = tmp_path / "channel"
    with Machine("ring_console64", backend=backend_name, devices=channel_devices(target, 1000)) as machine:
        machine.write_memory(PARAMS_ADDRESS, parameter_block(4096, 256, 4))
        result = machine.run(timeout=30)
        state = machine.device_state(CHANNEL_NAME)
    assert (result.status.kind, result.status.code) == (StatusKind.EXITED, 0)  # every chain still came back used
    assert (state["bytes"], state["dropped"]) == (4096, 4096 - 1000)
    assert target.read_bytes() == expected_console(4096).encode()[:1000]


def test_without_its_devices_backup64_says_so(backend_name):
    with Machine("backup64", backend=backend_name) as machine:
        result = machine.run(timeout=10)
    assert (result.status.kind, result.status.code) == (StatusKind.EXITED, 2)


def test_the_backup_figure_is_readable_and_says_what_measured_it(lessons, tmp_path):
    from labkit.backup.lesson import StopTimes
    from labkit.viz.backups import backup_figure, origin_label
    from labkit.viz.style import readability_problems

    lesson = lessons("emu")
    stops = stop_times(tmp_path / "stops", (1 << 20,), backend="emu")  # one size: the notebook runs three
    assert [stop.disk_bytes for stop in stops] == [1 << 20] and all(isinstance(s, StopTimes) for s in stops)
    assert all(stop.vadp.bytes_copied == stop.cold.bytes_copied == stop.disk_bytes for stop in stops)
    figure = backup_figure(lesson, stops)
    assert readability_problems(figure) == []
    assert origin_label(lesson.origin) in figure.get_suptitle()
    assert "emulator" in figure.get_suptitle()
    assert [name for name in os.listdir(tmp_path / "stops") if name.endswith(".raw")] == []  # backups deleted


def test_a_failed_copy_still_commits_the_delta_and_the_vm_goes_on(backend_name, tmp_path):
    from labkit.backup.host import DiskVM, vadp_backup
    from labkit.errors import ConfigError

    store = Datastore(tmp_path / "store", capacity=8 << 20)
    store.create_raw("base.raw", 1 << 20)
    with store.open("base.raw") as base:
        layout = format_files(base, sample_files({"a": 5000}), scratch_sectors=8)
    (tmp_path / "taken.raw").write_bytes(b"")
    vm = DiskVM(store, "base.raw", 1_000_000, backend=backend_name)
    try:
        vm.start()
        with pytest.raises(ConfigError, match="exists: a backup goes into a new file"):
            vadp_backup(vm, tmp_path / "taken.raw")  # refused before the VM is touched
        with pytest.raises(StorageError, match="cannot open"):
            vadp_backup(vm, "/proc/labkit-backup.raw")  # /proc takes no new file, not even from root: fails mid-way
        assert store.names() == ["base.raw"] and vm.disk == "base.raw" and vm.running
    finally:
        vm.close()
    with store.open("base.raw", writable=False) as base:  # every acknowledged write reached the base
        assert scratch_numbers(base, layout) in (expected_scratch(vm.acknowledged, 8),
                                                 expected_scratch(vm.acknowledged + 1, 8))
