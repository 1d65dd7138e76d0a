"""Readable results: markdown tables and matplotlib figures (written headless, as PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["image_grid", "line_plot", "markdown_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table; floats formatted with ``floatfmt``."""
    def cell(v: object) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], path: str | Path, xlabel: str, ylabel: str,
              title: str = "", markers: bool = True) -> None:
    """One line per entry of ``series`` over ``x``, saved to ``path``."""
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for label, ys in series.items():
        ax.plot(x, ys, marker="o" if markers else None, markersize=4, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def image_grid(rows: Sequence[Sequence[np.ndarray]], path: str | Path, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), cell: float = 1.6) -> None:
    """A grid of RGB images (uint8 [H, W, 3] or float in [0, 1]) with optional row/column labels."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows), dpi=120, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c])
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=8)
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
