"""labkit.viz.kvm_stats and the KvmControls widget: the figures say what measured them, are readable, and
follow the controls; the exit-mix guest's bytes are its source's."""

from __future__ import annotations

import shutil

import pytest

from labkit import Machine
from labkit.errors import ConfigError
from labkit.kvm.system import kvm_flavour
from labkit.viz import kvm_stats

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def mix():
    return kvm_stats.run_exit_mix()


def _texts(figure):
    from matplotlib.text import Text

    return [text for text in figure.findobj(Text) if text.get_text().strip()]


def test_exit_mix_code_is_its_source():
    if shutil.which("as") is None:
        pytest.skip("needs GNU as to assemble the source")
    from labkit.assembler import assemble

    assert assemble(kvm_stats.EXIT_MIX_SOURCE, 64) == kvm_stats.EXIT_MIX_CODE
    assert assemble(kvm_stats.RING3_DOORBELL_SOURCE, 64) == kvm_stats.RING3_DOORBELL_CODE
    assert kvm_stats.EXIT_MIX_CODE.endswith(kvm_stats.EXIT_MIX_MESSAGE.encode() + b"\0")


def test_exit_mix_counts(mix):
    stats = mix.stats
    assert mix.result.console == kvm_stats.EXIT_MIX_MESSAGE
    assert stats.userspace == {"IO": len(kvm_stats.EXIT_MIX_MESSAGE) + 32, "MMIO": 32, "HLT": 1}
    assert mix.frame_counter["writes"] == 32 and mix.notify == {"notified": {0: 32}}
    if kvm_flavour() == "kvm_pvm":  # every ring-0 instruction is emulated, one count each
        assert stats["insn_emulation"] == kvm_stats.exit_mix_instructions()


@pytest.mark.parametrize("make", ["kernel_vs_userspace", "exit_latency"])
def test_figures_are_readable_and_say_what_measured_them(mix, make):
    figure = getattr(kvm_stats, make)(mix.result)
    assert figure.dpi >= 150
    texts = _texts(figure)
    assert min(text.get_fontsize() for text in texts) >= 11
    assert any(f"measured on KVM ({kvm_flavour()})" in text.get_text() for text in texts)


def test_control_effects_follow_each_control():
    effects = kvm_stats.compare_controls()
    assert [effect.names for effect in effects] == [(name,) for name in kvm_stats.CONTROL_NAMES]
    assert all(effect.same_output for effect in effects)
    by_name = {effect.names[0]: effect for effect in effects}
    before = by_name["msr"].before.stats.userspace
    assert by_name["msr"].after.stats.userspace == {**before, "X86_RDMSR": 32, "X86_WRMSR": 32}
    assert by_name["coalesced"].after.stats.userspace == {"IO": 32, "HLT": 1}
    assert by_name["ioeventfd"].after.stats.userspace == {"IO": len(kvm_stats.EXIT_MIX_MESSAGE), "MMIO": 32,
                                                          "HLT": 1}
    figure = kvm_stats.control_effects(effects)
    assert figure.dpi >= 150 and min(text.get_fontsize() for text in _texts(figure)) >= 11
    assert f"measured on KVM ({kvm_flavour()})" in figure.get_suptitle()
    table = kvm_stats.control_table(effects)
    assert len(table.rows) == 2 * len(effects) and "same in every run" in table.note


def test_the_widget_reruns_with_the_ticked_controls():
    from labkit.widgets.kvm_controls import KvmControls

    panel = KvmControls(chosen=("coalesced",))
    first = panel.results()
    assert panel.last.names == ("coalesced",) and "With coalesced PIO (UART) + MMIO:" in first[0].data
    panel.boxes["coalesced"].value = False  # a change reruns (Experiment observes the boxes)
    panel.boxes["msr"].value = True
    assert panel.runs == 2 and panel.last.names == ("msr",)
    assert panel.last.after.stats.userspace["X86_RDMSR"] == 32


def test_ring3_doorbell_table():
    without, with_ioeventfd = kvm_stats.ring3_doorbell(False), kvm_stats.ring3_doorbell(True)
    table = kvm_stats.doorbell_table(without, with_ioeventfd)
    (_, mmio_before, _, _, delivered_before), (_, mmio_after, exits_after, _, delivered_after) = table.rows
    assert (mmio_before, delivered_before) == (str(kvm_stats.RING3_DOORBELLS), "0")
    assert (mmio_after, delivered_after) == ("0", str(kvm_stats.RING3_DOORBELLS))
    assert int(exits_after) >= kvm_stats.RING3_DOORBELLS  # the kernel still took every exit


def test_emulator_results_are_refused_with_the_reason():
    with Machine("hello64", backend="emu") as machine:
        result = machine.run(timeout=10.0)
    with pytest.raises(ConfigError, match="not KVM"):
        kvm_stats.counter_table(result)
    with pytest.raises(ConfigError, match="not KVM"):
        kvm_stats.exit_latency(result)


def test_the_widget_without_kvm_offers_nothing_to_click(monkeypatch):
    """Under LABKIT_BACKEND=emu the boxes and "run again" are disabled and the panel says why."""
    from labkit.widgets.kvm_controls import KvmControls

    monkeypatch.setenv("LABKIT_BACKEND", "emu")
    panel = KvmControls()
    assert panel.controls and all(control.disabled for control in panel.controls)
    assert "No KVM in this session" in panel.results()[0].data
