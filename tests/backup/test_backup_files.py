"""LKFS, the backup lesson's file layout: round trips, every metadata byte's damage caught, damaged bases refused."""

from __future__ import annotations

import os

import pytest

from labkit.backup.agent import restore_agent_backup
from labkit.backup.files import (METADATA_BYTES, SECTOR, check_files, decode_metadata, encode_metadata,
                                 expected_scratch, format_files, parse_stream, read_files, read_layout,
                                 scratch_numbers, scratch_record)
from labkit.backup.lesson import DAMAGES, damage_disk, open_checked, sample_files
from labkit.errors import ConfigError, FilesDamaged, StorageError
from labkit.storage import Datastore, RawImage

pytestmark = pytest.mark.unit

FILES = sample_files({"a.txt": 700, "b.bin": 70_000, "empty": 0, "c.dat": 5000})


@pytest.fixture
def disk(tmp_path):
    RawImage.create(tmp_path / "disk.raw", 1 << 20).close()
    image = RawImage.open(tmp_path / "disk.raw", writable=True)
    yield image
    image.close()


def test_files_round_trip_and_sit_where_the_layout_says(disk):
    layout = format_files(disk, FILES, scratch_sectors=8)
    assert read_layout(disk) == layout
    assert read_files(disk) == FILES
    assert check_files(disk).ok and check_files(disk).good == tuple(FILES)
    sectors = [entry.first_sector for entry in layout.files]
    assert sectors == [9, 11, 148, 148]  # 700 bytes: 2 sectors; 70,000: 137; the empty file takes none
    assert layout.scratch_first == 158 and scratch_numbers(disk, layout) == [None] * 8
    assert disk.read(11 * SECTOR, 70_000) == FILES["b.bin"]


def test_every_byte_of_the_metadata_flipped_is_caught(disk):
    format_files(disk, FILES, scratch_sectors=8)
    metadata = disk.read(0, METADATA_BYTES)
    assert metadata == encode_metadata(read_layout(disk))
    for offset in range(METADATA_BYTES):
        damaged = bytearray(metadata)
        damaged[offset] ^= 0x01
        with pytest.raises(FilesDamaged):
            decode_metadata(bytes(damaged), 2048)


def test_a_flipped_data_byte_names_its_file_and_only_it(disk):
    layout = format_files(disk, FILES, scratch_sectors=8)
    entry = layout.files[1]
    byte = disk.read(entry.first_sector * SECTOR + 12_345, 1)
    disk.write(entry.first_sector * SECTOR + 12_345, bytes((byte[0] ^ 0x80,)))
    report = check_files(disk)
    assert not report.ok and list(report.damaged) == ["b.bin"] and "SHA-256" in report.damaged["b.bin"]
    assert report.good == ("a.txt", "empty", "c.dat")
    with pytest.raises(FilesDamaged, match="b.bin"):
        report.require()


def test_a_disk_without_the_layout_is_reported_not_read(disk):
    report = check_files(disk)
    assert not report.ok and "not an LKFS superblock" in report.layout_error


def test_layouts_that_do_not_fit_are_refused(disk):
    with pytest.raises(ConfigError, match="at most 32"):
        format_files(disk, {f"f{i}": b"" for i in range(33)})
    with pytest.raises(ConfigError, match="1-64 UTF-8 bytes"):
        format_files(disk, {"x" * 65: b""})
    with pytest.raises(ConfigError, match="the disk has 2048"):
        format_files(disk, {"big": bytes(1 << 20)})


def test_the_agent_stream_is_checked_exactly(disk):
    layout = format_files(disk, FILES, scratch_sectors=8)
    stream = encode_metadata(layout) + b"".join(FILES.values())
    parsed, files, report = parse_stream(stream)
    assert parsed == layout and files == FILES and report.ok
    for bad in (stream[:-1], stream + b"\0"):
        with pytest.raises(FilesDamaged, match="the agent's stream"):
            parse_stream(bad)
    flipped = bytearray(stream)
    flipped[METADATA_BYTES + 100] ^= 1
    assert list(parse_stream(bytes(flipped))[2].damaged) == ["a.txt"]


def test_a_damaged_agent_backup_is_refused_before_the_disk_is_touched(disk, tmp_path):
    layout = format_files(disk, FILES, scratch_sectors=8)
    stream = bytearray(encode_metadata(layout) + b"".join(FILES.values()))
    stream[-1] ^= 1
    (tmp_path / "backup.lkfs").write_bytes(bytes(stream))
    before = disk.read(0, disk.size)
    with pytest.raises(FilesDamaged, match="the backup itself is damaged: .*c.dat"):
        restore_agent_backup(tmp_path / "backup.lkfs", disk)
    assert disk.read(0, disk.size) == before


def test_scratch_records_say_which_writes_landed(disk):
    layout = format_files(disk, FILES, scratch_sectors=5)
    for number in range(13):  # what backup64's workload writes: round and round the scratch area
        disk.write((layout.scratch_first + number % 5) * SECTOR, scratch_record(number))
    assert scratch_numbers(disk, layout) == expected_scratch(13, 5) == [10, 11, 12, 8, 9]
    assert expected_scratch(3, 5) == [0, 1, 2, None, None]
    disk.write(layout.scratch_first * SECTOR, scratch_record(11))  # a record in the wrong sector
    with pytest.raises(FilesDamaged, match="no record of the workload"):
        scratch_numbers(disk, layout)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_base_makes_its_snapshot_useless(tmp_path, how):
    store = Datastore(tmp_path / "store", capacity=16 << 20)
    store.create_raw("base.raw", 1 << 20)
    with store.open("base.raw") as base:
        format_files(base, FILES, scratch_sectors=8)
    store.create_overlay("snap.qcow2", "base.raw")
    open_checked(store.file("snap.qcow2")).close()  # fine before
    said = damage_disk(store.file("base.raw"), how)
    expected = {"delete": (StorageError, "does not exist.*a snapshot is not a backup"),
                "corrupt": (FilesDamaged, "3 of 4 files damaged"),  # the empty file has no byte to flip
                "truncate": (FilesDamaged, "2 of 4 files damaged: b.bin: .*; c.dat")}[how]
    with pytest.raises(expected[0], match=expected[1]):
        open_checked(store.file("snap.qcow2"))
    assert os.path.exists(store.file("base.raw")) == (how != "delete")
    assert {"delete": "deleted", "corrupt": "flipped", "truncate": "cut"}[how] in said


def test_damage_names_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="delete, corrupt, truncate"):
        damage_disk(tmp_path / "x", "burn")
