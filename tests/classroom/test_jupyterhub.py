"""A class on JupyterHub: 10 students log in through the REST API and run notebook 00 at once, each on their own.

Starts a real JupyterHub from deploy/jupyterhub_config.py with two changes for a test
machine without student accounts: the dummy authenticator and SimpleLocalProcessSpawner
(JupyterHub's local process spawner that runs every server as the hub's user, each in
its own home folder).  The proxy is the configurable-http-proxy that scripts/setup
classroom installed from npm.  Each student's server gets notebook 00 through the
contents API and runs it in a kernel through the kernel websocket, as JupyterLab does;
then a cell runs a guest that prints the student's own name.  Memory per student
server (the server, its kernel and the kernel's labkit worker processes, summed from
/proc) is sampled while all ten run and printed.  Everything started is stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from binder_run import descendants, pss_bytes  # noqa: E402
from processes import session_processes  # noqa: E402

STUDENTS = [f"student{number:02d}" for number in range(1, 11)]
VENV_BIN = Path(sys.executable).parent
NAME_GUEST = '''
from labkit import Guest, Machine
import os
name = os.environ["JUPYTERHUB_USER"]
source = "\\n".join(f"mov al, {ord(ch)}\\nout dx, al" for ch in name)
guest = Guest.from_asm("mov dx, 0x3f8\\n" + source + "\\nhlt", mode=64, name="whoami")
with Machine(guest) as machine:
    result = machine.run(timeout=20)
print(f"console of {name}: {result.console!r} pid {os.getpid()} backend {result.backend}")
'''

pytestmark = [pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Hub:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def api(self, method: str, path: str, body: object = None, token: str | None = None) -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"token {token or self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=180) as answer:
            text = answer.read().decode()
        return json.loads(text) if text else None


MAX_DROPS = 2
"""How often one student's kernel websocket may close under us (the load of ten servers on two cores) and be
opened again; each time the cell it was running is run again."""


async def run_cell(connection, user: str, session: str, source: str) -> list[str] | None:
    """Run ``source`` in the kernel behind ``connection``: its outputs' text, ``None`` if the websocket closed."""
    msg_id = uuid.uuid4().hex
    await connection.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": user, "session": session, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": source, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    texts: list[str] = []
    while True:
        raw = await asyncio.wait_for(connection.read_message(), timeout=180)
        if raw is None:
            return None
        message = json.loads(raw)
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "error":
            texts.append(f"ERROR {content['ename']}: {content['evalue']}")
        elif kind == "stream":
            texts.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            data = content.get("data", {})
            texts.append(data.get("text/markdown") or data.get("text/html") or data.get("text/plain", ""))
        elif kind == "status" and content["execution_state"] == "idle":
            return texts


async def run_notebook(hub: Hub, user: str, token: str, notebook: nbformat.NotebookNode) -> list[str]:
    """Every code cell of ``notebook`` in a new kernel of ``user``'s server, through its websocket; the outputs' text."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    base = f"{hub.url}/user/{user}/api"
    kernel = await asyncio.to_thread(hub.api, "POST", f"/user/{user}/api/kernels", {"name": "python3"}, token)
    socket_url = base.replace("http://", "ws://") + f"/kernels/{kernel['id']}/channels"
    # The server answers the websocket's upgrade only once the new kernel is ready: ten kernels importing
    # labkit at once on two cores take longer than tornado's 20 s default.
    request = HTTPRequest(socket_url, headers={"Authorization": f"token {token}"}, connect_timeout=240,
                          request_timeout=240)
    connection = await websocket_connect(request)
    texts: list[str] = []
    session = uuid.uuid4().hex
    drops: list[str] = []
    try:
        for cell in [c for c in notebook.cells if c.cell_type == "code"] + [nbformat.v4.new_code_cell(NAME_GUEST)]:
            while True:  # a dropped websocket is opened again and the cell run again, as JupyterLab reconnects
                cell_texts = await run_cell(connection, user, session, cell.source)
                if cell_texts is not None:
                    texts += cell_texts
                    break
                drops.append(f"code {connection.close_code}, reason {connection.close_reason!r}")
                assert len(drops) <= MAX_DROPS, f"{user}'s kernel websocket closed {len(drops)} times: {drops}"
                connection = await websocket_connect(request)
    finally:
        connection.close()
        await asyncio.to_thread(hub.api, "DELETE", f"/user/{user}/api/kernels/{kernel['id']}", None, token)
    if drops:
        print(f"\n{user}'s kernel websocket closed and was opened again: {drops}")
    return texts


class ServerMemory(threading.Thread):
    """Peak summed PSS of each student's server process tree, sampled every 0.5 s (PSS, not VmRSS: the
    emulator's workers are forked from the kernel and VmRSS would count the pages they share once per process)."""

    def __init__(self, servers: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.servers, self.peak = servers, {user: 0 for user in servers}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for user, pid in self.servers.items():
                total = pss_bytes(pid) + sum(pss_bytes(child) for child in descendants(pid))
                self.peak[user] = max(self.peak[user], total)


def test_ten_students_run_notebook_00_at_once_each_on_their_own(tmp_path, record_property):
    for tool in ("jupyterhub", "configurable-http-proxy", "jupyterhub-singleuser"):
        assert (VENV_BIN / tool).exists(), f"{tool} is missing: run scripts/setup classroom"
    port, token = free_port(), secrets.token_hex(32)
    config = tmp_path / "jupyterhub_test_config.py"
    config.write_text(f"""
load_subconfig({str(REPO / 'deploy' / 'jupyterhub_config.py')!r})
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.Spawner.notebook_dir = ""
c.SimpleLocalProcessSpawner.home_dir_template = {str(tmp_path / 'home' / '{username}')!r}
c.JupyterHub.services.append({{"name": "labkit-test", "api_token": {token!r}}})  # beside the idle culler
c.JupyterHub.load_roles.append({{"name": "labkit-test", "services": ["labkit-test"],
                                "scopes": ["admin:users", "admin:servers", "tokens", "access:servers",
                                           "read:services"]}})
c.JupyterHub.hub_port = {free_port()}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
# This machine runs the test as root: every student's server then runs as root too.
c.Spawner.args = {["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []!r}
""")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JUPYTER", "LABKIT_BACKEND"))}
    env.update(LABKIT_HUB_URL=f"http://127.0.0.1:{port}", LABKIT_HUB_DB=f"sqlite:///{tmp_path / 'hub.sqlite'}",
               LABKIT_HUB_COOKIE_SECRET=str(tmp_path / "cookie_secret"), PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    for user in STUDENTS:
        (tmp_path / "home" / user).mkdir(parents=True)
    log = open(tmp_path / "hub.log", "w+")
    hub_process = subprocess.Popen([str(VENV_BIN / "jupyterhub"), "-f", str(config)], cwd=tmp_path, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hub = Hub(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                hub.api("GET", "/hub/api/")
                break
            except (OSError, urllib.error.HTTPError):
                if hub_process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"JupyterHub did not come up:\n{log.read()[-3000:]}")
                time.sleep(0.5)
        culler = hub.api("GET", "/hub/api/services/jupyterhub-idle-culler")
        assert culler["pid"] and "jupyterhub_idle_culler" in Path(f"/proc/{culler['pid']}/cmdline").read_text(), \
            f"the hub did not start the idle culler: {culler}"
        hub.api("POST", "/hub/api/users", {"usernames": STUDENTS})
        tokens = {user: hub.api("POST", f"/hub/api/users/{user}/tokens", {"note": "labkit test"})["token"]
                  for user in STUDENTS}

        def start(user: str) -> int | None:
            """Each student starts their own server with their own token; the HTTP error, None when it started."""
            try:
                hub.api("POST", f"/hub/api/users/{user}/server", {}, tokens[user])
            except urllib.error.HTTPError as pending:
                return None if pending.code == 202 else pending.code
            return None

        # All at once, as a class logs in: the hub answers a start when the server is up or after 10 s (its
        # slow_spawn_timeout), so one student after another took 55 s of the test's 95.
        with ThreadPoolExecutor(len(STUDENTS)) as pool:
            failed = {user: code for user, code in zip(STUDENTS, pool.map(start, STUDENTS)) if code is not None}
        if failed:
            log.seek(0)
            raise AssertionError(f"servers that did not start (HTTP status): {failed}\n{log.read()[-3000:]}")
        deadline = time.monotonic() + 240
        while not all(hub.api("GET", f"/hub/api/users/{user}")["servers"].get("", {}).get("ready")
                      for user in STUDENTS):
            assert time.monotonic() < deadline, "not every student's server became ready in 240 s"
            time.sleep(1)
        servers = {user: hub.api("GET", f"/hub/api/users/{user}")["servers"][""]["state"]["pid"] for user in STUDENTS}
        assert len(set(servers.values())) == len(STUDENTS), "two students share a server process"

        notebook = nbformat.read(REPO / "notebooks" / "00-welcome.ipynb", as_version=4)
        for user in STUDENTS:
            hub.api("PUT", f"/user/{user}/api/contents/00-welcome.ipynb",
                    {"type": "notebook", "format": "json", "content": notebook}, tokens[user])
        meter = ServerMemory(servers)
        meter.start()
        started = time.perf_counter()

        async def everyone() -> list[list[str]]:
            return await asyncio.gather(*(run_notebook(hub, user, tokens[user], notebook) for user in STUDENTS))

        try:
            outputs = dict(zip(STUDENTS, asyncio.run(everyone())))
        finally:
            meter.stopping.set()
            meter.join()
        seconds = time.perf_counter() - started

        kernel_pids = set()
        for user, texts in outputs.items():
            text = "\n".join(texts)
            assert "ERROR" not in text, f"{user}'s notebook 00 failed:\n{text[-2000:]}"
            assert "Hello from 64-bit mode!" in text and "console: 'A'" in text, f"{user} did not see the guests"
            mine = [line for line in text.splitlines() if line.startswith("console of ")]
            assert len(mine) == 1 and mine[0].startswith(f"console of {user}: '{user}'"), mine
            others = [other for other in STUDENTS if other != user and f"'{other}'" in text]
            assert not others, f"{user} saw the console of {others}"
            kernel_pids.add(int(mine[0].split(" pid ")[1].split()[0]))
        assert len(kernel_pids) == len(STUDENTS), "two students' guests ran in the same kernel"

        home_files = {user: sorted(path.name for path in (tmp_path / "home" / user).iterdir()) for user in STUDENTS}
        assert all("00-welcome.ipynb" in names for names in home_files.values())
        report = ", ".join(f"{user} {meter.peak[user] / 1e6:.0f} MB" for user in STUDENTS)
        mean = sum(meter.peak.values()) / len(STUDENTS)
        print(f"\n10 students ran notebook 00 at once in {seconds:.0f} s; peak memory per student server "
              f"(server + kernel + workers, summed PSS): mean {mean / 1e6:.0f} MB, max {max(meter.peak.values()) / 1e6:.0f} MB; "
              f"{report}")
        record_property("memory_per_student_mb", {user: round(peak / 1e6) for user, peak in meter.peak.items()})
        assert all(peak > 0 for peak in meter.peak.values())

        log.seek(0)
        culled = [line for line in log.read().splitlines() if "GET /hub/api/users" in line and "idle-culler" in line]
        assert culled and all(" 200 GET " in line for line in culled), f"the culler cannot list the users: {culled}"

        def stop(user: str) -> int | None:
            try:
                hub.api("DELETE", f"/hub/api/users/{user}/server")
            except urllib.error.HTTPError as pending:
                return None if pending.code == 202 else pending.code
            return None

        with ThreadPoolExecutor(len(STUDENTS)) as pool:  # at once too: each waits up to 10 s for its server to stop
            failed = {user: code for user, code in zip(STUDENTS, pool.map(stop, STUDENTS)) if code is not None}
        assert failed == {}, f"servers that did not stop (HTTP status): {failed}"
    finally:
        hub_process.terminate()
        try:
            hub_process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            hub_process.kill()
            hub_process.wait()
        deadline = time.monotonic() + 20
        while session_processes(hub_process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = session_processes(hub_process.pid)
        for pid in left:
            os.kill(pid, 9)
        log.close()
    assert left == [], f"JupyterHub left processes behind: {left}"
