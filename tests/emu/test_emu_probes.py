"""The start-up probes the emulation backend added for issue 7 fail loudly when their assumption is wrong."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

from labkit.emu import cpu_state, halted, intercepts
from labkit.emu.cpu_state import locate_state
from labkit.errors import EmulatorError

pytestmark = pytest.mark.emu


def test_halted_flag_checks_the_engines_back_pointer():
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    address = locate_state(uc)
    flag = halted.HaltedFlag(uc, address)
    assert flag.value is False
    with pytest.raises(EmulatorError, match="CPUState.uc does not point back"):
        halted.HaltedFlag(uc, address + 8)  # a CPU state that is not where the back-pointer says


def test_halted_offset_is_where_a_hlt_sets_one():
    at, back = halted.find_halted_offset()
    assert back - 32 <= at < back < 0


def test_intercept_fields_are_verified_by_provoking_intercepts(monkeypatch):
    real = cpu_state.find_deep_fields()
    shifted = dataclasses.replace(real, old_exception=real.old_exception + 8)
    monkeypatch.setattr(intercepts, "_fields", None)
    monkeypatch.setattr(intercepts.S, "find_deep_fields", lambda: shifted)
    with pytest.raises(EmulatorError, match="SVM intercept fields"):
        intercepts.find_intercept_fields()
    monkeypatch.setattr(intercepts.S, "find_deep_fields", lambda: real)
    assert intercepts.find_intercept_fields().vm_vmcb == (real.old_exception + 4 + 7) & ~7


def test_prepare_leaves_no_scratch_engine_for_a_worker_to_inherit():
    """The probes' engines live in reference cycles; prepare() collects them before any worker is forked.

    In a fresh process with the cycle collector off (so it cannot happen to run in between), every
    Unicorn engine the probes made must be gone after prepare(): a worker forked then inherits none.
    """
    code = ("import gc, unicorn, labkit.emu\n"
            "gc.disable()\n"
            "labkit.emu.prepare()\n"
            "print(sum(isinstance(o, unicorn.Uc) for o in gc.get_objects()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", f"{done.stdout.strip()} scratch engines still alive after prepare()"
