"""A ranking as people read it: the table (score, 95% interval, rank interval, P(best), the
leader's group) and the one line after it that says what to do next.

Decimals (docs/interface.md): a metric's column shows as many decimals as make the narrowest 95%
interval among the models readable to two significant digits, between 1 and 6; more would print
digits that the resampling says carry no information. Without intervals (``--resamples 0``, or a
metric no model could be resampled under) the column keeps 6 decimals, as before intervals existed.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from rich.console import Console
from rich.table import Table

MAX_DECIMALS = 6
LABELS = {"ddscore": "D-deepscore"}


def decimals(widths: list[float]) -> int:
    """Decimals for a column whose models' 95% intervals have these widths."""
    widths = [w for w in widths if w > 0 and math.isfinite(w)]
    if not widths:
        return MAX_DECIMALS
    return max(1, min(MAX_DECIMALS, 1 - math.floor(math.log10(min(widths)))))


def _column_decimals(ranking, metric: str) -> int:
    widths = [u.interval[1] - u.interval[0] for m in ranking.models
              if (u := m.uncertainty.get(metric)) is not None]
    return decimals(widths)


def _value(m, metric: str, first: bool) -> float:
    return m.metrics.get(metric, m.score if first else float("nan"))


def _fmt(x: float | None, d: int) -> str:
    return "n/a" if x is None or x != x else f"{x:.{d}f}"


def table(ranking, title: str) -> Table:
    """The ranking's table: per metric its value and 95% interval; for the ranking (first) metric
    also the rank interval and P(best), and ``*`` on the models in the leader's group."""
    metrics = ranking.metric_names
    resampled = any(m.uncertainty for m in ranking.models)
    caption = f"score precision: {ranking.settings['precision']}"
    if len(metrics) > 1 or metrics[0] != "ddscore":
        caption += f"; ranked by {metrics[0]}"
    if resampled:
        caption += (f"; 95% intervals from {ranking.settings.get('resamples')} bootstrap "
                    "replicates of the scored images; * in the leader's group (not told apart "
                    "from the leader)")
        if len(metrics) > 1:
            caption += "; the other metrics' intervals: --json, --csv, --figure"
    out = Table(caption=caption)
    out.add_column("rank", justify="right")
    # The model's name is what the table is read for: never shortened, whatever else must give.
    out.add_column("model", no_wrap=True,
                   min_width=max((len(m.name) for m in ranking.models), default=0))
    if resampled:
        out.add_column("", justify="center")  # the leader's group mark
    # D-deepscore alone: its two block scores too. The ranking metric gets interval, rank
    # interval and P(best) columns; every further metric its value alone, so that nine metrics
    # fit a terminal (their intervals: --json, --csv, --figure, said in the caption).
    blocks = ranking.settings["blocks"] if metrics == ["ddscore"] else []
    places = {k: _column_decimals(ranking, k) for k in metrics}
    for i, name in enumerate(metrics):
        label = LABELS.get(name, name)
        if i == 0:
            out.add_column(label, justify="right")
            if resampled:
                out.add_column("95% interval", justify="right", no_wrap=True)
                out.add_column("rank 95%", justify="right")
                out.add_column("P(best)", justify="right")
        else:
            out.add_column(label, justify="right", no_wrap=True)
    for block in blocks:
        out.add_column(block, justify="right")
    group = set(ranking.leader_group()) if resampled else set()
    for i, m in enumerate(ranking.models, 1):
        cells = [str(i), m.name]
        if resampled:
            cells.append("*" if m.name in group else "")
        first, u = metrics[0], m.uncertainty.get(metrics[0])
        d = places[first]
        cells.append(_fmt(_value(m, first, True), d))
        if resampled:
            cells.append(f"[{_fmt(u.interval[0], d)}, {_fmt(u.interval[1], d)}]" if u else "n/a")
            cells.append((str(u.rank_interval[0]) if u.rank_interval[0] == u.rank_interval[1]
                          else f"{u.rank_interval[0]}-{u.rank_interval[1]}") if u else "n/a")
            cells.append(f"{u.p_best:.2f}" if u else "n/a")
        cells += [_fmt(_value(m, name, False), places[name]) for name in metrics[1:]]
        cells += [_fmt(m.block_scores.get(b), places["ddscore"]) for b in blocks]
        out.add_row(*cells)
    return out


def print_ranking(ranking, title: str, console: Console) -> None:
    # The title on a line of its own: a table title wraps to the table's width, mid-path.
    console.print(title, soft_wrap=True)
    console.print(table(ranking, title))


def _finetune_data(data_root: Path | None) -> str | None:
    """The DATA to fine-tune on: the folder with train/ and valid/ (the parent of a scored
    DATA/train, docs/finetune.md), or None when the ranked data has no such folder."""
    if data_root is None:
        return None
    root = Path(data_root)
    if root.name == "train" and (root.parent / "valid").is_dir():
        root = root.parent
    if not ((root / "train").is_dir() and (root / "valid").is_dir()):
        return None
    return shlex.quote(str(root))


def next_step(ranking, zoo_dir: Path | None, data_root: Path | None,
              ranking_json: str | None) -> str | None:
    """One line: the models in the leader's group and the command that settles it (fine-tune
    them: ``--models a,b``, or ``--top 1 --ranking FILE`` when the ranking was saved). None for
    a ranking without models or without resampling."""
    if not ranking.models or not any(m.uncertainty for m in ranking.models):
        return None
    group = ranking.leader_group()
    zoo = shlex.quote(str(zoo_dir)) if zoo_dir is not None else "ZOO"
    data = _finetune_data(data_root)
    command = f"ddscore-jax finetune {zoo} {data or 'DATA'}"
    if ranking_json not in (None, "-"):
        command += f" --top 1 --ranking {shlex.quote(str(ranking_json))}"
    else:
        command += f" --models {shlex.quote(','.join(group))}"
    command += " --out finetuned.json"
    if data is None:
        command += " (DATA: a folder with train/ and valid/; rank DATA/train)"
    if len(group) == 1:
        return (f"next: {group[0]} leads, told apart from every other model at 95%; to confirm "
                f"it on your task: {command}")
    return (f"next: {len(group)} models cannot be told apart from the leader at 95% "
            f"({', '.join(group)}); fine-tuning them settles it: {command}")
