"""Figures for notebook 04: what each kernel costs its hypervisor, and byte-wise UART against a virtqueue.

    >>> from labkit.viz.paravirt import kernel_entries, console_paths
    >>> kernel_entries({"kvm": compare_kernels(backend="kvm"), "emu": compare_kernels(backend="emu")})
    >>> console_paths([measure_console(4, "uart"), measure_console(4, "ring"), ...])

Every figure says what measured it (KVM and its flavour, or the emulator) and
follows :mod:`labkit.viz.style` (8 in wide at most, 150 dpi, 11-point text or
larger): each figure's two panels are stacked, readable on a projector.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from labkit.errors import ConfigError
from labkit.monitor.paravirt import CATEGORIES, KERNELS, KernelComparison
from labkit.viz.labels import label, measured_on, short_label
from labkit.viz.style import MAX_WIDTH_IN, MIN_FONT_PT, new_figure, readable_fonts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FONT_SIZE = MIN_FONT_PT
KERNEL_COLOURS = {"native": "#7f7f7f", "trap-and-emulate": "#d62728", "paravirtual": "#2ca02c"}
PATH_NAMES = {"uart": "UART, byte by byte", "ring": "virtqueue ring"}
PATH_COLOURS = {"uart": "#d62728", "ring": "#1f77b4"}
BACKEND_STYLES = {"kvm": "-", "emu": "--"}
SLOT_IN = 0.8
"""Height of one category's group of bars: three bars whose count labels (11 pt) do not touch."""


def kernel_entries(comparisons: Mapping[str, KernelComparison]) -> Figure:
    """Top: hypervisor entries by kind for the three kernels (one backend's counts; a note says whether
    every backend counted the same).  Below: host time of each kernel's run per backend.  ``comparisons``
    maps a backend name to :func:`labkit.monitor.paravirt.compare_kernels` on it."""
    if not comparisons:
        raise ConfigError("kernel_entries needs at least one backend's comparison")
    first = next(iter(comparisons.values()))
    kernels = [kernel for kernel in KERNELS if kernel in first.runs]
    same = all({k: c.runs[k].entries for k in kernels} == {k: first.runs[k].entries for k in kernels}
               for c in comparisons.values())
    categories = [name for name in CATEGORIES if any(first.runs[k].by_category()[name] for k in kernels)]
    entries_in = SLOT_IN * len(categories) + 1.0
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, entries_in + 4.4)
        left, right = figure.subplots(2, 1, height_ratios=(entries_in, 2.6))
        height = 0.8 / len(kernels)
        for index, kernel in enumerate(kernels):
            counts = first.runs[kernel].by_category()
            values = [counts[name] for name in categories]
            positions = [c + (index - (len(kernels) - 1) / 2) * height for c in range(len(categories))]
            bars = left.barh(positions, [v if v else float("nan") for v in values], height,
                             label=f"{kernel}:\n{first.runs[kernel].total} entries", color=KERNEL_COLOURS[kernel])
            left.bar_label(bars, labels=[str(v) if v else "" for v in values], padding=3, fontsize=FONT_SIZE)
        left.set_yticks(range(len(categories)), [textwrap.fill(name, 20) for name in categories])
        left.invert_yaxis()
        left.set_xscale("log")
        largest = max(max(first.runs[k].by_category().values()) for k in kernels)
        left.set_xlim(0.7, max(largest, 1) * 6)
        left.set_xlabel("entries into the hypervisor (count, log)")
        counted = ("the same on every backend run" if same
                   else f"counted on {short_label(first.runs[kernels[0]].result)}")
        left.set_title(f"Entries by kind ({counted})")

        backends = list(comparisons)
        width = 0.8 / len(kernels)
        for index, kernel in enumerate(kernels):
            times = [comparisons[b].runs[kernel].result.elapsed_s * 1e3 for b in backends]
            positions = [b + (index - (len(kernels) - 1) / 2) * width for b in range(len(backends))]
            bars = right.bar(positions, times, width, color=KERNEL_COLOURS[kernel])
            right.bar_label(bars, labels=[f"{t:.0f}" for t in times], padding=2, fontsize=FONT_SIZE)
        right.set_xticks(range(len(backends)),
                         [short_label(comparisons[b].runs[kernels[0]].result) for b in backends])
        right.set_yscale("log")
        right.margins(y=0.25)
        right.set_ylabel("host time of the whole run (ms, log)")
        right.set_title("Time of each kernel's run")
        figure.legend(loc="outside lower center", ncol=len(kernels))
        measured = "; ".join(dict.fromkeys(label(c.runs[kernels[0]].result) for c in comparisons.values()))
        figure.suptitle("Native, trap-and-emulate and paravirtual kernels, same routines\n"
                        + textwrap.fill(measured, 80))
    return figure


def console_paths(measurements: Sequence[Any], *, flavour: str | None = None) -> Figure:
    """Exits per KiB (top) and host time per KiB (below) against the amount written, for the byte-wise
    UART and the virtqueue ring, one line per path and backend.  ``measurements`` are
    :class:`labkit.virtio.ConsoleMeasurement` objects (fields ``path``, ``kib``, ``exits``,
    ``host_seconds``, ``backend``, ``batch``); ``flavour`` names the KVM module that measured the KVM ones."""
    from matplotlib.ticker import NullFormatter

    if not measurements:
        raise ConfigError("console_paths needs at least one measurement")
    series: dict[tuple[str, str], list[Any]] = {}
    for measurement in measurements:
        series.setdefault((measurement.backend, measurement.path), []).append(measurement)
    batches = sorted({m.batch for m in measurements if m.path == "ring"})
    with readable_fonts(FONT_SIZE):
        figure = new_figure(MAX_WIDTH_IN, 9.0)
        left, right = figure.subplots(2, 1)
        for (backend, path), points in sorted(series.items()):
            points = sorted(points, key=lambda m: m.kib)
            kib = [m.kib for m in points]
            name = f"{PATH_NAMES.get(path, path)}, {_backend_name(backend, flavour)}"
            style = dict(color=PATH_COLOURS.get(path, "black"), linestyle=BACKEND_STYLES.get(backend, ":"),
                         marker="o" if backend == "kvm" else "s", linewidth=2)
            left.plot(kib, [m.exits / m.kib for m in points], label=name, **style)
            right.plot(kib, [m.host_seconds * 1e6 / m.kib for m in points], label=name, **style)
        for axes in (left, right):
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            sizes = sorted({m.kib for m in measurements})
            axes.set_xticks(sizes, [str(size) for size in sizes])
            axes.set_xlabel("console output written (KiB, log)")
            axes.grid(True, which="major", alpha=0.3)
            axes.yaxis.set_minor_formatter(NullFormatter())  # decades only: fewer labels to read (and to lay out)
        left.set_ylabel("VM exits to labkit per KiB (log)")
        counts: dict[str, set[tuple[tuple[int, int], ...]]] = {}
        for (backend, path), points in series.items():
            counts.setdefault(path, set()).add(tuple(sorted((m.kib, m.exits) for m in points)))
        same = len(series) > len(counts) and all(len(runs) == 1 for runs in counts.values())
        left.set_title("Exits per KiB" + (" (equal on every backend: lines coincide)" if same else ""))
        right.set_ylabel("host time per KiB (µs, log)")
        right.set_title("Host time per KiB")
        figure.legend(handles=left.get_lines(), loc="outside lower center", ncol=2, fontsize=FONT_SIZE)
        measured = "; ".join(dict.fromkeys(measured_on(m.backend, flavour if m.backend == "kvm" else None)
                                           for m in measurements))
        batch = f"ring batch: {', '.join(map(str, batches))} buffer(s) per notification" if batches else ""
        figure.suptitle("Console output: UART port exits against one virtqueue notification per batch\n"
                        + textwrap.fill(f"{batch}; {measured}", 80))
    return figure


def _backend_name(backend: str, flavour: str | None) -> str:
    if backend == "kvm":
        return f"KVM ({flavour})" if flavour else "KVM"
    return "emulator" if backend == "emu" else backend
