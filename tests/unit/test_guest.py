"""labkit.guest: validation, loading from files and the shipped guests' manifest."""

from __future__ import annotations

import json

import pytest

from labkit.assembler import have_binutils
from labkit.errors import ConfigError, GuestFileError
from labkit.guest import Guest, GuestInfo, guests_dir, list_guests, load_manifest
from labkit.x86 import layout

pytestmark = pytest.mark.unit
needs_binutils = pytest.mark.skipif(not have_binutils(), reason="GNU binutils is not installed")

REQUIRED = {"hello16", "hello32", "hello64", "compute64", "exit64", "triplefault64",
            "unmapped64", "forever64", "forever_user64", "fault64"}


def test_defaults():
    guest = Guest.from_bytes(b"\xf4", mode=32, name="h")
    assert (guest.entry, guest.load_address, guest.user, guest.end) == (0x8000, 0x8000, False, 0x8001)
    guest.check_fits(layout.MIN_MEMORY)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(code=b"\xf4", mode=8), ConfigError, "mode must be 16, 32 or 64"),
        (dict(code=b""), GuestFileError, "no code"),
        (dict(code=b"\xf4", load_address=0x1000), ConfigError, "overlaps the system area"),
        (dict(code=bytes(0x70000)), GuestFileError, "too large"),
        (dict(code=b"\xf4", entry=0x9000), ConfigError, "outside its code"),
        (dict(code=bytes(0x9000), mode=16), GuestFileError, "below 0x10000"),
        (dict(code=b"\xf4", mode=16, user=True), ConfigError, "real mode has no rings"),
        (dict(code="hlt"), GuestFileError, "must be bytes"),
    ],
)
def test_validation(kwargs, error, words):
    with pytest.raises(error, match=words):
        Guest(name="bad", **kwargs)


def test_code_above_the_stacks_is_allowed_but_must_fit_in_ram():
    guest = Guest.from_bytes(b"\xf4", load_address=0x100000, name="high")
    with pytest.raises(ConfigError, match="only 0x100000 bytes"):
        guest.check_fits(layout.MIN_MEMORY)


def test_guests_are_frozen_and_comparable():
    guest = Guest.from_bytes(b"\xf4", name="h")
    with pytest.raises(AttributeError):
        guest.mode = 32  # type: ignore[misc]
    assert guest == Guest.from_bytes(b"\xf4", name="h")


def test_manifest_lists_the_required_guests():
    names = {info.name for info in list_guests()}
    assert REQUIRED <= names
    for info in list_guests():
        assert isinstance(info, GuestInfo) and info.mode in (16, 32, 64) and info.description
        assert (guests_dir() / info.source).is_file() and (guests_dir() / info.binary).is_file()


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_named_guests_load_from_their_binaries(name):
    guest = Guest.named(name)
    entry = {e["name"]: e for e in load_manifest()}[name]
    assert guest.code == (guests_dir() / entry["binary"]).read_bytes()
    assert (guest.mode, guest.user, guest.entry) == (entry["mode"], entry["user"], entry["entry"])
    assert guest.expected["status"] in ("halted", "exited", "shutdown", "timeout", "fault")
    assert Guest.named(name) is guest  # read once per process
    with pytest.raises(TypeError):  # so no caller may change what the next one gets
        guest.expected["status"] = "changed"  # type: ignore[index]


def test_user_guests_are_the_ring3_ones():
    users = {info.name for info in list_guests() if info.user}
    assert {"compute64", "forever_user64"} <= users
    assert "forever64" not in users


def test_unknown_shipped_guest():
    with pytest.raises(ConfigError, match="no shipped guest named 'nope'.*hello64"):
        Guest.named("nope")


def test_from_file_bin_with_metadata(tmp_path):
    (tmp_path / "spin.bin").write_bytes(b"\xeb\xfe")
    (tmp_path / "spin.json").write_text(json.dumps({"mode": 32, "user": True, "description": "spins"}))
    guest = Guest.from_file(tmp_path / "spin.bin")
    assert (guest.name, guest.mode, guest.user, guest.description) == ("spin", 32, True, "spins")
    assert Guest.from_file(tmp_path / "spin.bin", mode=64).mode == 64


def test_from_file_bin_without_metadata_is_64_bit(tmp_path):
    (tmp_path / "plain.bin").write_bytes(b"\xf4")
    assert Guest.from_file(tmp_path / "plain.bin").mode == 64


@pytest.mark.parametrize(
    "metadata,words",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"mode": "64"}', "'mode' must be int"),
        ('{"colour": "red"}', "unknown metadata keys"),
    ],
)
def test_from_file_bad_metadata(tmp_path, metadata, words):
    (tmp_path / "g.bin").write_bytes(b"\xf4")
    (tmp_path / "g.json").write_text(metadata)
    with pytest.raises(GuestFileError, match=words) as caught:
        Guest.from_file(tmp_path / "g.bin")
    assert "g.json" in str(caught.value)


def test_from_file_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(GuestFileError, match="unknown guest file type '.exe'"):
        Guest.from_file(tmp_path / "g.exe")
    with pytest.raises(GuestFileError, match="cannot read"):
        Guest.from_file(tmp_path / "missing.bin")


@needs_binutils
def test_from_asm_and_from_file_source(tmp_path):
    guest = Guest.from_asm("mov al, 1\nhlt", mode=16, name="tiny")
    assert guest.code == b"\xb0\x01\xf4" and guest.mode == 16
    (tmp_path / "tiny.S").write_text("hlt\n")
    assert Guest.from_file(tmp_path / "tiny.S", mode=32).code == b"\xf4"


@needs_binutils
def test_from_asm_rejects_a_bad_mode_before_assembling():
    with pytest.raises(ConfigError):
        Guest.from_asm("hlt", mode=8)
