"""The exit-rate chart of a guest that is still running (the instructor's live view, labkit.widgets.live).

The view runs the guest in short slices (``Machine.run`` with a small timeout
continues where the last slice stopped) and after each slice takes a
:class:`RateSample`: the guest's running time so far and its exit count per
reason.  The chart draws, per reason, the exits per second of running time in
each slice; the time the view was paused is not running time and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from labkit.viz.exits import reason_colour
from labkit.viz.labels import measured_on
from labkit.viz.style import TEXT_PT, TITLE_PT, finish, new_figure
from labkit.vmm.status import Origin

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class RateSample:
    """The guest's state after one slice: running seconds so far and exits so far per reason."""

    run_s: float
    counts: Mapping[str, int]


def rates(samples: Sequence[RateSample]) -> dict[str, list[tuple[float, float]]]:
    """Per reason, ``(end of slice in running seconds, exits per second in that slice)`` for every slice."""
    reasons = sorted({reason for sample in samples for reason in sample.counts},
                     key=lambda reason: -samples[-1].counts.get(reason, 0))
    found: dict[str, list[tuple[float, float]]] = {reason: [] for reason in reasons}
    previous = RateSample(0.0, {})
    for sample in samples:
        seconds = sample.run_s - previous.run_s
        if seconds > 0:
            for reason in reasons:
                added = sample.counts.get(reason, 0) - previous.counts.get(reason, 0)
                found[reason].append((sample.run_s, added / seconds))
        previous = sample
    return found


def exit_rate(samples: Sequence[RateSample], origin: Origin | None, guest: str, *, reasons: int = 5) -> Figure:
    """Exits per second of running time per reason (the ``reasons`` most frequent), slice by slice.

    Titled with the guest and what ran it (``origin``: KVM and its flavour, or the emulator).
    """
    figure = new_figure(8.0, 3.6)
    ax = figure.add_subplot()
    per_reason = rates(samples)
    for reason in list(per_reason)[:reasons]:
        points = per_reason[reason]
        ax.plot([0.0, *(x for x, _ in points)], [points[0][1] if points else 0.0, *(y for _, y in points)],
                drawstyle="steps-pre", color=reason_colour(reason), linewidth=2.2,
                label=f"{reason} ({samples[-1].counts.get(reason, 0)})")
    ax.set_xlabel("running time (s)")
    ax.set_ylabel("exits per second")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0, right=max(samples[-1].run_s if samples else 0.0, 1e-3))
    ax.grid(alpha=0.3)
    label = measured_on(origin.backend, origin.flavour) if origin else "not run yet"
    ax.set_title(f"exit rate: {guest}\n{label.split(':')[0]}", fontsize=TITLE_PT)
    if per_reason:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=TEXT_PT, frameon=False)
    else:
        ax.text(0.5, 0.5, "no exits yet", transform=ax.transAxes, ha="center", va="center", fontsize=TEXT_PT)
    finish(ax)
    return figure
