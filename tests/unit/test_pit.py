"""The 8254 channel 0 model: control words, counts, reads, modes, the period floor, coalescing, state."""

from __future__ import annotations

import time

import pytest

from labkit.errors import ConfigError
from labkit.vmm.devices.timer import MIN_COUNT, MIN_PERIOD_S, PIT_HZ, Pit8254, PitState
from labkit.vmm.interrupts import InterruptController

pytestmark = pytest.mark.unit

COUNTER0, CONTROL = 0, 3
MODE2, MODE3, MODE0 = 0x34, 0x36, 0x30  # channel 0, LSB then MSB, binary


class ManualClock:
    """Host time the test sets (for what the counter reads; the thread then just sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pic():
    controller = InterruptController()
    controller.write(0, 1, 0x11)
    for value in (0x20, 0x04, 0x01):
        controller.write(1, 1, value)
    return controller


@pytest.fixture
def make_pit(pic):
    timers = []

    def make(**options) -> Pit8254:
        timer = Pit8254(pic, **options)
        timers.append(timer)
        return timer

    yield make
    for timer in timers:
        timer.close()


def program(pit: Pit8254, control: int, count: int) -> None:
    pit.write(CONTROL, 1, control)
    pit.write(COUNTER0, 1, count & 0xFF)
    pit.write(COUNTER0, 1, count >> 8)


def read_count(pit: Pit8254) -> int:
    low = pit.read(COUNTER0, 1)
    return pit.read(COUNTER0, 1) << 8 | low


# -- programming ---------------------------------------------------------------------------------

def test_the_count_starts_after_its_msb_and_means_what_it_means_on_a_pc(make_pit, pic):
    pit = make_pit()
    pit.write(CONTROL, 1, MODE2)
    pit.write(COUNTER0, 1, 1193 & 0xFF)
    assert not pit.save().counting and not pic.armed
    pit.write(COUNTER0, 1, 1193 >> 8)
    assert pit.save().counting and pic.armed
    assert pit.count == 1193 and pit.period_s == pytest.approx(0.00099985, rel=1e-4)


def test_count_zero_is_65536(make_pit):
    pit = make_pit()
    program(pit, MODE3, 0)
    assert pit.reload == 0x10000 and pit.period_s == pytest.approx(65536 / PIT_HZ)


def test_lsb_only_and_msb_only_access(make_pit):
    pit = make_pit(clock=ManualClock())
    pit.write(CONTROL, 1, 0x14)  # RW = 1: LSB only, mode 2
    pit.write(COUNTER0, 1, 200)
    assert pit.count == 200 and pit.save().counting
    assert pit.read(COUNTER0, 1) == 200 and pit.read(COUNTER0, 1) == 200
    pit.write(CONTROL, 1, 0x24)  # RW = 2: MSB only
    pit.write(COUNTER0, 1, 0x12)
    assert pit.count == 0x1200 and pit.read(COUNTER0, 1) == 0x12


def test_modes_6_and_7_are_2_and_3(make_pit):
    pit = make_pit()
    pit.write(CONTROL, 1, 0x3C)
    assert pit.mode == 2
    pit.write(CONTROL, 1, 0x3E)
    assert pit.mode == 3


def test_a_control_word_stops_the_counter_and_disarms_the_line(make_pit, pic):
    pit = make_pit(clock=ManualClock())  # no tick can come (and make `armed` true) meanwhile
    program(pit, MODE2, 1193)
    pit.write(CONTROL, 1, MODE2)
    assert not pit.save().counting and not pic.armed


# -- reading the counter -----------------------------------------------------------------------------

def test_mode2_counts_down_from_the_count_on_host_time(make_pit):
    clock = ManualClock()
    pit = make_pit(clock=clock)
    program(pit, MODE2, 1000)
    assert read_count(pit) == 1000
    clock.now += 250 / PIT_HZ
    assert read_count(pit) == 750
    clock.now += 1000 / PIT_HZ  # one whole period later: the same phase
    assert read_count(pit) == 750


def test_mode3_counts_by_twos(make_pit):
    clock = ManualClock()
    pit = make_pit(clock=clock)
    program(pit, MODE3, 1000)
    clock.now += 100 / PIT_HZ
    assert read_count(pit) == 800


def test_the_latch_command_holds_the_count_until_both_bytes_are_read(make_pit):
    clock = ManualClock()
    pit = make_pit(clock=clock)
    program(pit, MODE2, 1000)
    clock.now += 100 / PIT_HZ
    pit.write(CONTROL, 1, 0x00)  # counter latch, channel 0
    clock.now += 300 / PIT_HZ
    pit.write(CONTROL, 1, 0x00)  # a second latch before the read is ignored
    assert pit.read(COUNTER0, 1) == 900 & 0xFF
    clock.now += 100 / PIT_HZ
    assert pit.read(COUNTER0, 1) == 900 >> 8
    assert read_count(pit) == 500, "after the latched count, reads follow the counter again"


# -- ticking: edges, coalescing, the period floor ------------------------------------------------------------

def test_each_period_is_an_edge_that_coalesces_while_irr_holds_the_last(make_pit, pic):
    pit = make_pit()
    started = time.monotonic()
    program(pit, MODE2, 1193)  # 1 ms
    time.sleep(0.03)
    pit.write(CONTROL, 1, MODE2)  # stop, so the numbers hold still
    elapsed = time.monotonic() - started
    state = pit.save()
    assert 5 <= state.periods <= elapsed / pit.period_s, "about 30 periods passed"
    assert pic.master.irr == 0x01 and pic.delivered[0] == 0
    assert state.coalesced == state.periods - 1, "nobody took the first: every later edge was lost in IRR"
    assert pic.coalesced[0] <= state.coalesced, "the PIC saw the pulses; edges a late wake-up bunched never reached it"


def test_ticks_are_taken_one_by_one_when_acknowledged(make_pit, pic):
    pit = make_pit()
    program(pit, MODE2, 2386)  # 2 ms
    taken = 0
    deadline = time.monotonic() + 5
    while taken < 5 and time.monotonic() < deadline:
        if pic.wait(1.0):
            pic.acknowledge_interrupt(pic.pending_vector())
            pic.write(0, 1, 0x20)
            taken += 1
    pit.write(CONTROL, 1, MODE2)
    state = pit.save()
    assert taken == 5
    assert state.periods == taken + state.coalesced + (pic.master.irr & 1)


def test_mode0_raises_one_edge_then_disarms(make_pit, pic):
    pit = make_pit()
    program(pit, MODE0, 1193)
    assert pic.armed
    assert pic.wait(2.0)
    pic.acknowledge_interrupt(pic.pending_vector())
    pic.write(0, 1, 0x20)
    time.sleep(0.01)
    state = pit.save()
    assert state.periods == 1 and state.counting, "one edge; the counter goes on counting down"
    assert not pic.armed, "nothing will raise IR0 again"


def test_a_period_below_the_floor_runs_at_the_floor(make_pit, pic):
    pit = make_pit()
    started = time.monotonic()
    program(pit, MODE2, 1)
    assert pit.clamped and pit.period_s == MIN_PERIOD_S
    time.sleep(0.05)
    pit.write(CONTROL, 1, MODE2)
    elapsed = time.monotonic() - started
    periods = pit.save().periods
    assert 0 < periods <= elapsed / MIN_PERIOD_S + 1, "never more edges than one per 100 us"
    program(pit, MODE2, MIN_COUNT)
    assert not pit.clamped
    program(pit, MODE2, MIN_COUNT - 1)
    assert pit.clamped


# -- hostile guests, unmodelled features ----------------------------------------------------------------------

def test_offsets_past_the_four_ports_and_the_control_register_read_ff(make_pit):
    pit = make_pit()
    program(pit, MODE2, 1193)
    assert pit.read(CONTROL, 1) == 0xFF and pit.read(4, 1) == 0xFF and pit.read(0x100, 2) == 0xFFFF
    pit.write(4, 1, 0x30)
    pit.write(-5, 1, 0x30)
    assert pit.mode == 2 and pit.save().counting


@pytest.mark.parametrize("port,value,feature", [
    (CONTROL, 0x74, "channel 1"),
    (CONTROL, 0xB6, "channel 2"),
    (CONTROL, 0xE2, "read-back"),
    (CONTROL, 0x35, "BCD"),
    (CONTROL, 0x32, "mode 1"),
    (CONTROL, 0x38, "mode 4"),
    (CONTROL, 0x3A, "mode 5"),
    (1, 0x10, "channel 1"),
    (2, 0x10, "channel 2"),
])
def test_unmodelled_features_are_named(make_pit, port, value, feature):
    pit = make_pit()
    with pytest.raises(NotImplementedError, match=feature):
        pit.write(port, 1, value)


def test_reading_channel_2_is_named(make_pit):
    with pytest.raises(NotImplementedError, match="channel 2"):
        make_pit().read(2, 1)


def test_a_count_before_any_control_word_is_refused(make_pit, pic):
    pit = make_pit()
    with pytest.raises(NotImplementedError, match="before any control word"):
        pit.write(COUNTER0, 1, 0x10)
    assert not pic.armed


def test_a_word_write_to_port_0x40_also_writes_channel_1(make_pit):
    pit = make_pit()
    pit.write(CONTROL, 1, MODE2)
    with pytest.raises(NotImplementedError, match="channel 1"):
        pit.write(COUNTER0, 2, 0x04A9)


# -- state and lifetime ---------------------------------------------------------------------------------------

def test_save_restore_round_trip_keeps_the_phase(make_pit, pic):
    clock = ManualClock()
    pit = make_pit(clock=clock)
    program(pit, MODE3, 1000)
    clock.now += 100 / PIT_HZ
    pit.write(CONTROL, 1, 0x00)  # latched, and half read
    pit.read(COUNTER0, 1)
    state = pit.save()
    copy = make_pit(clock=clock)
    copy.restore(state)
    assert copy.save() == state
    assert copy.read(COUNTER0, 1) == pit.read(COUNTER0, 1) == 800 >> 8, "the latched MSB is still due"
    assert read_count(copy) == read_count(pit) == 800
    assert pic.armed


def test_reset_is_power_on(make_pit, pic):
    pit = make_pit(clock=ManualClock())
    program(pit, MODE2, 1193)
    pit.reset()
    assert pit.save() == PitState() and not pic.armed


@pytest.mark.parametrize("state", [
    None,
    PitState(mode=1),
    PitState(access=0),
    PitState(count=0x10000),
    PitState(count=True),
    PitState(latched=-2),
    PitState(periods=-1),
    PitState(counting=True),
    PitState(programmed=1),
    PitState(programmed=True, counting=True, count=1193, elapsed_ns=1_000_000, edges=50),
])
def test_restore_refuses_bad_state(make_pit, state):
    pit = make_pit()
    program(pit, MODE2, 5000)
    with pytest.raises(ConfigError):
        pit.restore(state)
    assert pit.count == 5000


def test_close_ends_the_timer_thread(make_pit, pic):
    pit = make_pit(clock=ManualClock())
    program(pit, MODE2, 1193)
    thread = pit._thread
    assert thread is not None and thread.is_alive()
    pit.close()
    assert not thread.is_alive() and not pic.armed


def test_a_timer_copied_into_a_forked_process_refuses_to_run(make_pit):
    """Its thread and lock belong to the process that built it: the emulator's worker must build its own."""
    import os

    pit = make_pit(clock=ManualClock())
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            pit.write(CONTROL, 1, MODE2)
        except ConfigError as error:
            code = 0 if "another process" in str(error) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
