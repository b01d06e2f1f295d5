"""What KVM handled in the kernel against what reached labkit, and what KVM's exit controls change.

Everything here is measured on KVM and labelled with its flavour (``kvm_pvm``,
``kvm_intel``, ``kvm_amd``) from the results themselves:

- :func:`counter_table` / :func:`kernel_vs_userspace`: the vCPU's own counters
  (binary stats fd) beside the exits labkit's run loop saw, one row per kind;
- :func:`exit_latency`: per exit reason, a histogram of the host time from one
  exit to the next as labkit saw it (guest run + exit + re-entry + handling);
- :func:`run_exit_mix` / :func:`compare_controls` / :func:`control_effects`: one
  small guest (:data:`EXIT_MIX_SOURCE`: UART output, MSR accesses, MMIO writes,
  queue notifications, ``hlt``) run without and with each exit control;
- :func:`flavour_explanation`: what the flavour does, in this run's numbers.

On the emulator there is no KVM: :func:`kvm_absent_reason` says so, and nothing
here invents numbers for it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from labkit.errors import ConfigError
from labkit.table import Table
from labkit.trace import LABKIT_EVENTS
from labkit.exits import reason_name
from labkit.viz.style import MAX_WIDTH_IN, new_figure, readable_fonts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from labkit.guest import Guest
    from labkit.kvm.controls import KvmExitControls
    from labkit.kvm.stats import KvmRunStats
    from labkit.vmm.status import RunResult

USERSPACE_COLOUR = "#1f77b4"
KERNEL_COLOUR = "#ff7f0e"
DELIVERED_COLOUR = "#2ca02c"

NOTIFY_PORT = 0xF6
"""The virtqueue's notify port (``layout.VIRTIO_NOTIFY_PORT``): a write of the queue index."""
FRAME_COUNTER = 0x1000_0000
"""The exit-mix guest's MMIO device, above RAM."""
MIX_MSR = 0xC000_0102
"""IA32_KERNEL_GS_BASE: the MSR the exit-mix guest reads and writes."""

EXIT_MIX_SOURCE = """\
    # console: one `out` per byte to the UART's transmit register (COM1 + 0)
    lea rsi, [rip + message]
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov ebx, 32                 # 32 x (rdmsr, wrmsr) of IA32_KERNEL_GS_BASE
3:  mov ecx, 0xc0000102
    rdmsr
    add eax, 1
    wrmsr
    dec ebx
    jnz 3b
    mov rdi, 0x10000000          # 32 MMIO writes to the frame counter above RAM
    mov ebx, 32
4:  mov dword ptr [rdi], ebx
    dec ebx
    jnz 4b
    mov ebx, 32                  # 32 notifications of queue 0 on the notify port
    xor eax, eax
5:  out 0xf6, al
    dec ebx
    jnz 5b
    hlt
message:
    .asciz "exit controls: the same guest, the same output\\n"
"""
EXIT_MIX_CODE = bytes.fromhex(
    "488d354100000066baf803ac84c07403eeebf8bb20000000b9020100c00f3283c0010f30ffcb75f048c7c700000010bb200000"
    "00891fffcb75fabb2000000031c0e6f6ffcb75faf46578697420636f6e74726f6c733a207468652073616d652067756573742c"
    "207468652073616d65206f75747075740a00"
)
""":data:`EXIT_MIX_SOURCE` assembled by GNU as (64-bit), so the lab runs without binutils;
``tests/unit/test_kvm_stats_viz.py`` checks the two agree."""
EXIT_MIX_MESSAGE = "exit controls: the same guest, the same output\n"


def _stats_of(result: RunResult) -> KvmRunStats:
    if result.kvm_stats is None:
        raise ConfigError(kvm_absent_reason(result.backend))
    return result.kvm_stats


def measured_on(result: RunResult) -> str:
    """``measured on KVM (kvm_pvm)`` from the result's own origin."""
    stats = _stats_of(result)
    return f"measured on KVM ({stats.flavour})"


def kvm_absent_reason(backend: str = "emu") -> str:
    """Why there are no KVM counters or exit controls for a run on ``backend``."""
    return (f"this run is on {'the emulator (Unicorn)' if backend == 'emu' else backend!r}, not KVM: the vCPU "
            "counters come from KVM's binary stats fd (KVM_GET_STATS_FD) and the exit controls are KVM's own, "
            "so there is nothing to show; run on a Linux machine with /dev/kvm to see them")


# --- the kernel's counters against labkit's ---------------------------------------------------


def counter_table(result: RunResult, title: str = "") -> Table:
    """The vCPU's counters beside the exits labkit's run loop saw (one row per kind of exit)."""
    stats = _stats_of(result)
    rows = []
    notes = []
    for row in stats.rows():
        kernel = "—" if row.kernel is None else str(row.kernel)
        in_kernel = "—" if row.in_kernel is None else str(row.in_kernel)
        if row.note:
            notes.append(f"{row.counter}: {row.note}.")
            in_kernel = "n/a (see note)"
        rows.append([row.what, str(row.userspace), row.counter or "(none)", kernel, in_kernel])
    for kind, count in stats.delivered.items():
        if count:
            rows.append([f"{kind.replace('_', ' ')} writes delivered", "0", "(labkit's count)", "—", str(count)])
    if stats.controls:
        notes.append("Exit controls in force: " + "; ".join(stats.controls) + ".")
    return Table(title or f"What KVM counted and what reached labkit ({measured_on(result)})",
                 ["kind", "exits labkit saw", "vCPU stat", "KVM counted", "handled in the kernel"], rows,
                 note=" ".join(notes))


def kernel_vs_userspace(result: RunResult, title: str = "") -> Figure:
    """Bars per kind: exits that reached labkit next to what KVM's vCPU counters say (log scale)."""
    from labkit.viz.exits import _plain_log_axis

    stats = _stats_of(result)
    rows = [row for row in stats.rows() if row.userspace or row.kernel]
    with readable_fonts():
        figure = new_figure(7.6, 0.55 * max(len(rows), 3) + 1.6)
        ax = figure.add_subplot()
        labels = [f"{row.what}\n({row.counter or 'no vCPU stat'})" for row in rows]
        positions = range(len(rows))
        user = [row.userspace for row in rows]
        kernel = [row.kernel or 0 for row in rows]
        height = 0.38
        bars_user = ax.barh([p + height / 2 for p in positions], user, height, color=USERSPACE_COLOUR,
                            label="reached labkit (userspace exits)")
        bars_kernel = ax.barh([p - height / 2 for p in positions], kernel, height, color=KERNEL_COLOUR,
                              label="KVM's vCPU stat")
        ax.bar_label(bars_user, labels=[str(v) if v else "" for v in user], padding=3)
        ax.bar_label(bars_kernel, labels=[str(v) if v else "" for v in kernel], padding=3)
        for position, (u, k) in enumerate(zip(user, kernel)):  # a log axis has no 0: say it
            for value, offset in ((u, height / 2), (k, -height / 2)):
                if not value:
                    ax.text(0.85, position + offset, "0", va="center", ha="left")
        ax.set_yticks(list(positions), labels)
        ax.invert_yaxis()
        _plain_log_axis(ax.xaxis)
        top = max(user + kernel + [1])
        ax.set_xlim(0.8, top * 6)
        ax.set_xlabel("count over the run (log scale)")
        figure.legend(handles=[bars_user, bars_kernel], loc="outside lower center", ncols=2)
        ax.set_title(title or f"In the kernel or in userspace?\n{measured_on(result)}")
    return figure


def exit_latencies(result: RunResult) -> dict[str, list[float]]:
    """Host time from one exit to the next (µs), by exit reason, of every kept trace record that is a VM exit."""
    latencies: dict[str, list[float]] = {}
    for raw in result.trace.records:
        if raw[0] in LABKIT_EVENTS:
            continue
        latencies.setdefault(reason_name(raw[0]), []).append(raw[6] / 1e3)
    return latencies


def exit_latency(result: RunResult, title: str = "") -> Figure:
    """Per exit reason, a histogram of the host time from the previous exit to this one (µs, log bins).

    That time holds the guest's run up to the exit, KVM's exit and re-entry and
    labkit's handling: the round trip of one exit as a VMM in userspace sees it.
    """
    import numpy as np

    from labkit.viz.exits import _plain_log_axis, reason_colour

    latencies = exit_latencies(_stats_result(result))
    reasons = sorted(latencies, key=lambda reason: -len(latencies[reason]))
    with readable_fonts():
        figure = new_figure(7.6, 1.5 * max(len(reasons), 1) + 1.4)
        axes = figure.subplots(max(len(reasons), 1), 1, sharex=True, squeeze=False)[:, 0]
        values = [value for reason in reasons for value in latencies[reason]]
        low, high = (min(values), max(values)) if values else (1.0, 10.0)
        bins = np.geomspace(max(low * 0.9, 0.1), high * 1.1, 40)
        for ax, reason in zip(axes, reasons):
            data = latencies[reason]
            ax.hist(data, bins=bins, color=reason_colour(reason))
            median = float(np.median(data))
            ax.axvline(median, color="black", linewidth=1)
            ax.set_ylabel("exits")
            ax.set_title(f"{reason}: {len(data)} exit{'s' if len(data) != 1 else ''}, median {median:.1f} µs",
                         loc="left")
            ax.yaxis.get_major_locator().set_params(integer=True)
        _plain_log_axis(axes[-1].xaxis)
        axes[-1].set_xlabel("host time from the previous exit to this one (µs, log scale):\n"
                            "guest run + KVM exit and re-entry + labkit's handling")
        if not reasons:
            axes[0].text(0.5, 0.5, "no exits recorded", transform=axes[0].transAxes, ha="center")
        figure.suptitle(title or f"Exit round trips by reason, {measured_on(result)}")
    return figure


def _stats_result(result: RunResult) -> RunResult:
    _stats_of(result)
    return result


# --- the same guest without and with each control ------------------------------------------


class FrameCounter:
    """The exit-mix guest's MMIO device: keeps the last value written, the number and a checksum of writes."""

    def __init__(self, context: object = None):
        self.reset()

    def reset(self) -> None:
        self.last = 0
        self.writes = 0
        self.checksum = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value
        self.writes += 1
        self.checksum = (self.checksum * 31 + value + 1) & 0xFFFF_FFFF  # order-sensitive

    def save(self) -> dict[str, int]:
        return {"last": self.last, "writes": self.writes, "checksum": self.checksum}

    def restore(self, state: dict[str, int]) -> None:
        self.last, self.writes, self.checksum = int(state["last"]), int(state["writes"]), int(state["checksum"])


class QueueNotify:
    """The notify port of a queue device: counts notifications per queue index written."""

    def __init__(self, context: object = None):
        self.reset()

    def reset(self) -> None:
        self.notified: dict[int, int] = {}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.notified[value] = self.notified.get(value, 0) + 1

    def save(self) -> dict[str, dict[int, int]]:
        return {"notified": dict(self.notified)}

    def restore(self, state: dict[str, dict[int, int]]) -> None:
        self.notified = {int(queue): int(count) for queue, count in state["notified"].items()}


CONTROL_NAMES = ("hlt", "msr", "coalesced", "ioeventfd")
"""The controls :func:`exit_mix_controls` knows, in the order the notebook shows them."""
CONTROL_TITLES = {
    "hlt": "KVM_CAP_X86_DISABLE_EXITS (HLT)",
    "msr": "user-space MSR + MSR filter",
    "coalesced": "coalesced PIO (UART) + MMIO",
    "ioeventfd": "KVM_IOEVENTFD (notify port)",
}


def exit_mix_controls(names: Sequence[str]) -> KvmExitControls:
    """The exit controls named (any of :data:`CONTROL_NAMES`) as they apply to the exit-mix guest."""
    from labkit.kvm.controls import CoalescedZone, IoEventFd, KvmExitControls, UserMsr
    from labkit.x86 import layout

    unknown = [name for name in names if name not in CONTROL_NAMES]
    if unknown:
        raise ConfigError(f"unknown exit control {unknown[0]!r}: choose from {', '.join(CONTROL_NAMES)}")
    return KvmExitControls(
        disable_exits=("hlt",) if "hlt" in names else (),
        msrs=(UserMsr(MIX_MSR),) if "msr" in names else (),
        coalesced=(CoalescedZone(layout.COM1_PORT, 1, pio=True), CoalescedZone(FRAME_COUNTER, 0x1000))
        if "coalesced" in names else (),
        ioeventfds=(IoEventFd(NOTIFY_PORT, 1, datamatch=0),) if "ioeventfd" in names else (),
    )


def exit_mix_guest() -> Guest:
    from labkit.guest import Guest

    return Guest.from_bytes(EXIT_MIX_CODE, mode=64, name="exit-mix")


@dataclass(frozen=True)
class MixRun:
    """One run of the exit-mix guest: the result and its devices' state."""

    controls: tuple[str, ...]
    result: RunResult
    frame_counter: Mapping[str, int]
    notify: Mapping[str, Any]

    @property
    def stats(self) -> KvmRunStats:
        return _stats_of(self.result)


def run_exit_mix(names: Sequence[str] = (), timeout: float = 2.0) -> MixRun:
    """Run the exit-mix guest on KVM with the named controls (see :data:`CONTROL_NAMES`)."""
    from labkit.vmm.devices import DeviceSpec
    from labkit.vmm.machine import Machine

    names = tuple(names)
    devices = [DeviceSpec("frame-counter", "mmio", FRAME_COUNTER, 0x1000, FrameCounter),
               DeviceSpec("notify", "pio", NOTIFY_PORT, 1, QueueNotify)]
    with Machine(exit_mix_guest(), backend="kvm", devices=devices,
                 kvm_controls=exit_mix_controls(names) if names else None) as machine:
        result = machine.run(timeout=timeout)
        return MixRun(names, result, machine.device_state("frame-counter"), machine.device_state("notify"))


@dataclass(frozen=True)
class ControlEffect:
    """The exit-mix guest without and with a set of controls (usually one)."""

    names: tuple[str, ...]
    before: MixRun
    after: MixRun

    @property
    def title(self) -> str:
        return " + ".join(CONTROL_TITLES[name] for name in self.names) or "no control"

    @property
    def same_output(self) -> bool:
        """Console, MMIO device and notifications identical without and with the control."""
        return (self.before.result.console == self.after.result.console
                and self.before.frame_counter == self.after.frame_counter
                and self.before.notify == self.after.notify)


def compare_controls(names: Sequence[str] = CONTROL_NAMES) -> list[ControlEffect]:
    """The exit-mix guest once without controls, then once with each named control alone."""
    before = run_exit_mix(())
    return [ControlEffect((name,), before, run_exit_mix((name,))) for name in names]


def _counts(run: MixRun) -> dict[str, int]:
    stats = run.stats
    delivered = sum(stats.delivered.values())
    return {"userspace exits": stats.userspace_total, "KVM exits (stat)": stats.counters.get("exits", 0),
            "delivered from the kernel": delivered}


def control_table(effects: Sequence[ControlEffect]) -> Table:
    """One row per control: userspace exits by reason and KVM's counters, without and with it."""
    rows = []
    for effect in effects:
        for label, run in (("without", effect.before), ("with", effect.after)):
            stats = run.stats
            by_reason = ", ".join(f"{reason} {count}" for reason, count in stats.userspace.items()) or "none"
            delivered = ", ".join(f"{kind} {count}" for kind, count in stats.delivered.items() if count) or "—"
            rows.append([effect.title if label == "without" else "", label, by_reason,
                         str(stats.userspace_total), str(stats.counters.get("exits", 0)),
                         str(stats.counters.get("insn_emulation", 0)), delivered, str(run.result.status)])
    flavour = effects[0].after.stats.flavour if effects else "?"
    same = all(effect.same_output for effect in effects)
    return Table(f"The exit-mix guest without and with each exit control (measured on KVM ({flavour}))",
                 ["control", "", "exits that reached labkit", "total", "vCPU stat exits", "insn_emulation",
                  "writes KVM kept, delivered by labkit", "status"], rows,
                 note=("Console, MMIO device and notifications were the same in every run."
                       if same else "Some runs' output differed: see the status column."))


def control_effects(effects: Sequence[ControlEffect], title: str = "") -> Figure:
    """One panel per control: exits that reached labkit, KVM's exit counter and the writes labkit delivered,
    without and with the control."""
    if not effects:
        raise ConfigError("control_effects needs at least one ControlEffect")
    flavour = effects[0].after.stats.flavour
    columns = min(len(effects), 2)
    lines = -(-len(effects) // columns)
    with readable_fonts():
        figure = new_figure(MAX_WIDTH_IN if columns > 1 else 5.0, 3.9 * lines + 1.6)
        grid = figure.subplots(lines, columns, squeeze=False, sharey=True)
        axes = [ax for line in grid for ax in line]
        keys = ("userspace exits", "KVM exits (stat)", "delivered from the kernel")
        colours = (USERSPACE_COLOUR, KERNEL_COLOUR, DELIVERED_COLOUR)
        width = 0.26
        for ax, effect in zip(axes, effects):
            counts = [_counts(effect.before), _counts(effect.after)]
            for index, (key, colour) in enumerate(zip(keys, colours)):
                values = [count[key] for count in counts]
                bars = ax.bar([x + (index - 1) * width for x in (0, 1)], values, width, color=colour,
                              label=key)
                ax.bar_label(bars, padding=2, fontsize=11)
            ax.set_xticks([0, 1], ["without", "with"])
            ax.set_title(textwrap.fill(effect.title, 30))
            ax.margins(y=0.18)
        for ax in axes[len(effects):]:
            ax.set_visible(False)  # an odd number of controls leaves one cell of the grid empty
        for line in grid:
            line[0].set_ylabel("count over the run")
        # The legend goes below the panels, where it hides no bar's count.
        figure.legend(handles=axes[0].get_legend_handles_labels()[0], loc="outside lower center",
                      ncol=3 if columns > 1 else 1, fontsize=11, frameon=False)
        figure.suptitle(title or (textwrap.fill("The same guest without and with each exit control,", 40)
                                  + f"\nmeasured on KVM ({flavour})"))
    return figure


# --- a doorbell rung from ring 3: the exit KVM still takes ---------------------------------------

RING3_DOORBELL_SOURCE = """\
    mov ecx, 40                  # ring 3: 40 doorbell writes of 7 (queue 7) to MMIO above RAM
    mov rbx, 0x10000000
1:  mov dword ptr [rbx], 7
    dec ecx
    jnz 1b
    ud2                          # the end: labkit's default handler reports #UD
"""
RING3_DOORBELL_CODE = bytes.fromhex("b92800000048c7c300000010c70307000000ffc975f60f0b")
""":data:`RING3_DOORBELL_SOURCE` assembled (64-bit), run with ``user=True`` (ring 3)."""
RING3_DOORBELLS = 40


def ring3_doorbell(ioeventfd: bool, timeout: float = 2.0) -> RunResult:
    """The ring-3 doorbell guest on KVM, with or without an MMIO ioeventfd (4 bytes, value 7) on the doorbell.

    Ring-3 code runs natively under PVM, so each store to the doorbell page faults into KVM (a real
    exit the kernel counts: ``exits``, ``pf_taken``); with the ioeventfd KVM completes it in the
    kernel and only the exit to userspace is gone.
    """
    from labkit.guest import Guest
    from labkit.kvm.controls import IoEventFd, KvmExitControls
    from labkit.vmm.devices import DeviceSpec
    from labkit.vmm.machine import Machine

    guest = Guest.from_bytes(RING3_DOORBELL_CODE, mode=64, user=True, name="ring3-doorbell")
    controls = KvmExitControls(ioeventfds=(IoEventFd(FRAME_COUNTER, 4, datamatch=7, pio=False),)) \
        if ioeventfd else None
    devices = [DeviceSpec("doorbell", "mmio", FRAME_COUNTER, 0x1000, FrameCounter)]
    with Machine(guest, backend="kvm", devices=devices, kvm_controls=controls) as machine:
        return machine.run(timeout=timeout)


def doorbell_table(without: RunResult, with_ioeventfd: RunResult) -> Table:
    """The ring-3 doorbell without and with the ioeventfd: exits that reached labkit against KVM's own."""
    rows = []
    for label, result in (("without ioeventfd", without), ("with ioeventfd", with_ioeventfd)):
        stats = _stats_of(result)
        rows.append([label, str(stats.userspace.get("MMIO", 0)), str(stats.counters.get("exits", 0)),
                     str(stats.counters.get("pf_taken", 0)), str(stats.delivered["ioeventfd"])])
    return Table(f"{RING3_DOORBELLS} doorbell writes from ring 3 ({measured_on(with_ioeventfd)})",
                 ["", "MMIO exits labkit saw", "vCPU stat exits", "vCPU stat pf_taken",
                  "notifications delivered"], rows)


# --- the flavour, in this run's numbers ------------------------------------------------------


def flavour_explanation(result: RunResult, instructions: int | None = None) -> str:
    """Markdown: what the KVM flavour did with this run, with the run's own counts.

    ``instructions``, when known, is how many instructions the guest executed in
    ring 0 (the exit-mix guest's count is :func:`exit_mix_instructions`).
    """
    stats = _stats_of(result)
    counters = stats.counters
    emulated = counters.get("insn_emulation", 0)
    exits = counters.get("exits", 0)
    seen = stats.userspace_total
    if stats.flavour == "kvm_pvm":
        executed = f" for the {instructions} instructions the guest ran in ring 0" if instructions else ""
        return (
            f"**This host's KVM is PVM (`kvm_pvm`)**: a hypervisor built from page tables, with no VT-x or AMD-V. "
            f"A PVM guest runs in hardware ring 3 of the host; labkit's guest kernel is not PVM-aware, so its "
            f"ring-0 code cannot run on the CPU at all. KVM's own instruction emulator runs it, one instruction "
            f"at a time: `insn_emulation` grew by **{emulated}**{executed}. That is why every ring-0 instruction "
            f"shows up there, `in`/`out` included (`io_exits` stayed at **{counters.get('io_exits', 0)}**: PVM "
            f"never takes the hardware I/O-exit path that counts it). KVM counted **{exits}** exits and "
            f"**{seen}** reached labkit: under PVM an exit is counted when KVM leaves the emulator, which for "
            f"ring-0 code is almost only on the way to userspace (plus the odd preemption of the vCPU thread)."
        )
    hardware = "VT-x (VMX non-root mode)" if stats.flavour == "kvm_intel" else "AMD-V (SVM guest mode)"
    return (
        f"**This host's KVM uses {hardware}** (`{stats.flavour}`): the CPU itself runs the guest's ring-0 code "
        f"and leaves guest mode (a VM exit) only for what the controls in the VMCS/VMCB intercept. KVM counted "
        f"**{exits}** VM exits and **{seen}** reached labkit; the rest ({exits - seen}) it handled in the kernel. "
        f"`insn_emulation` grew by only **{emulated}**: KVM emulates an instruction only where the hardware "
        f"cannot finish it alone (an MMIO access, say), and `io_exits` (**{counters.get('io_exits', 0)}**) counts "
        f"every `in`/`out` the CPU intercepted, handled in the kernel or not."
    )


def exit_mix_instructions() -> int:
    """How many instructions the exit-mix guest executes (counted from its source's loops)."""
    message = len(EXIT_MIX_MESSAGE)
    console = 2 + message * 5 + 4  # lea, mov; per byte lodsb/test/jz/out/jmp; last lodsb/test/jz (+mov ebx)
    msrs = 32 * 6 + 1              # mov ecx, rdmsr, add, wrmsr, dec, jnz; then mov rdi
    mmio = 1 + 32 * 3              # mov ebx; write, dec, jnz
    notify = 2 + 32 * 3 + 1        # mov ebx, xor; out, dec, jnz; hlt
    return console + msrs + mmio + notify
