"""Assemble guest source with GNU binutils: ``as`` -> ``ld`` -> ``objcopy -O binary``.

``assemble(source, mode)`` prepends ``.intel_syntax noprefix`` and ``.code16`` /
``.code32`` / ``.code64``, assembles with ``as --32`` (16/32-bit) or ``as --64``,
links every section into one flat image at ``load_address`` and returns its
bytes.  The result is deterministic: no build ids, no time stamps.  Keystone is
not used: it silently encodes ``mov rbx, [0x3000]`` as RIP-relative.

``python -m labkit.assembler --build-guests`` rebuilds the shipped guests'
binaries from their sources (see :func:`build_guests`).

A student's few lines spliced into a larger source (a routine of
``minikernel64``, the task of ``rings64``) go through :func:`splice`: an
error in them then names the student's own line and quotes it ("your
routine, line 1: Error: no such instruction ..."), not the line of the
generated source.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from labkit.errors import AssemblyError, ConfigError, GuestError, strerror
from labkit.x86.layout import LOAD_ADDRESS

MODES = (16, 32, 64)
INSTALL_HINT = (
    "GNU binutils (as, ld, objcopy) is needed to assemble guest source: "
    "install it with `apt install binutils` (Debian/Ubuntu), `dnf install binutils` (Fedora) "
    "or `conda install -c conda-forge binutils`; the shipped guests' prebuilt binaries work without it"
)
_TOOL_PREFIXES = ("", "x86_64-linux-gnu-", "x86_64-conda-linux-gnu-", "x86_64-elf-")
_TIMEOUT_S = 30
_NO_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN)

_LINKER_SCRIPT = """\
SECTIONS
{{
  . = {load:#x};
  .image : {{ *(.text .text.*) *(.rodata .rodata.*) *(.data .data.*) *(.bss .bss.* COMMON) }}
  /DISCARD/ : {{ *(.note*) *(.comment) *(.eh_frame*) }}
}}
"""


@lru_cache(maxsize=None)
def _tools() -> tuple[str, str, str]:
    """Paths of GNU ``as``, ``ld`` and ``objcopy``, found once.

    ``LABKIT_BINUTILS_PREFIX`` (e.g. ``x86_64-elf-``) picks a cross toolchain.
    """
    prefixes = (os.environ["LABKIT_BINUTILS_PREFIX"],) if "LABKIT_BINUTILS_PREFIX" in os.environ else _TOOL_PREFIXES
    for prefix in prefixes:
        as_path, ld_path, objcopy_path = (shutil.which(prefix + name) for name in ("as", "ld", "objcopy"))
        if as_path and ld_path and objcopy_path and _is_gnu_as(as_path):
            return as_path, ld_path, objcopy_path
    raise AssemblyError(f"GNU binutils not found on PATH. {INSTALL_HINT}")


def _is_gnu_as(path: str) -> bool:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=_TIMEOUT_S)
    except OSError as error:
        if error.errno in _NO_RESOURCES:  # `as` is there, this process cannot start it: say so, not "missing"
            raise AssemblyError(f"cannot start {path}: {strerror(error.errno)}") from error
        return False
    except subprocess.SubprocessError:
        return False
    return result.returncode == 0 and "GNU assembler" in result.stdout


def binutils_version() -> str:
    """The GNU assembler's version, e.g. ``"2.40"``; raises AssemblyError when binutils is missing."""
    as_path = _tools()[0]
    output = subprocess.run([as_path, "--version"], capture_output=True, text=True, timeout=_TIMEOUT_S).stdout
    first = output.splitlines()[0] if output else ""
    match = re.search(r"(\d+\.\d+(?:\.\d+)?)\s*$", first)
    return match.group(1) if match else first


def have_binutils() -> bool:
    """True when GNU as, ld and objcopy are installed."""
    try:
        _tools()
    except AssemblyError:
        return False
    return True


@dataclass(frozen=True)
class Insertion:
    """Where :func:`splice` put someone's text in a larger source, so errors can point back at it."""

    first_line: int
    """Line of the whole source (1-based) where the inserted text's first line is."""
    lines: tuple[str, ...]
    """The inserted text, line by line."""
    name: str
    """What to call it in a message: ``"your routine"``."""

    def locate(self, line: int) -> str:
        """``your routine, line 2`` for a line of the whole source inside the insertion, else ``line N of the whole source``."""
        index = line - self.first_line
        if 0 <= index < len(self.lines):
            return f"{self.name}, line {index + 1}"
        return f"line {line} of the source around {self.name}"

    def quote(self, line: int) -> str:
        """The inserted line at ``line`` of the whole source, or ``""`` outside the insertion."""
        index = line - self.first_line
        return self.lines[index].strip() if 0 <= index < len(self.lines) else ""


def splice(template: str, start: int, end: int, text: str, name: str) -> tuple[str, Insertion]:
    """``template`` with ``template[start:end]`` replaced by ``text``, and where ``text`` landed.

    Pass the :class:`Insertion` to :func:`assemble` (or ``Guest.from_asm``) and
    its errors name ``name``'s own lines.  ``text`` keeps its lines as given;
    a trailing newline is added when ``template[end:]`` does not start a line.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{name} must be assembly source text, not {type(text).__name__}")
    if not 0 <= start <= end <= len(template):
        raise ConfigError(f"cannot splice at {start}:{end} into a source of {len(template)} characters")
    body = text.rstrip("\n")
    if end < len(template) and template[end] != "\n":
        body += "\n"
    first_line = template.count("\n", 0, start) + 1
    return template[:start] + body + template[end:], Insertion(first_line, tuple(body.split("\n")), name)


def _prelude(mode: int) -> list[str]:
    return [".intel_syntax noprefix", f".code{mode}"]


def assemble(source: str, mode: int, load_address: int = LOAD_ADDRESS, *, insertion: Insertion | None = None) -> bytes:
    """Assemble Intel-syntax ``source`` for ``mode`` 16/32/64 into a flat image at ``load_address``.

    Runs ``as`` (with ``-g``, so that ``ld`` can name the line of an undefined
    symbol; the debug sections never reach the flat image; and ``-I``
    :func:`include_dir`, so ``.include "uart_print.inc"`` works), ``ld`` and
    ``objcopy`` in a temporary directory.  Raises
    :class:`AssemblyError` with the tool's messages, line numbers counted in
    ``source`` (or, with ``insertion`` from :func:`splice`, in the inserted
    text, quoting its line), or saying how to install binutils when it is missing.
    """
    if not isinstance(source, str):
        raise ConfigError(f"guest source must be text (str), not {type(source).__name__}")
    if mode not in MODES:
        raise ConfigError(f"mode must be 16, 32 or 64, not {mode!r}")
    if not 0 <= load_address < 1 << 32:
        raise ConfigError(f"load_address must be a 32-bit address, not {load_address:#x}")
    as_path, ld_path, objcopy_path = _tools()
    prelude = _prelude(mode)
    text = "\n".join(prelude) + "\n" + source
    if not text.endswith("\n"):
        text += "\n"  # as warns about a last line without a newline
    as_flag, emulation = ("--64", "elf_x86_64") if mode == 64 else ("--32", "elf_i386")
    try:
        return _assemble_in(text, load_address, as_flag, emulation, as_path, ld_path, objcopy_path, len(prelude),
                            insertion)
    except OSError as error:  # the temporary directory, its files, starting a tool: out of fds, space, memory
        raise AssemblyError(f"cannot assemble: {strerror(error.errno or 0)}"
                            + (f": {error.filename}" if error.filename else "")) from error


def include_dir() -> Path:
    """``guests/include``: the routines the shipped guests share (console output, virtio-mmio's registers), which
    any source may ``.include`` by name."""
    from labkit.guest import guests_dir  # lazy: guest imports this module

    return guests_dir() / "include"


def _assemble_in(text: str, load_address: int, as_flag: str, emulation: str, as_path: str, ld_path: str,
                 objcopy_path: str, prelude_lines: int, insertion: Insertion | None) -> bytes:
    with tempfile.TemporaryDirectory(prefix="labkit-as-") as tmp:
        directory = Path(tmp)
        try:
            (directory / "guest.S").write_text(text, encoding="utf-8")
        except UnicodeEncodeError as error:
            raise AssemblyError(f"the source is not valid Unicode text: {error.reason} at character {error.start}") \
                from None
        (directory / "guest.ld").write_text(_LINKER_SCRIPT.format(load=load_address))
        _run([as_path, as_flag, "-g", "-I", str(include_dir()), "-o", "guest.o", "guest.S"], directory, "as",
             prelude_lines, insertion)
        _run(
            [ld_path, "-m", emulation, "--build-id=none", "-nostdlib", "-e", f"{load_address:#x}", "-T", "guest.ld", "-o", "guest.elf", "guest.o"],
            directory, "ld", prelude_lines, insertion,
        )
        _run([objcopy_path, "-O", "binary", "guest.elf", "guest.bin"], directory, "objcopy", prelude_lines, insertion)
        return (directory / "guest.bin").read_bytes()


def _run(argv: list[str], directory: Path, tool: str, prelude_lines: int, insertion: Insertion | None = None) -> None:
    try:
        result = subprocess.run(argv, cwd=directory, capture_output=True, text=True, errors="replace", timeout=_TIMEOUT_S)
    except FileNotFoundError as error:
        raise AssemblyError(f"{tool} could not be started ({error}). {INSTALL_HINT}") from None
    except subprocess.TimeoutExpired:
        raise AssemblyError(f"{tool} did not finish within {_TIMEOUT_S} s") from None
    if result.returncode != 0:
        message = _user_messages(result.stderr + result.stdout, prelude_lines, insertion)
        raise AssemblyError(f"{tool} failed:\n{message}")


def _user_messages(output: str, prelude_lines: int, insertion: Insertion | None = None) -> str:
    """Tool messages with ``guest.S:7:`` turned into ``line 5:`` of the user's source.

    With an ``insertion``, a line inside it becomes ``your routine, line 1:``
    followed by that line's text, and one outside it says it is in the source
    around the insertion.
    """
    def where(match: re.Match[str]) -> str:
        line = max(int(match.group(1)) - prelude_lines, 1)
        return f"{insertion.locate(line)}: " if insertion else f"line {line}: "

    lines = []
    for line in output.splitlines():
        if line.endswith("Assembler messages:") or "LOAD segment with RWX permissions" in line:
            continue  # as's heading, and ld's warning about labkit's own one-segment image
        if insertion and re.search(r"guest\.o: in function `", line):
            continue  # a label of the surrounding source; the next line says where
        location = re.compile(r"(?:\S*/)?guest\.S:(\d+):\s*")  # `as` names the file; `ld` (with -g) its path
        found = location.search(line)
        line = location.sub(where, line, count=1)
        lines.append(line.replace("guest.S", "source"))
        if insertion and found:
            quoted = insertion.quote(max(int(found.group(1)) - prelude_lines, 1))
            if quoted:
                lines.append(f"    {quoted}")
    return "\n".join(lines).strip() or "(no message)"


def build_guests(out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Rebuild every shipped guest's binary from its source, per ``guests/guests.json``.

    Writes into the guests directory itself, or into ``out_dir``; returns the
    paths written.
    """
    from labkit.guest import guests_dir, load_manifest  # lazy: guest imports this module

    source_dir = guests_dir()
    target = Path(out_dir) if out_dir is not None else source_dir
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in load_manifest():
        source = (source_dir / entry["source"]).read_text(encoding="utf-8")
        code = assemble(source, entry["mode"], entry["load_address"])
        path = target / entry["binary"]
        path.write_bytes(code)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.assembler", description=__doc__.splitlines()[0])
    parser.add_argument("--build-guests", action="store_true", help="rebuild the shipped guests' binaries")
    parser.add_argument("--out", help="write the binaries here instead of the guests directory")
    parser.add_argument("--mode", type=int, default=64, choices=MODES, help="mode for assembling FILE")
    parser.add_argument("file", nargs="?", help="assemble this file and write FILE.bin")
    args = parser.parse_args(argv)
    try:
        if args.build_guests:
            for path in build_guests(args.out):
                print(f"wrote {path} ({path.stat().st_size} bytes)")
            return 0
        if args.file:
            from labkit.guest import MAX_SOURCE_BYTES, decode_source, read_file

            source = decode_source(read_file(Path(args.file), MAX_SOURCE_BYTES, "guest source is at most {limit} bytes"),
                                   args.file)
            code = assemble(source, args.mode)
            out = Path(args.out) if args.out else Path(args.file).with_suffix(".bin")
            out.write_bytes(code)
            print(f"wrote {out} ({len(code)} bytes)")
            return 0
    except (GuestError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
