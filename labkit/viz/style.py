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

:func:`readability_problems` draws the figure and reports text below the
minimum size, text that overlaps other text (piled-up labels, a legend over a
bar's label) and a figure too wide for the projector; the figure tests call it
for every figure labkit draws.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from matplotlib.axes import Axes
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


@contextmanager
def readable_fonts(size: float = MIN_FONT_PT) -> Iterator[None]:
    """matplotlib settings for figures drawn inside: every text at least ``size`` pt, titles a little larger."""
    import matplotlib

    with matplotlib.rc_context({"font.size": size, "axes.titlesize": size + 1, "axes.labelsize": size,
                                "xtick.labelsize": size, "ytick.labelsize": size, "legend.fontsize": size,
                                "figure.titlesize": size + 2}):
        yield


def new_figure(width_in: float, height_in: float) -> Figure:
    """An empty labkit figure: ``width_in`` x ``height_in`` inches at :data:`DPI`, constrained layout.

    Made without pyplot, so no global figure state is kept.  A width above
    :data:`MAX_WIDTH_IN` is a programming error (the figure would be scaled
    down in a notebook): it raises ValueError.
    """
    from matplotlib.figure import Figure

    if width_in > MAX_WIDTH_IN:
        raise ValueError(f"a labkit figure is at most {MAX_WIDTH_IN} in wide, not {width_in}")
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


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


def _undrawn_tick_labels(figure: Figure) -> set[int]:
    """Tick labels matplotlib keeps but does not draw: their tick lies outside the axis's view."""
    undrawn: set[int] = set()
    for ax in figure.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-9
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - span <= tick.get_loc() <= high + span:
                    undrawn.update((id(tick.label1), id(tick.label2)))
    return undrawn


def _visible_texts(figure: Figure) -> list[Text]:
    from matplotlib.text import Text

    undrawn = _undrawn_tick_labels(figure)
    texts = []
    for artist in figure.findobj(Text):
        if not artist.get_visible() or not artist.get_text().strip() or id(artist) in undrawn:
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
    the figure is drawn with its layout.
    """
    from matplotlib.legend import Legend
    from matplotlib.patches import Rectangle

    problems = []
    width, _height = figure.get_size_inches()
    if width > MAX_WIDTH_IN + 1e-6:
        problems.append(f"figure is {width:.1f} in wide (at most {MAX_WIDTH_IN} in)")
    if figure.dpi < DPI:
        problems.append(f"figure is drawn at {figure.dpi:g} dpi (at least {DPI})")
    renderer = renderer_of(figure)
    texts = _visible_texts(figure)
    for text in texts:
        size = float(text.get_fontsize())
        if size < MIN_FONT_PT:
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
        for patch in ax.patches:
            if not isinstance(patch, Rectangle) or not patch.get_visible() or not patch.get_width() \
                    or not patch.get_height():
                continue  # a bar of 0 is meant to be flat
            box = patch.get_window_extent(renderer)
            if min(box.width, box.height) < MIN_BAR_PX:
                label = series.get(id(patch), "") or "a bar"
                label = "a bar" if label.startswith("_") else label
                problems.append(f"{label} ({patch.get_height():g}) is drawn {min(box.width, box.height):.1f} px "
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
