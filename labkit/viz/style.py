"""One look for every labkit figure, readable on a 1280x720 projector at 150% zoom, and a check that says so.

At 150% zoom a 1280-pixel-wide screen is 853 CSS pixels wide, and JupyterLab
leaves a notebook's output about 700 of them; a wider image is scaled down to
fit.  A label's height on screen is then ``points x 700 / (72 x width in
inches)`` CSS pixels, so a figure at most :data:`MAX_WIDTH_IN` inches wide with
text of at least :data:`MIN_FONT_PT` points shows every label at about 12 CSS
pixels or more (18 device pixels at 150%).  Figures are drawn at :data:`DPI`,
so the scaled-down image stays sharp.

    >>> figure, ax = new_axes(None, (7.5, 3.0))      # a labkit figure: DPI, fonts, constrained layout
    >>> ... draw ...
    >>> finish(ax)                                   # tick labels, axis labels, title at labkit's sizes
    >>> readability_problems(figure)                 # [] when nothing is too small, too wide or overlapping
    []

Every labkit figure is made by :func:`new_figure` (or :func:`new_axes`), and
such a figure draws itself inside :func:`readable_fonts`: text matplotlib makes
while drawing (a log axis's minor tick labels, ticks added when the layout
changes) takes labkit's sizes instead of matplotlib's default 10 pt, whether or
not the figure's code remembered ``tick_params(which="both", ...)``.

:func:`readability_problems` draws the figure and reports text below the
minimum size, tick labels that would be drawn below it (even those empty now:
a log axis labels its minor ticks only when its data spans less than a decade),
text that overlaps other text (piled-up labels, a legend over a bar's label),
bars too thin to see, and a figure too wide for the projector; the figure tests
call it for every figure labkit draws.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import cache
from typing import TYPE_CHECKING, Any, Iterator, cast

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis, Tick
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.figure import Figure, SubFigure
    from matplotlib.text import Text

DPI = 150
"""Dots per inch of every figure (the PNG a notebook shows)."""
MIN_FONT_PT = 11.0
"""No text in a figure is smaller than this."""
MAX_WIDTH_IN = 8.0
"""No figure is wider than this: wider ones are scaled down in a notebook, and their text with them."""
TEXT_PT = 12.0
"""Tick labels, axis labels, legends and annotations."""
TITLE_PT = 13.0
"""Axes titles and a figure's title."""
MIN_BAR_PX = 2.0
"""A bar or stacked segment with a value is at least this many pixels thick, or it cannot be seen."""
OVERLAP_TOLERANCE_PX = 1.0
"""Boxes of two texts may touch by this much (glyph boxes include some empty space)."""


FONT_SETTINGS = ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize", "ytick.labelsize",
                 "legend.fontsize", "figure.titlesize")
"""The matplotlib settings :func:`readable_fonts` sets (and :func:`readability_problems` resets to
matplotlib's defaults, as a notebook draws a figure outside any ``rc_context`` its code used)."""


@contextmanager
def readable_fonts(size: float = MIN_FONT_PT) -> Iterator[None]:
    """matplotlib settings for figures drawn inside: every text at least ``size`` pt, titles a little larger."""
    import matplotlib

    sizes = (size, size + 1, size, size, size, size, size + 2)
    with matplotlib.rc_context(cast(Any, dict(zip(FONT_SETTINGS, sizes)))):  # matplotlib types rc keys as literals
        yield


@cache
def _figure_class() -> type[Figure]:
    """The Figure every labkit figure is: it draws inside :func:`readable_fonts`.  Made on first use, so
    that ``import labkit.viz`` does not import matplotlib."""
    from matplotlib.figure import Figure

    class LabkitFigure(Figure):
        """A matplotlib Figure whose tick labels are never under :data:`MIN_FONT_PT`: each draw raises a group
        of tick labels that is smaller (ticks made with matplotlib's 10 pt before anyone set their size) to
        :data:`TEXT_PT`, and makes new text (tick labels made at draw time) at labkit's sizes."""

        def draw(self, renderer: Any) -> None:
            with readable_fonts(TEXT_PT):
                for ax in self.get_axes():
                    for axis in (ax.xaxis, ax.yaxis):
                        for which, ticks in (("major", axis.majorTicks), ("minor", axis.minorTicks)):
                            if any(float(label.get_fontsize()) < MIN_FONT_PT for tick in ticks
                                   for label in (tick.label1, tick.label2)):
                                axis.set_tick_params(which=cast(Any, which), labelsize=TEXT_PT)
                super().draw(renderer)

    return LabkitFigure


def new_figure(width_in: float, height_in: float) -> Figure:
    """An empty labkit figure: ``width_in`` x ``height_in`` inches at :data:`DPI`, constrained layout.

    Made without pyplot, so no global figure state is kept.  The figure draws
    itself inside :func:`readable_fonts`, so tick labels matplotlib makes at
    draw time are :data:`TEXT_PT`, never its default 10 pt.  A width above
    :data:`MAX_WIDTH_IN` is a programming error (the figure would be scaled
    down in a notebook): it raises ValueError.
    """
    if width_in > MAX_WIDTH_IN:
        raise ValueError(f"a labkit figure is at most {MAX_WIDTH_IN} in wide, not {width_in}")
    return _figure_class()(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def new_axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure | SubFigure, Axes]:
    """``ax`` and its figure when given, else a new labkit figure of ``size`` inches with one Axes."""
    if ax is not None:
        return ax.figure, ax
    figure = new_figure(*size)
    return figure, figure.add_subplot()


def finish(ax: Axes) -> None:
    """Set the sizes labkit's figures use on ``ax``: tick and axis labels, its title, its legend."""
    ax.tick_params(axis="both", which="both", labelsize=TEXT_PT)
    ax.xaxis.label.set_fontsize(TEXT_PT)
    ax.yaxis.label.set_fontsize(TEXT_PT)
    ax.title.set_fontsize(TITLE_PT)
    legend = ax.get_legend()
    if legend is not None:
        for text in legend.get_texts():
            text.set_fontsize(TEXT_PT)


def renderer_of(figure: Figure | SubFigure) -> RendererAgg:
    """An Agg renderer for ``figure`` (or the figure a subfigure belongs to), laid out as it is now.

    Measuring text (a label's width) needs one; a figure made without pyplot
    has none until an Agg canvas is attached, which this does.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    root = figure.get_figure(root=True)
    if root is None:
        raise ValueError("a figure to measure must belong to a Figure")
    canvas = root.canvas if isinstance(root.canvas, FigureCanvasAgg) else FigureCanvasAgg(root)
    root.draw_without_rendering()
    return canvas.get_renderer()


def _drawn_ticks(axis: Axis, major: bool) -> list[Tick]:
    """The major or minor ticks of ``axis`` its last draw drew: one per locator position inside the view
    (matplotlib keeps more Tick objects than it draws, with stale positions and texts)."""
    from matplotlib.ticker import NullLocator

    if isinstance(axis.get_major_locator() if major else axis.get_minor_locator(), NullLocator):
        return []
    locations = axis.get_majorticklocs() if major else axis.get_minorticklocs()
    ticks = axis.get_major_ticks(len(locations)) if major else axis.get_minor_ticks(len(locations))
    low, high = sorted(axis.get_view_interval())
    span = (high - low) * 1e-9
    return [tick for tick in ticks if low - span <= tick.get_loc() <= high + span]


def _tick_label_problems(figure: Figure) -> list[str]:
    """Tick labels drawn below :data:`MIN_FONT_PT`, one sentence per axis and kind of tick, counting labels
    empty now: whether a log axis labels its minor ticks depends on the data (it does when the data spans
    less than a decade), so a figure whose minor labels are 10 pt would fail on the next run's numbers."""
    from matplotlib.ticker import NullFormatter

    problems = []
    for ax in figure.get_axes():
        if not ax.get_visible() or not ax.axison:
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible():
                continue
            for major in (True, False):
                if isinstance(axis.get_major_formatter() if major else axis.get_minor_formatter(), NullFormatter):
                    continue  # never labelled
                sizes = [float(label.get_fontsize()) for tick in _drawn_ticks(axis, major)
                         for label in (tick.label1, tick.label2) if label.get_visible()]
                if sizes and min(sizes) < MIN_FONT_PT:
                    title = f" of {ax.get_title()!r}" if ax.get_title() else ""
                    problems.append(f"the {name} axis{title} draws its {'major' if major else 'minor'} tick "
                                    f"labels at {min(sizes):g} pt (at least {MIN_FONT_PT:g} pt; "
                                    "tick_params(which='both', labelsize=...) or labkit.viz.style.new_figure)")
    return problems


def _visible_texts(figure: Figure) -> list[Text]:
    from matplotlib.text import Text

    ticks: set[int] = set()
    drawn: set[int] = set()
    for ax in figure.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update((id(tick.label1), id(tick.label2)))
            for major in (True, False):
                for tick in _drawn_ticks(axis, major):
                    drawn.update((id(tick.label1), id(tick.label2)))
    texts = []
    for artist in figure.findobj(Text):
        if not artist.get_visible() or not artist.get_text().strip() or (id(artist) in ticks
                                                                         and id(artist) not in drawn):
            continue
        axes = artist.axes
        if axes is not None and not axes.get_visible():
            continue
        texts.append(artist)
    return texts


def readability_problems(figure: Figure) -> list[str]:
    """What makes ``figure`` hard to read at a projector, as sentences; ``[]`` when nothing does.

    Checks the figure's width (:data:`MAX_WIDTH_IN`) and resolution
    (:data:`DPI`), every visible text's size (:data:`MIN_FONT_PT`), that no
    two texts overlap, nor a legend and a text outside it, and that no bar or
    stacked segment with a value is too thin to see (:data:`MIN_BAR_PX`), after
    the figure is drawn with its layout.  It is drawn with matplotlib's default
    font settings, as a notebook draws it (outside any ``rc_context`` the
    figure's code used), and the tick labels that draw made are checked, the
    empty ones too (:func:`_tick_label_problems`).
    """
    import matplotlib
    from matplotlib.legend import Legend
    from matplotlib.patches import Rectangle

    problems = []
    width, _height = figure.get_size_inches()
    if width > MAX_WIDTH_IN + 1e-6:
        problems.append(f"figure is {width:.1f} in wide (at most {MAX_WIDTH_IN} in)")
    if figure.dpi < DPI:
        problems.append(f"figure is drawn at {figure.dpi:g} dpi (at least {DPI})")
    # How many ticks an axis has room for depends on the tick label size in matplotlib's settings, so the
    # ticks drawn are found under the settings the figure was drawn with.
    root = figure.get_figure(root=True)
    defaults = cast(Any, matplotlib.rcParamsDefault)
    with matplotlib.rc_context(cast(Any, {key: defaults[key] for key in FONT_SETTINGS})), \
            (readable_fonts(TEXT_PT) if isinstance(root, _figure_class()) else nullcontext()):
        renderer = renderer_of(figure)
        problems += _tick_label_problems(figure)
        texts = _visible_texts(figure)
    tick_labels = {id(label) for ax in figure.get_axes() for axis in (ax.xaxis, ax.yaxis)
                   for tick in axis.get_major_ticks() + axis.get_minor_ticks() for label in (tick.label1, tick.label2)}
    for text in texts:
        size = float(text.get_fontsize())
        if size < MIN_FONT_PT and id(text) not in tick_labels:  # tick labels: _tick_label_problems
            problems.append(f"text {text.get_text()!r} is {size:g} pt (at least {MIN_FONT_PT:g} pt)")
    boxes = [(text, text.get_window_extent(renderer).expanded(1.0, 1.0)) for text in texts]
    for index, (first, box) in enumerate(boxes):
        for second, other in boxes[index + 1:]:
            overlap_x = min(box.x1, other.x1) - max(box.x0, other.x0)
            overlap_y = min(box.y1, other.y1) - max(box.y0, other.y0)
            if overlap_x > OVERLAP_TOLERANCE_PX and overlap_y > OVERLAP_TOLERANCE_PX:
                problems.append(f"texts overlap: {first.get_text()!r} and {second.get_text()!r}")
    for ax in figure.get_axes():
        series = {id(patch): container.get_label() for container in ax.containers for patch in container}
        across = {id(patch): getattr(container, "orientation", "vertical") == "horizontal"
                  for container in ax.containers for patch in container}
        for patch in ax.patches:
            if not isinstance(patch, Rectangle) or not patch.get_visible() or not patch.get_width() \
                    or not patch.get_height():
                continue  # a bar of 0 is meant to be flat
            box = patch.get_window_extent(renderer)
            if min(box.width, box.height) < MIN_BAR_PX:
                label = series.get(id(patch), "") or "a bar"
                label = "a bar" if label.startswith("_") else label
                value = patch.get_width() if across.get(id(patch)) else patch.get_height()
                problems.append(f"{label} ({value:g}) is drawn {min(box.width, box.height):.1f} px "
                                f"thick: invisible (a log axis or a label beside it helps)")
    for legend in figure.findobj(Legend):
        frame = legend.get_window_extent(renderer)
        own = set(map(id, legend.get_texts())) | {id(legend.get_title())}
        for text, box in boxes:
            if id(text) in own:
                continue
            overlap_x = min(box.x1, frame.x1) - max(box.x0, frame.x0)
            overlap_y = min(box.y1, frame.y1) - max(box.y0, frame.y0)
            if overlap_x > OVERLAP_TOLERANCE_PX and overlap_y > OVERLAP_TOLERANCE_PX:
                problems.append(f"the legend hides text {text.get_text()!r}")
    return problems
