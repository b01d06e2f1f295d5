"""The instructor's live view as the class sees it: ``labkit demo`` (Voila) in Chromium, driven by its buttons.

start, pause, step and reset are clicked as an instructor would; while the guest
runs the exit-rate chart, the exit table and the console must each be seen
changing, a pause must hold (the count stays), a step must run exactly one VM
exit (the status line and the table both count it), and reset must bring back a
page with no VM.  Assertions are on counts and states, never on wall time: the
guest is asked for 256 MiB (uart_console64: two port-I/O exits per byte), which
no backend finishes before the pause, and reset ends it early.
Nothing may outlive the test: Voila, its kernel and the kernel's labkit worker.

The suite drives the page once, on the backend ``labkit demo`` picks by default
(``auto``: KVM where usable); tests/classroom/test_live.py checks the view itself on
both backends.  ``scripts/browser-all`` (``LABKIT_BROWSER_EMU=all``) drives the page on
the emulator too.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path

import pytest
from servers import Server, chromium, free_port

from labkit.virtio.measure import LINE_TEMPLATE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TOTAL_BYTES = 256 * 1024 * 1024
"""Half a billion exits: minutes even on hardware KVM (PVM runs 2-5 k exits/s here, the emulator 15-150 k)."""
CONSOLE_LINE = re.compile(r"line (\d{5}) ")
PAGE_S = 180
"""Voila executes the page's notebook before showing it (a kernel start and a first figure)."""
CHANGE_S = 60
RUNNING_CHANGES = 3
"""Distinct values of the chart, the table and the console to be seen while the guest runs."""
EXITS = re.compile(r"(\d+) VM exits")
BACKENDS = ["auto", "emu"] if os.environ.get("LABKIT_BROWSER_EMU") == "all" else ["auto"]


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.1)


class Page:
    """The live view's parts on the page: VBox [title, HBox [4 buttons, status], chart, table, console]."""

    def __init__(self, page) -> None:
        self.page = page
        self.status = page.locator(".widget-hbox .widget-html").first
        self.chart = page.locator("img.widget-image").first
        self.table = page.locator(".widget-html:has(table)")
        self.console = page.locator(".widget-html pre").first

    def button(self, name: str):
        return self.page.locator("button.widget-button", has_text=re.compile(f"^\\s*{name}\\s*$"))

    def state(self) -> tuple[str, str, str, str]:
        """Status, chart (a hash of its image), table and console text, as shown now."""
        chart = self.chart.evaluate("img => img.naturalWidth > 0 ? img.src : ''")
        table = self.table.first.inner_text() if self.table.count() else ""
        return (self.status.inner_text(), hashlib.sha256(chart.encode()).hexdigest()[:16] if chart else "",
                table, self.console.inner_text())

    def exits_in_status(self) -> int:
        found = EXITS.search(self.status.inner_text())
        assert found, f"the status names no exit count: {self.status.inner_text()!r}"
        return int(found.group(1))

    def table_exits(self) -> int | None:
        found = re.search(r"VM exits \((\d+)\)", self.table.first.inner_text()) if self.table.count() else None
        return int(found.group(1)) if found else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_live_view_in_the_browser_starts_pauses_steps_and_resets(backend, browser, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    total = TOTAL_BYTES
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("JUPYTER_TOKEN", "LABKIT_BACKEND")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    server = Server([sys.executable, "-m", "labkit.cli", "demo", "--backend", backend, "--bytes", str(total),
                     f"--port={port}"], env, tmp_path / "voila.log")
    shots = Path(os.environ.get("LABKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    left: list[int] = []
    try:
        line = server.first_line()
        assert f"http://127.0.0.1:{port}/?token=" in line, f"{line!r}\n{server.tail()}"
        base = f"http://127.0.0.1:{port}"
        server.wait_until_listening(port, PAGE_S)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((base, "data:", "blob:"))
                   else route.abort())
        page.goto(line.split()[-1], wait_until="domcontentloaded", timeout=PAGE_S * 1000)
        view = Page(page)
        try:
            view.button("start").wait_for(timeout=PAGE_S * 1000)
        except Exception as error:  # noqa: BLE001 - Playwright's TimeoutError, with Voila's log to say why
            raise AssertionError(f"the live view did not appear: {error}\n{server.tail()}") from None
        server.seen()
        assert "not started" in view.status.inner_text() and view.console.inner_text().strip() == "(not started)"
        assert view.chart.evaluate("img => img.naturalWidth") > 0, "the chart did not decode"
        assert view.table_exits() is None

        # start: the chart, the table and the console each change while the status says running
        view.button("start").click()
        seen: list[set[str]] = [set(), set(), set()]

        def changing() -> bool:
            status, *parts = view.state()
            if status.startswith("running"):
                for values, part in zip(seen, parts):
                    if part:
                        values.add(part)
            assert "exited" not in status and "halted" not in status, f"the guest ended while running: {status}"
            return all(len(values) >= RUNNING_CHANGES for values in seen)

        _wait_for(changing, CHANGE_S, f"the chart, table and console to change {RUNNING_CHANGES} times while "
                                      f"running (distinct values seen: {[len(values) for values in seen]})")
        server.seen()  # the kernel and its VM's worker (emulator) are up now
        page.screenshot(path=str(shots / f"live-{backend}-running.png"))

        # pause: stopped at an exit boundary; the status and the table agree on the count, and it stays
        view.button("pause").click()
        _wait_for(lambda: "paused after" in view.status.inner_text(), CHANGE_S, "the status to say paused")
        paused = view.exits_in_status()
        assert 0 < paused < 2 * total, f"{paused} exits: the guest ended before the pause"
        _wait_for(lambda: view.table_exits() == paused, CHANGE_S, f"the table to show {paused} exits")
        shown = view.console.inner_text().strip().splitlines()
        first = CONSOLE_LINE.match(shown[0]) if shown else None
        assert first, f"the console shows what the guest did not write: {shown[:1]}"
        written = [f"line {(int(first.group(1)) + index) % 100000:05d} {LINE_TEMPLATE}" for index in range(len(shown))]
        assert shown[:-1] == written[:-1] and written[-1].startswith(shown[-1]), \
            f"the console shows lines the guest did not write in that order: {shown[-3:]}"
        page.screenshot(path=str(shots / f"live-{backend}-paused.png"))

        # step: exactly one more VM exit, still paused
        view.button("step").click()
        _wait_for(lambda: "paused after" in view.status.inner_text() and view.exits_in_status() != paused,
                  CHANGE_S, "the status to count the step")
        assert view.exits_in_status() == paused + 1, f"step ran {view.exits_in_status() - paused} exits, not 1"
        _wait_for(lambda: view.table_exits() == paused + 1, CHANGE_S, f"the table to show {paused + 1} exits")

        # start again: it continues from there
        view.button("start").click()
        _wait_for(lambda: view.status.inner_text().startswith("running") and (view.table_exits() or 0) > paused + 1,
                  CHANGE_S, "the run to continue past the step")

        # reset: the VM is gone, the page is as at the start
        view.button("reset").click()
        _wait_for(lambda: "not started" in view.status.inner_text() and view.console.inner_text().strip()
                  == "(not started)" and view.table_exits() is None, CHANGE_S, "reset to clear the view")
        page.screenshot(path=str(shots / f"live-{backend}-reset.png"))
        errors = page.locator("[data-mime-type='application/vnd.jupyter.stderr']")
        assert "Traceback" not in page.inner_text("body") and "Error" not in view.status.inner_text()
        assert errors.count() == 0, f"the page shows error output: {errors.first.inner_text()[:300]}"
        page.close()
    finally:
        left = server.stop()
    assert left == [], f"labkit demo left processes behind: {left}"
