"""Readable results: markdown tables and matplotlib figures (written headless, as PNG).

The fusion-comparison helpers read the results both pipelines produce:
``{fusion: {"metrics": {str(level): {metric: value}}, "alpha": {str(level): {modality: mean alpha}} | None}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

__all__ = ["FUSION_LABELS", "alpha_plots", "corruption_levels", "corruption_plot", "fusion_table", "image_grid",
           "line_plot", "markdown_table"]

FUSION_LABELS = {"moe": "MoE", "poe": "PoE", "gpoe": "gPoE", "mopoe": "MoPoE"}


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
               col_labels: Sequence[str] = (), cell: float = 1.6,
               legend: Mapping[str, Sequence[int]] | None = None) -> None:
    """A grid of RGB images (uint8 [H, W, 3] or float in [0, 1]) with optional row/column labels.

    legend: label -> RGB colour (0..255), drawn as colour patches below the grid (e.g. class colours).
    """
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
    if legend:
        handles = [Patch(color=np.asarray(colour) / 255.0, label=label) for label, colour in legend.items()]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.6 / (cell * n_rows), 1, 1))
    else:
        fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def corruption_levels(results: Mapping[str, Mapping]) -> list[str]:
    """The test-corruption levels (the metrics' keys, e.g. "0.5") of the first fusion, in order."""
    return list(next(iter(results.values()))["metrics"])


def fusion_table(results: Mapping[str, Mapping], columns: Sequence[tuple[str, str]], floatfmt: str = ".4f") -> str:
    """The paper's comparison layout (Tables 3 and 4): a row per fusion and, for every corruption
    level, one column per (header, metric key) of ``columns``."""
    levels = corruption_levels(results)
    header = ["Fusion"] + [f"{h} @ {float(lv):.0%}" for lv in levels for h, _ in columns]
    rows = [[FUSION_LABELS[f]] + [r["metrics"][lv][key] for lv in levels for _, key in columns]
            for f, r in results.items()]
    return markdown_table(header, rows, floatfmt=floatfmt)


def corruption_plot(results: Mapping[str, Mapping], metric: str, path: str | Path, ylabel: str,
                    title: str = "") -> None:
    """``metric`` against the test pixel corruption, one line per fusion."""
    levels = corruption_levels(results)
    series = {FUSION_LABELS[f]: [r["metrics"][lv][metric] for lv in levels] for f, r in results.items()}
    line_plot([100 * float(lv) for lv in levels], series, path, "test pixel corruption (%)", ylabel, title)


def alpha_plots(results: Mapping[str, Mapping], out_dir: str | Path) -> None:
    """For every fusion with credibilities (gPoE), ``alpha_<fusion>.png``: the mean alpha of each
    modality against the test pixel corruption of RGB."""
    levels = corruption_levels(results)
    for f, r in results.items():
        if r.get("alpha"):
            series = {m: [r["alpha"][lv][m] for lv in levels] for m in r["alpha"][levels[0]]}
            line_plot([100 * float(lv) for lv in levels], series, Path(out_dir) / f"alpha_{f}.png",
                      "test pixel corruption of RGB (%)", "mean alpha", f"{FUSION_LABELS[f]}: credibility per modality")
