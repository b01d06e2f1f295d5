"""Figures of a run's VM exits: when they happened, and how many of each reason.

The x axis of a timeline is host time since the run started: the running sum
of each record's ``host_ns`` (time since the previous record: guest execution,
the exit and its handling; see :mod:`labkit.trace`).  On the emulator that is emulator time, and every
figure says so.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Sequence

from labkit.errors import ConfigError
from labkit.viz.labels import BackendHint, Measured, Source, resolve
from labkit.viz.style import TEXT_PT, TITLE_PT, finish, new_axes, new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure, SubFigure

TIME_UNITS = {"ns": 1.0, "µs": 1e3, "ms": 1e6, "s": 1e9}

# One colour per reason, the same in every figure (matplotlib's tab10, fixed order).
REASON_COLOURS = {
    "IO": "#1f77b4", "MMIO": "#ff7f0e", "HLT": "#2ca02c", "SHUTDOWN": "#d62728",
    "EXCEPTION": "#9467bd", "HYPERCALL": "#8c564b", "TIMEOUT": "#e377c2",
    "INTR": "#7f7f7f", "INTERNAL_ERROR": "#bcbd22", "EMULATOR_ERROR": "#17becf",
}
OTHER_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def reason_colour(reason: str) -> str:
    if reason in REASON_COLOURS:
        return REASON_COLOURS[reason]
    return OTHER_COLOURS[sum(map(ord, reason)) % len(OTHER_COLOURS)]


def pick_time_unit(total_ns: float) -> str:
    """µs for runs shorter than 10 ms, ms up to 100 s, else s."""
    if total_ns < 10e6:
        return "µs"
    if total_ns < 100e9:
        return "ms"
    return "s"


def _plain_log_axis(axis: Axis, subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """A logarithmic axis labelled 1, 2, 5, 10, 20, 50, ... (or the ``subs`` of each decade) rather than 10^1."""
    from matplotlib.axis import YAxis
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_yscale("log") if isinstance(axis, YAxis) else axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _title(what: str, source: Source, width: int = 60) -> str:
    name = f": {source.guest}" if source.guest else ""
    return f"{what}{name}\n" + textwrap.fill(source.label, width)


LOG_COUNTS_ABOVE = 50
"""exit_counts draws a log axis when one reason has more than this many times the exits of another."""
MARKED_EXITS = 200
"""A reason with more exits than this is drawn as its line alone, without a dot per exit."""


def exit_timeline(data: Measured, backend: BackendHint = None, ax: Axes | None = None, *, flavour: str | None = None,
                  guest: str | None = None, unit: str | None = None, title: bool = True) -> Figure | SubFigure:
    """Exits so far against host time, one staircase and colour per exit reason: each step is one exit.

    A burst of exits is a steep climb rather than one merged block, and the
    height at the end is the count.  ``data`` is an ExitTrace or a RunResult;
    ``backend`` says what measured it (see :func:`labkit.viz.labels.resolve`).
    ``unit`` is ``ns``, ``µs``, ``ms`` or ``s`` (default: picked from the
    run's length).  Draws into ``ax`` when given (``title=False`` leaves its
    title to the caller); returns the Figure.
    """
    from matplotlib.ticker import MaxNLocator

    source = resolve(data, backend, flavour)
    if guest:
        source = Source(source.trace, source.backend, source.flavour, guest)
    trace = source.trace
    total = 0
    ends: list[int] = []
    for raw in trace.records:
        total += raw[6]
        ends.append(total)
    if unit is None:
        unit = pick_time_unit(total)
    if unit not in TIME_UNITS:
        raise ConfigError(f"unit must be one of {', '.join(TIME_UNITS)}, not {unit!r}")
    scale = TIME_UNITS[unit]

    figure, ax = new_axes(ax, (7.5, 3.4))
    reasons = list(trace.by_reason())  # most frequent first
    points: dict[str, list[float]] = {reason: [] for reason in reasons}
    for record, end in zip(trace, ends):
        points[record.reason].append(end / scale)
    right = max(total / scale, 1e-9) * 1.02
    for reason in reasons:
        xs = points[reason]
        counts = list(range(1, len(xs) + 1))
        ax.step([0.0, *xs, right], [0, *counts, counts[-1]], where="post", color=reason_colour(reason),
                linewidth=1.6, label=f"{reason} ({trace.count(reason)})")
        if len(xs) <= MARKED_EXITS:
            ax.scatter(xs, counts, s=14, color=reason_colour(reason), zorder=3, label=reason)
    ax.set_xlim(left=0, right=right)
    ax.set_ylim(bottom=0, top=max((len(xs) for xs in points.values()), default=1) * 1.12 + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 1.25 exits
    ax.set_xlabel(f"host time since the run started ({unit})")
    ax.set_ylabel("exits so far (count)")
    if title:
        ax.set_title(_title("VM exits over time", source), fontsize=TITLE_PT)
    ax.grid(alpha=0.3)
    if trace.dropped:
        ax.text(0.99, 0.02, f"{trace.dropped} later exits counted, not drawn (trace limit)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=TEXT_PT)
    if reasons:
        ax.legend(handles=list(ax.get_lines()), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=TEXT_PT,
                  frameon=False, borderaxespad=0.2, handlelength=1.2)
    else:
        ax.text(0.5, 0.5, "no exits recorded", transform=ax.transAxes, ha="center", va="center", fontsize=TEXT_PT)
    finish(ax)
    return figure


def exit_counts(data: Measured, backend: BackendHint = None, ax: Axes | None = None, *, flavour: str | None = None,
                guest: str | None = None, log: bool | None = None, title: bool = True) -> Figure | SubFigure:
    """A bar per exit reason: how many exits of each reason the run had, the count on each bar.

    ``log=True`` uses a logarithmic count axis, ``False`` a linear one; the
    default picks log when the largest count is more than
    :data:`LOG_COUNTS_ABOVE` times the smallest, where a bar of a few exits
    would be too thin to see.  Draws into ``ax`` when given
    (``title=False`` leaves its title to the caller); returns the Figure.
    """
    source = resolve(data, backend, flavour)
    if guest:
        source = Source(source.trace, source.backend, source.flavour, guest)
    from matplotlib.ticker import MaxNLocator

    counts = source.trace.by_reason()
    figure, ax = new_axes(ax, (5.0, 3.4))
    reasons = list(counts)
    if log is None:
        log = bool(counts) and max(counts.values()) > LOG_COUNTS_ABOVE * min(counts.values())
    bars = ax.bar(reasons, [counts[reason] for reason in reasons],
                  color=[reason_colour(reason) for reason in reasons])
    ax.bar_label(bars, padding=2, fontsize=TEXT_PT)
    ax.margins(y=0.2)  # room for the counts above the bars (in log space on a log axis)
    if log:
        _plain_log_axis(ax.yaxis, subs=(1.0,))  # 1, 10, 100, ...: counts, in a short axis
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("exit reason")
    ax.set_ylabel("exits (count)" + (", log scale" if log else ""))
    if title:
        ax.set_title(_title("VM exits by reason", source, 40), fontsize=TITLE_PT)
    if not reasons:
        ax.text(0.5, 0.5, "no exits recorded", transform=ax.transAxes, ha="center", va="center", fontsize=TEXT_PT)
    finish(ax)
    return figure


def exits_side_by_side(runs: Sequence[Measured], backends: Sequence[BackendHint] | None = None, *,
                       guest: str | None = None) -> Figure:
    """One row per run: its exits over time beside its exit counts, the row titled with what measured it.

    ``runs`` are RunResults (or ExitTraces, with ``backends`` saying what
    measured each).  The count axes are shared, so equal bars mean the
    backends saw the same exits; the time axes are not, because KVM and the
    emulator run at very different speeds (each says its own unit).
    """
    runs = list(runs)
    if not runs:
        raise ConfigError("exits_side_by_side needs at least one run")
    if backends is None:
        backends = [None] * len(runs)
    backends = list(backends)
    if len(backends) != len(runs):
        raise ConfigError(f"{len(runs)} runs but {len(backends)} backends")

    figure = new_figure(7.8, 0.5 + 3.3 * len(runs))
    rows = figure.subfigures(len(runs), 1, squeeze=False)[:, 0]
    count_axes = []
    for row, run, backend in zip(rows, runs, backends):
        source = resolve(run, backend)
        timeline, counts = row.subplots(1, 2, width_ratios=(1.7, 1.0))
        exit_timeline(run, backend, ax=timeline, guest=guest, title=False)
        exit_counts(run, backend, ax=counts, guest=guest, title=False)
        timeline.set_title("over time", fontsize=TEXT_PT)
        counts.set_title("by reason", fontsize=TEXT_PT)
        row.suptitle(textwrap.fill(source.label, 70), fontsize=TEXT_PT)
        count_axes.append(counts)
    if len(runs) > 1:
        top = max(ax.get_ylim()[1] for ax in count_axes)
        for ax in count_axes:
            ax.set_ylim(top=top)
    name = f" {guest}" if guest else " guest"
    figure.suptitle(f"VM exits of the same{name} on {len(runs)} backend{'s' if len(runs) > 1 else ''}",
                    fontsize=TITLE_PT)
    return figure


def exit_costs(runs: Sequence[Measured], backends: Sequence[BackendHint] | None = None, ax: Axes | None = None, *,
               guest: str | None = None) -> Figure | SubFigure:
    """Host time since the previous exit against the exit's number, one series per run.

    Each point is the guest's run up to the exit plus the exit and its
    handling (``ExitRecord.host_ns``), not the handling alone: steady state
    and outliers at a glance.

    ``runs`` are RunResults (or ExitTraces with ``backends``), typically the
    same guest on KVM and on the emulator.  The time axis is logarithmic,
    because the two can differ by orders of magnitude.  The legend sits
    above the plot, where it hides no point.  Returns the Figure.
    """
    runs = list(runs)
    if not runs:
        raise ConfigError("exit_costs needs at least one run")
    backends = [None] * len(runs) if backends is None else list(backends)
    if len(backends) != len(runs):
        raise ConfigError(f"{len(runs)} runs but {len(backends)} backends")
    figure, ax = new_axes(ax, (7.5, 4.2))
    sources = [resolve(run, backend) for run, backend in zip(runs, backends)]
    markers = ("o", "s", "^", "D")
    for index, source in enumerate(sources):
        costs = [record[6] / 1e3 for record in source.trace.records]
        colour = "#1f77b4" if source.backend == "kvm" else "#ff7f0e" if source.backend == "emu" else None
        ax.plot(range(len(costs)), costs, linestyle="none", marker=markers[index % len(markers)],
                markersize=5, color=colour, label=source.short)
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("exit number (in the order they happened)")
    ax.set_ylabel("host time since the previous exit\n(µs, log scale)")
    name = f": {guest}" if guest else ""
    labels = "\n".join(textwrap.fill(source.label, 76) for source in sources)
    ax.grid(alpha=0.3, which="both", axis="y")
    if any(source.trace.records for source in sources):
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=len(sources), frameon=False,
                  fontsize=TEXT_PT, borderaxespad=0.2)
    else:
        ax.text(0.5, 0.5, "no exits recorded", transform=ax.transAxes, ha="center", va="center", fontsize=TEXT_PT)
    title = f"Host time from one exit to the next (guest run + exit + handling){name}\n{labels}"
    if figure is ax.figure and len(figure.axes) == 1:
        figure.suptitle(title, fontsize=TITLE_PT)
    else:
        ax.set_title(title, fontsize=TITLE_PT)
    finish(ax)
    return figure
