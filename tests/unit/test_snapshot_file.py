"""The snapshot file format: round trip, every corruption rejected, atomic replacement, a full disk."""

from __future__ import annotations

import resource
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labkit.errors import SnapshotError
from labkit.snapshot.file import (ENTRY, HEADER, NO_PARENT, SnapshotFile, SnapshotKind, new_snapshot_id,
                                  write_snapshot_file)

pytestmark = pytest.mark.unit

SECTIONS = {"regs": bytes(range(144)), "memory": bytes(range(256)) * 2, "device:uart": b"\x03\x00\x60"}


def load_all(path: Path) -> dict[str, bytes]:
    with SnapshotFile(path) as snapshot:
        snapshot.verify()
        return {name: bytes(snapshot.section(name)) for name in snapshot.names()}


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    path = tmp_path / "ref.snap"
    write_snapshot_file(path, SECTIONS)
    return path


def test_round_trip_keeps_order_ids_and_bytes(tmp_path: Path) -> None:
    parent = new_snapshot_id()
    header = write_snapshot_file(tmp_path / "d.snap", SECTIONS, kind=SnapshotKind.DIFF, parent_id=parent)
    with SnapshotFile(tmp_path / "d.snap") as snapshot:
        assert snapshot.header == header
        assert snapshot.header.is_diff and snapshot.header.parent_id == parent
        assert snapshot.names() == list(SECTIONS)
    assert load_all(tmp_path / "d.snap") == SECTIONS
    assert header.file_size == (tmp_path / "d.snap").stat().st_size == \
        HEADER.size + ENTRY.size * len(SECTIONS) + sum(map(len, SECTIONS.values()))


def test_every_single_byte_change_is_rejected(reference: Path, tmp_path: Path) -> None:
    good = reference.read_bytes()
    damaged = tmp_path / "damaged.snap"
    for offset in range(len(good)):
        for flip in (0x01, 0xFF):
            data = bytearray(good)
            data[offset] ^= flip
            damaged.write_bytes(data)
            with pytest.raises(SnapshotError):
                load_all(damaged)


def test_every_truncation_and_an_appended_byte_are_rejected(reference: Path, tmp_path: Path) -> None:
    good = reference.read_bytes()
    damaged = tmp_path / "short.snap"
    for length in range(len(good)):
        damaged.write_bytes(good[:length])
        with pytest.raises(SnapshotError, match="truncated|not a labkit snapshot|after the last section"):
            load_all(damaged)
    damaged.write_bytes(good + b"\0")
    with pytest.raises(SnapshotError, match="1 bytes after the last section"):
        load_all(damaged)


def rewrite_header(path: Path, **fields: int | bytes) -> None:
    """Change header fields and fix the header's CRC, as a buggy or hostile writer would."""
    import zlib
    data = bytearray(path.read_bytes())
    names = ["magic", "version", "kind", "snapshot_id", "parent_id", "count", "reserved", "table_crc", "header_crc"]
    values = dict(zip(names, HEADER.unpack_from(data)))
    values.update(fields)
    head = HEADER.pack(*(values[name] for name in names))
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    data[:HEADER.size] = head
    path.write_bytes(data)


@pytest.mark.parametrize(("fields", "message"), [
    ({"magic": b"QFI\xfb\0\0\0\3"}, "not a labkit snapshot"),
    ({"version": 2}, "version 2; this labkit reads version 1"),
    ({"kind": 7}, "unknown snapshot kind 7"),
    ({"count": 0}, "absurd section count 0"),
    ({"count": 1 << 31}, "absurd section count"),
    ({"kind": SnapshotKind.DIFF}, "diff snapshot with no parent"),
])
def test_header_fields_are_checked_even_with_a_good_checksum(reference: Path, fields: dict[str, int | bytes],
                                                             message: str) -> None:
    rewrite_header(reference, **fields)
    with pytest.raises(SnapshotError, match=message):
        SnapshotFile(reference)


def test_absurd_section_length_is_named(tmp_path: Path) -> None:
    import zlib
    path = tmp_path / "absurd.snap"
    write_snapshot_file(path, {"memory": b"x" * 64})
    data = bytearray(path.read_bytes())
    name, offset, _, crc, reserved = ENTRY.unpack_from(data, HEADER.size)
    data[HEADER.size:HEADER.size + ENTRY.size] = ENTRY.pack(name, offset, 1 << 62, crc, reserved)
    path.write_bytes(data)
    rewrite_header(path, table_crc=zlib.crc32(data[HEADER.size:HEADER.size + ENTRY.size]))
    with pytest.raises(SnapshotError, match="truncated or absurd length: section 'memory'"):
        SnapshotFile(path)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="section name"):
        write_snapshot_file(tmp_path / "x.snap", {"Memory!": b""})
    with pytest.raises(SnapshotError, match="1 to 256 sections"):
        write_snapshot_file(tmp_path / "x.snap", {})
    with pytest.raises(SnapshotError, match="must name its parent"):
        write_snapshot_file(tmp_path / "x.snap", {"a": b""}, kind=SnapshotKind.DIFF, parent_id=NO_PARENT)
    with pytest.raises(SnapshotError, match="no section 'disk'"):
        write_snapshot_file(tmp_path / "x.snap", {"a": b"1"})
        SnapshotFile(tmp_path / "x.snap").section("disk")
    with pytest.raises(SnapshotError, match="cannot read snapshot"):
        SnapshotFile(tmp_path / "missing.snap")
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_leaves_the_old_snapshot_and_no_temporary_file(reference: Path) -> None:
    """A write past RLIMIT_FSIZE fails (EFBIG) as a full disk would: the old file stays, the error says so."""
    script = textwrap.dedent(f"""
        import resource, signal
        from labkit.snapshot.file import write_snapshot_file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        write_snapshot_file({str(reference)!r}, {{"memory": bytes(1 << 20)}})
    """)
    before = reference.read_bytes()
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "SnapshotError: cannot save snapshot" in run.stderr and "is unchanged" in run.stderr
    assert "EFBIG" in run.stderr
    assert reference.read_bytes() == before
    assert not list(reference.parent.glob(".*.tmp"))
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY


WRITER = textwrap.dedent("""
    import sys
    from labkit.snapshot.file import write_snapshot_file
    path, size = sys.argv[1], int(sys.argv[2])
    versions = [{"memory": bytes([n]) * size, "regs": bytes([n]) * 144} for n in (0xAA, 0x55)]
    print("ready", flush=True)
    n = 0
    while True:
        write_snapshot_file(path, versions[n % 2])
        n += 1
""")


def kill_while_saving(folder: Path, kills: int, size: int = 1 << 20, seed: int = 1) -> list[str]:
    """Kill a process that saves snapshots over one file at random moments, then load the file.

    One outcome per kill: "0xaa" or "0x55" (the version that loaded, whole), "none" (killed before
    the first save finished), or "bad: <what>" (a mix of versions, or a file that does not load).
    """
    import random
    import time
    rng = random.Random(seed)
    path = folder / "vm.snap"
    outcomes = []
    for _ in range(kills):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size)], stdout=subprocess.PIPE)
        try:
            assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        if not path.exists():
            outcomes.append("none")
            continue
        try:
            sections = load_all(path)
        except SnapshotError as error:
            outcomes.append(f"bad: {error}")
            continue
        seen = set(sections["memory"]) | set(sections["regs"])
        outcomes.append(f"{seen.pop():#x}" if len(seen) == 1 else f"bad: mixed bytes {sorted(seen)}")
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink()
    return outcomes


@pytest.mark.slow
def test_kill_9_while_saving_leaves_the_old_or_the_new_snapshot(tmp_path: Path) -> None:
    """A sample of 20 kills; benchmarks/killsweep_snapshot.py runs 200."""
    outcomes = kill_while_saving(tmp_path, 20)
    assert [outcome for outcome in outcomes if outcome.startswith("bad")] == []
    assert sum(outcome != "none" for outcome in outcomes) >= 15


def test_cli_info_and_check_exit_codes(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from labkit.cli import main
    assert main(["snapshot", "check", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "full" in out and "memory" in out and "every section's checksum matches" in out
    assert main(["snapshot", "info", "--json", str(reference)]) == 0
    info = __import__("json").loads(capsys.readouterr().out)
    assert [section["name"] for section in info["sections"]] == list(SECTIONS) and info["kind"] == "full"
    damaged = tmp_path / "damaged.snap"
    data = bytearray(reference.read_bytes())
    data[-1] ^= 0x10
    damaged.write_bytes(data)
    assert main(["snapshot", "info", str(damaged)]) == 0  # info checks the header and table only
    capsys.readouterr()
    assert main(["snapshot", "check", str(damaged)]) == 2
    assert "section 'device:uart' checksum mismatch" in capsys.readouterr().err
    damaged.write_bytes(data[:100])
    assert main(["snapshot", "info", str(damaged)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["snapshot", "check", str(tmp_path / "missing.snap")]) == 1
    assert "no such file" in capsys.readouterr().err

