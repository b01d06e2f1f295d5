"""The 8259A model and the InterruptController: ICW sequences, masking, priority, EOI, coalescing, threads."""

from __future__ import annotations

import threading
import time

import pytest

from labkit.errors import ConfigError
from labkit.vmm.devices.pic import Pic8259, PicState
from labkit.vmm.interrupts import InterruptController, InterruptControllerState

pytestmark = pytest.mark.unit

COMMAND, DATA = 0, 1


def initialised(base: int = 0x20, icw1: int = 0x11, icw4: int = 0x01, kick=None) -> InterruptController:
    """A controller after the PC's sequence: ICW1, ICW2 = base, ICW3 (cascade only), ICW4; all unmasked."""
    controller = InterruptController(kick=kick)
    controller.write(COMMAND, 1, icw1)
    controller.write(DATA, 1, base)
    if not icw1 & 0x02:
        controller.write(DATA, 1, 0x04)
    controller.write(DATA, 1, icw4)
    return controller


def take(controller: InterruptController) -> int:
    """What a backend does: the pending vector, injected, acknowledged."""
    vector = controller.pending_vector()
    assert vector is not None
    controller.acknowledge_interrupt(vector)
    return vector


# -- initialization -------------------------------------------------------------------------------

@pytest.mark.parametrize("icw1,icws", [(0x11, [0x28, 0x04, 0x01]), (0x13, [0x28, 0x01])],
                         ids=["cascade-with-icw3", "single-without-icw3"])
def test_icw_sequence_sets_the_vector_base_and_only_then_delivers(icw1, icws):
    controller = InterruptController()
    controller.raise_irq(0)
    assert controller.pending_vector() is None, "an uninitialised PIC has no vector base"
    controller.write(COMMAND, 1, icw1)
    for value in icws:
        assert not controller.master.initialised
        controller.write(DATA, 1, value)
    assert controller.master.initialised and controller.master.vector_base == 0x28
    controller.lower_irq(0)
    controller.raise_irq(5)
    assert controller.pending_vector() == 0x2D


def test_icw1_forgets_requests_and_masks_and_selects_irr():
    controller = initialised()
    controller.write(DATA, 1, 0xF0)
    controller.pulse_irq(1)
    take(controller)
    controller.pulse_irq(3)
    controller.write(COMMAND, 1, 0x0B)  # OCW3: read ISR
    assert controller.read(COMMAND, 1) == 0x02
    controller.write(COMMAND, 1, 0x11)
    assert (controller.master.irr, controller.master.isr, controller.master.imr) == (0, 0, 0)
    assert not controller.master.read_isr and controller.pending_vector() is None


def test_icw2_low_bits_are_the_level_not_the_base():
    controller = initialised(base=0x27)
    controller.pulse_irq(3)
    assert controller.pending_vector() == 0x23


def test_writes_in_the_wrong_order():
    controller = InterruptController()
    controller.write(DATA, 1, 0x20)  # "ICW2" before ICW1 is an OCW1: it sets IMR
    assert controller.master.imr == 0x20 and not controller.master.initialised
    controller.write(COMMAND, 1, 0x11)
    controller.write(COMMAND, 1, 0x0B)  # an OCW3 in the middle of the sequence is done, and the sequence goes on
    controller.write(DATA, 1, 0x40)
    controller.write(COMMAND, 1, 0x11)  # ICW1 again restarts it
    assert controller.master.init_step == 2
    for value in (0x50, 0x04, 0x01):
        controller.write(DATA, 1, value)
    assert controller.master.vector_base == 0x50 and controller.master.initialised


# -- masking, priority, EOI --------------------------------------------------------------------------

def test_a_masked_request_latches_in_irr_and_is_delivered_once_unmasked():
    controller = initialised()
    controller.write(DATA, 1, 0x01)  # OCW1: mask IR0
    assert controller.pulse_irq(0)
    assert controller.master.irr == 0x01 and not controller.interrupt_pending and controller.pending_vector() is None
    assert controller.read(DATA, 1) == 0x01
    controller.write(DATA, 1, 0x00)
    assert controller.interrupt_pending and controller.pending_vector() == 0x20


def test_priority_ir0_highest_and_fully_nested():
    controller = initialised()
    controller.pulse_irq(3)
    controller.pulse_irq(1)
    assert take(controller) == 0x21
    assert controller.pending_vector() is None, "IR3 waits while the higher IR1 is in service"
    controller.pulse_irq(0)
    assert take(controller) == 0x20, "IR0 preempts IR1"
    assert controller.master.isr == 0b011
    controller.write(COMMAND, 1, 0x20)  # non-specific EOI: ends IR0, the highest in service
    assert controller.master.isr == 0b010 and controller.pending_vector() is None
    controller.write(COMMAND, 1, 0x20)
    assert take(controller) == 0x23
    controller.write(COMMAND, 1, 0x63)  # specific EOI for level 3
    assert controller.master.isr == 0 and controller.delivered[:4] == [1, 1, 0, 1]


def test_a_request_of_the_level_in_service_waits_for_its_eoi():
    controller = initialised()
    controller.pulse_irq(5)
    take(controller)
    controller.pulse_irq(5)
    assert controller.pending_vector() is None and controller.master.irr == 0x20
    controller.write(COMMAND, 1, 0x65)
    assert controller.pending_vector() == 0x25


def test_automatic_eoi_leaves_isr_clear():
    controller = initialised(icw4=0x03)
    controller.pulse_irq(4)
    take(controller)
    assert controller.master.isr == 0
    controller.pulse_irq(4)
    assert controller.pending_vector() == 0x24


def test_ocw3_reads_irr_or_isr_and_data_reads_imr():
    controller = initialised()
    controller.write(DATA, 1, 0xF0)
    controller.pulse_irq(1)
    controller.pulse_irq(3)
    take(controller)
    assert controller.read(COMMAND, 1) == 0x08  # IRR after ICW1
    controller.write(COMMAND, 1, 0x0B)
    assert controller.read(COMMAND, 1) == 0x02  # ISR
    controller.write(COMMAND, 1, 0x0A)
    assert controller.read(COMMAND, 1) == 0x08
    assert controller.read(DATA, 1) == 0xF0


# -- lines, coalescing, the hot-path flag and kick -------------------------------------------------------

def test_edges_coalesce_in_irr_and_are_counted():
    controller = initialised()
    assert controller.pulse_irq(0)
    assert not controller.pulse_irq(0) and not controller.pulse_irq(0)
    assert controller.coalesced[0] == 2
    take(controller)
    controller.write(COMMAND, 1, 0x20)
    assert controller.pending_vector() is None and controller.delivered[0] == 1


def test_only_a_rising_edge_requests():
    controller = initialised()
    assert controller.raise_irq(6)
    take(controller)
    controller.write(COMMAND, 1, 0x20)
    assert not controller.raise_irq(6), "the line is still high: no edge"
    assert controller.pending_vector() is None
    controller.lower_irq(6)
    assert controller.raise_irq(6)
    assert controller.pending_vector() == 0x26


def test_kick_only_when_an_interrupt_becomes_pending():
    kicks = []
    controller = initialised(kick=lambda: kicks.append(1))
    controller.write(DATA, 1, 0x02)
    controller.pulse_irq(1)
    assert kicks == [] and not controller.interrupt_pending, "masked: nothing to interrupt the guest for"
    controller.pulse_irq(0)
    assert kicks == [1] and controller.interrupt_pending
    controller.pulse_irq(3)
    assert kicks == [1], "already pending: the backend knows"
    take(controller)
    assert not controller.interrupt_pending, "IR3 waits below IR0 in service"
    controller.write(COMMAND, 1, 0x20)
    assert controller.interrupt_pending and kicks == [1], "the vCPU thread's own EOI: the backend re-reads the flag"


def test_acknowledging_a_vector_not_requested_is_an_error():
    controller = initialised()
    with pytest.raises(ConfigError, match="not requested"):
        controller.acknowledge_interrupt(0x20)
    controller.pulse_irq(0)
    with pytest.raises(ConfigError, match="vector 0x8"):
        controller.acknowledge_interrupt(0x08)


@pytest.mark.parametrize("line", [-1, 16, 2, 1.0, True, None])
def test_bad_lines_are_refused(line):
    controller = initialised()
    with pytest.raises(ConfigError, match="interrupt line"):
        controller.raise_irq(line)


# -- threads: wait, wake, armed -------------------------------------------------------------------------

def test_wait_returns_when_another_thread_raises_a_line():
    controller = initialised()
    timer = threading.Timer(0.02, controller.pulse_irq, args=(0,))
    timer.start()
    started = time.monotonic()
    assert controller.wait(5.0)
    assert time.monotonic() - started < 2.0
    timer.join()


def test_wait_times_out_and_wake_ends_it_early():
    controller = initialised()
    started = time.monotonic()
    assert not controller.wait(0.05)
    assert time.monotonic() - started >= 0.05
    controller.wake()  # before the wait: the next wait returns at once
    started = time.monotonic()
    assert not controller.wait(5.0)
    assert time.monotonic() - started < 1.0
    threading.Timer(0.02, controller.wake).start()
    started = time.monotonic()
    assert not controller.wait(5.0)
    assert time.monotonic() - started < 2.0


def test_armed_needs_an_initialised_pic_and_an_unmasked_armed_source():
    controller = InterruptController()
    controller.set_armed(0, True)
    assert not controller.armed, "no vector base yet"
    controller = initialised()
    assert not controller.armed, "no source"
    controller.set_armed(0, True)
    assert controller.armed
    controller.write(DATA, 1, 0x01)
    assert not controller.armed, "its line is masked: nothing can wake a HLT"
    controller.write(DATA, 1, 0x00)
    controller.set_armed(0, False)
    controller.pulse_irq(5)
    assert controller.armed, "a pending interrupt wakes a HLT at once"


# -- hostile guests, unmodelled features --------------------------------------------------------------------

def test_offsets_past_the_two_ports_read_nothing_and_drop_writes():
    controller = initialised()
    controller.write(DATA, 1, 0x5A)
    assert controller.read(2, 1) == 0xFF and controller.read(0x1000, 4) == 0xFFFFFFFF
    controller.write(2, 1, 0x11)
    controller.write(-1, 1, 0x11)
    assert controller.master.initialised and controller.master.imr == 0x5A


def test_a_word_access_is_two_byte_accesses():
    controller = initialised()
    controller.pulse_irq(1)
    controller.write(DATA, 1, 0x33)
    assert controller.read(COMMAND, 2) == 0x33 << 8 | 0x02  # IRR, then IMR
    controller.write(COMMAND, 2, 0xC30A)  # OCW3 (read IRR) to 0x20, then IMR = 0xC3 to 0x21
    assert controller.master.imr == 0xC3


@pytest.mark.parametrize("port,value,feature", [
    (COMMAND, 0x19, "level-triggered"),
    (COMMAND, 0x10, "MCS-80/85"),
    (COMMAND, 0xA0, "rotate on non-specific EOI"),
    (COMMAND, 0xC7, "set priority"),
    (COMMAND, 0xE1, "rotate on specific EOI"),
    (COMMAND, 0x80, "rotate in AEOI mode"),
    (COMMAND, 0x68, "special mask mode"),
    (COMMAND, 0x0C, "poll"),
])
def test_unmodelled_commands_are_named(port, value, feature):
    controller = initialised()
    with pytest.raises(NotImplementedError, match=feature):
        controller.write(port, 1, value)


@pytest.mark.parametrize("icw4,feature", [(0x00, "MCS-80/85"), (0x11, "special fully nested")])
def test_unmodelled_icw4_modes_are_named(icw4, feature):
    controller = InterruptController()
    controller.write(COMMAND, 1, 0x13)
    controller.write(DATA, 1, 0x20)
    with pytest.raises(NotImplementedError, match=feature):
        controller.write(DATA, 1, icw4)
    assert not controller.master.initialised


def test_harmless_ocw_commands_change_nothing():
    controller = initialised()
    controller.pulse_irq(0)
    take(controller)
    for value in (0x40, 0x00, 0x48):  # no-op, rotate in AEOI (clear), reset special mask mode
        controller.write(COMMAND, 1, value)
    assert controller.master.isr == 0x01


# -- state ------------------------------------------------------------------------------------------------

def test_save_restore_round_trip():
    controller = initialised(base=0x30)
    controller.write(DATA, 1, 0xF8)
    controller.pulse_irq(1)
    controller.pulse_irq(1)
    take(controller)
    controller.pulse_irq(0)
    controller.raise_irq(4)
    controller.write(COMMAND, 1, 0x0B)
    state = controller.save()
    copy = InterruptController()
    copy.restore(state)
    assert copy.save() == state
    assert copy.interrupt_pending and copy.pending_vector() == 0x30
    assert copy.read(COMMAND, 1) == 0x02  # ISR, as OCW3 selected
    assert not copy.raise_irq(4), "line 4 was high when saved"


def test_reset_is_power_on():
    controller = initialised()
    controller.pulse_irq(0)
    controller.reset()
    assert controller.save() == InterruptControllerState(PicState())
    assert not controller.interrupt_pending


@pytest.mark.parametrize("state", [
    None,
    PicState(),
    InterruptControllerState(PicState(irr=0x100)),
    InterruptControllerState(PicState(init_step=7)),
    InterruptControllerState(PicState(), lines=-1),
    InterruptControllerState(PicState(), coalesced=(0,) * 7),
    InterruptControllerState(PicState(), coalesced=[0] * 16),
    InterruptControllerState(PicState(), slave=PicState(isr=-1)),
    InterruptControllerState(PicState(), slave_int=1),
    InterruptControllerState(PicState(), delivered=(-1,) + (0,) * 15),
])
def test_restore_refuses_bad_state(state):
    controller = initialised()
    before = controller.save()
    with pytest.raises(ConfigError):
        controller.restore(state)
    assert controller.save() == before


def test_the_chip_alone_round_trips():
    chip = Pic8259()
    state = PicState(irr=1, isr=2, imr=3, icw1=0x11, icw2=0x20, icw3=4, icw4=1, init_step=0, read_isr=True)
    chip.restore(state)
    assert chip.save() == state


# -- the slave 8259A on IR2 ----------------------------------------------------------------------------------

def pc_pair(kick=None) -> InterruptController:
    """Master at vector 0x20 with a slave on IR2, slave at 0x28 with ID 2: what a PC BIOS sets up."""
    controller = initialised(kick=kick)
    slave = controller.slave_ports
    slave.write(COMMAND, 1, 0x11)
    for value in (0x28, 0x02, 0x01):
        slave.write(DATA, 1, value)
    return controller


def test_a_slave_request_arrives_through_ir2_with_the_slaves_vector():
    kicks = []
    controller = pc_pair(kick=lambda: kicks.append(1))
    assert controller.pulse_irq(9)
    assert kicks == [1] and controller.pending_vector() == 0x29
    assert take(controller) == 0x29
    assert (controller.master.isr, controller.slave.isr) == (0x04, 0x02)
    assert controller.delivered[9] == 1 and controller.delivered[2] == 0
    controller.slave_ports.write(COMMAND, 1, 0x20)  # EOI to the slave, then to the master, as a PC's handler does
    controller.write(COMMAND, 1, 0x20)
    assert (controller.master.isr, controller.slave.isr) == (0, 0)


def test_slave_lines_share_the_priority_of_ir2():
    controller = pc_pair()
    controller.pulse_irq(3)
    controller.pulse_irq(12)
    assert take(controller) == 0x2C, "IRQ 12 (at IR2) is above IRQ 3"
    assert controller.pending_vector() is None, "IRQ 3 waits below IR2 in service"
    controller.pulse_irq(1)
    assert take(controller) == 0x21, "IRQ 1 preempts the slave's IRQ 12"
    controller.pulse_irq(8)
    assert controller.pending_vector() is None, "IRQ 8 is at IR2, which is in service"
    controller.write(COMMAND, 1, 0x20)  # ends IR1
    controller.slave_ports.write(COMMAND, 1, 0x20)  # ends IRQ 12 at the slave: IRQ 8 raises INT again
    assert controller.pending_vector() is None, "IR2 is still in service at the master"
    controller.write(COMMAND, 1, 0x20)  # ends IR2: the latched edge from the slave is delivered
    assert take(controller) == 0x28


def test_a_second_slave_request_is_delivered_after_the_first():
    controller = pc_pair()
    controller.pulse_irq(10)
    controller.pulse_irq(11)
    assert take(controller) == 0x2A
    controller.slave_ports.write(COMMAND, 1, 0x20)
    controller.write(COMMAND, 1, 0x20)
    assert take(controller) == 0x2B


def test_a_slave_request_masked_before_its_inta_is_a_spurious_irq15():
    controller = pc_pair()
    controller.pulse_irq(13)
    assert controller.master.irr & 0x04
    controller.slave_ports.write(DATA, 1, 0x20)  # mask IRQ 13 at the slave: the master's IR2 is latched already
    assert controller.pending_vector() == 0x2F
    controller.acknowledge_interrupt(0x2F)
    assert (controller.master.isr, controller.slave.isr) == (0x04, 0), "no ISR bit at the slave for a spurious one"
    assert controller.delivered[15] == 0
    controller.write(COMMAND, 1, 0x20)
    controller.slave_ports.write(DATA, 1, 0x00)  # IRQ 13, still in the slave's IRR, raises INT again
    assert controller.pending_vector() == 0x2D
    with pytest.raises(ConfigError, match="not requested at the slave"):
        controller.acknowledge_interrupt(0x2C)
    assert (controller.master.isr, controller.slave.isr) == (0, 0), "a refused acknowledge changes nothing"


def test_without_the_cascade_the_slave_reaches_nothing():
    controller = initialised(icw1=0x13)  # single mode: no ICW3, no slave
    slave = controller.slave_ports
    slave.write(COMMAND, 1, 0x13)
    slave.write(DATA, 1, 0x28)
    slave.write(DATA, 1, 0x01)
    controller.set_armed(9, True)
    controller.pulse_irq(9)
    assert controller.slave.irr == 0x02 and controller.pending_vector() is None and not controller.armed
    controller.pulse_irq(2 + 1)
    assert controller.pending_vector() == 0x23, "IR2 is an ordinary input in single mode, IR3 still works"


def test_slave_lines_are_armed_only_through_an_unmasked_ir2():
    controller = pc_pair()
    controller.set_armed(9, True)
    assert controller.armed
    controller.write(DATA, 1, 0x04)  # mask IR2 at the master
    assert not controller.armed
    controller.write(DATA, 1, 0x00)
    controller.slave_ports.write(DATA, 1, 0x02)  # mask IRQ 9 at the slave
    assert not controller.armed


def test_slave_ports_read_and_keep_their_own_state():
    controller = pc_pair()
    controller.slave_ports.write(DATA, 1, 0x5A)
    assert controller.slave_ports.read(DATA, 1) == 0x5A and controller.read(DATA, 1) == 0x00
    assert controller.slave_ports.read(2, 1) == 0xFF
    state = controller.slave_ports.save()
    controller.slave_ports.reset()
    assert not controller.slave.initialised
    controller.slave_ports.restore(state)
    assert controller.slave_ports.save() == state
    with pytest.raises(ConfigError):
        controller.slave_ports.restore(PicState(imr=0x1FF))
    assert controller.slave_ports.save() == state


def test_save_restore_round_trip_with_a_slave_request_in_service():
    controller = pc_pair()
    controller.pulse_irq(9)
    take(controller)
    controller.pulse_irq(10)
    controller.raise_irq(15)
    state = controller.save()
    copy = InterruptController()
    copy.restore(state)
    assert copy.save() == state
    copy.slave_ports.write(COMMAND, 1, 0x20)
    copy.write(COMMAND, 1, 0x20)
    assert take(copy) == 0x2A


def test_kick_runs_without_the_controllers_lock():
    """A backend's kick may look at the controller (or take its own lock that a vCPU holds while calling in)."""
    seen = []
    controller = initialised(kick=lambda: seen.append(controller.pending_vector()))
    raiser = threading.Thread(target=controller.pulse_irq, args=(4,))
    raiser.start()
    raiser.join(timeout=5)
    assert not raiser.is_alive(), "kick was called with the controller's lock held: deadlock"
    assert seen == [0x24]
