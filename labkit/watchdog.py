"""One process-wide thread that stops runs overrunning their time budget.

Both backends arm it for every run: at the deadline it calls the run's
``action`` from its own thread.  The KVM backend's action sets
``kvm_run.immediate_exit`` and ``pthread_kill``\\ s the vCPU thread with
:data:`KICK_SIGNAL` (what QEMU does to kick a vCPU; see ``labkit.kvm.backend``);
the KVM backend also has the kernel send that signal at the deadline
(:class:`ThreadTimer`), so no Python stands between the deadline and the kick;
the emulation backend's asks its stop gate for a stop at the next block
boundary (see ``labkit.emu.unicorn_backend._StopGate``).  Unicorn's own
``timeout`` argument would stop it too, but mid-instruction, and it starts and
joins a thread on every ``uc_emu_start`` (about 160 µs
here, against 7 µs for the start itself), and the emulation backend restarts
emulation after every stop it needs.

The thread blocks every signal (it must never take SIGINT meant for Python or
a kick meant for a vCPU).  It is started on first use and again in a forked
child, whose state is reset at the fork so a lock held by the parent's thread
cannot hang it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from typing import Callable

KICK_SIGNAL = signal.SIGUSR1

_libc = ctypes.CDLL(None, use_errno=True)
_CLOCK_MONOTONIC = 1  # <linux/time.h>; time.monotonic() reads the same clock on Linux
_TIMER_ABSTIME = 1
_SIGEV_THREAD_ID = 4  # <asm-generic/siginfo.h>


class _Sigevent(ctypes.Structure):
    """``struct sigevent`` for ``SIGEV_THREAD_ID`` (64 bytes on x86-64: the union pads it)."""

    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int), ("sigev_notify", ctypes.c_int),
                ("sigev_notify_thread_id", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc.timer_create.argtypes = (ctypes.c_int, ctypes.POINTER(_Sigevent), ctypes.POINTER(ctypes.c_void_p))
_libc.timer_settime.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p)
_libc.timer_delete.argtypes = (ctypes.c_void_p,)


class ThreadTimer:
    """A kernel timer (``timer_create`` with ``SIGEV_THREAD_ID``, POSIX timers, man 2 timer_create) that sends
    ``signum`` to one thread at ``deadline`` (``time.monotonic()``), with no Python in between.

    The watchdog thread needs the GIL to act, and with 16 vCPU threads of one
    process on 2 cores it waited tens of milliseconds per deadline behind them,
    one deadline after another: the last VM of 16 stopped 0.3-0.55 s late.  The
    kernel's timer interrupts ``KVM_RUN`` at the deadline whatever Python does.
    A context manager: the timer is deleted on exit (a signal it already sent
    stays pending for the caller to consume).  ``ok`` is False where the kernel
    refused the timer; the watchdog then still stops the run.
    """

    def __init__(self, deadline: float, thread_id: int, signum: int = KICK_SIGNAL):
        self._timer = ctypes.c_void_p()
        event = _Sigevent(sigev_signo=signum, sigev_notify=_SIGEV_THREAD_ID, sigev_notify_thread_id=thread_id)
        self.ok = _libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._timer)) == 0
        if self.ok:
            seconds = max(deadline, 1e-6)
            value = _Itimerspec(it_value=_Timespec(int(seconds), int((seconds % 1) * 1e9)))
            if _libc.timer_settime(self._timer, _TIMER_ABSTIME, ctypes.byref(value), None) != 0:
                self.close()

    def close(self) -> None:
        if self.ok:
            _libc.timer_delete(self._timer)
            self.ok = False

    def __enter__(self) -> "ThreadTimer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watchdog:
    """Calls each armed action once its deadline (``time.monotonic()``) has passed, unless disarmed first."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[int, tuple[float, Callable[[], None], float | None]] = {}
        self._fired: set[int] = set()
        self._tokens = 0
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, action: Callable[[], None], repeat: float | None = None) -> int:
        """Call ``action()`` from the watchdog thread at ``deadline``, then every ``repeat`` seconds if given,
        until disarmed; returns a token for :meth:`disarm`.  (Repeating covers a stop that lands just
        between two ``uc_emu_start`` calls, where Unicorn ignores it.)"""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="labkit-watchdog", daemon=True)
                self._thread.start()
            self._tokens += 1
            token = self._tokens
            self._armed[token] = (deadline, action, repeat)
            if deadline < self._wake_at:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Cancel ``token``; returns whether its action already ran.  After this it never runs."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _loop(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        with self._cond:
            while True:
                now = time.monotonic()
                for token in [token for token, (deadline, _, _) in self._armed.items() if deadline <= now]:
                    _, action, repeat = self._armed.pop(token)
                    self._fired.add(token)
                    if repeat is not None:
                        self._armed[token] = (now + repeat, action, repeat)
                    try:
                        action()  # under the lock: a run cannot disarm (and go on) halfway through it
                    except Exception:  # noqa: BLE001 - a failed kick must not kill the watchdog
                        pass
                self._wake_at = min((deadline for deadline, _, _ in self._armed.values()), default=float("inf"))
                self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._reset)
