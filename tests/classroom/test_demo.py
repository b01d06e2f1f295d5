"""`labkit demo`: the live view as a Voila page, on 127.0.0.1, behind a token, leaving nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from processes import session_processes  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{name}/stat").read() if name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
            found.append(int(name))
    return found


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect to the login page is the refusal itself


def labkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.unit
def test_demo_refuses_an_unknown_guest_in_one_line():
    done = labkit("demo", "--guest", "no_such_guest")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no_such_guest" in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.emu
def test_demo_serves_the_live_view_behind_a_token_and_leaves_nothing_behind(tmp_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "JUPYTER_TOKEN"}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path)
    log = open(tmp_path / "voila.log", "w+")
    kernels: list[int] = []
    server = subprocess.Popen([sys.executable, "-m", "labkit.cli", "demo", "--backend", "emu", "--bytes", "2048",
                               f"--port={port}"], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                              start_new_session=True)
    try:
        line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/?token=" in line, line
        token = line.split("token=", 1)[1].split()[0]
        assert len(token) >= 32
        deadline = time.monotonic() + 90
        no_redirects = urllib.request.build_opener(NoRedirect)
        while True:
            try:
                no_redirects.open(f"http://127.0.0.1:{port}/", timeout=5)
                raise AssertionError("Voila served the page without the token")
            except urllib.error.HTTPError as refused:
                assert refused.code in (302, 401, 403), refused.code
                if refused.code == 302:
                    assert "/login" in refused.headers["Location"], refused.headers["Location"]
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"Voila did not come up:\n{log.read()[-2000:]}")
                time.sleep(0.5)
        listening = open("/proc/net/tcp").read()
        assert f"0100007F:{port:04X}" in listening, "Voila does not listen on 127.0.0.1 only"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?token={token}", timeout=120) as answer:
            page = answer.read().decode()
        assert "application/vnd.jupyter.widget-view+json" in page, "the page shows no widget"
        assert "Traceback" not in page, page[-2000:]
        # jupyter_client starts each kernel in a session of its own: found as Voila's children
        kernels = children(server.pid)
        assert kernels, "Voila started no kernel for the page"
        cmdline = open(f"/proc/{server.pid}/cmdline").read().split("\0")
        assert cmdline[1:3] == ["-m", "voila"], cmdline  # labkit became Voila: signals reach it
        assert token not in " ".join(cmdline)  # handed over in the environment, not on `ps`
        server.terminate()
        assert server.wait(timeout=30) is not None
        deadline = time.monotonic() + 10
        while session_processes(server.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(server.pid) == [], "labkit demo left processes behind"
        assert [pid for pid in kernels if os.path.exists(f"/proc/{pid}")] == [], "the page's kernel outlived Voila"
    finally:
        for pid in session_processes(server.pid) + [pid for pid in kernels if os.path.exists(f"/proc/{pid}")]:
            os.kill(pid, 9)
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        server.stdout.close()
        log.close()
