"""Guest programs: flat x86 code, the mode it starts in, and where it is loaded.

A :class:`Guest` is what a :class:`labkit.Machine` runs.  Make one from GNU as
source (``Guest.from_asm``), from raw bytes (``Guest.from_bytes``), from a file
(``.S``/``.s``/``.asm`` assembled, ``.bin`` loaded with metadata from a sibling
``.json``), or take a shipped one by name (``Guest.named("hello64")``); the
shipped guests' prebuilt binaries load without binutils.

Shipped guests live in ``<repo>/guests`` (source checkout / editable install)
or ``labkit/_guests`` (wheel), described by ``guests.json``.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from labkit.errors import AssemblyError, ConfigError, GuestFileError
from labkit.x86 import layout

if TYPE_CHECKING:
    from labkit.assembler import Insertion

MODES = (16, 32, 64)
ASSEMBLY_SUFFIXES = (".S", ".s", ".asm")
MANIFEST = "guests.json"

KERNEL_STACK_SIZE = 0x4000
"""Room kept free below KERNEL_STACK_TOP for the ring-0 stack."""
RESERVED_STACKS = (layout.KERNEL_STACK_TOP - KERNEL_STACK_SIZE, layout.STACK_TOP)
"""[start, end) of the kernel and user stacks: guest code may not overlap them."""
REAL_MODE_LIMIT = 0x10000
"""16-bit code runs with CS = 0, so it must end below 64 KiB."""

MAX_SOURCE_BYTES = 16 << 20
"""The largest guest source file read (GNU as source of a tiny guest is a few KiB)."""
MAX_METADATA_BYTES = 1 << 20
"""The largest guest metadata (``.json``) file read."""

_METADATA_KEYS = {"name", "mode", "load_address", "entry", "user", "description", "expected"}


@dataclass(frozen=True)
class Guest:
    """A guest program: ``code`` loaded at ``load_address``, started at ``entry`` in ``mode``.

    ``user=True`` starts it in ring 3 (32- and 64-bit mode only); see
    :func:`labkit.x86.boot.boot_state`.  ``expected`` is what a shipped guest
    is known to do (status, exit code, console output) and is used by tests.
    """

    name: str
    code: bytes
    mode: int = 64
    load_address: int = layout.LOAD_ADDRESS
    entry: int | None = None
    user: bool = False
    description: str = ""
    expected: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"guest {self.name!r}: mode must be 16, 32 or 64, not {self.mode!r}")
        if not isinstance(self.code, (bytes, bytearray, memoryview)):
            raise GuestFileError(f"guest {self.name!r}: code must be bytes, not {type(self.code).__name__}")
        object.__setattr__(self, "code", bytes(self.code))
        if not self.code:
            raise GuestFileError(f"guest {self.name!r} has no code (0 bytes)")
        if self.entry is None:
            object.__setattr__(self, "entry", self.load_address)
        start, end = self.load_address, self.load_address + len(self.code)
        if start < layout.LOAD_ADDRESS:
            raise ConfigError(
                f"guest {self.name!r}: load address {start:#x} overlaps the system area "
                f"[0, {layout.LOAD_ADDRESS:#x}) (IVT, GDT, IDT, TSS, page tables)"
            )
        if start < RESERVED_STACKS[1] and end > RESERVED_STACKS[0]:
            raise GuestFileError(
                f"guest {self.name!r} is too large: its code [{start:#x}, {end:#x}) overlaps the "
                f"stacks at [{RESERVED_STACKS[0]:#x}, {RESERVED_STACKS[1]:#x}); at most "
                f"{RESERVED_STACKS[0] - layout.LOAD_ADDRESS} bytes fit at {layout.LOAD_ADDRESS:#x}"
            )
        if end > layout.MAX_MEMORY:
            raise GuestFileError(f"guest {self.name!r} ends at {end:#x}, beyond the largest RAM ({layout.MAX_MEMORY:#x})")
        entry = self.load_address if self.entry is None else self.entry
        if not start <= entry < end:
            raise ConfigError(f"guest {self.name!r}: entry {entry:#x} is outside its code [{start:#x}, {end:#x})")
        if self.mode == 16 and end > REAL_MODE_LIMIT:
            raise GuestFileError(
                f"16-bit guest {self.name!r} ends at {end:#x}: real-mode code runs with CS = 0 "
                f"and must end below {REAL_MODE_LIMIT:#x}"
            )
        if self.user and self.mode == 16:
            raise ConfigError(f"guest {self.name!r}: real mode has no rings, user=True needs mode 32 or 64")

    @property
    def end(self) -> int:
        """First guest-physical address after the code."""
        return self.load_address + len(self.code)

    def check_fits(self, memory_size: int) -> None:
        """Raise ConfigError when the code does not fit in ``memory_size`` bytes of RAM."""
        if self.end > memory_size:
            raise ConfigError(
                f"guest {self.name!r} ends at {self.end:#x} but the VM has only {memory_size:#x} bytes of RAM"
            )

    @classmethod
    def from_asm(
        cls, source: str, mode: int = 64, name: str = "asm", *,
        load_address: int = layout.LOAD_ADDRESS, entry: int | None = None,
        user: bool = False, description: str = "", insertion: Insertion | None = None,
    ) -> Guest:
        """Assemble Intel-syntax GNU as ``source`` (see :func:`labkit.assembler.assemble`).

        ``insertion`` (from :func:`labkit.assembler.splice`) makes errors name the inserted text's lines.
        """
        from labkit.assembler import assemble

        if mode not in MODES:
            raise ConfigError(f"guest {name!r}: mode must be 16, 32 or 64, not {mode!r}")
        code = assemble(source, mode, load_address, insertion=insertion)
        return cls(name, code, mode, load_address, entry, user, description)

    @classmethod
    def from_bytes(
        cls, code: bytes, mode: int = 64, name: str = "bytes", *,
        load_address: int = layout.LOAD_ADDRESS, entry: int | None = None,
        user: bool = False, description: str = "",
    ) -> Guest:
        """A guest from machine code already assembled for ``load_address``."""
        return cls(name, code, mode, load_address, entry, user, description)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], mode: int | None = None) -> Guest:
        """Load ``.S``/``.s``/``.asm`` (assembled) or ``.bin`` (raw) guest code.

        Metadata (name, mode, load_address, entry, user, description, expected)
        comes from a sibling ``<stem>.json`` if there is one; ``mode`` given
        here wins over it; without either the mode is 64.
        """
        path = Path(path)
        if path.suffix not in ASSEMBLY_SUFFIXES + (".bin",):
            raise GuestFileError(
                f"{path}: unknown guest file type {path.suffix!r}: use .S, .s or .asm (GNU as source) or .bin (flat binary)"
            )
        metadata = _read_metadata(path.with_suffix(".json"))
        if mode is not None:
            metadata["mode"] = mode
        metadata.setdefault("name", path.stem)
        metadata.setdefault("mode", 64)
        if path.suffix == ".bin":
            load_address = metadata.get("load_address", layout.LOAD_ADDRESS)
            code = read_file(path, largest_code(metadata["mode"], load_address),
                             f"at most {{limit}} bytes of code fit at {load_address:#x}")
        else:
            source = decode_source(read_file(path, MAX_SOURCE_BYTES, "guest source is at most {limit} bytes"),
                                   str(path))
            from labkit.assembler import assemble

            if metadata["mode"] not in MODES:
                raise ConfigError(f"{path}: mode must be 16, 32 or 64, not {metadata['mode']!r}")
            try:
                code = assemble(source, metadata["mode"], metadata.get("load_address", layout.LOAD_ADDRESS))
            except AssemblyError as error:
                raise AssemblyError(f"{path}: {error}") from None
        return cls(code=code, **metadata)

    @classmethod
    def named(cls, name: str) -> Guest:
        """A shipped guest by name (``list_guests()`` shows them), from its prebuilt binary.

        Kept per process and binary file: read again only when the file's size or mtime changed
        (a rebuild), so a fleet of the same guest reads it once.
        """
        entries = _manifest_by_name(os.path.join(guests_dir(), MANIFEST))
        if name not in entries:
            raise ConfigError(f"no shipped guest named {name!r}; there are: {', '.join(sorted(entries))}")
        entry = entries[name]
        path = os.path.join(guests_dir(), entry["binary"])
        try:
            info = os.stat(path)
            version = (path, info.st_mtime_ns, info.st_size)
            known = _NAMED.get(name)
            if known is not None and known[0] == version:
                return known[1]
            with open(path, "rb") as file:
                code = file.read()
        except OSError as error:
            raise GuestFileError(
                f"shipped guest {name!r}: cannot read {path}: {error.strerror or error} "
                "(rebuild with `python -m labkit.assembler --build-guests`)"
            ) from None
        guest = cls(
            name, code, entry["mode"], entry["load_address"], entry["entry"], entry["user"],
            entry["description"], MappingProxyType(dict(entry.get("expected", {}))),
        )  # read-only ``expected``: the same Guest is handed to every caller that names it
        if len(code) == info.st_size:  # not a file caught halfway through a rebuild
            _NAMED[name] = (version, guest)
        return guest


_NAMED: dict[str, tuple[tuple[str, int, int], Guest]] = {}
"""``Guest.named``'s guests by name, with the (path, mtime, size) of the binary they were read from."""


@dataclass(frozen=True)
class GuestInfo:
    """One shipped guest as ``guests.json`` describes it."""

    name: str
    mode: int
    description: str
    user: bool
    load_address: int
    entry: int
    source: str
    binary: str
    expected: dict = field(default_factory=dict)


def list_guests() -> list[GuestInfo]:
    """The shipped guests, in manifest order."""
    return [
        GuestInfo(
            entry["name"], entry["mode"], entry["description"], entry["user"], entry["load_address"],
            entry["entry"], entry["source"], entry["binary"], dict(entry.get("expected", {})),
        )
        for entry in load_manifest()
    ]


@lru_cache(maxsize=1)
def guests_dir() -> Path:
    """Where the shipped guests live: ``labkit/_guests`` in a wheel, else ``<repo>/guests`` (found once)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_guests", package.parent / "guests"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise GuestFileError(
        f"the shipped guests are missing: no {MANIFEST} in {package / '_guests'} or {package.parent / 'guests'}"
    )


def load_manifest() -> list[dict[str, Any]]:
    """The entries of ``guests.json``, checked; raises GuestFileError naming what is wrong."""
    return [dict(entry) for entry in _manifest(str(guests_dir() / MANIFEST))]


_MANIFEST_FIELDS = {
    "name": str, "source": str, "binary": str, "mode": int, "load_address": int,
    "entry": int, "user": bool, "description": str, "expected": dict,
}
EXPECTED_STATUSES = ("halted", "exited", "shutdown", "timeout", "fault")


@lru_cache(maxsize=4)
def _manifest_by_name(path: str) -> dict[str, dict[str, Any]]:
    """The manifest's entries by name (read-only: :func:`load_manifest` hands out copies)."""
    return {entry["name"]: entry for entry in _manifest(path)}


@lru_cache(maxsize=4)
def _manifest(path: str) -> tuple[dict[str, Any], ...]:
    document = _read_json(Path(path))
    if not isinstance(document, dict) or not isinstance(document.get("guests"), list):
        raise GuestFileError(f"{path}: expected an object with a \"guests\" list")
    entries = []
    for index, entry in enumerate(document["guests"]):
        where = f"{path}: guests[{index}]"
        if not isinstance(entry, dict):
            raise GuestFileError(f"{where} is not an object")
        for key, kind in _MANIFEST_FIELDS.items():
            if key not in entry:
                raise GuestFileError(f"{where} has no {key!r}")
            if not isinstance(entry[key], kind) or (kind is int and isinstance(entry[key], bool)):
                raise GuestFileError(f"{where}.{key} must be {kind.__name__}, not {entry[key]!r}")
        status = entry["expected"].get("status")
        if status not in EXPECTED_STATUSES:
            raise GuestFileError(f"{where}.expected.status must be one of {EXPECTED_STATUSES}, not {status!r}")
        entries.append(entry)
    return tuple(entries)


def largest_code(mode: int, load_address: int) -> int:
    """How many bytes of code a guest of ``mode`` loaded at ``load_address`` can have (see :class:`Guest`)."""
    if mode == 16:
        return max(REAL_MODE_LIMIT - load_address, 0)
    if load_address < RESERVED_STACKS[0]:
        return RESERVED_STACKS[0] - load_address
    return max(layout.MAX_MEMORY - max(load_address, RESERVED_STACKS[1]), 0)


def read_file(path: Path, limit: int, why: str) -> bytes:
    """The contents of the regular file ``path``, at most ``limit`` bytes, or a :class:`GuestFileError`.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` before anything is
    read, so a FIFO or a device named like a guest fails at once instead of
    blocking, and a huge file is refused by its size, never read whole (at
    most ``limit + 1`` bytes are read even if it grows meanwhile).  ``why``
    completes the too-large message; ``{limit}`` in it is filled in.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise GuestFileError(f"{path}: cannot read: {error.strerror or error}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GuestFileError(f"{path}: not a regular file but {_file_kind(info.st_mode)}; "
                                 "a guest is read from a file")
        raise GuestFileError(f"{path}: {info.st_size} bytes is too large: {why.format(limit=limit)}")
    with open(fd, "rb", buffering=0, closefd=True) as file:
        chunks, total = [], 0
        try:
            while total <= limit:
                chunk = file.read(limit + 1 - total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except OSError as error:
            raise GuestFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if total > limit:
        raise GuestFileError(f"{path}: grew past {limit} bytes while being read: {why.format(limit=limit)}")
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def decode_source(data: bytes, where: str) -> str:
    """Guest source or metadata bytes as text; a :class:`GuestFileError` naming the first bad byte if not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise GuestFileError(f"{where}: not UTF-8 text: byte {data[error.start]:#04x} on line {line} "
                             f"(save the file as UTF-8)") from None


def _read_json(path: Path) -> Any:
    text = decode_source(read_file(path, MAX_METADATA_BYTES, "guest metadata is at most {limit} bytes"), str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise GuestFileError(f"{path}: malformed JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None


def _read_metadata(path: Path) -> dict[str, Any]:
    """A guest file's sibling ``.json`` metadata, checked; ``{}`` when there is none."""
    if not os.path.lexists(path):
        return {}
    metadata = _read_json(path)
    if not isinstance(metadata, dict):
        raise GuestFileError(f"{path}: guest metadata must be a JSON object, not {type(metadata).__name__}")
    unknown = set(metadata) - _METADATA_KEYS
    if unknown:
        raise GuestFileError(f"{path}: unknown metadata keys {sorted(unknown)}; allowed: {sorted(_METADATA_KEYS)}")
    kinds = {"name": str, "mode": int, "load_address": int, "entry": int, "user": bool,
             "description": str, "expected": dict}
    for key, value in metadata.items():
        if not isinstance(value, kinds[key]) or (kinds[key] is int and isinstance(value, bool)):
            raise GuestFileError(f"{path}: {key!r} must be {kinds[key].__name__}, not {value!r}")
    return metadata
