"""PNG pictures (matplotlib, headless): the one way a figure is written, and training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from hjepa_core.utils import AtomicFile


def save_figure_png(fig: Figure, path: str | Path, dpi: float | None = None) -> Path:
    """Writes ``fig`` as a PNG atomically (temp file + rename; a failure leaves the old file)
    and closes it. ``dpi``: the figure's own when None."""
    try:
        with AtomicFile(path) as out:
            fig.savefig(out.file, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "value",
    log_y: bool = False,
) -> Path:
    """One line per named curve of (x, y) points; written atomically as PNG."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, linewidth=1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_png(fig, path)
