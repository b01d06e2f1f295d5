"""Binder within its limits: the lab built from ``binder/`` alone runs every notebook in at most 1.5 GB.

repo2docker cannot run here (no Docker), so this test does what it would do, by hand,
and nothing more: a copy of the repository's files, the system packages of
``binder/apt.txt`` (checked installed: repo2docker apt-installs them in its image),
a fresh virtual environment with only ``pip install -r binder/requirements.txt``
run from the copy's root, and every notebook run through ``binder/start`` (which
sets ``LABKIT_BACKEND=emu``, as Binder has no /dev/kvm).  What remains different
from a real Binder is listed in binder/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "notebooks"))
sys.path.insert(0, str(REPO / "tests"))

from notebook_execution import Execution, problems_in  # noqa: E402
from processes import session_processes  # noqa: E402
from test_notebooks import CONTENT_CHECKS, MAX_SECONDS  # noqa: E402

LIMIT_BYTES = 1_500_000_000
"""Binder gives about 2 GB; the Jupyter server and the browser's share leave 1.5 GB for the kernels."""
RUNNER = Path(__file__).with_name("binder_run.py")

pytestmark = [pytest.mark.slow, pytest.mark.emu]


def repository_copy(target: Path) -> Path:
    """The repository's own files (tracked, or new and not ignored), as a Binder clone would have them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def check_apt_packages(copy: Path) -> None:
    wanted = (copy / "binder" / "apt.txt").read_text().split()
    assert {"binutils", "gcc"} <= set(wanted), f"binder/apt.txt must install GNU as/ld and gcc, has {wanted}"
    missing = [name for name in wanted
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True,
                                 text=True).stdout != "install ok installed"]
    assert not missing, f"binder/apt.txt names packages this machine lacks (apt-get install {' '.join(missing)})"


def test_binder_environment_runs_every_notebook_within_limits(tmp_path, record_property):
    copy = repository_copy(tmp_path / "repo")
    check_apt_packages(copy)
    venv = tmp_path / "venv"
    # The machine's own Python, as repo2docker's image has its own (never the test's venv).
    base_python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base_python), "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r",
                              "binder/requirements.txt"], cwd=copy, capture_output=True, text=True)
    assert install.returncode == 0, f"pip install -r binder/requirements.txt failed:\n{install.stderr[-3000:]}"

    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "LABKIT_BACKEND", "VIRTUAL_ENV", "MPLBACKEND")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    out = tmp_path / "out"
    runner = subprocess.Popen([str(copy / "binder" / "start"), str(venv / "bin" / "python"), str(RUNNER),
                               str(copy / "notebooks"), str(out)], cwd=copy, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = runner.communicate(timeout=15 * 60)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, 9)
            runner.wait()
    assert runner.returncode == 0, f"the notebook runner failed:\n{log[-3000:]}"
    assert session_processes(runner.pid) == [], "a kernel or worker outlived the Binder run"

    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "emu" and report["python"].startswith(str(venv))
    names = sorted(path.name for path in (REPO / "notebooks").glob("*.ipynb"))
    assert sorted(report["seconds"]) == names, "not every notebook ran"
    for name in names:
        notebook = nbformat.read(out / name, as_version=4)
        run = Execution(notebook, report["seconds"][name], problems_in(notebook))
        assert not run.problems, f"{name} in the Binder environment:\n" + "\n".join(run.problems)
        assert run.seconds < MAX_SECONDS, f"{name} took {run.seconds:.1f} s in the Binder environment"
        check = CONTENT_CHECKS.get(name)
        if check is not None:
            check(run, "emu")
    peak = report["pss_bytes"]
    unique, pss_then = report["unique_bytes"], report["pss_bytes_then"]
    assert None not in unique.values(), "run as root: counting distinct pages needs /proc/PID/pagemap's frame numbers"
    # Pss divides a page also among processes outside the run (another Python's libpython); a cgroup would charge
    # it to the container whole.  That difference, measured after each notebook, is added to the peak.
    outside = max(0, *(unique[name] - pss_then[name] for name in names))
    charged = peak + outside
    record_property("peak_pss_bytes", peak)
    record_property("peak_charged_bytes", charged)
    record_property("peak_rss_sum_bytes", report["rss_bytes"])
    print(f"\nBinder environment, {len(names)} notebooks, every kernel kept alive: peak {charged / 1e9:.2f} GB "
          f"(summed Pss {peak / 1e9:.2f} GB of {report['processes_at_peak']} kernel and worker processes + "
          f"{outside / 1e6:.0f} MB shared with processes outside; summed VmRSS {report['rss_bytes'] / 1e9:.2f} GB); "
          f"limit {LIMIT_BYTES / 1e9:.1f} GB")
    for name in names:
        own = report["notebooks"][name]
        print(f"  {name}: own peak {own['pss_bytes'] / 1e6:.0f} MB Pss ({own['rss_bytes'] / 1e6:.0f} MB summed "
              f"VmRSS); all kernels after it: {unique[name] / 1e6:.0f} MB distinct pages")
    assert charged <= LIMIT_BYTES, (f"the notebooks' kernels and workers peaked at {charged / 1e9:.2f} GB "
                                    f"(summed Pss {peak / 1e9:.2f} GB + {outside / 1e6:.0f} MB shared outside)")
