"""Stopping a ``KVM_RUN`` that overruns its time budget (what QEMU does to kick a vCPU).

The vCPU thread keeps :data:`KICK_SIGNAL` blocked while it is in
:meth:`KvmBackend.run`, and ``KVM_SET_SIGNAL_MASK`` gives ``KVM_RUN`` the same
mask with that signal unblocked.  So the signal can interrupt ``KVM_RUN`` only:
it never reaches a Python handler, and outside ``KVM_RUN`` it stays pending
until the run loop consumes it with ``sigtimedwait``.  At the deadline the one
process-wide :class:`Watchdog` thread sets ``kvm_run.immediate_exit`` (covers
the moment between two ``KVM_RUN`` calls) and ``pthread_kill``\\ s the vCPU
thread; ``KVM_RUN`` then fails with ``EINTR`` and the loop returns a timeout.

SIGINT is left alone: it stays unblocked during ``KVM_RUN``, so Ctrl-C in the
main thread interrupts the guest and surfaces as ``KeyboardInterrupt``.
"""

from __future__ import annotations

import signal
import threading
import time

KICK_SIGNAL = signal.SIGUSR1


class Watchdog:
    """One daemon thread that kicks overdue vCPU threads; started on first use, shared by all VMs."""

    def __init__(self, signum: int = KICK_SIGNAL):
        self.signum = signum
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[int, tuple[float, int, object]] = {}  # token -> (deadline, thread ident, kvm_run)
        self._fired: set[int] = set()
        self._tokens = 0
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, thread_ident: int, run) -> int:
        """Kick ``thread_ident`` (and set ``run.immediate_exit``) at ``time.monotonic() >= deadline``."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="labkit-kvm-watchdog", daemon=True)
                self._thread.start()
            self._tokens += 1
            token = self._tokens
            self._armed[token] = (deadline, thread_ident, run)
            if deadline < self._wake_at:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Cancel ``token``; returns whether it already fired.  After this the watchdog never fires for it."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _loop(self) -> None:
        # This thread must never take a signal meant for Python (SIGINT) or for a vCPU.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        with self._cond:
            while True:
                now = time.monotonic()
                due = [token for token, (deadline, _, _) in self._armed.items() if deadline <= now]
                for token in due:
                    _, thread_ident, run = self._armed.pop(token)
                    self._fired.add(token)
                    run.immediate_exit = 1
                    try:
                        signal.pthread_kill(thread_ident, self.signum)
                    except ProcessLookupError:
                        pass  # the thread is gone; nothing left to stop
                self._wake_at = min((deadline for deadline, _, _ in self._armed.values()), default=float("inf"))
                self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)


WATCHDOG = Watchdog()
