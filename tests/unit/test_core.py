"""The core's exit handling, driven by the scripted backend (tests/fakes.py): no KVM, no emulator."""

from __future__ import annotations

import threading

import pytest

from fakes import Do, FakeBackend
from labkit import exits
from labkit.errors import LabkitError
from labkit.guest import Guest
from labkit.vmm.core import MachineCore
from labkit.vmm.devices import DeviceSpec
from labkit.vmm.status import StatusKind
from labkit.x86 import layout
from labkit.x86.boot import RFLAGS_IF

pytestmark = pytest.mark.unit

GUEST = Guest(name="scripted", code=b"\xf4", mode=64)
OUT_A = exits.Io(layout.COM1_PORT, 1, True, ord("A"))
POLL = exits.Io(layout.COM1_PORT + 5, 1, False)


class ArmedController:
    """An interrupt controller with one source that a thread fires once."""

    def __init__(self):
        self.lines = 0
        self.armed = True
        self.waits = 0
        self.acknowledged = []
        self._raised = threading.Event()

    @property
    def interrupt_pending(self):
        return bool(self.lines)

    def pending_vector(self):
        return 0x20 + (self.lines & -self.lines).bit_length() - 1 if self.lines else None

    def acknowledge_interrupt(self, vector):
        self.acknowledged.append(vector)
        self.lines = 0
        self.armed = False  # a one-shot source

    def raise_irq(self, line):
        self.lines |= 1 << line
        self._raised.set()

    def lower_irq(self, line):
        self.lines &= ~(1 << line)

    def wait(self, timeout):
        self.waits += 1
        return self._raised.wait(timeout)


def core_with(script, **options) -> tuple[MachineCore, FakeBackend]:
    backend = FakeBackend(script=script)
    return MachineCore(GUEST, backend, len(backend.memory), **options), backend


def reasons(core: MachineCore) -> list[str]:
    return [record.reason for record in core.trace]


@pytest.mark.parametrize("exit, kind", [
    (exits.Hlt(), StatusKind.HALTED),
    (exits.Shutdown(), StatusKind.SHUTDOWN),
    (exits.SystemEvent(type=2), StatusKind.SHUTDOWN),
    (exits.InternalError(suberror=1), StatusKind.ERROR),
    (exits.FailEntry(hardware_entry_failure_reason=0x21), StatusKind.ERROR),
    (exits.EmulatorFailure("Unicorn stopped"), StatusKind.ERROR),
    (exits.Unsupported(99), StatusKind.ERROR),
    (exits.Exception_(vector=13), StatusKind.ERROR),
])
def test_every_exit_type_becomes_its_status(exit, kind):
    core, _ = core_with([OUT_A, POLL, exit])
    result = core.run(5.0)
    assert result.status.kind is kind
    assert result.console == "A"
    assert reasons(core) == ["IO", "IO", exits.reason_name(int(exit.reason))]
    assert result.origin.backend == "fake" and result.origin.flavour is None


def test_error_statuses_say_where_the_guest_was():
    core, backend = core_with([exits.InternalError(suberror=1)])
    result = core.run(5.0)
    assert f"at rip {backend.get_regs().rip:#x}" in result.status.message
    assert "KVM_INTERNAL_ERROR_EMULATION" in result.status.message


def test_a_device_ends_the_run_with_its_status():
    core, backend = core_with([OUT_A, exits.Io(layout.DEBUG_EXIT_PORT, 1, True, 7), OUT_A, exits.Hlt()])
    result = core.run(5.0)
    assert (result.status.kind, result.status.code) == (StatusKind.EXITED, 7)
    assert result.console == "A" and len(backend.script) == 2, "the guest stopped at the debug-exit write"


class Exploding:
    def __init__(self, context):
        self.context = context

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        raise ValueError(f"bad command {value:#x}")


def test_a_device_exception_ends_the_run_with_an_error_naming_device_port_and_rip():
    spec = DeviceSpec("blaster", "pio", 0x500, 4, Exploding)
    core, backend = core_with([OUT_A, exits.Io(0x502, 1, True, 0x99), OUT_A, exits.Hlt()], devices=[spec])
    backend._regs.rip = 0x8123
    result = core.run(5.0)
    assert result.status.kind is StatusKind.ERROR and result.status.device == "blaster"
    assert result.status.message == ("device 'blaster' failed on a write to port 0x502 at guest rip 0x8123: "
                                     "ValueError: bad command 0x99")
    assert result.console == "A" and len(backend.script) == 2
    with pytest.raises(LabkitError, match="already stopped"):
        core.run(5.0)


def test_a_device_built_from_a_spec_gets_memory_registers_and_lines():
    contexts = []
    spec = DeviceSpec("probe", "mmio", 0x1000_0000, 0x1000, lambda context: contexts.append(context) or Exploding(context))
    core, backend = core_with([exits.Hlt()], devices=[spec], interrupts=ArmedController())
    (context,) = contexts
    context.memory.write(0x9000, b"dma!")
    assert bytes(backend.memory[0x9000:0x9004]) == b"dma!"
    assert context.regs() == backend.get_regs()
    context.raise_irq(3)
    assert core.interrupt_pending and core.pending_vector() == 0x23
    context.lower_irq(3)
    assert not core.interrupt_pending
    assert core.devices["probe"].context is context


def test_a_pause_stops_the_run_and_another_run_continues_where_it_stopped():
    core, backend = core_with([])
    backend.script = [OUT_A, Do(core.request_pause), exits.Io(layout.COM1_PORT, 1, True, ord("B")),
                      exits.Io(layout.COM1_PORT, 1, True, ord("C")), exits.Hlt()]
    first = core.run(5.0)
    assert first.status.kind is StatusKind.PAUSED
    assert first.console == "A", "the kick made the backend return before the next access"
    second = core.run(5.0)
    assert second.status.kind is StatusKind.HALTED and second.console == "ABC"
    assert reasons(core) == ["IO", "IO", "IO", "HLT"]


def test_a_pause_without_a_run_in_progress_pauses_the_next_run_at_once():
    core, backend = core_with([OUT_A, exits.Hlt()])
    core.request_pause()
    assert core.run(5.0).status.kind is StatusKind.PAUSED
    assert backend.runs <= 1 and len(backend.script) == 2, "no guest code ran"
    assert core.run(5.0).status.kind is StatusKind.HALTED


def test_a_timeout_then_another_run_continues():
    core, backend = core_with([OUT_A, exits.Timeout(budget_s=0.1), exits.Io(layout.COM1_PORT, 1, True, ord("B")),
                               exits.Hlt()])
    first = core.run(0.25)
    assert first.status.kind is StatusKind.TIMEOUT and "0.25 s" in first.status.message
    second = core.run(5.0)
    assert second.status.kind is StatusKind.HALTED and second.console == "AB"
    assert reasons(core) == ["IO", "TIMEOUT", "IO", "HLT"]


def test_a_run_after_a_final_status_raises():
    for final in (exits.Hlt(), exits.Shutdown(), exits.EmulatorFailure("x")):
        core, _ = core_with([final])
        core.run(5.0)
        with pytest.raises(LabkitError, match="cannot run again"):
            core.run(5.0)


def test_hlt_with_interrupts_enabled_and_an_armed_source_waits_for_the_interrupt():
    controller = ArmedController()
    core, backend = core_with([], interrupts=controller)
    regs = backend.get_regs()
    regs.rflags |= RFLAGS_IF
    backend.set_regs(regs)
    backend.script = [OUT_A, exits.Hlt(), exits.Io(layout.COM1_PORT, 1, True, ord("B")), exits.Hlt()]
    timer = threading.Timer(0.05, controller.raise_irq, (0,))
    timer.start()
    result = core.run(5.0)
    timer.join()
    assert result.status.kind is StatusKind.HALTED and result.console == "AB"
    assert controller.waits >= 2, "the core waited (in slices) instead of ending the run at the first HLT"
    assert backend.injected == [0x20] and controller.acknowledged == [0x20]
    assert reasons(core)[:2] == ["IO", "HLT"] and reasons(core)[-1] == "HLT"


def test_hlt_with_interrupts_disabled_halts_even_with_an_armed_source():
    controller = ArmedController()
    core, _ = core_with([exits.Hlt(), OUT_A], interrupts=controller)
    assert core.run(5.0).status.kind is StatusKind.HALTED
    assert controller.waits == 0


def test_a_wait_for_an_interrupt_times_out_and_continues_waiting():
    controller = ArmedController()
    core, backend = core_with([], interrupts=controller)
    regs = backend.get_regs()
    regs.rflags |= RFLAGS_IF
    backend.set_regs(regs)
    backend.script = [exits.Hlt(), OUT_A, exits.Hlt()]
    assert core.run(0.05).status.kind is StatusKind.TIMEOUT
    assert backend.script == [OUT_A, exits.Hlt()], "still halted: the guest did not go on"
    controller.raise_irq(0)
    result = core.run(5.0)
    assert result.status.kind is StatusKind.HALTED and result.console == "A"


def test_steps_return_only_the_new_records_and_the_status():
    core, _ = core_with([OUT_A, POLL, exits.Io(layout.COM1_PORT, 1, True, ord("B")), exits.Hlt()])
    steps = [core.step(5.0) for _ in range(4)]
    assert [[record.seq for record in step.records] for step in steps] == [[0], [1], [2], [3]]
    assert [step.records[0].reason for step in steps] == ["IO", "IO", "IO", "HLT"]
    assert [step.status.kind for step in steps] == [StatusKind.RUNNING] * 3 + [StatusKind.HALTED]
    assert steps[1].records[0].direction == "in" and steps[1].records[0].data == 0x60


def test_a_step_does_not_stop_inside_an_mmio_access():
    mmio = exits.Mmio(0x1000_0000, 4, True, 0x1234)
    core, backend = core_with([mmio, OUT_A, exits.Hlt()])
    step = core.step(5.0)
    assert [record.reason for record in step.records] == ["MMIO", "IO"]
    assert step.status.kind is StatusKind.RUNNING and backend.script == [exits.Hlt()]
    assert core.step(5.0).status.kind is StatusKind.HALTED


def test_a_step_timeout_names_the_whole_budget():
    core, _ = core_with([])
    step = core.step(0.01, budget=2.5)
    assert step.status.kind is StatusKind.TIMEOUT and "2.5 s" in step.status.message
    assert [record.reason for record in step.records] == ["TIMEOUT"]


def test_a_raised_line_is_injected_when_the_guest_can_take_it_and_kicks_a_running_guest():
    controller = ArmedController()
    controller.armed = False
    core, backend = core_with([], interrupts=controller)
    regs = backend.get_regs()
    regs.rflags |= RFLAGS_IF
    backend.set_regs(regs)
    backend.script = [OUT_A, Do(lambda: (controller.raise_irq(4), core.kick())), OUT_A, exits.Hlt()]
    result = core.run(5.0)
    assert result.status.kind is StatusKind.HALTED and result.console == "AA"
    assert backend.injected == [0x24]


def test_the_scripted_backend_implements_the_whole_protocol():
    from labkit.backend import Backend

    backend = FakeBackend()
    assert isinstance(backend, Backend)
    view = backend.add_memory_region(0x20_0000, 0x2000, read_only=True)
    assert [(base, len(region), read_only) for base, region, read_only in backend.regions()] == \
           [(0, len(backend.memory), False), (0x20_0000, 0x2000, True)]
    assert view is backend.regions()[1][1]
