"""The ranking as a figure (``rank --figure PATH``): one panel per metric, one row per model,
sorted, the point score with its 95% bootstrap interval, the leader's group marked; with several
metrics a last panel of Kendall's tau between the metrics' rankings.

Drawn on matplotlib's Agg canvas directly (no display, no global backend changed in the caller's
process) and written atomically, in the format the path's suffix names.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ddscore_jax.atomic import atomic_path, check_writable
from ddscore_jax.errors import InputError

if TYPE_CHECKING:
    from ddscore_jax.api import Ranking

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
PANEL_INCHES = (4.2, 0.6)  # width; height is this + 0.28 per model
MAX_COLUMNS = 3
DPI = 110
LABELS = {"ddscore": "D-deepscore", "hscore": "H-score", "shrinkage_hscore": "shrinkage H-score",
          "logme": "LogME", "transrate": "TransRate", "gbc": "GBC", "knn": "1-NN accuracy",
          "leep": "LEEP", "nce": "NCE"}


def check_path(path: str | os.PathLike) -> Path:
    """``path`` if a figure can be written there (a known suffix, an existing folder), else
    InputError: called before any work."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"{path}: --figure must end in {', '.join(FORMATS)}")
    if path.is_dir():
        raise InputError(f"{path}: --figure names a folder; give a file path")
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    check_writable(path)  # a folder that takes no new file (/proc), a read-only disk
    return path


def panels(ranking: Ranking) -> list[str]:
    """The panel titles, in order: the metrics (those some model has), then "Kendall tau" when
    there are two or more."""
    names = [m for m in ranking.metric_names
             if any(not np.isnan(s.metrics.get(m, np.nan)) for s in ranking.models)]
    return names + (["Kendall tau"] if len(names) > 1 else [])


def layout(n_panels: int, n_models: int) -> tuple[int, int, tuple[float, float]]:
    """(rows, columns, figure size in inches) for ``n_panels`` panels of ``n_models`` rows."""
    cols = min(MAX_COLUMNS, n_panels)
    rows = math.ceil(n_panels / cols)
    height = PANEL_INCHES[1] + 0.28 * max(n_models, 3) + 0.9
    return rows, cols, (PANEL_INCHES[0] * cols, height * rows)


def kendall_matrix(ranking: Ranking, metrics: list[str]) -> np.ndarray:
    """Kendall's tau-b between each pair of metrics' scores, over the models that have both
    (NaN where fewer than 2 do)."""
    from scipy.stats import kendalltau

    out = np.eye(len(metrics))
    for i, a in enumerate(metrics):
        for j, b in enumerate(metrics[:i]):
            x = np.array([m.metrics.get(a, np.nan) for m in ranking.models])
            y = np.array([m.metrics.get(b, np.nan) for m in ranking.models])
            both = ~(np.isnan(x) | np.isnan(y))
            tau = kendalltau(x[both], y[both]).statistic if both.sum() >= 2 else np.nan
            out[i, j] = out[j, i] = tau
    return out


def plot_ranking(ranking: Ranking, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``ranking`` to ``path`` (.png, .svg or .pdf) atomically; returns the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("the figure needs matplotlib (pip install matplotlib)") from None
    path = check_path(path)
    names = panels(ranking)
    if not names:
        raise InputError(f"{path}: no model has a score to draw")
    metrics = [n for n in names if n != "Kendall tau"]
    rows, cols, size = layout(len(names), len(ranking.models))
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        _metric_panel(ax, ranking, metric)
    if len(metrics) > 1:
        _tau_panel(fig, axes[len(metrics)], metrics, kendall_matrix(ranking, metrics))
    for ax in axes[len(names):]:
        ax.set_visible(False)
    resamples = ranking.settings.get("resamples", 0)
    note = (f"bars: 95% interval over {resamples} bootstrap replicates of the scored images; "
            "filled: the leader's group" if resamples else "no resampling (--resamples 0)")
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9)
    fmt = FORMATS[path.suffix.lower()]
    # The panel titles travel in the file's metadata: a reader (or test) can list them.
    meta = {"Description": "panels: " + "; ".join(names)} if fmt in ("png", "svg") else \
        {"Subject": "panels: " + "; ".join(names)}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta)
    return path


def _metric_panel(ax, ranking: Ranking, metric: str) -> None:
    have = [m for m in ranking.models if not np.isnan(m.metrics.get(metric, np.nan))]
    have.sort(key=lambda m: -m.metrics[metric])
    group = set(ranking.leader_group(metric))
    ys = np.arange(len(have))[::-1]  # the best on top
    for y, m in zip(ys, have, strict=True):
        u = m.uncertainty.get(metric)
        inside = m.name in group
        colour = "tab:blue" if inside else "tab:gray"
        if u is not None:
            ax.plot(u.interval, [y, y], color=colour, lw=2.2 if inside else 1.4,
                    solid_capstyle="butt")
        ax.plot([m.metrics[metric]], [y], "o", ms=6, color=colour,
                markerfacecolor=colour if inside else "white", zorder=3)
    ax.set_yticks(ys, [m.name for m in have], fontsize=8)
    for tick, m in zip(ax.get_yticklabels(), have, strict=True):
        if m.name in group:
            tick.set_fontweight("bold")
    ax.set_ylim(-0.7, len(have) - 0.3)
    ax.set_title(LABELS.get(metric, metric), fontsize=9)
    ax.set_xlabel("score (higher: expected to transfer better)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)


def _tau_panel(fig, ax, metrics: list[str], tau: np.ndarray) -> None:
    image = ax.imshow(tau, vmin=-1, vmax=1, cmap="RdBu_r")
    labels = [LABELS.get(m, m) for m in metrics]
    ax.set_xticks(range(len(metrics)), labels, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(metrics)), labels, fontsize=7)
    # Many metrics: fewer digits and a smaller font, so that the cells stay readable.
    many = len(metrics) > 5
    for i in range(len(metrics)):
        for j in range(len(metrics)):
            text = "n/a" if np.isnan(tau[i, j]) else f"{tau[i, j]:.1f}" if many else \
                f"{tau[i, j]:+.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=5 if many else 7,
                    color="white" if abs(np.nan_to_num(tau[i, j])) > 0.6 else "black")
    ax.set_title("Kendall tau between the metrics' rankings", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
