"""KvmExitControls, the MSR filter it asks for, the capability check and KvmRunStats' rows: no KVM needed."""

from __future__ import annotations

import pytest

from labkit.errors import ConfigError
from labkit.kvm import bindings as kb
from labkit.kvm.controls import (
    CoalescedZone, IoEventFd, KvmExitControls, MsrRegister, UserMsr, missing_capabilities, msr_filter_ranges,
)
from labkit.kvm.stats import KvmRunStats, counters_delta

pytestmark = pytest.mark.unit


def test_bad_controls_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="cannot disable 'halt'"):
        KvmExitControls(disable_exits=("halt",))
    with pytest.raises(ConfigError, match="ioeventfd length"):
        IoEventFd(0xF6, 3, datamatch=0)
    with pytest.raises(ConfigError, match="ioeventfd length"):
        IoEventFd(0xF6, 8, datamatch=0)  # 8 bytes only for MMIO
    assert IoEventFd(0x1000_0000, 8, datamatch=1, pio=False).length == 8
    with pytest.raises(ConfigError, match="datamatch"):
        IoEventFd(0xF6, 1, datamatch=0x100)
    with pytest.raises(ConfigError, match="ioeventfd address"):
        IoEventFd(0x10000, 1, datamatch=0)
    with pytest.raises(ConfigError, match="coalesced zone length"):
        CoalescedZone(0xFFFF, 2, pio=True)
    with pytest.raises(ConfigError, match="listed twice"):
        KvmExitControls(msrs=(UserMsr(0x10), UserMsr(0x10)))
    with pytest.raises(ConfigError, match="at most 16"):
        KvmExitControls(msrs=tuple(UserMsr(0x4000_0000 + i) for i in range(17)))
    with pytest.raises(ConfigError, match="must be a tuple"):
        KvmExitControls(coalesced=CoalescedZone(0x10, 1, pio=True))
    with pytest.raises(ConfigError, match="expected a IoEventFd"):
        KvmExitControls(ioeventfds=(CoalescedZone(0x10, 1, pio=True),))
    with pytest.raises(ConfigError, match="neither reads nor writes"):
        UserMsr(0x10, read=False, write=False)
    with pytest.raises(ConfigError, match="UserMsr index"):
        UserMsr(1 << 32)


def test_describe_and_truth():
    assert not KvmExitControls()
    controls = KvmExitControls(disable_exits=["hlt"], msrs=[UserMsr(0xC0000102)],
                               coalesced=[CoalescedZone(0x3F8, 1, pio=True)], ioeventfds=[IoEventFd(0xF6, 1, 0)])
    assert controls and controls.disable_exits == ("hlt",)  # lists become tuples
    assert controls.disable_exits_flags == kb.KVM_X86_DISABLE_EXITS_HLT
    assert controls.describe() == ("hlt exits disabled", "rdmsr/wrmsr 0xc0000102 to userspace",
                                   "coalesced ports [0x3f8, +0x1)", "ioeventfd port 0xf6/1 == 0x0")


def test_msr_filter_denies_exactly_the_chosen_msrs_and_accesses():
    ranges = msr_filter_ranges((UserMsr(0xC0000102), UserMsr(0x10, write=False)))
    both = kb.KVM_MSR_FILTER_READ | kb.KVM_MSR_FILTER_WRITE
    assert ranges == [(both, 0xC0000102, 1, b"\x00"), (kb.KVM_MSR_FILTER_READ, 0x10, 1, b"\x00")]


def test_missing_capabilities_names_each():
    offered = {kb.KVM_CAP_X86_DISABLE_EXITS: kb.KVM_X86_DISABLE_EXITS_PAUSE, kb.KVM_CAP_IOEVENTFD: 1}
    controls = KvmExitControls(disable_exits=("hlt",), msrs=(UserMsr(0x10),), coalesced=(CoalescedZone(0x10, 1, True),),
                               ioeventfds=(IoEventFd(0xF6, 1, 0),))
    problems = missing_capabilities(lambda cap: offered.get(cap, 0), controls)
    assert problems == [
        "KVM_CAP_X86_DISABLE_EXITS offers pause here, not hlt",
        "msrs needs KVM_CAP_X86_USER_SPACE_MSR, which this KVM does not offer",
        "msrs needs KVM_CAP_X86_MSR_FILTER, which this KVM does not offer",
        "coalesced_pio needs KVM_CAP_COALESCED_PIO, which this KVM does not offer",
    ]
    assert missing_capabilities(lambda cap: 0xFF, controls) == []


def test_msr_register_state_round_trips():
    register = MsrRegister(initial=5)
    assert register.read() == 5 and register.write(1 << 64 | 7) and register.read() == 7
    state = register.save()
    assert state == {"value": 7, "reads": 2, "writes": 1}
    register.reset()
    assert register.save() == {"value": 5, "reads": 0, "writes": 0}
    register.restore(state)
    assert register.save() == state


def test_run_stats_rows_say_where_a_counter_does_not_count_userspace_exits():
    counters = {"exits": 12, "io_exits": 0, "mmio_exits": 2, "halt_exits": 1, "insn_emulation": 40, "pf_taken": 1}
    pvm = KvmRunStats("kvm_pvm", counters, {"IO": 8, "MMIO": 2, "HLT": 1}, {"ioeventfd": 3})
    rows = {row.what: row for row in pvm.rows()}
    assert rows["all exits"].userspace == 11 and rows["all exits"].in_kernel == 1
    assert rows["port I/O"].in_kernel is None and "emulator" in rows["port I/O"].note
    assert rows["MMIO"].in_kernel == 0 and rows["emulated instructions"].in_kernel == 40
    assert rows["RDMSR / WRMSR"].kernel is None and rows["RDMSR / WRMSR"].in_kernel is None
    assert "signal / kick" not in rows  # this kernel keeps no signal_exits in `counters`
    intel = KvmRunStats("kvm_intel", {**counters, "io_exits": 8}, pvm.userspace, {})
    assert {row.what: row for row in intel.rows()}["port I/O"].in_kernel == 0
    assert pvm["insn_emulation"] == 40


def test_counters_delta_takes_scalars_only():
    before = {"exits": 3, "hist": (1, 2), "gone": 1}
    after = {"exits": 10, "hist": (2, 2), "new": 5}
    assert counters_delta(before, after, ("exits", "hist", "gone", "new")) == {"exits": 7}
