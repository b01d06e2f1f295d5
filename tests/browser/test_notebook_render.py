"""What a student sees: the notebooks, executed and rendered to HTML, in a real headless Chromium.

Uses Debian's /usr/bin/chromium driven by Playwright (never a downloaded
browser); every request that is not for the local file is blocked, so the page
must render offline.  Missing Chromium fails the test with how to install it:
CI installs it (``scripts/setup test``), so a skip would hide a broken set-up.
The screenshot goes to pytest's temp dir, or to ``LABKIT_SCREENSHOT_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
from notebook_execution import NOTEBOOKS, execute  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HELLO = "Hello from 64-bit mode!"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def require_chromium() -> None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium (sudo apt-get install -y chromium, "
                    "or scripts/setup test); the browser tests never download a browser", pytrace=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """Notebook 00 executed on the default backend choice (``auto``) and converted to HTML."""
    from nbconvert import HTMLExporter

    run = execute(NOTEBOOKS / "00-welcome.ipynb", backend=None)
    assert not run.problems, "\n".join(run.problems)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(run.notebook)
    page = tmp_path_factory.mktemp("render") / "00-welcome.html"
    page.write_text(body, encoding="utf-8")
    return page


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_student_sees_hello_figures_and_no_errors(rendered, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    blocked: list[str] = []

    def offline(route):
        if route.request.url.startswith(("file://", "data:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", offline)
    page.goto(rendered.as_uri(), wait_until="load")

    hello = page.get_by_text(HELLO).first
    assert hello.is_visible(), f"{HELLO!r} is not visible on the page"
    assert page.get_by_text("This machine (labkit").first.is_visible(), "the capability table is not visible"
    assert page.get_by_text("measured on the emulator (Unicorn)").first.is_visible()

    images = page.locator(".jp-OutputArea-output img")
    assert images.count() >= 3, f"expected at least 3 figures, found {images.count()}"
    for index in range(images.count()):
        image = images.nth(index)
        image.scroll_into_view_if_needed()
        width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert width > 0 and height > 0, f"figure {index} did not decode (naturalWidth {width})"
        assert image.is_visible(), f"figure {index} is not visible"

    errors = page.locator("[data-mime-type='application/vnd.jupyter.stderr']")
    assert errors.count() == 0, f"error or stderr output on the page: {errors.first.inner_text()[:500]}"
    assert "Traceback" not in page.inner_text("body")

    shots = Path(os.environ.get("LABKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "00-welcome-top.png"))
    page.screenshot(path=str(shots / "00-welcome-full.png"), full_page=True)
    hello.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "00-welcome-hello.png"))
    assert (shots / "00-welcome-full.png").stat().st_size > 10_000
    print(f"screenshots in {shots}; blocked requests: {blocked}")
    page.close()


VISIBLE = {
    "01-protection-rings.ipynb": ("hello from ring 3", "matches the paper on emulator (Unicorn)"),
    "02-trap-and-emulate.ipynb": ("lines that differ (5 of 13):", "unemulated instruction at RIP 0x8003: wbinvd"),
    "03-binary-translation.ipynb": ("binary translation gives the native console: True",
                                    "int3               ; -> monitor: emulate popfq"),
}
"""Per notebook, text the student must be able to see (the lesson's result, not just that it ran)."""


@pytest.mark.parametrize("name", sorted(VISIBLE))
def test_each_lesson_shows_its_result_and_figures(name, browser, tmp_path):
    from nbconvert import HTMLExporter

    run = execute(NOTEBOOKS / name, backend=None)
    assert not run.problems, "\n".join(run.problems)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(run.notebook)
    html = tmp_path / name.replace(".ipynb", ".html")
    html.write_text(body, encoding="utf-8")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file://", "data:"))
               else route.abort())
    page.goto(html.as_uri(), wait_until="load")
    for text in VISIBLE[name]:
        shown = page.get_by_text(text).first
        shown.scroll_into_view_if_needed()
        assert shown.is_visible(), f"{name}: {text!r} is not visible"
    images = page.locator(".jp-OutputArea-output img")
    assert images.count() >= 1, f"{name} shows no figure"
    for index in range(images.count()):
        image = images.nth(index)
        image.scroll_into_view_if_needed()
        width, _ = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert width > 0, f"{name}: figure {index} did not decode"
    assert page.locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    assert "Traceback" not in page.inner_text("body")
    shots = Path(os.environ.get("LABKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / name.replace(".ipynb", "-full.png")), full_page=True)
    page.close()


def test_missing_chromium_is_a_failure_not_a_skip(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        require_chromium()

