"""Run a machine core in a forked worker process, so a crash or hang stays there.

Unicorn can crash its host process on some byte sequences, and a notebook
kernel must survive any guest.  The worker is forked from the caller, so the
guest, its devices and their callbacks need no pickling; it builds the core,
then serves calls over a socket pair.  A worker that dies or stops answering
is reported as a run with status ``error`` saying what happened; the caller
goes on.

The worker ignores SIGINT (Jupyter's "interrupt" signals the whole process
group); an interrupt in the caller stops and reaps the worker instead.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import traceback
import warnings
import weakref
from multiprocessing.connection import Connection, Pipe
from typing import Any, Callable

from labkit import errors
from labkit.errors import EmulatorError

GRACE_S = 1.0
"""How much longer than a run's budget the caller waits for the worker to answer."""
CALL_TIMEOUT_S = 30.0
"""How long any other call (set-up, registers, memory) may take."""


class WorkerDied(EmulatorError):
    """The worker process crashed, hung or was stopped; the message says which."""


def _serve(conn: Connection, make_core: Callable[[], Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.disable()  # a crash here is reported by the caller, not dumped on the notebook's stderr
    try:
        core = make_core()
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the caller
        conn.send(("error", _portable(error)))
        return
    conn.send(("ok", None))
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            break
        try:
            value = getattr(core, name)(*args)
        except BaseException as error:  # noqa: BLE001
            conn.send(("error", _portable(error)))
        else:
            conn.send(("ok", value))
        if name == "close":
            break


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


def _reap(pid: int, conn: Connection) -> None:
    conn.close()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class Worker:
    """A forked process holding one core; :meth:`call` runs one of its methods there."""

    def __init__(self, make_core: Callable[[], Any]):
        here, there = Pipe(duplex=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process"
            pid = os.fork()
        if pid == 0:  # the worker: never return into the caller's code
            code = 0
            try:
                here.close()
                _serve(there, make_core)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        there.close()
        self.pid = pid
        self._conn = here
        self._dead: str | None = None
        self._finalizer = weakref.finalize(self, _reap, pid, here)
        self._receive(CALL_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self._dead is None

    def call(self, name: str, *args, timeout: float = CALL_TIMEOUT_S):
        """Run ``core.name(*args)`` in the worker; raise :class:`WorkerDied` if it crashes or hangs."""
        if self._dead:
            raise WorkerDied(self._dead)
        try:
            self._conn.send((name, args))
        except (OSError, BrokenPipeError):
            self._died("the worker process is gone")
        return self._receive(timeout)

    def _receive(self, timeout: float):
        try:
            ready = self._conn.poll(timeout)
        except KeyboardInterrupt:
            self._stop_worker("interrupted: the emulated machine was stopped")
            raise  # the caller sees the interrupt itself, as with an in-process run
        if not ready:
            self._died(f"the emulator did not answer within {timeout:g} s (it hung) and was stopped")
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._died(self._exit_description())
        if kind == "error":
            raise _rebuild(*value)
        return value

    def _exit_description(self) -> str:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "the emulator process ended"
        self._finalizer.detach()
        self._conn.close()
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            return f"the emulator crashed ({signal.Signals(number).name}); the guest's state is lost"
        return f"the emulator process exited with code {os.WEXITSTATUS(status)}"

    def _stop_worker(self, message: str) -> None:
        if self._dead is None:
            self._dead = message
            if self._finalizer.alive:
                self._finalizer()

    def _died(self, message: str):
        self._stop_worker(message)
        raise WorkerDied(self._dead)

    def close(self) -> None:
        if self._dead is None:
            try:
                self.call("close", timeout=5.0)
            except errors.LabkitError:
                pass
            self._dead = "closed"
        if self._finalizer.alive:
            self._finalizer()
