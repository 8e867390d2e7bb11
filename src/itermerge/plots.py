"""Figures: matplotlib without a display, and the one atomic PNG save (a reader never sees half a file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to a temporary sibling, rename it onto ``path``, and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


# Where a label may sit around its point, in typographic points, tried in this order.
_OFFSETS = ((5, 5), (5, -11), (-5, 5), (-5, -11), (8, -3), (-8, -3), (0, 10), (0, -15),
            (14, 12), (-14, 12), (14, -18), (-14, -18), (22, 0), (-22, 0), (0, 22), (0, -26))


def annotate_apart(ax: Any, labels: list[tuple[float, float, str, Any]], fontsize: float = 7) -> int:
    """Label points (x, y, text, colour) so that no two labels overlap each other or a marker: each label takes the
    first offset around its point whose box is clear; a label with no clear place is left out (the point keeps its
    marker, and the page's table has its numbers). Returns how many were left out."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the axis limits and transforms the boxes are measured in
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    r = 4.0 * fig.dpi / 72  # a marker's half-width in pixels
    taken = [(px - r, py - r, px + r, py + r) for px, py in (to_px((x, y)) for x, y, _, _ in labels)]
    inside = ax.get_window_extent(renderer)
    left_out = 0
    for x, y, text, colour in labels:
        for dx, dy in _OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              color=colour, ha="left" if dx >= 0 else "right", zorder=5)
            box = ann.get_window_extent(renderer).padded(1)
            clear = (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                     and not any(box.x0 < b[2] and b[0] < box.x1 and box.y0 < b[3] and b[1] < box.y1 for b in taken))
            if clear:
                taken.append((box.x0, box.y0, box.x1, box.y1))
                break
            ann.remove()
        else:
            left_out += 1
    return left_out
