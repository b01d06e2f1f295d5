"""The emulator has no KVM: KVM's exit controls are refused, and results carry no KVM counters."""

from __future__ import annotations

import pytest

from labkit import Machine
from labkit.errors import ConfigError
from labkit.kvm import IoEventFd, KvmExitControls

pytestmark = pytest.mark.emu


def test_kvm_controls_are_refused_on_the_emulator():
    controls = KvmExitControls(ioeventfds=(IoEventFd(0xF6, 1, datamatch=0),))
    with pytest.raises(ConfigError, match="kvm_controls need KVM.*emulator"):
        Machine("hello64", backend="emu", kvm_controls=controls)


def test_results_on_the_emulator_have_no_kvm_stats():
    with Machine("hello64", backend="emu") as machine:
        result = machine.run(timeout=10.0)
        assert result.status.kind == "halted"
        assert result.kvm_stats is None
        with pytest.raises(ConfigError, match="exist only on KVM.*'emu'"):
            machine.kvm_stats()
