"""KVM's vCPU counters against the exits labkit saw, and KVM's exit controls toggled on the same guest.

Each guest here is a few lines of GNU as with a known instruction and exit count.
What each counter counts was measured on this project's PVM host (``kvm_pvm``);
for VT-x/AMD-V the expectation is what the kernel's VMX/SVM exit handlers do
(arch/x86/kvm/vmx/vmx.c ``handle_io``, svm.c ``io_interception``: ``++io_exits``
for every I/O exit, handled in the kernel or not).
"""

from __future__ import annotations

import pytest

from labkit import Guest, Machine
from labkit.errors import ConfigError
from labkit.kvm import CoalescedZone, IoEventFd, KvmExitControls, UserMsr, control_support
from labkit.kvm.system import kvm_flavour
from labkit.vmm.devices import DeviceSpec
from labkit.vmm.status import StatusKind

pytestmark = pytest.mark.kvm

FLAVOUR = kvm_flavour()
PVM = FLAVOUR == "kvm_pvm"
HARDWARE = FLAVOUR in ("kvm_intel", "kvm_amd")
N = 40
LOG_PORT = 0x10
NOTIFY_PORT = 0xF6  # layout.VIRTIO_NOTIFY_PORT: the virtqueue's notify port
MMIO_ADDRESS = 0x1000_0000
MSR = 0xC000_0102  # IA32_KERNEL_GS_BASE: KVM handles it in the kernel unless filtered


class WriteLog:
    """A device that keeps every write it gets, in order: (offset, size, value)."""

    def __init__(self, context=None):
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset, size):
        return 0x5A

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))

    def reset(self):
        self.writes = []

    def save(self):
        return {"writes": list(self.writes)}

    def restore(self, state):
        self.writes = list(state["writes"])


def log_devices():
    return [DeviceSpec("port-log", "pio", LOG_PORT, 2, WriteLog),
            DeviceSpec("notify", "pio", NOTIFY_PORT, 1, WriteLog),
            DeviceSpec("mmio-log", "mmio", MMIO_ADDRESS, 0x1000, WriteLog)]


def run(source: str, controls: KvmExitControls | None = None, **options):
    guest = Guest.from_asm(source, mode=64, name="controls")
    with Machine(guest, backend="kvm", devices=log_devices(), kvm_controls=controls, **options) as machine:
        result = machine.run(timeout=10.0)
        states = {name: machine.device_state(name) for name in ("port-log", "notify", "mmio-log")}
        return result, states


def require(control: str) -> None:
    """Skip with the reason where this host's KVM lacks the control; on PVM every one must be there."""
    problem = control_support()[control]
    if problem is not None:
        if PVM:
            pytest.fail(f"this PVM host offers every exit control, but: {problem}")
        pytest.skip(problem)


def assert_pvm_exits_are_returns_to_userspace(stats) -> None:
    """Under PVM a ring-0 guest's `exits` are its returns to userspace, plus one now and then when the
    host preempted the vCPU thread inside KVM_RUN (measured: 27 runs in 200 under load, each with
    ``preemption_other`` >= the extra exits)."""
    extra = stats.counters["exits"] - stats.userspace_total
    assert 0 <= extra <= stats.counters["preemption_other"] + stats.counters["preemption_reported"], stats


# --- the binary stats fd against labkit's own count -----------------------------------------

# N `out`, N `in` (each one exit), N MMIO writes and N MMIO reads, hlt.  Instructions:
# 2 + 3N + 3N + 4N (mov ecx, mov rbx; out/in/mov/write loops: 3, 3, 4 per iteration ... see below)
EXIT_MIX = f"""
    mov ecx, {N}
1:  out {LOG_PORT}, al
    dec ecx
    jnz 1b
    mov ecx, {N}
2:  in al, {LOG_PORT}
    dec ecx
    jnz 2b
    mov rbx, {MMIO_ADDRESS}
    mov ecx, {N}
3:  mov dword ptr [rbx], ecx
    mov eax, dword ptr [rbx + 8]
    dec ecx
    jnz 3b
    hlt
"""
EXIT_MIX_INSTRUCTIONS = 1 + 3 * N + 1 + 3 * N + 2 + 4 * N + 1


def test_userspace_exits_agree_with_the_stats_fd():
    result, states = run(EXIT_MIX)
    assert result.status.kind is StatusKind.HALTED
    stats = result.kvm_stats
    assert stats is not None and stats.flavour == FLAVOUR
    # What labkit's run loop saw, by reason, is what its trace recorded (no string I/O here).
    assert stats.userspace == {"IO": 2 * N, "MMIO": 2 * N, "HLT": 1}
    assert result.exits == {"IO": 2 * N, "MMIO": 2 * N, "HLT": 1}
    assert len(states["port-log"]["writes"]) == N and len(states["mmio-log"]["writes"]) == N
    counters = stats.counters
    # Counted the same on every flavour: an MMIO access or a hlt KVM hands to userspace.
    assert counters["mmio_exits"] == 2 * N
    assert counters["halt_exits"] == 1
    assert counters["signal_exits"] == 0
    if PVM:
        # Ring-0 code never runs in a hardware guest mode under PVM: every instruction is
        # emulated (one insn_emulation each), and an exit is counted only when KVM returns
        # to userspace.  The in/out go through the emulator, never the I/O-exit handler.
        assert stats.userspace_total == 4 * N + 1
        assert_pvm_exits_are_returns_to_userspace(stats)
        assert counters["io_exits"] == 0
        assert counters["insn_emulation"] == EXIT_MIX_INSTRUCTIONS
    elif HARDWARE:
        assert counters["io_exits"] == 2 * N          # every in/out is a VM exit, all go to userspace here
        assert counters["exits"] >= stats.userspace_total
        assert counters["insn_emulation"] >= 2 * N    # the MMIO accesses are decoded by the emulator
    rows = {row.what: row for row in stats.rows()}
    assert rows["HLT"].in_kernel == 0 and rows["MMIO"].in_kernel == 0
    assert rows["emulated instructions"].userspace == 0
    assert rows["port I/O"].in_kernel is None if PVM else rows["port I/O"].in_kernel == 0


def test_stats_are_for_the_machine_since_it_was_made_across_runs():
    guest = Guest.from_asm(f"mov ecx, {N}\n1: out {LOG_PORT}, al\ndec ecx\njnz 1b\n2: jmp 2b\n", mode=64)
    with Machine(guest, backend="kvm") as machine:
        first = machine.run(timeout=0.2)
        assert first.status.kind is StatusKind.TIMEOUT
        second = machine.run(timeout=0.1)
        assert second.kvm_stats.userspace["IO"] == N == first.kvm_stats.userspace["IO"]
        assert second.kvm_stats.userspace["INTR"] >= 2  # each timeout is a KVM_RUN ending in EINTR
        assert machine.kvm_stats().userspace == second.kvm_stats.userspace
        if PVM:  # the ring-0 `jmp $` is emulated all the time the guest runs
            assert second.kvm_stats["insn_emulation"] > first.kvm_stats["insn_emulation"] > 3 * N


# --- exit controls --------------------------------------------------------------------------

HLT_GUEST = "mov ecx, 3\n1: out 0x10, al\ndec ecx\njnz 1b\nhlt\n"


def test_disable_hlt_exits():
    require("disable_exits")
    before, _ = run(HLT_GUEST)
    controls = KvmExitControls(disable_exits=("hlt",))
    if PVM:
        after, _ = run(HLT_GUEST, controls)
        # PVM runs ring-0 code in KVM's instruction emulator, not in a hardware guest mode, so
        # there is no HLT intercept to turn off; with no in-kernel local APIC the emulated hlt
        # still goes to userspace.  The control is accepted and changes nothing.
        assert after.status.kind is StatusKind.HALTED
        assert after.kvm_stats.userspace == before.kvm_stats.userspace == {"IO": 3, "HLT": 1}
        assert after.kvm_stats.counters["halt_exits"] == before.kvm_stats.counters["halt_exits"] == 1
        assert after.kvm_stats.controls == ("hlt exits disabled",)
    else:
        # VT-x/AMD-V: the CPU no longer intercepts hlt; with IF = 0 and nothing to wake it the
        # vCPU sits halted in guest mode until labkit's time budget kicks it out.
        guest = Guest.from_asm(HLT_GUEST, mode=64)
        with Machine(guest, backend="kvm", kvm_controls=controls) as machine:
            after = machine.run(timeout=0.3)
        assert after.status.kind is StatusKind.TIMEOUT
        assert "HLT" not in after.kvm_stats.userspace
        assert after.kvm_stats.counters["halt_exits"] == 0


MSR_GUEST = f"""
    mov ebx, {N}
1:  mov ecx, {MSR:#x}
    rdmsr
    add eax, 1
    wrmsr
    dec ebx
    jnz 1b
    mov ecx, {MSR:#x}
    rdmsr
    mov r12, rax
    mov ecx, 0x4c4b0001     # an MSR no CPU has: KVM raises #GP unless userspace answers
    rdmsr
    mov r13, rax
    hlt
"""


def test_user_space_msrs_reach_labkit_only_when_filtered():
    require("msrs")
    guest_without_unknown = MSR_GUEST.replace("mov ecx, 0x4c4b0001", "jmp 9f\n9:").replace(
        "    rdmsr\n    mov r13, rax", "    mov r13, 0")
    before, _ = run(guest_without_unknown)
    assert before.status.kind is StatusKind.HALTED
    assert "X86_RDMSR" not in before.kvm_stats.userspace  # KVM answered all 2N+1 reads in the kernel
    start = before.regs.r12 - N  # whatever KVM's KERNEL_GS_BASE held at the start

    controls = KvmExitControls(msrs=(UserMsr(MSR, initial=1000), UserMsr(0x4C4B0001, write=False, initial=7)))
    guest = Guest.from_asm(MSR_GUEST, mode=64)
    with Machine(guest, backend="kvm", kvm_controls=controls) as machine:
        after = machine.run(timeout=10.0)
        assert machine.device_state(f"msr {MSR:#x}") == {"value": 1000 + N, "reads": N + 1, "writes": N}
        assert machine.device_state("msr 0x4c4b0001") == {"value": 7, "reads": 1, "writes": 0}
    assert after.status.kind is StatusKind.HALTED
    assert after.kvm_stats.userspace == {"X86_RDMSR": N + 2, "X86_WRMSR": N, "HLT": 1}
    assert after.exits == {"X86_RDMSR": N + 2, "X86_WRMSR": N, "HLT": 1}
    assert after.regs.r12 == 1000 + N and after.regs.r13 == 7
    assert start >= 0
    records = [record for record in after.trace if record.reason == "X86_WRMSR"]
    assert [record.address for record in records] == [MSR] * N
    assert [record.data for record in records] == list(range(1001, 1001 + N))
    if PVM:
        assert_pvm_exits_are_returns_to_userspace(after.kvm_stats)


def test_msr_handler_refusing_is_a_gp_in_the_guest():
    require("msrs")

    class Refuse:
        def read(self):
            return None

        def write(self, value):
            return False

        def reset(self):
            pass

        def save(self):
            return {}

        def restore(self, state):
            pass

    guest = Guest.from_asm(f"mov ecx, {MSR:#x}\nrdmsr\nhlt\n", mode=64)
    with Machine(guest, backend="kvm", kvm_controls=KvmExitControls(msrs=(UserMsr(MSR, handler=Refuse),))) as machine:
        result = machine.run(timeout=5.0)
    assert result.status.kind is StatusKind.FAULT and result.status.fault.vector == 13
    assert result.kvm_stats.userspace["X86_RDMSR"] == 1


COALESCED_GUEST = f"""
    mov ecx, {N}
1:  mov al, cl
    out {LOG_PORT}, al
    dec ecx
    jnz 1b
    in al, {LOG_PORT}            # reads still exit
    mov rbx, {MMIO_ADDRESS}
    mov ecx, {N}
2:  mov dword ptr [rbx + 4], ecx
    dec ecx
    jnz 2b
    mov al, 0x77
    out {LOG_PORT + 1}, al       # outside the zone: exits, after the batched writes
    hlt
"""


def test_coalesced_pio_and_mmio_batch_writes_and_keep_their_order():
    require("coalesced_pio")
    require("coalesced_mmio")
    before, before_states = run(COALESCED_GUEST)
    controls = KvmExitControls(coalesced=(CoalescedZone(LOG_PORT, 1, pio=True), CoalescedZone(MMIO_ADDRESS, 0x1000)))
    after, after_states = run(COALESCED_GUEST, controls)
    assert before.kvm_stats.userspace == {"IO": N + 2, "MMIO": N, "HLT": 1}
    assert after.kvm_stats.userspace == {"IO": 2, "HLT": 1}          # the `in` and the write to port 0x11
    assert after.kvm_stats.delivered == {"coalesced_pio": N, "coalesced_mmio": N, "ioeventfd": 0}
    # The devices got the same writes in the same order either way.
    assert after_states == before_states
    assert before_states["port-log"]["writes"][:3] == [(0, 1, N), (0, 1, N - 1), (0, 1, N - 2)]
    assert before_states["port-log"]["writes"][-1] == (1, 1, 0x77)
    assert before.kvm_stats.counters["mmio_exits"] == N and after.kvm_stats.counters["mmio_exits"] == 0
    if PVM:
        assert after.kvm_stats.userspace_total == 3
        assert_pvm_exits_are_returns_to_userspace(after.kvm_stats)
        assert after.kvm_stats.counters["insn_emulation"] == before.kvm_stats.counters["insn_emulation"]


def test_coalesced_ring_full_exits_and_order_is_kept():
    require("coalesced_pio")
    count = 500  # more than the ring's 169 free entries
    source = f"mov ecx, {count}\n1: mov eax, ecx\nout {LOG_PORT}, ax\ndec ecx\njnz 1b\nhlt\n"
    controls = KvmExitControls(coalesced=(CoalescedZone(LOG_PORT, 2, pio=True),))
    result, states = run(source, controls)
    assert [value for _, _, value in states["port-log"]["writes"]] == list(range(count, 0, -1))
    exits_seen = result.kvm_stats.userspace.get("IO", 0)
    assert 1 <= exits_seen <= count // 100  # a write finding the ring full exits; the ring is drained first
    assert result.kvm_stats.delivered["coalesced_pio"] + exits_seen == count


NOTIFY_GUEST = f"""
    mov ecx, {N}
    xor eax, eax
1:  out {NOTIFY_PORT:#x}, al   # notify queue 0
    dec ecx
    jnz 1b
    mov al, 1
    out {NOTIFY_PORT:#x}, al   # queue 1: no ioeventfd for it, exits
    hlt
"""


def test_ioeventfd_keeps_notifications_in_the_kernel():
    require("ioeventfds")
    before, before_states = run(NOTIFY_GUEST)
    controls = KvmExitControls(ioeventfds=(IoEventFd(NOTIFY_PORT, 1, datamatch=0),))
    after, after_states = run(NOTIFY_GUEST, controls)
    assert before.kvm_stats.userspace == {"IO": N + 1, "HLT": 1}
    assert after.kvm_stats.userspace == {"IO": 1, "HLT": 1}
    assert after.kvm_stats.delivered["ioeventfd"] == N
    assert after_states["notify"] == before_states["notify"] == {"writes": [(0, 1, 0)] * N + [(0, 1, 1)]}
    before_counters, after_counters = before.kvm_stats.counters, after.kvm_stats.counters
    if PVM:
        # KVM's emulator still executed every `out` (insn_emulation is unchanged), but under PVM a
        # ring-0 `out` is no VM exit: `exits` counts only the returns to userspace.
        assert after_counters["insn_emulation"] == before_counters["insn_emulation"]
        assert_pvm_exits_are_returns_to_userspace(before.kvm_stats)
        assert_pvm_exits_are_returns_to_userspace(after.kvm_stats)
        assert after_counters["exits"] <= 2 + after_counters["preemption_other"] < N
    elif HARDWARE:
        # Each `out` is still a VM exit that the kernel counts; only the trip to userspace is gone.
        assert after_counters["io_exits"] == before_counters["io_exits"] == N + 1
        assert after_counters["exits"] >= N + 2


def test_controls_must_be_kvm_exit_controls():  # the rest of the checks: tests/unit/test_kvm_controls.py
    with pytest.raises(ConfigError, match="kvm_controls must be"):
        Machine("hello64", backend="kvm", kvm_controls={"hlt": True})


def test_controls_work_in_an_isolated_machine():
    require("msrs")
    require("ioeventfds")
    guest = Guest.from_asm(f"mov ecx, {MSR:#x}\nrdmsr\nmov ebx, eax\n" + NOTIFY_GUEST, mode=64)
    controls = KvmExitControls(msrs=(UserMsr(MSR, initial=0x1234),), ioeventfds=(IoEventFd(NOTIFY_PORT, 1, 0),))
    with Machine(guest, backend="kvm", isolate=True, devices=log_devices(), kvm_controls=controls) as machine:
        result = machine.run(timeout=10.0)
        assert machine.device_state(f"msr {MSR:#x}")["reads"] == 1
        assert machine.device_state("notify") == {"writes": [(0, 1, 0)] * N + [(0, 1, 1)]}
        assert machine.kvm_stats().userspace == result.kvm_stats.userspace
    assert result.status.kind is StatusKind.HALTED and result.regs.rbx == 0x1234
    assert result.kvm_stats.userspace == {"X86_RDMSR": 1, "IO": 1, "HLT": 1}
    assert result.kvm_stats.delivered["ioeventfd"] == N


def test_a_device_failing_on_a_delivered_write_ends_the_run_naming_it():
    require("ioeventfds")

    class Broken(WriteLog):
        def write(self, offset, size, value):
            raise ValueError("broken doorbell")

    from labkit.errors import DeviceError

    guest = Guest.from_asm(NOTIFY_GUEST, mode=64)
    devices = [DeviceSpec("notify", "pio", NOTIFY_PORT, 1, Broken)]
    controls = KvmExitControls(ioeventfds=(IoEventFd(NOTIFY_PORT, 1, datamatch=0),))
    with Machine(guest, backend="kvm", devices=devices, kvm_controls=controls) as machine:
        with pytest.raises(DeviceError, match="'notify' failed on a write to port 0xf6 that KVM kept in the kernel"):
            machine.run(timeout=5.0)
        assert machine.last_result.status.kind is StatusKind.ERROR


RING3_DOORBELL = f"""
    mov ecx, {N}
    mov rbx, {MMIO_ADDRESS}
1:  mov dword ptr [rbx], 7
    dec ecx
    jnz 1b
    ud2
"""


def test_ioeventfd_from_ring3_leaves_the_kernel_exit_counted():
    require("ioeventfds")
    guest = Guest.from_asm(RING3_DOORBELL, mode=64, user=True)
    results = []
    for controls in (None, KvmExitControls(ioeventfds=(IoEventFd(MMIO_ADDRESS, 4, datamatch=7, pio=False),))):
        with Machine(guest, backend="kvm", devices=log_devices(), kvm_controls=controls) as machine:
            results.append((machine.run(timeout=5.0), machine.device_state("mmio-log")))
    (before, before_log), (after, after_log) = results
    assert before.status.kind is after.status.kind is StatusKind.FAULT  # the closing ud2
    assert before_log == after_log == {"writes": [(0, 4, 7)] * N}
    assert before.kvm_stats.userspace["MMIO"] == N and "MMIO" not in after.kvm_stats.userspace
    assert after.kvm_stats.delivered["ioeventfd"] == N
    assert after.kvm_stats.counters["mmio_exits"] == 0
    if PVM:
        # Ring 3 runs natively under PVM: each store to the doorbell faults into KVM, a VM exit the
        # kernel counts with or without the ioeventfd; only the trip to userspace is gone.
        for result in (before, after):
            assert result.kvm_stats.counters["pf_emulate"] >= N
        assert after.kvm_stats.counters["exits"] >= N > after.kvm_stats.userspace_total
    elif HARDWARE:
        assert after.kvm_stats.counters["exits"] >= N > after.kvm_stats.userspace_total
