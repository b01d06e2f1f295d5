"""labkit's two small C files, built once per machine with the system compiler and loaded with ctypes.

``labkit/emu/trap_replay.c`` delivers the emulator's exceptions (``labkit.emu.native``),
``labkit/virtio/drain.c`` consumes a transmit queue's common chains
(``labkit.virtio.native``).  Neither uses Python or Unicorn headers (addresses and
function pointers are handed to them), so one build serves every Python version,
and each has a Python twin that gives the same results where it is not built.

Build: the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) with
:data:`FLAGS` into a per-user cache directory (``$LABKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/labkit`` or ``~/.cache/labkit``, mode 0700), named by a hash of
the source, the compiler and the flags, written to a temporary name and renamed
into place.  Where there is no compiler, the build fails, or ``LABKIT_NATIVE=0``
is set, :func:`build` returns a :class:`Built` without a library and with the reason.
Each C file is one :class:`Library`, built at most once per process, when first used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FLAGS = ("-O2", "-fPIC", "-shared", "-std=c99", "-Wall", "-Wextra")


@dataclass(frozen=True)
class Built:
    """One C file's build in this process: the loaded ``library`` and its ``path``, or the ``reason`` there is none."""

    library: ctypes.CDLL | None
    path: Path | None
    reason: str = ""


def cache_dir() -> Path:
    configured = os.environ.get("LABKIT_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "labkit"
    home = Path.home()
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".cache" / "labkit"
    return Path(tempfile.gettempdir()) / f"labkit-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    """``path``, created 0700 if missing; refused if another user owns it (we load code from it)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user")
    return path


def compiler() -> list[str] | None:
    configured = os.environ.get("CC")
    if configured:
        return shlex.split(configured)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def build(source: Path, check: Callable[[ctypes.CDLL], str | None]) -> Built:
    """Build ``source`` (or load the cached build) and hand the library to ``check``, which declares its
    functions' types and returns why it cannot be used (a layout that does not match its ctypes mirror), or None."""
    if os.environ.get("LABKIT_NATIVE", "1").strip().lower() in ("0", "no", "off", "false"):
        return Built(None, None, "turned off by LABKIT_NATIVE=0")
    command = compiler()
    if command is None:
        return Built(None, None, "no C compiler found (install gcc, or set CC)")
    text = source.read_bytes()
    digest = hashlib.sha256(b"\0".join([text, " ".join(command).encode(), " ".join(FLAGS).encode(),
                                        platform.machine().encode()])).hexdigest()[:16]
    try:
        directory = _private_dir(cache_dir())
        target = directory / f"{source.stem}-{digest}.so"
        library = _open_cached(target)
        if library is None:
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                built = Path(scratch) / target.name
                result = subprocess.run([*command, *FLAGS, "-o", str(built), str(source)],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                    return Built(None, None, f"{command[0]} could not build {source.name}: {detail}")
                os.replace(built, target)
            library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        return Built(None, None, f"cannot build or load {source.name}: {error}")
    refused = check(library)
    if refused:
        return Built(None, None, refused)
    return Built(library, target)


def _open_cached(target: Path) -> ctypes.CDLL | None:
    """The library built before, or None; a cached file that does not load is removed (and rebuilt)."""
    if not target.exists():
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError:
        target.unlink(missing_ok=True)
        return None


class Library:
    """One C file: :meth:`load` builds (or loads) it at most once per process; :meth:`status` says for ``labkit
    doctor`` what is used, ``using`` (the C file's job) or Python, and why."""

    def __init__(self, source: Path, check: Callable[[ctypes.CDLL], str | None], using: str):
        self.source = source
        self.using = using
        self._check = check
        self._built: Built | None = None
        self._lock = threading.Lock()
        # A worker forked while another thread of its caller builds would inherit the lock held by a thread
        # it does not have: it gets a lock of its own (and builds or loads for itself if it needs to).
        os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def built(self) -> Built:
        built = self._built
        if built is None:
            with self._lock:
                if self._built is None:
                    self._built = build(self.source, self._check)
                built = self._built
        return built

    def load(self) -> ctypes.CDLL | None:
        """The library, or None where it is not built (see :meth:`status`)."""
        return self.built().library

    def status(self) -> str:
        built = self.built()
        if built.library is not None:
            return f"{self.using} ({built.path})"
        return f"Python only: {built.reason}"
