"""The ``labkit`` command as a student types it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from processes import session_processes

HELLO = {
    16: "mov dx, 0x3f8\nmov al, 'x'\nout dx, al\nhlt\n",
    32: "mov dx, 0x3f8\nmov al, 'x'\nout dx, al\nmov ecx, 3\n1: loop 1b\nhlt\n",
    64: "mov dx, 0x3f8\nlea rsi, [rip + msg]\nmov al, [rsi]\nout dx, al\nhlt\nmsg: .byte 'x'\n",
}


def labkit(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True,
                          timeout=120, check=check)


@pytest.mark.unit
def test_doctor_reports_kvm_tools_and_the_choice():
    report = json.loads(labkit("doctor", "--json", check=True).stdout)
    assert {"kvm", "unicorn", "capstone", "binutils", "trap_replay", "auto", "fixes"} <= set(report)
    assert report["auto"]["backend"] in ("kvm", "emu") and report["auto"]["reason"]
    assert report["unicorn"] == "2.1.4"
    if shutil.which("cc") or shutil.which("gcc"):
        assert report["trap_replay"].startswith("C trap replay"), report["trap_replay"]
    text = labkit("doctor", check=True).stdout
    assert "backend='auto' picks" in text and "/dev/kvm" in text and "trap delivery" in text and "virtio drain" in text


@pytest.mark.unit
def test_doctor_says_when_exceptions_are_delivered_in_python_and_how_to_fix_it(tmp_path):
    env = {**os.environ, "CC": "no-such-compiler", "LABKIT_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "doctor", "--json"], capture_output=True, text=True,
                          timeout=120, check=True, env=env)
    report = json.loads(done.stdout)
    assert report["trap_replay"].startswith("Python only: cannot build or load trap_replay.c"), report["trap_replay"]
    assert any("install a C compiler" in fix for fix in report["fixes"])


@pytest.mark.unit
def test_guests_lists_names_and_modes():
    guests = json.loads(labkit("guests", "--json", check=True).stdout)
    names = {guest["name"]: guest["mode"] for guest in guests}
    assert names["hello16"] == 16 and names["hello32"] == 32 and names["hello64"] == 64


def test_run_a_shipped_guest_prints_console_and_exit_table(backend_name):
    done = labkit("run", "hello64", "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello from 64-bit mode!\n")
    assert "reason" in done.stdout and "IO" in done.stdout and "HLT" in done.stdout
    assert "median" in done.stdout and "since prev." in done.stdout and "TIMEOUT" not in done.stdout


def test_run_json_has_the_exit_table_and_a_timeout_is_no_exit(backend_name, tmp_path):
    done = labkit("run", "hello64", "--backend", backend_name, "--json")
    table = json.loads(done.stdout)["exit_table"]
    rows = {row["reason"]: row for row in table["exits"]}
    assert rows["IO"]["count"] == 48 and rows["HLT"]["count"] == 1 and table["labkit_events"] == []
    io = rows["IO"]
    assert 0 < io["handling_min_ns"] <= io["handling_median_ns"] <= io["handling_max_ns"] <= io["handling_total_ns"]
    assert io["handling_total_ns"] < io["since_previous_total_ns"]  # handling is a part of the time between exits
    assert table["handling_total_ns"] == sum(row["handling_total_ns"] for row in table["exits"])
    spin = tmp_path / "spin.S"
    spin.write_text("jmp .\n")
    done = labkit("run", str(spin), "--mode", "64", "--backend", backend_name, "--timeout", "0.3", "--json")
    result = json.loads(done.stdout)
    assert result["status"] == "timeout"
    assert "TIMEOUT" not in {row["reason"] for row in result["exit_table"]["exits"]}
    assert [row["reason"] for row in result["exit_table"]["labkit_events"]] == ["TIMEOUT"]
    assert "TIMEOUT" not in result["exits"] and result["labkit_events"] == {"TIMEOUT": 1}


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_run_assembly_written_outside_the_project(mode, backend_name, tmp_path):
    source = tmp_path / f"outside{mode}.S"
    source.write_text(textwrap.dedent(HELLO[mode]))
    done = labkit("run", str(source), "--mode", str(mode), "--backend", backend_name, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["console"] == "x"
    assert result["status"] == "halted"
    assert result["exits"]["IO"] >= 1 and result["exits"]["HLT"] == 1
    assert set(result["regs"]) >= {"rax", "rip", "rflags"}


@pytest.mark.unit
def test_run_reports_bad_input_clearly(tmp_path):
    broken = tmp_path / "broken.S"
    broken.write_text("mov rax,, 1\n")
    done = labkit("run", str(broken), "--backend", "emu")
    assert done.returncode == 2 and "broken.S" in done.stderr and "line 1" in done.stderr
    done = labkit("run", "no-such-guest", "--backend", "emu")
    assert done.returncode == 2 and "no-such-guest" in done.stderr
    done = labkit("run", "hello64", "--backend", "emu", "--memory", "12345")
    assert done.returncode == 2 and "4 KiB" in done.stderr


@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm") or shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs /dev/kvm, setpriv and root to run labkit as a user without access to /dev/kvm")
def test_kvm_without_permission_falls_back_with_auto_and_fails_clearly_with_kvm():
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--reset-env"]
    command = [*as_nobody, sys.executable, "-m", "labkit.cli", "run", "hello64", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["backend"] == "emu"
    assert "no permission to open /dev/kvm" in result["backend_reason"]
    assert result["console"] == "Hello from 64-bit mode!\n"
    done = subprocess.run([*command[:-1], "--backend", "kvm"], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 2
    assert "the KVM backend cannot run here: no permission to open /dev/kvm" in done.stderr
    assert "usermod -aG kvm" in done.stderr


@pytest.mark.unit
def test_lab_becomes_jupyterlab_with_a_token_and_leaves_nothing_behind(tmp_path):
    """`labkit lab` execs JupyterLab with a token it made: a request without it is refused; SIGTERM ends it all."""
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key != "JUPYTER_TOKEN"}
    log = open(tmp_path / "jupyter.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "labkit.cli", "lab", "--no-browser", f"--port={port}",
                               "--ServerApp.ip=127.0.0.1", f"--ServerApp.runtime_dir={tmp_path}"],
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
    try:
        line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/lab?token=" in line, line
        token = line.split("token=", 1)[1].split()[0]
        assert len(token) >= 32
        base = f"http://127.0.0.1:{port}/api/contents"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base, timeout=5)
                raise AssertionError("JupyterLab answered a request without the token")
            except urllib.error.HTTPError as refused:
                assert refused.code == 403, refused.code
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"JupyterLab did not come up:\n{log.read()[-2000:]}")
                time.sleep(0.5)
        request = urllib.request.Request(base, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            names = {item["name"] for item in json.load(answer)["content"]}
        assert "00-welcome.ipynb" in names
        cmdline = open(f"/proc/{server.pid}/cmdline").read().split("\0")
        assert cmdline[1:3] == ["-m", "jupyterlab"], cmdline  # labkit became JupyterLab: signals reach it
        assert f"token={token}" not in " ".join(cmdline)  # handed over in the environment, not on `ps`
        server.terminate()
        assert server.wait(timeout=30) is not None
        time.sleep(0.2)
        assert session_processes(server.pid) == [], "JupyterLab left processes behind"
    finally:
        for pid in session_processes(server.pid):
            os.kill(pid, 9)
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        server.stdout.close()
        log.close()


@pytest.mark.unit
def test_lab_refuses_an_empty_token():
    done = labkit("lab", "--no-browser", "--IdentityProvider.token=")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "empty token" in done.stderr, done.stderr
    assert "http" not in done.stdout


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode not in (0, None), done
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("labkit"), done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


@pytest.mark.unit
def test_bad_guest_files_get_one_line_errors(tmp_path):
    latin1 = tmp_path / "latin1.S"
    latin1.write_bytes(b"; caf\xe9\nhlt\n")
    assert_one_line_error(labkit("run", str(latin1), "--backend", "emu"), "latin1.S", "not UTF-8", "line 1")
    fifo = tmp_path / "x.bin"
    os.mkfifo(fifo)
    assert_one_line_error(labkit("run", str(fifo), "--backend", "emu"), "x.bin", "FIFO")
    os.mkfifo(tmp_path / "y.S")
    assert_one_line_error(labkit("run", str(tmp_path / "y.S"), "--backend", "emu"), "y.S", "FIFO")
    (tmp_path / "dir.bin").mkdir()
    assert_one_line_error(labkit("run", str(tmp_path / "dir.bin"), "--backend", "emu"), "directory")
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as sparse:
        sparse.truncate(100 << 20)
    assert_one_line_error(labkit("run", str(huge), "--backend", "emu"), "huge.bin", "too large", str(100 << 20))


@pytest.mark.unit
@pytest.mark.parametrize("memory, words", [
    ("abc", ["--memory", "'abc' is not a size"]),
    ("12345", ["4 KiB"]),
    ("3G", ["between 1 MiB"]),
])
def test_bad_memory_sizes_get_one_line_errors(memory, words):
    assert_one_line_error(labkit("run", "hello64", "--backend", "emu", "--memory", memory), *words)


@pytest.mark.emu
@pytest.mark.parametrize("memory", ["4M", "4MiB", "0x400000", "4194304", "4096K"])
def test_memory_sizes_take_units(memory):
    done = labkit("run", "hello64", "--backend", "emu", "--memory", memory, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["console"] == "Hello from 64-bit mode!\n"


# Leaves only ``free`` descriptors to the command, then runs it in this process.
FEW_FDS = textwrap.dedent("""
    import contextlib, io, json, os, resource, sys, traceback
    import labkit.cli, labkit.vmm.machine, labkit.guest, labkit.assembler
    from labkit.emu import prepare
    prepare()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    outcomes = []
    for free in range(12):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 64, hard))
        fillers = []
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        for fd in fillers[:free]:
            os.close(fd)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = labkit.cli.main(sys.argv[1:])
        except BaseException:
            code, text = -1, traceback.format_exc()
        else:
            text = err.getvalue()
        finally:
            for fd in fillers[free:]:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        outcomes.append([free, code, text])
    print(json.dumps(outcomes))
""")


@pytest.mark.emu
@pytest.mark.parametrize("guest", ["hello64", "x.bin", "x.S"])
def test_out_of_descriptors_says_so(guest, tmp_path):
    """With 0, 1, 2, ... descriptors left, `labkit run` works or says "too many open files", never blames the guest."""
    (tmp_path / "x.bin").write_bytes(b"\xf4")
    (tmp_path / "x.S").write_text("hlt\n")
    target = guest if guest == "hello64" else str(tmp_path / guest)
    done = subprocess.run([sys.executable, "-c", FEW_FDS, "run", target, "--backend", "emu"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    for free, code, text in outcomes:
        if code != 0:
            assert code == 2 and text.count("\n") == 1 and text.startswith("labkit: error: too many open files"), \
                (free, code, text)
    assert outcomes[0][1] == 2 and outcomes[-1][1] == 0, outcomes  # none left fails, enough left works


@pytest.mark.emu
def test_a_cut_console_is_marked(tmp_path):
    flood = tmp_path / "flood.S"
    flood.write_text(textwrap.dedent("""
        mov edi, 20
    1:  mov eax, 1            # WRITE hypercall: 64 KiB of guest RAM to the console per exit
        mov ebx, 0x100000
        mov ecx, 0x10000
        out 0xf0, eax
        dec edi
        jnz 1b
        hlt
    """))
    done = labkit("run", str(flood), "--backend", "emu", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["console_dropped"] == 20 * 0x10000 - (1 << 20)
    done = labkit("run", str(flood), "--backend", "emu")
    assert f"[console truncated: {20 * 0x10000 - (1 << 20)} bytes dropped]" in done.stdout
