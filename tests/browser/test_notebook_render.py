"""What a student sees: the notebooks, executed and rendered to HTML, in a real headless Chromium.

Uses Debian's /usr/bin/chromium driven by Playwright (never a downloaded
browser); every request that is not for the local file is blocked, so the page
must render offline.  Missing Chromium fails the test with how to install it:
CI installs it (``scripts/setup test``), so a skip would hide a broken set-up.
The screenshot goes to pytest's temp dir, or to ``LABKIT_SCREENSHOT_DIR``.

Both backends: the default (``auto``) and ``LABKIT_BACKEND=emu``.  Every notebook is
rendered from both runs; the emulator's run is the very one tests/notebooks checks
(:func:`execute_shared`: executed once per session), the default backend's is the live
JupyterLab's "Run all" of the widget pass, saved before any control is changed
(:data:`LIVE_RUNS`; executed headless only where that pass did not run it).  In a live JupyterLab every
notebook's widgets are changed on the default backend, and one of them per run, in turn
(:func:`emu_widget_notebooks`) under ``LABKIT_BACKEND=emu``: ``scripts/browser-all``
changes every notebook's widgets on both.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
from notebook_execution import NOTEBOOKS, Execution, execute_shared, problems_in  # noqa: E402
from servers import Server, chromium, free_port, require_chromium  # noqa: E402

HELLO = "Hello from 64-bit mode!"
BACKENDS = {"default": None, "emu": "emu"}
"""How each backend is asked for: no LABKIT_BACKEND (``auto``), or LABKIT_BACKEND=emu."""

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@dataclass(frozen=True)
class Lesson:
    """What the browser tests check in one notebook: add a notebook with one entry in :data:`LESSONS`."""

    visible: tuple[str, ...]
    """Text the student must be able to see (the lesson's result, not just that it ran)."""
    controls: dict[str, int] = field(default_factory=dict)
    """The controls its widget panels have (in all its cells), by kind (:data:`SELECTORS`): each is changed once
    in a live JupyterLab and must change the results."""
    projector: bool = False
    """Its figures use labkit.viz.style: at 1280x720 and 150% zoom their smallest text must be readable."""


LESSONS = {
    "00-welcome.ipynb": Lesson((HELLO, "This machine (labkit", "The notebooks of this lab"),
                               {"dropdown": 1, "toggle": 1, "button": 1}, projector=True),
    "01-protection-rings.ipynb": Lesson(("hello from ring 3", "How each instruction of the task entered the kernel",
                                         "matches the paper on emulator (Unicorn)"),
                                        {"dropdown": 1, "toggle": 1}, projector=True),
    "02-trap-and-emulate.ipynb": Lesson(("The 5 of 13 console lines that differ",
                                         "unemulated instruction at RIP 0x8003: wbinvd"),
                                        {"dropdown": 1, "toggle": 1}),
    "03-binary-translation.ipynb": Lesson(("binary translation gives the native console: True",
                                           "int3               ; -> monitor: emulate popfq",
                                           "binary translation gives the native value in 21 of 21."),
                                          {"dropdown": 1, "select_multiple": 1, "toggle": 1, "slider": 1}),
    "04-paravirtualization.ipynb": Lesson(("paravirtual console equals the native one: True",
                                           "lines where trap-and-emulate differs from native: 5"),
                                          {"select_multiple": 1, "toggle": 3, "slider": 1}),
    "05-hardware-assisted.ipynb": Lesson(("VM exits of a model of VMX run on", "One workload, every technique, run on "),
                                         {"dropdown": 3, "select_multiple": 2, "toggle": 2, "checkbox": 4, "button": 1}),
    "06-memory-virtualization.ipynb": Lesson(("shadow paging gives the native console: True",
                                              "under nested paging (4 guest levels x (4 EPT levels + 1) + 4"),
                                             {"dropdown": 1, "toggle": 1, "slider": 1}),
    "08-snapshots.ipynb": Lesson(("rejected: 7 of 7 damaged files", "migrated output equals an unmigrated run: True"),
        {"dropdown": 2, "toggle": 1}),
    "07-isolation.ipynb": Lesson(("found the secret 0 times", "kernel: 8 tasks run, 6 killed, still running", "so the guest made the host call host_debug_dump"),
        {"select_multiple": 1, "toggle": 1, "slider": 1}),
    "09-disks-and-backups.ipynb": Lesson(("3 of 3 VMs read back everything they wrote, 0 acknowledged sectors lost",
                                          "larger than its 128 KiB base", "3 of 3 backups restore to files that check out",
                                          "a snapshot is not a backup"),
                                         {"dropdown": 3, "slider": 1, "toggle": 2}, projector=True),
}
"""One entry per notebook in notebooks/ (a test requires it)."""
PROJECTOR = {"width": 853, "height": 480, "device_scale_factor": 1.5}
"""A 1280x720 projector at 150% zoom: 853x480 CSS pixels, 1.5 device pixels each."""
MIN_TEXT_CSS_PX = 11.0
"""The smallest figure text a student at the back of the room can read, in CSS pixels."""


def test_every_notebook_has_a_lesson_entry():
    assert sorted(LESSONS) == sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")), \
        "add the new notebook to LESSONS in tests/browser/test_notebook_render.py"


def test_missing_chromium_is_a_failure_not_a_skip():
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        require_chromium("/nonexistent/chromium")



# -- the widgets, live: JupyterLab with a token, a kernel, and every control changed once ------------------

SELECTORS = {
    "dropdown": ".widget-dropdown select",
    "select_multiple": ".widget-select-multiple select",
    "toggle": ".widget-toggle-buttons",
    "slider": ".widget-slider",
    "button": "button.widget-button:not(.widget-toggle-button)",
    "checkbox": ".widget-checkbox input",
}
# The results of a cell: the text and figures of its outputs that are not the control panel itself.
RESULTS_JS = """cell => Array.from(cell.querySelectorAll('.jp-OutputArea-output'))
    .filter(output => !output.querySelector('.jupyter-widgets'))
    .map(output => output.innerText + Array.from(output.querySelectorAll('img'))
        .map(image => image.src.length + ':' + image.src.slice(-80)).join(','))
    .join('\\n')"""
RUN_ALL_S = 180
SETTINGS = {
    # Render every cell (JupyterLab 4 leaves cells outside the view unrendered), start the kernel unasked.
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}
CHANGE_S = 60
QUEUED_S = 5
"""Seconds after Run all by which JupyterLab has marked a cell [*]: it marks them as it queues them (at once), so none
means none was sent; a late mark would only run the notebook twice."""


WIDGET_NOTEBOOKS = sorted(name for name, lesson in LESSONS.items() if lesson.controls)
EMU_PER_RUN = 1
"""How many notebooks' widgets the emulator's pass changes per run, in turn (the default backend's: all).
One keeps the pass under a minute (a JupyterLab with LABKIT_BACKEND=emu and one notebook run in it)."""


def emu_widget_notebooks(environ=os.environ, turn: int | None = None) -> list[str]:
    """The notebooks whose widgets are changed under ``LABKIT_BACKEND=emu`` in this run.

    ``LABKIT_BROWSER_EMU=all`` (what ``scripts/browser-all`` sets) or a comma-separated list of notebooks
    chooses; otherwise :data:`EMU_PER_RUN` of :data:`WIDGET_NOTEBOOKS` in turn, the turn being the checkout's
    number of commits: consecutive commits cover every notebook (9 commits for 9 notebooks), and a rerun of
    one commit checks the same ones.  Without git the turn is the day's number.  ``turn`` replaces the count
    (for the test of the rotation).
    """
    import datetime
    import subprocess

    chosen = environ.get("LABKIT_BROWSER_EMU", "")
    if chosen == "all":
        return list(WIDGET_NOTEBOOKS)
    if chosen:
        names = [name.strip() for name in chosen.split(",") if name.strip()]
        unknown = sorted(set(names) - set(WIDGET_NOTEBOOKS))
        if unknown:
            raise pytest.UsageError(f"LABKIT_BROWSER_EMU names {unknown}: not among {WIDGET_NOTEBOOKS}")
        return names
    if turn is not None:
        return _in_turn(turn)
    try:
        counted = subprocess.run(["git", "-C", str(NOTEBOOKS.parent), "rev-list", "--count", "HEAD"],
                                 capture_output=True, text=True, timeout=30)
        turn = int(counted.stdout) if counted.returncode == 0 else datetime.date.today().toordinal()
    except (OSError, ValueError, subprocess.TimeoutExpired):
        turn = datetime.date.today().toordinal()
    return _in_turn(turn)


def _in_turn(turn: int) -> list[str]:
    count = len(WIDGET_NOTEBOOKS)
    return [WIDGET_NOTEBOOKS[(turn * EMU_PER_RUN + offset) % count] for offset in range(min(EMU_PER_RUN, count))]


WIDGET_CASES = [pytest.param(name, "default", marks=pytest.mark.kvm, id=f"{name}-default")
                for name in WIDGET_NOTEBOOKS]
WIDGET_CASES += [pytest.param(name, "emu", marks=pytest.mark.emu, id=f"{name}-emu")
                 for name in emu_widget_notebooks()]


def test_the_emulators_widget_pass_covers_every_notebook_in_turn():
    runs = -(-len(WIDGET_NOTEBOOKS) // EMU_PER_RUN)
    turns = [emu_widget_notebooks({}, turn) for turn in range(100, 100 + runs)]
    assert sorted({name for names in turns for name in names}) == WIDGET_NOTEBOOKS, turns
    assert all(len(names) == EMU_PER_RUN for names in turns)
    assert emu_widget_notebooks({}, 7) == emu_widget_notebooks({}, 7) != emu_widget_notebooks({}, 8)
    assert emu_widget_notebooks({"LABKIT_BROWSER_EMU": "all"}) == WIDGET_NOTEBOOKS
    assert emu_widget_notebooks({"LABKIT_BROWSER_EMU": "00-welcome.ipynb"}) == ["00-welcome.ipynb"]
    with pytest.raises(pytest.UsageError, match="no-such.ipynb"):
        emu_widget_notebooks({"LABKIT_BROWSER_EMU": "no-such.ipynb"})


@pytest.fixture(scope="module")
def lab_default(tmp_path_factory):
    yield from _jupyterlab("default", tmp_path_factory)


@pytest.fixture(scope="module")
def lab_emu(tmp_path_factory):
    yield from _jupyterlab("emu", tmp_path_factory)


def _jupyterlab(backend: str, tmp_path_factory):
    """``labkit lab`` on a copy of the notebooks (JupyterLab saves what it runs), with its token, on ``backend``
    (:data:`BACKENDS`), one per module; nothing left after: the server, its kernels, their workers."""
    import shutil
    import urllib.request

    root = tmp_path_factory.mktemp(f"lab-{backend}")
    notebooks = root / "notebooks"
    shutil.copytree(NOTEBOOKS, notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for plugin, values in SETTINGS.items():
        path = root / "settings" / f"{plugin.replace(':', '/')}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port = free_port()
    repo = str(NOTEBOOKS.parent)
    env = {key: value for key, value in os.environ.items() if key not in ("JUPYTER_TOKEN", "LABKIT_BACKEND")}
    if BACKENDS[backend] is not None:
        env["LABKIT_BACKEND"] = BACKENDS[backend]  # the kernels inherit it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))  # the kernel imports this tree
    server = Server([sys.executable, "-m", "labkit.cli", "lab", "--notebooks", str(notebooks),
                     "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                     f"--ServerApp.runtime_dir={root / 'runtime'}",
                     f"--LabApp.workspaces_dir={root / 'workspaces'}",
                     f"--LabApp.user_settings_dir={root / 'settings'}"], env, root / "jupyter.log")
    left: list[int] = []
    try:
        line = server.first_line()
        assert f"http://127.0.0.1:{port}/lab?token=" in line, f"{line!r}\n{server.tail()}"
        token = line.split("token=", 1)[1].split()[0]
        base = f"http://127.0.0.1:{port}"

        def status() -> bool:
            request = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"token {token}"})
            try:
                urllib.request.urlopen(request, timeout=5).close()
                return True
            except OSError:
                assert server.process.poll() is None, f"JupyterLab ended:\n{server.tail()}"
                return False

        _wait_for(status, 90, "JupyterLab to come up")
        yield base, token, server, notebooks
    finally:
        left = server.stop()
    assert left == [], f"JupyterLab left processes behind: {left}"


def _wait_for(condition, seconds: float, what: str) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.25)


def _change(page, kind: str, control, backend: str) -> str | None:
    """Change one control as a student would; returns what was done (None: it offers nothing else to choose).

    Under LABKIT_BACKEND=emu a control may offer nothing: a backend picker with the emulator alone, or KVM's
    exit controls, disabled without KVM (the caller checks that the panel says so).
    """
    if control.is_disabled():
        assert backend == "emu", f"a disabled {kind} on the default backend"
        return None
    if kind == "dropdown":
        index = control.evaluate("select => select.selectedIndex")
        count = control.evaluate("select => select.options.length")
        control.select_option(index=(index + 1) % count)
        return f"dropdown: option {(index + 1) % count}"
    if kind == "select_multiple":
        labels = control.evaluate("select => Array.from(select.options).map(option => option.label)")
        chosen = control.evaluate("select => Array.from(select.selectedOptions).map(option => option.label)")
        if len(chosen) == len(labels):  # everything chosen already (07's faults): keep only the first
            control.select_option(label=labels[:1])
            return "select multiple: the first only"
        control.select_option(label=labels)  # translate everything
        return "select multiple: all"
    if kind == "toggle":
        inactive = control.locator("button:not(.mod-active)")
        if inactive.count() == 0 and backend == "emu":  # the backend picker under LABKIT_BACKEND=emu
            from labkit.widgets.experiment import BACKEND_NAMES

            only = control.locator("button").all_inner_texts()
            assert only == [BACKEND_NAMES["emu"]], f"a toggle with one choice that is not the emulator: {only}"
            return None
        assert inactive.count() >= 1, "only one backend button: this test runs where KVM is usable"
        label = inactive.first.inner_text()
        inactive.first.click()
        return f"toggle: {label}"
    if kind == "checkbox":
        control.click()
        return "checkbox"
    if kind == "slider":
        readout = control.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("5")
        page.keyboard.press("Enter")
        return "slider: 5"
    control.click()
    return "button"


@pytest.mark.parametrize(("name", "backend"), WIDGET_CASES)
def test_every_widget_changes_the_results(name, backend, browser, tmp_path, request):
    """The default backend's cases are marked kvm: there the backend buttons need a second backend to switch
    to (conftest skips them only without /dev/kvm).  Under LABKIT_BACKEND=emu a control with nothing else to
    choose is found and checked (:func:`_change`), and every other control is changed."""
    import re
    import time

    base, token, server, notebooks = request.getfixturevalue(f"lab_{backend}")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((base, "data:", "blob:"))
               else route.abort())
    page.goto(f"{base}/lab/tree/{name}?token={token}&reset", wait_until="domcontentloaded")  # reset: this tab only
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    notebook.locator(".jp-CodeCell").first.wait_for(timeout=90_000)
    # The kernel starts on its own (autoStartDefaultKernel), or JupyterLab asks for one on a first start: whichever
    # comes first (a kernel that is idle asks for nothing), instead of waiting 10 s for a dialog that never comes.
    select_kernel = page.locator(".jp-Dialog button", has_text=re.compile("^Select$"))
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first
    select_kernel.or_(idle).first.wait_for(timeout=90_000)
    if select_kernel.count():
        select_kernel.first.click()
    idle.wait_for(timeout=90_000)
    prompts = notebook.locator(".jp-CodeCell .jp-InputPrompt")

    def queued() -> bool:  # JupyterLab marks a cell [*] as it sends it to the kernel, [n] once it ran
        return any(re.fullmatch(r"\[(\*|\d+)\]:", text.strip()) for text in prompts.all_inner_texts())

    # Just after the kernel started, JupyterLab's Run all can pass over every cell and send none (all stay [ ],
    # the last one selected; 3 of about 70 openings here, 4 of 11 in one run at load 4): it is chosen again, as a
    # student would (DECISIONS 129).
    dropped = 0
    while True:
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
        page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
        started = time.perf_counter()
        try:
            _wait_for(queued, QUEUED_S, f"{name}: Run all to send a cell")
            break
        except AssertionError:
            dropped += 1
            assert dropped < 3, f"{name}: Run all sent no cell to the kernel, {dropped} times"

    def all_ran() -> bool:
        texts = prompts.all_inner_texts()
        return bool(texts) and all(re.fullmatch(r"\[\d+\]:", text.strip()) for text in texts)

    _wait_for(all_ran, RUN_ALL_S, f"{name} to run to the end")
    seconds = time.perf_counter() - started
    server.seen()  # its kernel and the kernel's workers, to be found if they outlive the server
    errors = notebook.locator("[data-mime-type='application/vnd.jupyter.stderr']")
    assert errors.count() == 0, f"{name}: error output: {errors.first.inner_text()[:500]}"
    if backend == "default":  # the run the lesson test renders (before any control changes an output)
        LIVE_RUNS[name] = _save(page, notebooks / name, seconds)

    cells = notebook.locator(".jp-CodeCell").filter(has=page.locator(".jp-OutputArea-output .jupyter-widgets"))
    found = {kind: 0 for kind in SELECTORS}
    changed = []
    for index in range(cells.count()):
        cell = cells.nth(index)
        cell.scroll_into_view_if_needed()
        for kind, selector in SELECTORS.items():
            controls = cell.locator(selector)
            for number in range(controls.count()):
                found[kind] += 1
                before = cell.evaluate(RESULTS_JS)
                assert before.strip(), f"{name}: a panel shows no results"
                done = _change(page, kind, controls.nth(number), backend)
                if done is None:
                    assert kind == "toggle" or "No KVM in this session" in before, \
                        f"{name}: a disabled {kind} in a panel that does not say why"
                    changed.append(f"{kind}: nothing else to choose on the emulator")
                    continue
                _wait_for(lambda: cell.evaluate(RESULTS_JS) != before
                          and "running" not in cell.locator(".jupyter-widgets").first.inner_text(),
                          CHANGE_S, f"{name}: the results to change after {done}")
                changed.append(done)
        assert "Traceback" not in cell.inner_text(), f"{name}: a change raised"
    expected = {kind: LESSONS[name].controls.get(kind, 0) for kind in SELECTORS}
    assert found == expected, f"{name}: controls found {found}, expected {expected}"
    shots = Path(os.environ.get("LABKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / name.replace(".ipynb", f"-{backend}-widgets.png")))
    print(f"{name} ({backend}): changed {changed}" + (f"; Run all chosen {dropped + 1} times" if dropped else ""))
    page.close()
    _shut_down_kernels(base, token)


LIVE_RUNS: dict[str, Execution] = {}
"""The default backend's runs of the widget pass, by notebook: as JupyterLab saved them right after "Run all"."""


def _save(page, path: Path, seconds: float) -> Execution:
    """Save the notebook open in ``page`` (File, Save Notebook) and read back what JupyterLab wrote."""
    import re

    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^File$")).click()
    # Waited for through Playwright: the page's requests pass this process's route handler, so a plain sleep
    # here would hold the save's PUT back.
    with page.expect_response(lambda response: response.request.method == "PUT" and
                              f"/api/contents/{path.name}" in response.url, timeout=30_000) as saving:
        page.locator("li.lm-Menu-item[data-command='docmanager:save']").click()
    assert saving.value.ok, f"JupyterLab could not save {path.name}: HTTP {saving.value.status}"
    saved = nbformat.read(path, as_version=4)
    unrun = [index for index, cell in enumerate(saved.cells) if cell.cell_type == "code" and not cell.execution_count]
    assert unrun == [], f"{path.name} was saved with cells {unrun} not run"
    return Execution(saved, seconds, problems_in(saved))


def default_run(name: str) -> Execution:
    """The default backend's run of ``name`` to render: the widget pass's (:data:`LIVE_RUNS`) when it ran it, else
    executed headless (:func:`execute_shared`: without KVM the widget pass is skipped, or this test runs alone)."""
    import copy

    if name in LIVE_RUNS:
        return copy.deepcopy(LIVE_RUNS[name])
    return execute_shared(NOTEBOOKS / name, None)


def _shut_down_kernels(base: str, token: str) -> None:
    """End the sessions (and kernels) the page started: the next notebook gets the machine's cores."""
    import urllib.request

    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/api/sessions", headers=headers), timeout=10) as answer:
        sessions = json.load(answer)
    for session in sessions:
        request = urllib.request.Request(f"{base}/api/sessions/{session['id']}", headers=headers, method="DELETE")
        urllib.request.urlopen(request, timeout=30).close()


# -- what a student sees: the executed notebooks rendered to HTML ------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """Notebook 00 run on the default backend choice (``auto``, :func:`default_run`) and converted to HTML."""
    from nbconvert import HTMLExporter

    run = default_run("00-welcome.ipynb")
    assert not run.problems, "\n".join(run.problems)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(run.notebook)
    page = tmp_path_factory.mktemp("render") / "00-welcome.html"
    page.write_text(body, encoding="utf-8")
    return page


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(LESSONS))
def test_each_lesson_shows_its_result_and_figures(name, backend, browser, tmp_path):
    """Rendered as on a 1280x720 projector at 150% zoom: the results visible, every figure decoded and, for a
    notebook whose figures use labkit.viz.style, shown large enough that its smallest text stays readable."""
    from nbconvert import HTMLExporter

    from labkit.viz.style import DPI, MIN_FONT_PT

    run = default_run(name) if backend == "default" else execute_shared(NOTEBOOKS / name, BACKENDS[backend])
    assert not run.problems, "\n".join(run.problems)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(run.notebook)
    html = tmp_path / name.replace(".ipynb", f"-{backend}.html")
    html.write_text(body, encoding="utf-8")

    lesson = LESSONS[name]
    page = browser.new_page(viewport={"width": PROJECTOR["width"], "height": PROJECTOR["height"]},
                            device_scale_factor=PROJECTOR["device_scale_factor"])
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file://", "data:"))
               else route.abort())
    page.goto(html.as_uri(), wait_until="load")
    for text in lesson.visible:
        shown = page.get_by_text(text).first
        shown.scroll_into_view_if_needed()
        assert shown.is_visible(), f"{name}: {text!r} is not visible"
    images = page.locator(".jp-OutputArea-output img")
    assert images.count() >= 1, f"{name} shows no figure"
    for index in range(images.count()):
        image = images.nth(index)
        image.scroll_into_view_if_needed()
        width, shown = image.evaluate("img => [img.naturalWidth, img.getBoundingClientRect().width]")
        assert width > 0, f"{name}: figure {index} did not decode"
        smallest = MIN_FONT_PT * DPI / 72 * shown / width
        assert not lesson.projector or smallest >= MIN_TEXT_CSS_PX, \
            f"{name}: figure {index} is shown at {shown:.0f} of {width} px: its smallest text is {smallest:.1f} CSS px"
    if lesson.projector:  # every line of code fits its cell: nothing cut off at the right edge
        cut = page.locator(".jp-InputArea-editor").evaluate_all(
            "cells => cells.filter(cell => cell.scrollWidth > cell.clientWidth + 1).map(cell => cell.innerText.slice(0, 80))")
        assert cut == [], f"{name}: code cells wider than the page at 150% zoom: {cut}"
    assert page.locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    assert "Traceback" not in page.inner_text("body")
    shots = Path(os.environ.get("LABKIT_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    if backend == "default":
        page.screenshot(path=str(shots / name.replace(".ipynb", f"-{backend}-full.png")), full_page=True)
    else:  # the same page's other run: JPEG at CSS pixels takes a third of the time of a 1.5x PNG
        page.screenshot(path=str(shots / name.replace(".ipynb", f"-{backend}-full.jpg")), full_page=True,
                        type="jpeg", quality=70, scale="css")
    page.close()
