"""Worker processes never outlive their caller, hold only their own descriptors, and are always reaped."""

from __future__ import annotations

import functools
import gc
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from backends import HAS_KVM, NO_KVM_REASON

from labkit import Machine
from labkit.errors import ConfigError, EmulatorError
from labkit.vmm.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
STORM_CLOSES = int(os.environ.get("LABKIT_STORM_CLOSES", "200"))


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, utime + stime) of a process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[11]) + int(fields[12])


def children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and stat[1] == pid:
                found.append(int(name))
    return found


# A harness that makes itself the subreaper of its descendants, starts a caller
# that runs an endless guest on the emulator, kills the caller with SIGKILL in
# the middle of the run, and reports every descendant still there a second later.
HARNESS = textwrap.dedent("""
    import ctypes, json, os, signal, subprocess, sys, time
    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    sys.path[:0] = os.environ["TESTS"].split(os.pathsep)  # tests/machine and tests/ (for backends)
    from test_lifetimes import children_of, proc_stat

    def descendants(pid):
        found = []
        for child in children_of(pid):
            found += [child] + descendants(child)
        return found

    caller = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    worker = int(caller.stdout.readline())
    time.sleep(0.5)
    cpu_before = proc_stat(worker)[2]
    time.sleep(0.3)
    busy = proc_stat(worker)[2] > cpu_before  # the worker is running the guest
    before = descendants(os.getpid())
    os.kill(caller.pid, signal.SIGKILL)
    killed = time.monotonic()
    caller.wait()
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        left = descendants(os.getpid())
        took = time.monotonic() - killed
        if not left or took > 1.0:
            break
        time.sleep(0.005)
    for pid in left:  # leave nothing behind, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    print(json.dumps({"worker": worker, "busy": busy, "before": before, "left": left, "took": took}))
""")

CALLER = textwrap.dedent("""
    import threading
    from labkit import Machine
    machines = []
    def make():
        machines.append(Machine("forever64", backend="emu"))
    if {in_thread}:  # made in a thread that has ended by the time the caller dies
        thread = threading.Thread(target=make); thread.start(); thread.join()
    else:
        make()
    print(machines[0]._worker.pid, flush=True)
    machines[0].run(timeout=600)
""")


@pytest.mark.emu
@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "ended-thread"])
def test_kill_9_of_the_caller_mid_run_leaves_no_process_behind(in_thread):
    here = Path(__file__).parent
    env = {**os.environ, "TESTS": os.pathsep.join([str(here), str(here.parent)]), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", HARNESS, CALLER.format(in_thread=in_thread)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["worker"] in report["before"], report  # the harness saw the worker ...
    assert report["busy"], "the worker was not running the guest when its caller was killed"
    assert report["left"] == [], f"still there {report['took']:.2f} s after kill -9 of the caller: {report}"
    assert report["took"] <= 1.0


@pytest.mark.emu
def test_a_machine_made_in_a_thread_that_ended_keeps_its_worker():
    """PDEATHSIG fires when the forking *thread* exits; the worker's own thread forks it, so it lives on."""
    made: list[Machine] = []
    thread = threading.Thread(target=lambda: made.append(Machine("hello64", backend="emu")))
    thread.start()
    thread.join()
    time.sleep(0.2)
    with made[0] as machine:
        assert machine.run().console == "Hello from 64-bit mode!\n"


@pytest.mark.emu
def test_a_dropped_machine_takes_its_worker_with_it():
    machine = Machine("forever64", backend="emu")
    pid = machine._worker.pid
    del machine
    gc.collect()
    assert proc_stat(pid) is None, "the worker of a dropped Machine is still there (or unreaped)"


def _fd_targets(pid: int) -> dict[int, str]:
    base, targets = f"/proc/{pid}/fd", {}
    for fd in os.listdir(base):
        try:
            targets[int(fd)] = os.readlink(f"{base}/{fd}")
        except FileNotFoundError:  # the directory listing's own fd, closed by now
            pass
    return targets


@pytest.mark.kvm
@pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)
def test_a_worker_holds_only_its_own_descriptors_not_the_callers_kvm_vm():
    kvm = Machine("hello64", backend="kvm")  # in this process: /dev/kvm, a VM, a vCPU and its kvm_run mapping
    assert any("kvm-vm" in target for target in _fd_targets(os.getpid()).values())
    emu = Machine("hello64", backend="emu")
    try:
        pid = emu._worker.pid
        targets = _fd_targets(pid)
        assert [targets.get(fd) for fd in (0, 1, 2)] == ["/dev/null"] * 3, targets
        rest = sorted(target.split(":")[0] for fd, target in targets.items() if fd > 2)
        # its RAM's memory file (Python's mmap keeps a descriptor of the file it maps), crash report, calls,
        # control; Unicorn opens none
        assert rest == ["/memfd", "pipe", "socket", "socket"], targets
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "kvm" not in maps, [line for line in maps.splitlines() if "kvm" in line]
        assert emu.run().console == "Hello from 64-bit mode!\n"
        kvm.close()  # and so the VM is gone: no worker keeps it
        assert not any("kvm" in target for target in _fd_targets(pid).values())
    finally:
        kvm.close()
        emu.close()


@pytest.mark.emu
def test_a_worker_does_not_hold_the_callers_terminal_or_files(tmp_path):
    with open(tmp_path / "callers-file", "w") as held:
        with Machine("hello64", backend="emu") as machine:
            targets = _fd_targets(machine._worker.pid)
    assert held.name not in targets.values()
    assert all(target in ("/dev/null", "/memfd:labkit-guest-ram (deleted)") or target.startswith(("socket:", "pipe:"))
               for target in targets.values()), targets


CLOSE_PATH = ("labkit/vmm/worker.py", "labkit/vmm/machine.py")


def _storm_handler(armed: threading.Event, close_path: tuple[str, ...], signum, frame):
    """Raise KeyboardInterrupt only when it lands inside labkit's close path (anywhere in it), never in the test."""
    while frame is not None and armed.is_set():
        if frame.f_code.co_filename.endswith(close_path):
            raise KeyboardInterrupt
        frame = frame.f_back


def interrupt_storm(closes: int, seed: int = 7, close_path: tuple[str, ...] = CLOSE_PATH) -> dict[str, int]:
    """Close ``closes`` emulated machines while SIGINTs rain on the process; count what is left unreaped.

    Also run by ``benchmarks/bench_reaping.py`` (800+ closes, against the a61b9f3 worker).
    """
    rng = random.Random(seed)
    armed = threading.Event()
    done = threading.Event()

    def rain():
        while not done.is_set():
            if armed.wait(0.05):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(rng.uniform(0, 0.002))

    previous = signal.signal(signal.SIGINT, functools.partial(_storm_handler, armed, close_path))
    sender = threading.Thread(target=rain, daemon=True)
    sender.start()
    pids, interrupted = [], 0
    try:
        for _ in range(closes):
            machine = Machine("hello64", backend="emu")
            pids.append(machine._worker.pid)
            armed.set()
            try:
                machine.close()
            except KeyboardInterrupt:
                interrupted += 1
            armed.clear()
            del machine
    finally:
        done.set()
        armed.clear()
        sender.join()
        signal.signal(signal.SIGINT, previous)
    gc.collect()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(proc_stat(pid) for pid in pids):
        time.sleep(0.01)
    states = [stat[0] for stat in map(proc_stat, pids) if stat is not None and stat[1] == os.getpid()]
    return {"closes": closes, "interrupted": interrupted, "zombies": states.count("Z"),
            "alive": len(states) - states.count("Z")}


@pytest.mark.emu
def test_an_interrupt_storm_while_closing_leaves_no_zombie_and_no_worker():
    result = interrupt_storm(STORM_CLOSES)
    assert result["interrupted"] > STORM_CLOSES // 10, f"the storm hardly hit the close path: {result}"
    assert result["zombies"] == 0 and result["alive"] == 0, result
    assert children_of(os.getpid()) == []


class SpinningCore:
    """A stand-in for MachineCore: ``spin`` runs until ``request_pause`` (poked from the caller) stops it."""

    def __init__(self):
        self.spinning = False
        self.stop = False
        self.pauses = 0

    def spin(self, limit_s: float):
        self.spinning = True
        started = time.monotonic()
        while not self.stop and time.monotonic() - started < limit_s:
            pass  # holds the GIL, as the emulator's Python hooks do
        self.spinning = False
        return ("paused" if self.stop else "timeout", self.pauses)

    def check_spinning(self):
        if not self.spinning:
            raise ConfigError("not spinning yet")

    def request_pause(self):
        self.pauses += 1
        self.stop = True

    def fail(self):
        raise ValueError("device broke")

    def close(self):
        pass


@pytest.mark.unit
def test_poke_runs_a_method_in_the_worker_while_a_call_is_in_progress():
    worker = Worker(SpinningCore)
    try:
        answer: list = []
        call = threading.Thread(target=lambda: answer.append(worker.call("spin", 20.0, timeout=30)))
        call.start()
        deadline = time.monotonic() + 10
        while True:  # poke's errors come back: wait until the call is really spinning
            try:
                worker.poke("check_spinning")
                break
            except ConfigError:
                assert time.monotonic() < deadline, "spin never started"
                time.sleep(0.01)
        started = time.monotonic()
        worker.poke("request_pause")
        poked_s = time.monotonic() - started
        call.join(timeout=10)
        assert answer == [("paused", 1)]
        assert poked_s < 1.0, f"poke took {poked_s:.3f} s"
        with pytest.raises(EmulatorError, match="device broke"):
            worker.poke("fail")
        with pytest.raises(EmulatorError, match="no_such_method"):
            worker.poke("no_such_method")
        with pytest.raises(ConfigError, match="public method"):
            worker.poke("__init__")
        threads = [threading.Thread(target=worker.poke, args=("request_pause",)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert worker.call("spin", 0.0) == ("paused", 9)  # every poke from every thread ran once
    finally:
        worker.close()
    with pytest.raises(ConfigError, match="this Machine is closed"):
        worker.poke("request_pause")
    assert proc_stat(worker.pid) is None


def test_run_after_close_raises_the_same_error_on_both_backends(backend_name):
    machine = Machine("hello64", backend=backend_name)
    machine.close()
    with pytest.raises(ConfigError, match="is closed"):
        machine.run()
    if backend_name == "emu":  # on KVM regs() after close is KvmError(EBADF) until Machine checks for itself
        with pytest.raises(ConfigError, match="this Machine is closed"):
            machine.regs()
