"""labkit.emu.internals: Unicorn's CPU state reached through its own pointers, every assumption probed.

The central test corrupts each item of :class:`internals.Layout` in turn (an
offset moved, a flag bit shifted, an order swapped) and requires the start-up
probes to raise an EmulatorError that names it: a wrong assumption must stop
labkit before it writes a guest's state to the wrong place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import mmap

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_16, UC_MODE_32, UC_MODE_64, Uc
from unicorn import x86_const as X

from labkit.emu import internals, unicorn_backend
from labkit.emu.internals import LAYOUT, Layout
from labkit.errors import EmulatorError

pytestmark = pytest.mark.emu

_TUPLE_SWAPS = {"gpr_order": ("rax", "rcx"), "segment_order": ("es", "cs"), "cc_op_names": ("ADDB", "ADDW")}
_LABELS = {"uc_cpu": "uc_struct.cpu", "cpu_env_ptr": "CPUState.env_ptr", "seg_selector": "SegmentCache.selector",
           "seg_base": "SegmentCache.base", "seg_limit": "SegmentCache.limit", "seg_flags": "SegmentCache.flags"}


def _label(name: str) -> str:
    """How the error names a Layout item: its field name, QEMU's macro name for a bit, the C path for a pointer."""
    if name.startswith(("hf_", "desc_")):
        return name.upper()
    return _LABELS.get(name, name)


def _swapped(items: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    return tuple(b if item == a else a if item == b else item for item in items)


def _corruptions() -> list:
    """(field, wrong value) for every item of Layout: two wrong values per number, one swap per order."""
    cases = []
    for field in dataclasses.fields(Layout):
        value = getattr(LAYOUT, field.name)
        if isinstance(value, tuple):
            wrong = [_swapped(value, *_TUPLE_SWAPS[field.name])]
        elif field.name.startswith(("hf_", "desc_")):
            wrong = [value << 1, value >> 1 or value << 2]
        elif field.name == "segment_size":
            wrong = [value + 8, value - 8]
        else:
            wrong = [value + 4, value - 4 if value >= 4 else value + 8]
        cases += [pytest.param(field.name, bad, id=f"{field.name}={bad if isinstance(bad, tuple) else hex(bad)}")
                  for bad in wrong]
    return cases


def test_the_layout_of_unicorn_2_1_4_passes_every_probe():
    assert internals.verify() is LAYOUT
    assert {name for name in internals.field_names()} == {f.name for f in dataclasses.fields(Layout)}


@pytest.mark.parametrize(("field", "bad"), _corruptions())
def test_each_corrupted_assumption_is_a_named_error(field, bad):
    layout = dataclasses.replace(LAYOUT, **{field: bad})
    with pytest.raises(EmulatorError, match=r"^Unicorn's CPU state: ") as caught:
        internals.verify(layout)
    assert _label(field) in str(caught.value), str(caught.value)
    assert layout not in internals._verified


def test_every_layout_item_is_corrupted_by_the_test_above():
    corrupted = {case.values[0] for case in _corruptions()}
    assert corrupted == set(internals.field_names())


@pytest.mark.parametrize("mode", [UC_MODE_16, UC_MODE_32, UC_MODE_64], ids=["16", "32", "64"])
def test_the_pointers_lead_to_the_state_uc_context_save_copies(mode):
    """Whatever the heap looks like: engines interleaved with big allocations all resolve to their own state."""
    engines, ballast = [], []
    for i in range(12):
        ballast.append(mmap.mmap(-1, (i + 1) << 20))
        uc = Uc(UC_ARCH_X86, mode)
        address = internals.locate(uc)
        uc.reg_write(X.UC_X86_REG_EAX, 0x1234_0000 + i)
        copy = bytes(uc.context_save())[-LAYOUT.end_reset_fields:]
        assert copy == ctypes.string_at(address, LAYOUT.end_reset_fields)
        assert ctypes.c_uint32.from_address(address).value == 0x1234_0000 + i
        engines.append((uc, address))
    assert len({address for _, address in engines}) == len(engines)
    for uc, _ in engines:
        uc._Uc__finalizer()
    for block in ballast:
        block.close()


def _corruptions_by_field() -> list[tuple[str, object]]:
    return [(case.values[0], case.values[1]) for case in _corruptions()]


@pytest.mark.parametrize("field", ["uc_cpu", "cpu_env_ptr", "regs", "gpr_order"])
def test_every_engine_is_located_and_checked_not_only_the_first(field):
    bad = dataclasses.replace(LAYOUT, **{field: dict(_corruptions_by_field())[field]})
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    try:
        with pytest.raises(EmulatorError, match=_label(field).replace(".", r"\.")):
            internals.locate(uc, bad)
        assert internals.locate(uc) > 0
    finally:
        uc._Uc__finalizer()


def test_the_backend_does_not_start_when_a_probe_fails(monkeypatch):
    bad = dataclasses.replace(LAYOUT, hf_cs64_mask=LAYOUT.hf_cs64_mask << 1)
    monkeypatch.setattr(internals, "verify", functools.partial(internals.verify, bad))
    with pytest.raises(EmulatorError, match="HF_CS64_MASK"):
        unicorn_backend.EmuBackend()
