"""Heatmaps for the analyses, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

ANNOTATE_UP_TO = 10  # annotate cell values when the matrix has at most this many rows and columns
NAN_COLOUR = "#bdbdbd"


def diverging_heatmap(ax: Axes, matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *,
                      title: str = "", limit: float | None = None, annotate: bool | None = None,
                      cmap: str = "RdBu", colorbar_ax: Axes | None = None) -> None:
    """`matrix` on `ax` with a colormap centred at 0 (red < 0 < blue), symmetric limits +-`limit` (default: the
    largest finite |value|), NaN cells grey and marked "nan", values written in the cells of small matrices."""
    values = np.asarray(matrix, dtype=float)
    finite = values[np.isfinite(values)]
    if limit is None or not math.isfinite(limit) or limit <= 0:
        limit = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    palette = colormaps[cmap].with_extremes(bad=NAN_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=palette, norm=TwoSlopeNorm(0.0, -limit, limit))
    if colorbar_ax is not None:
        ax.figure.colorbar(image, cax=colorbar_ax)
    else:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(values.shape[1]), labels=list(col_labels), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(values.shape[0]), labels=list(row_labels))
    ax.set_title(title, fontsize=10)
    if annotate is None:
        annotate = max(values.shape) <= ANNOTATE_UP_TO
    if annotate:
        size = 9 if max(values.shape) <= 6 else 7
        for (row, col), value in np.ndenumerate(values):
            text = "nan" if not math.isfinite(value) else f"{value:.2f}"
            dark = math.isfinite(value) and abs(value) > 0.6 * limit
            ax.text(col, row, text, ha="center", va="center", fontsize=size, color="white" if dark else "black")


def heatmap_grid(panels: Sequence[Sequence[tuple[str, np.ndarray]]], row_labels: Sequence[str],
                 col_labels: Sequence[str], path: str | Path, *, title: str = "", xlabel: str = "",
                 ylabel: str = "", limit: float | None = None) -> Path:
    """A grid of diverging heatmaps, `panels[r][c]` = (title, matrix), all with the same tick labels (row labels on
    the first column only); PNG at `path`.

    `limit`: the colour limit of every panel (default: each panel's largest finite |value|)."""
    rows, cols = len(panels), max(len(row) for row in panels)
    # A fixed layout in inches: square matrices of 0.4 per cell, row labels left of the first column only, the
    # rotated column labels under every panel, a colourbar right of each.
    side = max(2.0, 0.4 * max(len(row_labels), len(col_labels)))
    left = 0.5 + 0.075 * max((len(str(label)) for label in row_labels), default=0)
    below = 0.6 + 0.055 * max((len(str(label)) for label in col_labels), default=0)
    column, row_height, top = side + 1.2, 0.5 + side + below, 0.5 if title else 0.1
    width, height = left + cols * column, top + rows * row_height
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    for r, row in enumerate(panels):
        bottom = height - top - (r + 1) * row_height + below
        for c, (panel_title, matrix) in enumerate(row):
            x = left + c * column
            ax = figure.add_axes((x / width, bottom / height, side / width, side / height))
            colorbar_ax = figure.add_axes(((x + side + 0.15) / width, bottom / height, 0.15 / width, side / height))
            if not np.isfinite(np.asarray(matrix, dtype=float)).any():
                panel_title += "\nall NaN (no gradient)"
            diverging_heatmap(ax, matrix, row_labels if c == 0 else [""] * len(row_labels), col_labels,
                              title=panel_title, limit=limit,
                              colorbar_ax=colorbar_ax)
            ax.set_xlabel(xlabel, fontsize=8)
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11, y=1 - 0.15 / height, va="top")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    return out
