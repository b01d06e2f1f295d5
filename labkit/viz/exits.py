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


def _new_axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure | SubFigure, Axes]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy

    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.add_subplot()


def _plain_log_axis(axis: Axis) -> None:
    """A logarithmic axis labelled 1, 2, 5, 10, 20, 50, ... rather than 10^1."""
    from matplotlib.axis import YAxis
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_yscale("log") if isinstance(axis, YAxis) else axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _title(what: str, source: Source) -> str:
    name = f": {source.guest}" if source.guest else ""
    return f"{what}{name}\n" + textwrap.fill(source.label, 46)


def exit_timeline(data: Measured, backend: BackendHint = None, ax: Axes | None = None, *, flavour: str | None = None,
                  guest: str | None = None, unit: str | None = None) -> Figure | SubFigure:
    """Each exit as a tick at the host time it ended, one row and colour per exit reason.

    ``data`` is an ExitTrace or a RunResult; ``backend`` says what measured it
    (see :func:`labkit.viz.labels.resolve`).  ``unit`` is ``ns``, ``µs``,
    ``ms`` or ``s`` (default: picked from the run's length).  Draws into
    ``ax`` when given; returns the Figure.
    """
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

    figure, ax = _new_axes(ax, (7.0, 2.6))
    reasons = list(trace.by_reason())  # most frequent first: drawn top to bottom
    rows = {reason: len(reasons) - 1 - row for row, reason in enumerate(reasons)}
    points: dict[str, list[float]] = {reason: [] for reason in reasons}
    for record, end in zip(trace, ends):
        points[record.reason].append(end / scale)
    for reason in reasons:
        xs = points[reason]
        ax.scatter(xs, [rows[reason]] * len(xs), marker="|", s=220, linewidths=1.5,
                   color=reason_colour(reason), label=reason)
    ax.set_yticks([rows[reason] for reason in reasons],
                  [f"{reason} ({trace.count(reason)})" for reason in reasons])
    ax.set_ylim(-0.7, max(len(reasons), 1) - 0.3)
    ax.set_xlim(left=0, right=max(total / scale, 1e-9) * 1.02)
    ax.set_xlabel(f"host time since the run started ({unit})")
    ax.set_ylabel("exit reason (count)")
    ax.set_title(_title("VM exits over time", source), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if trace.dropped:
        ax.text(0.99, 0.02, f"{trace.dropped} later exits counted, not drawn (trace limit)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    if not reasons:
        ax.text(0.5, 0.5, "no exits recorded", transform=ax.transAxes, ha="center", va="center")
    return figure


def exit_counts(data: Measured, backend: BackendHint = None, ax: Axes | None = None, *, flavour: str | None = None,
                guest: str | None = None, log: bool = False) -> Figure | SubFigure:
    """A bar per exit reason: how many exits of each reason the run had.

    ``log=True`` uses a logarithmic count axis (for a run where one reason
    dominates by orders of magnitude).  Draws into ``ax`` when given; returns the Figure.
    """
    source = resolve(data, backend, flavour)
    if guest:
        source = Source(source.trace, source.backend, source.flavour, guest)
    counts = source.trace.by_reason()
    figure, ax = _new_axes(ax, (5.0, 3.0))
    reasons = list(counts)
    bars = ax.bar(reasons, [counts[reason] for reason in reasons],
                  color=[reason_colour(reason) for reason in reasons])
    ax.bar_label(bars, padding=2)
    if log:
        _plain_log_axis(ax.yaxis)
    else:
        ax.margins(y=0.15)
    ax.set_xlabel("exit reason")
    ax.set_ylabel("exits (count)" + (", log scale" if log else ""))
    ax.set_title(_title("VM exits by reason", source), fontsize=10)
    if not reasons:
        ax.text(0.5, 0.5, "no exits recorded", transform=ax.transAxes, ha="center", va="center")
    return figure


def exits_side_by_side(runs: Sequence[Measured], backends: Sequence[BackendHint] | None = None, *,
                       guest: str | None = None) -> Figure:
    """One column per run: its exit timeline above its exit counts.

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
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(runs), 5.4), layout="constrained")
    grid = figure.subplots(2, len(runs), squeeze=False, height_ratios=(1.1, 1.0))
    for column, (run, backend) in enumerate(zip(runs, backends)):
        exit_timeline(run, backend, ax=grid[0][column], guest=guest)
        exit_counts(run, backend, ax=grid[1][column], guest=guest)
    if len(runs) > 1:
        shared = grid[1][0]
        for ax in grid[1][1:]:
            ax.sharey(shared)
        top = max(ax.get_ylim()[1] for ax in grid[1])
        shared.set_ylim(top=top)
    name = f" {guest}" if guest else " guest"
    figure.suptitle(f"The same{name} on {len(runs)} backend{'s' if len(runs) > 1 else ''}", fontsize=12)
    return figure


def exit_costs(runs: Sequence[Measured], backends: Sequence[BackendHint] | None = None, ax: Axes | None = None, *,
               guest: str | None = None) -> Figure | SubFigure:
    """Host time since the previous exit against the exit's number, one series per run.

    Each point is the guest's run up to the exit plus the exit and its
    handling (``ExitRecord.host_ns``), not the handling alone: steady state
    and outliers at a glance.

    ``runs`` are RunResults (or ExitTraces with ``backends``), typically the
    same guest on KVM and on the emulator.  The time axis is logarithmic,
    because the two can differ by orders of magnitude.  Returns the Figure.
    """
    runs = list(runs)
    if not runs:
        raise ConfigError("exit_costs needs at least one run")
    backends = [None] * len(runs) if backends is None else list(backends)
    if len(backends) != len(runs):
        raise ConfigError(f"{len(runs)} runs but {len(backends)} backends")
    figure, ax = _new_axes(ax, (7.0, 3.4))
    sources = [resolve(run, backend) for run, backend in zip(runs, backends)]
    markers = ("o", "s", "^", "D")
    for index, source in enumerate(sources):
        costs = [record[6] / 1e3 for record in source.trace.records]
        colour = "#1f77b4" if source.backend == "kvm" else "#ff7f0e" if source.backend == "emu" else None
        ax.plot(range(len(costs)), costs, linestyle="none", marker=markers[index % len(markers)],
                markersize=4, color=colour, label=source.short)
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("exit number (in the order they happened)")
    ax.set_ylabel("host time since the previous exit\n(guest run + exit + handling; µs, log scale)")
    name = f": {guest}" if guest else ""
    labels = "\n".join(textwrap.fill(source.label, 72) for source in sources)
    ax.set_title(f"Host time from one exit to the next{name}\n{labels}", fontsize=10)
    ax.grid(alpha=0.3, which="both", axis="y")
    if any(source.trace.records for source in sources):
        ax.legend(loc="upper right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no exits recorded", transform=ax.transAxes, ha="center", va="center")
    return figure
