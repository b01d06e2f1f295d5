"""Run a machine core in a forked worker process, so a crash or hang stays there.

Unicorn can crash its host process on some byte sequences, and a notebook
kernel must survive any guest.  The worker is forked from the caller, so the
guest, its devices and their callbacks need no pickling; it builds the core,
then serves calls over a socket pair.  A worker that dies or stops answering
is reported as a run with status ``error`` saying what happened; the caller
goes on.

Lifetimes: a worker never outlives its caller, holds only what it needs, and
is always reaped.

- **It dies with its caller.**  Right after ``fork`` the worker asks for
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` and then checks that its parent is still
  the caller (the caller may have died between ``fork`` and ``prctl``).  The
  kernel sends that signal when the *thread* that forked exits, not the
  process, so each worker is forked by a thread of its own that then blocks in
  ``waitpid`` for it: that thread lives exactly as long as its worker, and a
  ``Machine`` made in a short-lived thread (a widget callback, a thread pool)
  keeps its worker.  As a second line, a thread in the worker reads the control
  socket and exits the worker at its end-of-file: when every copy of the
  caller's end is closed (the caller closed the ``Machine``, dropped it, or
  died), the worker goes too, even in the middle of a run.
- **It holds only its own descriptors.**  After ``fork`` the worker closes every
  file descriptor but its two sockets and the crash-report pipe, points 0, 1, 2
  at ``/dev/null`` (it never writes to the caller's terminal or notebook), and
  unmaps the caller's KVM mappings (``kvm_run`` of a vCPU: a mapping keeps the
  VM alive as an fd does), so a KVM VM the caller closes is gone, not kept
  alive in every worker forked while it was open.  The core, and every
  descriptor the emulator opens, is made after that, in the worker.  Objects
  of the caller that still name a closed descriptor are never collected in the
  worker (``gc.freeze``), so nothing there closes a number reused since.
- **Crash reports come back through a pipe**: ``faulthandler`` writes the
  worker's Python stack there on SIGSEGV/SIGBUS/SIGFPE/SIGABRT, and the error
  the caller sees names the innermost frame.
- **It is always reaped.**  Only the forking thread calls ``waitpid``, and
  Python raises ``KeyboardInterrupt`` only in the main thread, so a Ctrl-C
  landing at any moment of a close cannot leave a zombie; the caller only
  signals (under a lock with the reaping, so never a reused pid) and waits.

The worker ignores SIGINT (Jupyter's "interrupt" signals the whole process
group); an interrupt in the caller stops and reaps the worker instead.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import re
import signal
import threading
import time
import traceback
import warnings
import weakref
from multiprocessing.connection import Connection, Pipe
from typing import IO, Any, Callable, Iterable, NoReturn

from labkit import errors
from labkit.errors import ConfigError, EmulatorError

GRACE_S = 1.0
"""How much longer than a run's budget the caller waits for the worker to say the run has ended
(:data:`DONE`); the result itself may then take up to :data:`CALL_TIMEOUT_S` to arrive."""
DONE = b"done"
"""What the worker sends the moment a budgeted call (a run, a step) returns, before its result.

The result holds the run's new trace records, and pickling them in the worker and unpickling them
in the caller takes about 0.4 s of CPU per 150,000 records.  With 16 emulated VMs at once on 2 cores,
16 workers pickle at once and the caller's threads unpickle one at a time (one GIL): a result
arrived seconds after the budget, and a worker still busy sending it past ``GRACE_S`` was killed as
hung, its timeout reported as an error and its state lost.  The grace now covers only stopping the
guest; how fast the result then arrives depends on its size (``labkit.fleet`` bounds the trace)."""
CALL_TIMEOUT_S = 30.0
"""How long any other call (set-up, registers, memory) may take."""
POKE_TIMEOUT_S = 5.0
"""How long :meth:`Worker.poke` waits for the worker to run the poked method."""
REAP_WAIT_S = 5.0
"""How long closing waits for the killed worker to be reaped (it takes microseconds)."""
CLOSED_MESSAGE = "this Machine is closed"

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_KVM_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s+anon_inode:kvm-", re.MULTILINE)


class WorkerDied(EmulatorError):
    """The worker process crashed, hung or was stopped; the message says which."""


class _Child:
    """One worker process as its forking thread sees it: pid, exit status, and the lock that orders kill and reap.

    The caller's main thread waits on plain locks used as one-shot latches
    (held from the start, released once by the forking thread), never on
    ``threading.Event``: a ``KeyboardInterrupt`` landing inside
    ``Condition.wait`` can turn into ``RuntimeError: release unlocked lock``,
    while an interrupted ``Lock.acquire`` just raises.  The flags, not the
    latches, say what happened; a latch only makes the wait wake up early.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.error: BaseException | None = None
        self.status: int | None = None
        self.exited = False
        self._started = threading.Lock()
        self._started.acquire()
        self._reaped_latch = threading.Lock()
        self._reaped_latch.acquire()
        self._lock = threading.Lock()
        self._reaped = False

    def announce(self, pid: int = 0, error: BaseException | None = None) -> None:
        """The forking thread: the worker's pid (or why there is none) is known."""
        self.pid, self.error = pid, error
        self._started.release()

    def wait_started(self) -> bool:
        """Wait (at most a moment, to be called in a loop) for :meth:`announce`; True once it happened."""
        if not (self.pid or self.error):
            self._started.acquire(timeout=0.1)
        return bool(self.pid or self.error)

    def wait_exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the worker to have been reaped; True if it has."""
        deadline = time.monotonic() + timeout
        while not self.exited and time.monotonic() < deadline:
            self._reaped_latch.acquire(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
        return self.exited

    def kill(self) -> None:
        """SIGKILL the worker unless it has been reaped already (its pid may then belong to another process)."""
        with self._lock:
            if self.pid and not self._reaped:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def wait(self) -> None:
        """Reap the worker (the forking thread's job): wait for its exit without reaping, then reap under the lock."""
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            with self._lock:
                _, self.status = os.waitpid(self.pid, 0)
                self._reaped = True
        except ChildProcessError:  # someone else reaped it (SIGCHLD set to SIG_IGN)
            with self._lock:
                self._reaped = True
        finally:
            self.exited = True
            self._reaped_latch.release()


def _fork_and_wait(child: _Child, handed: list) -> None:
    """The body of a worker's own thread: fork the worker, hand its pid over, reap it when it exits.

    ``handed`` is ``[make_core, keep, drop, shared]``, emptied at once: this thread lives
    as long as the worker and must not keep the caller's ``Machine`` (which
    ``make_core`` refers to) or its sockets alive.  ``shared`` are the caller's
    descriptors the worker keeps open too (the caller closes its own copies).
    """
    make_core, keep, drop, shared = handed
    handed.clear()
    parent = os.getpid()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process"
            pid = os.fork()
    except OSError as error:
        _close_all(keep)
        child.exited = True
        child.announce(error=error)
        return
    if pid == 0:  # the worker: never return into the caller's code
        code = 0
        try:
            _become_worker(parent, keep, drop, shared)
            _serve(keep[0], keep[1], make_core)  # the core is made after the caller's descriptors are closed
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    _close_all(keep)  # the worker's ends, in the caller
    del make_core, keep, drop, shared
    child.announce(pid)
    child.wait()


def _close_all(items: Iterable[Connection | int]) -> None:
    for item in items:
        try:
            item.close() if isinstance(item, Connection) else os.close(item)
        except OSError:
            pass


_in_worker = False


def in_worker() -> bool:
    """Whether this process is a machine's worker (a device that must never run in the caller asks)."""
    return _in_worker


def _become_worker(parent: int, keep: tuple[Connection, Connection, int], drop: tuple[Connection, Connection, int],
                   shared: tuple[int, ...] = ()) -> None:
    """Tie the new process to its caller and shed everything of the caller's it does not need."""
    global _in_worker
    _in_worker = True
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(1)
    if os.getppid() != parent:  # the caller died before prctl: nobody would ever kill us
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the forking thread's mask is not ours
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()  # never collect the caller's objects here: their finalizers would close reused fd numbers
    _close_all(drop)
    _unmap_kvm()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    kept = sorted({0, 1, 2, keep[0].fileno(), keep[1].fileno(), keep[2], *shared})
    highest = max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    for low, high in zip(kept, kept[1:] + [max(highest, kept[-1] + 1)]):
        os.closerange(low + 1, high)
    faulthandler.enable(file=keep[2], all_threads=True)


def _unmap_kvm() -> None:
    """Unmap the caller's KVM mappings (``kvm_run`` pages): a mapping, like an fd, keeps its VM alive."""
    with open("/proc/self/maps") as maps:
        regions = _KVM_MAPPING.findall(maps.read())
    for start, end in regions:
        _libc.munmap(int(start, 16), int(end, 16) - int(start, 16))


def _serve(conn: Connection, control: Connection, make_core: Callable[[], Any]) -> None:
    core_box: list[Any] = []
    threading.Thread(target=_watch_control, args=(control, core_box), daemon=True, name="labkit-control").start()
    try:
        core = make_core()
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the caller
        conn.send(("error", _portable(error)))
        return
    core_box.append(core)
    conn.send(("ok", None))
    while True:
        try:
            name, args, announce = conn.recv()
        except (EOFError, OSError):
            break
        try:
            value = getattr(core, name)(*args)
        except BaseException as error:  # noqa: BLE001
            reply: tuple[str, Any] = ("error", _portable(error))
        else:
            reply = ("ok", value)
        if announce:  # the guest has stopped: say so before the (maybe large) reply is pickled and sent
            conn.send_bytes(DONE)
        conn.send(reply)
        if name == "close":
            break


def _watch_control(control: Connection, core_box: list[Any]) -> None:
    """The worker's second thread: run poked methods; exit the worker when the caller's end closes."""
    while True:
        try:
            name = control.recv()
        except (EOFError, OSError):
            os._exit(0)  # the caller closed its end or died: no one is left to serve
        try:
            if not core_box:
                raise ConfigError(f"cannot run {name}(): the machine is still being set up")
            getattr(core_box[0], name)()
        except BaseException as error:  # noqa: BLE001
            reply: tuple[str, Any] = ("error", _portable(error))
        else:
            reply = ("ok", None)
        try:
            control.send(reply)
        except OSError:
            os._exit(0)


def _portable(error: BaseException) -> tuple[str, str]:
    """An exception as (class name, message), rebuilt on the caller's side by :func:`_rebuild`."""
    message = str(error) or type(error).__name__
    if not isinstance(error, errors.LabkitError):
        message = f"{type(error).__name__}: {message}\n{traceback.format_exc(limit=6)}"
    return type(error).__name__, message


def _rebuild(name: str, message: str) -> Exception:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.LabkitError) and cls is not errors.KvmError:
        return cls(message)
    return EmulatorError(message)


def _reap(child: _Child, conn: Connection, control: Connection, control_lock: threading.Lock,
          report: IO[bytes]) -> None:
    """Kill the worker, close the caller's ends, wait until the forking thread has reaped it.

    Nested ``finally`` so that an interrupt landing in one step still runs the
    next; even if all were skipped, the worker would exit at its sockets'
    end-of-file and its thread would reap it.
    """
    try:
        child.kill()
    finally:
        try:
            with control_lock:  # a poke in flight ends at once: the worker is dead
                control.close()
        finally:
            try:
                conn.close()
                report.close()
            finally:
                child.wait_exited(REAP_WAIT_S)


class Worker:
    """A forked process holding one core; :meth:`call` runs one of its methods there.

    ``make_core`` is called in the worker (after the caller's descriptors are
    closed there), so the core and its devices live in the worker only.
    ``shared_fds`` stay open in the worker (the guest RAM's memfd, which
    ``make_core`` maps); the caller may close its copies once this returns.
    """

    def __init__(self, make_core: Callable[[], Any], shared_fds: tuple[int, ...] = ()):
        created: list = []
        try:
            here, there = Pipe(duplex=True)
            created += [here, there]
            control, control_there = Pipe(duplex=True)
            created += [control, control_there]
            report_read, report_write = os.pipe()
            created += [report_read, report_write]
        except OSError as error:
            _close_all(created)
            raise EmulatorError(f"cannot start the emulator's worker process: {errors.strerror(error.errno or 0)}") \
                from error
        os.set_blocking(report_read, False)
        child = _Child()
        handed = [make_core, (there, control_there, report_write), (here, control, report_read), tuple(shared_fds)]
        thread = threading.Thread(target=_fork_and_wait, args=(child, handed), daemon=True, name="labkit-worker")
        try:
            thread.start()
        except RuntimeError as error:
            _close_all(created)
            raise EmulatorError(f"cannot start the emulator's worker process: {error}") from error
        interrupted = False
        while True:  # a Ctrl-C now is deferred until the worker can be stopped
            try:
                if child.wait_started():
                    break
            except KeyboardInterrupt:
                interrupted = True
        if child.error is not None:
            _close_all((here, control, report_read))
            failure = child.error
            raise EmulatorError(f"cannot start the emulator's worker process: "
                                f"{errors.strerror(getattr(failure, 'errno', 0) or 0)}") from failure
        self.pid = child.pid
        self._child = child
        self._conn = here
        self._control = control
        self._control_lock = threading.Lock()
        self._report = os.fdopen(report_read, "rb", buffering=0)
        self._dead: str | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _reap, child, here, control, self._control_lock, self._report)
        if interrupted:
            self._stop_worker("interrupted: the emulated machine was stopped")
            raise KeyboardInterrupt
        try:
            self._receive(CALL_TIMEOUT_S)  # the core was made, or why not
        except BaseException:
            self._stop_worker("the machine could not be set up")
            raise

    @property
    def alive(self) -> bool:
        return self._dead is None

    def call(self, name: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Run ``core.name(*args)`` in the worker; raise :class:`WorkerDied` if it crashes or hangs.

        ``timeout`` is how long the method itself may take (a run's budget plus :data:`GRACE_S`);
        with a ``timeout`` other than :data:`CALL_TIMEOUT_S` the worker says when the method has
        returned (:data:`DONE`) and its result then has :data:`CALL_TIMEOUT_S` to arrive.
        After :meth:`close` raises ``ConfigError("this Machine is closed")``, as
        a closed in-process core does.
        """
        self._check_usable()
        announce = timeout != CALL_TIMEOUT_S
        try:
            self._conn.send((name, args, announce))
        except (OSError, BrokenPipeError):
            self._died("the worker process is gone")
        if announce:
            self._receive(timeout, marker=True)
            timeout = CALL_TIMEOUT_S
        return self._receive(timeout)

    def poke(self, name: str) -> None:
        """Run ``core.name()`` in the worker now, even while a :meth:`call` is in progress.

        For methods of the core that are themselves thread-safe, such as
        ``MachineCore.request_pause``: a thread in the worker reads the control
        socket and runs the method beside the call in progress.  Safe to call
        from any thread of the caller; returns once the method has run (well
        within :data:`POKE_TIMEOUT_S`), raising what it raised.
        """
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ConfigError(f"poke runs a public method of the core by name, not {name!r}")
        self._check_usable()
        with self._control_lock:
            try:
                self._control.send(name)
                if not self._control.poll(POKE_TIMEOUT_S):
                    raise WorkerDied(f"the emulator did not run {name}() within {POKE_TIMEOUT_S:g} s")
                kind, value = self._control.recv()
            except (EOFError, OSError):
                raise WorkerDied(self._dead or "the worker process is gone") from None
        if kind == "error":
            raise _rebuild(*value)

    def _check_usable(self) -> None:
        if self._closed:
            raise ConfigError(CLOSED_MESSAGE)
        if self._dead:
            raise WorkerDied(self._dead)

    def _receive(self, timeout: float, marker: bool = False) -> Any:
        try:
            ready = self._conn.poll(timeout)
        except KeyboardInterrupt:
            self._stop_worker("interrupted: the emulated machine was stopped")
            raise  # the caller sees the interrupt itself, as with an in-process run
        if not ready:
            self._died(f"the emulator did not answer within {timeout:g} s (it hung) and was stopped")
        try:
            if marker:
                if self._conn.recv_bytes() != DONE:
                    self._died("the worker process answered out of turn and was stopped")
                return None
            kind, value = self._conn.recv()
        except KeyboardInterrupt:
            self._stop_worker("interrupted: the emulated machine was stopped")
            raise
        except (EOFError, OSError):
            self._died(self._exit_description())
        if kind == "error":
            raise _rebuild(*value)
        return value

    def _exit_description(self) -> str:
        """Why the worker's socket closed: its exit status, and where it crashed if faulthandler said."""
        if not self._child.wait_exited(REAP_WAIT_S):
            return "the emulator process closed its socket but did not exit"
        status = self._child.status
        if status is None:
            return "the emulator process ended"
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            return f"the emulator crashed ({signal.Signals(number).name}){self._crash_site()}; the guest's state is lost"
        return f"the emulator process exited with code {os.WEXITSTATUS(status)}"

    def _crash_site(self) -> str:
        """`` in write (devices.py:57)`` from the worker's faulthandler report, or ``""``."""
        try:
            report = (self._report.read() or b"").decode(errors="replace")
        except (OSError, ValueError):  # ValueError: already closed by the finalizer
            return ""
        current = report.split("Current thread", 1)[-1]
        frame = re.search(r'File "([^"]*)", line (\d+) in (\S+)', current)
        if not frame:
            return ""
        return f" in {frame.group(3)} ({os.path.basename(frame.group(1))}:{frame.group(2)})"

    def _stop_worker(self, message: str) -> None:
        if self._dead is None:
            self._dead = message
        if self._finalizer.alive:
            self._finalizer()

    def _died(self, message: str) -> NoReturn:
        self._stop_worker(message)
        raise WorkerDied(self._dead)

    def close(self) -> None:
        """Close the core in the worker, then stop and reap the worker; later calls raise ``ConfigError``."""
        if self._dead is None and not self._closed and self._finalizer.alive:  # (at exit it may have run first)
            try:
                self.call("close", timeout=5.0)
            except errors.LabkitError:
                pass
        self._closed = True
        self._dead = self._dead or "closed"
        if self._finalizer.alive:
            self._finalizer()
