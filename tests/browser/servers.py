"""Shared by the browser tests: Debian's Chromium, and servers (JupyterLab, Voila) that leave nothing behind.

A Jupyter server starts each kernel in a session of its own, and a kernel's
labkit workers are its children: a server's session alone does not name them.
:class:`Server` therefore remembers every descendant it has seen while it ran
(:meth:`Server.seen`) and, when stopped, ends and reports any that outlived it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from processes import descendants  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def require_chromium(path: str | None = None) -> None:
    """Fail (never skip) where Debian's Chromium is missing: CI installs it (scripts/setup test)."""
    path = path or CHROMIUM
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"{path} is missing: install Debian's Chromium (sudo apt-get install -y chromium, "
                    "or scripts/setup test); the browser tests never download a browser", pytrace=False)


@contextlib.contextmanager
def chromium():
    """Headless Debian Chromium through Playwright; afterwards no browser or driver process of this test is left."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
    deadline = time.monotonic() + 10
    while (left := _browser_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, 9)
    assert left == [], f"Chromium or Playwright's driver outlived the browser: {left}"


def _browser_processes() -> list[int]:
    """This process's descendants that are Chromium or Playwright's driver."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read().split(b"\0")[0]
        except OSError:
            continue
        if b"chromium" in command or command.endswith(b"playwright/driver/node"):
            found.append(pid)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), or None when it is gone or a zombie: tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(") ", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


class Server:
    """A server process started in a session of its own, with its log; :meth:`stop` proves it left nothing."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = open(log, "w+")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                        start_new_session=True)
        self.known: dict[int, int | None] = {}

    def first_line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline()

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def wait_until_listening(self, port: int, seconds: float) -> None:
        """Until something accepts connections on 127.0.0.1:``port``; fails with the log if the server died."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not come up on port {port}:\n{self.tail()}") from None
                time.sleep(0.25)

    def seen(self) -> None:
        """Remember the server's kernels and their workers as they are now (call while it serves a page)."""
        for pid in descendants(self.process.pid):
            self.known.setdefault(pid, _start_time(pid))

    def stop(self) -> list[int]:
        """SIGTERM, then SIGKILL after 30 s; returns the processes that outlived it (and kills them)."""
        self.seen()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        from processes import session_processes

        deadline = time.monotonic() + 10
        left = []
        while time.monotonic() < deadline:
            left = sorted({pid for pid, started in self.known.items() if started is not None
                           and _start_time(pid) == started} | set(session_processes(self.process.pid)))
            if not left:
                break
            time.sleep(0.2)
        for pid in left:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()
        return left
