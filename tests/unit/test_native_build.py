"""labkit.native: a C file's library, built at most once per process, and safe to fork from any thread."""

from __future__ import annotations

import os
import threading

import pytest

from labkit import native
from labkit.virtio import native as virtio_native

pytestmark = pytest.mark.unit


def test_a_process_forked_while_another_thread_builds_gets_a_lock_of_its_own():
    """An emulator worker forked while a thread of its caller held the build lock must not wait for a thread it
    does not have (it would hang at its first drain)."""
    library = native.Library(virtio_native.SOURCE, lambda loaded: None, "test")
    holding, release = threading.Event(), threading.Event()

    def builder() -> None:
        with library._lock:
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=builder)
    thread.start()
    holding.wait(10)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if library._lock.acquire(timeout=2) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_library_is_built_once_and_says_what_it_is():
    calls = []
    library = native.Library(virtio_native.SOURCE, lambda loaded: calls.append(loaded) or None, "C test")
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    first, second = library.built(), library.built()
    assert first is second and len(calls) == 1
    assert library.status().startswith("C test (") and library.load() is first.library
    refused = native.Library(virtio_native.SOURCE, lambda loaded: "its layout does not match", "C test")
    assert refused.load() is None and refused.status() == "Python only: its layout does not match"
