"""The ``labkit`` command as a student types it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

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
    assert "backend='auto' picks" in text and "/dev/kvm" in text and "trap delivery" in text


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
def test_lab_serves_the_notebooks():
    """The README's first command ends in `labkit lab`: JupyterLab must come up on notebooks/."""
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "labkit.cli", "lab", "--no-browser", f"--port={port}",
                               "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token="],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5) as answer:
                    names = {item["name"] for item in json.load(answer)["content"]}
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"JupyterLab did not come up:\n{server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        assert "00-welcome.ipynb" in names
    finally:
        server.terminate()
        server.wait(timeout=30)
