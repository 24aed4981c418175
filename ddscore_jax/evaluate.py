"""How far to trust a ranking: transferability scores against fine-tuned held-out accuracy.

Per metric, over the models that have both a score and an accuracy:

- ``weighted_tau``: ``scipy.stats.weightedtau(scores, accuracies)`` with its defaults (hyperbolic
  weights 1 / (r + 1) on the rank r, ranks taken from both orderings and averaged): disagreements
  among the best models weigh more than among the worst, the convention of the transferability
  literature (LogME, TransRate, ...);
- ``kendall_tau``: ``scipy.stats.kendalltau`` (tau-b);
- ``pearson``: ``scipy.stats.pearsonr`` of the raw scores and accuracies;
- ``rel@k``: the best accuracy among the k top-scored models over the best accuracy of all models
  (1.0: the top k contain the best model). Ties in score are broken by the order of the SCORES
  file, which is its ranking.

A correlation that is undefined (fewer than two models, or a constant input) is ``None``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddscore_jax.atomic import atomic_path
from ddscore_jax.errors import InputError

REL_AT = (1, 3)
DEFAULT_METRIC = "ddscore"
# Names for figure titles and tables; unknown metrics are shown as they are named.
LABELS = {"ddscore": "D-deepscore", "hscore": "H-score", "shrinkage_hscore": "shrinkage H-score",
          "logme": "LogME", "transrate": "TransRate", "gbc": "GBC", "knn": "1-NN accuracy",
          "leep": "LEEP", "nce": "NCE"}


@dataclass
class MetricScores:
    """One metric's score per model, in the ranking's order (best first)."""

    metric: str
    scores: dict[str, float]
    source: str  # the file it came from


@dataclass
class MetricEvaluation:
    metric: str
    n_models: int
    weighted_tau: float | None
    kendall_tau: float | None
    pearson: float | None
    rel_at: dict[int, float | None]
    models: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"metric": self.metric, "n_models": self.n_models,
                "weighted_tau": self.weighted_tau, "kendall_tau": self.kendall_tau,
                "pearson": self.pearson,
                **{f"rel@{k}": v for k, v in self.rel_at.items()},
                "models": [{"name": n, "score": s, "accuracy": a} for n, s, a in
                           zip(self.models, self.scores, self.accuracies, strict=True)]}


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_scores(path: str | os.PathLike) -> tuple[list[MetricScores], dict]:
    """The metrics of a ``rank --json`` / ``score --json`` file, and its ``dataset`` block.

    Each model's ``"score"`` is one metric (the first of ``settings["metrics"]`` when the file
    names them, else D-deepscore); a ``"metrics"`` (or ``"scores"``) object per model adds one
    metric per key, each value a number or an object with a ``"score"``. A model without a number
    for a metric (null: e.g. LEEP for a checkpoint with no classifier) is left out of that metric.
    """
    path = Path(path)
    doc = _read_json(path)
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list) or not models:
        raise InputError(f"{path}: not a scores file (expected a non-empty \"models\" list, as "
                         "`rank --json` writes)")
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    # `rank --metric a,b` ranks by (and reports as "score") the first of settings["metrics"].
    named = settings.get("metrics")
    main = named[0] if isinstance(named, list) and named else settings.get("metric")
    if not isinstance(main, str):
        main = DEFAULT_METRIC
    found: dict[str, dict[str, float]] = {}
    for m in models:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise InputError(f"{path}: every model needs a \"name\"")
        extra = m.get("metrics", m.get("scores"))
        if isinstance(extra, dict):
            for metric, value in extra.items():
                if isinstance(value, dict):  # {"score": x, "block_scores": {...}} per metric
                    value = value.get("score")
                if _number(value) is not None:
                    found.setdefault(str(metric), {})[m["name"]] = _number(value)
        if _number(m.get("score")) is not None and not (isinstance(extra, dict) and main in extra):
            found.setdefault(main, {})[m["name"]] = _number(m["score"])
    if not found:
        raise InputError(f"{path}: no model has a numeric \"score\"")
    dataset = doc.get("dataset") if isinstance(doc.get("dataset"), dict) else {}
    return [MetricScores(k, v, str(path)) for k, v in found.items()], dataset


def read_accuracies(path: str | os.PathLike) -> tuple[dict[str, float], dict]:
    """``{model: held-out accuracy}`` from a ``finetune`` results file, and its ``dataset``.

    Also takes ``{"models": [{"name", "accuracy"}]}`` or a plain ``{name: accuracy}`` object.
    """
    path = Path(path)
    doc = _read_json(path)
    acc: dict[str, float] = {}
    dataset: dict = {}
    if isinstance(doc, dict) and isinstance(doc.get("models"), list):
        dataset = doc.get("dataset") if isinstance(doc.get("dataset"), dict) else {}
        for m in doc["models"]:
            if not isinstance(m, dict) or not isinstance(m.get("name"), str):
                raise InputError(f"{path}: every model needs a \"name\"")
            value = _number(m.get("held_out_accuracy", m.get("accuracy")))
            if value is None:
                raise InputError(f"{path}: model {m['name']!r} has no numeric accuracy")
            acc[m["name"]] = value
    elif isinstance(doc, dict) and doc and all(_number(v) is not None for v in doc.values()):
        acc = {str(k): _number(v) for k, v in doc.items()}
    else:
        raise InputError(f"{path}: not an accuracies file (expected `finetune` results)")
    if not acc:
        raise InputError(f"{path}: no models")
    return acc, dataset


def _statistic(fn, x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(x, y).statistic)
    return value if math.isfinite(value) else None


def evaluate_metric(scores: dict[str, float], accuracies: dict[str, float],
                    metric: str = DEFAULT_METRIC,
                    rel_at: Sequence[int] = REL_AT) -> MetricEvaluation:
    """Compare one metric's scores with accuracies over the models both have.

    The models keep the order of ``scores`` (a ranking lists them best first), which decides
    ties in ``rel@k``.
    """
    from scipy import stats

    names = [n for n in scores if n in accuracies]
    s = np.array([scores[n] for n in names], dtype=np.float64)
    a = np.array([accuracies[n] for n in names], dtype=np.float64)
    rel: dict[int, float | None] = {}
    # Stable sort: equal scores stay in file order.
    order = np.argsort(-s, kind="stable")
    for k in rel_at:
        if not len(names) or a.max() <= 0:
            rel[k] = None
        else:
            rel[k] = float(a[order[:k]].max() / a.max())
    return MetricEvaluation(
        metric=metric, n_models=len(names),
        weighted_tau=_statistic(stats.weightedtau, s, a),
        kendall_tau=_statistic(stats.kendalltau, s, a),
        pearson=_statistic(stats.pearsonr, s, a),
        rel_at=rel, models=names, scores=s.tolist(), accuracies=a.tolist())


@dataclass
class Evaluation:
    metrics: list[MetricEvaluation]
    scores_files: list[str]
    accuracies_file: str
    dropped: dict[str, list[str]]  # per metric: models with a score but no accuracy

    def to_json(self) -> dict:
        return {"metrics": [m.to_json() for m in self.metrics], "scores": self.scores_files,
                "accuracies": self.accuracies_file,
                "models_without_accuracy": self.dropped}


def _same_path(a: object, b: object) -> bool:
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _check_no_leak(scores_path: str, scored: dict, finetuned: dict) -> None:
    # The one mistake that makes the whole evaluation meaningless: scoring images the accuracy is
    # measured on. Only detectable when the scores name their data folder (`rank` does).
    root = scored.get("root")
    held = finetuned.get("held_out", {}) if isinstance(finetuned.get("held_out"), dict) else {}
    for leaky in (finetuned.get("root"), held.get("root")):
        if _same_path(root, leaky):
            raise InputError(f"{scores_path}: scores were computed on {root}, which contains the "
                             f"held-out images of the fine-tuning; score DATA/train only")


def evaluate(scores_paths: Sequence[str | os.PathLike],
             accuracies_path: str | os.PathLike) -> Evaluation:
    """Evaluate every metric of every SCORES file against the fine-tuned accuracies."""
    if not scores_paths:
        raise InputError("evaluate: no SCORES file given")
    accuracies, finetuned = read_accuracies(accuracies_path)
    all_metrics: list[MetricScores] = []
    for path in scores_paths:
        metrics, scored = read_scores(path)
        _check_no_leak(str(path), scored, finetuned)
        all_metrics += metrics
    # The same metric from two files (two `rank` runs) is told apart by the file's name.
    names = [m.metric for m in all_metrics]
    for m in all_metrics:
        if names.count(m.metric) > 1:
            m.metric = f"{m.metric} ({Path(m.source).stem})"
    results, dropped = [], {}
    for m in all_metrics:
        missing = [n for n in m.scores if n not in accuracies]
        if missing:
            dropped[m.metric] = missing
        ev = evaluate_metric(m.scores, accuracies, m.metric)
        if ev.n_models == 0:
            raise InputError(f"{m.source}: no model of metric {m.metric!r} is in "
                             f"{accuracies_path}")
        results.append(ev)
    return Evaluation(results, [str(p) for p in scores_paths], str(accuracies_path), dropped)


def label(metric: str) -> str:
    """A metric's display name."""
    base, _, rest = metric.partition(" ")
    return f"{LABELS.get(base, base)} {rest}".strip()


def plot(evaluation: Evaluation, path: str | os.PathLike, title: str | None = None) -> Path:
    """Scores against fine-tuned accuracy, one labelled point per model, one panel per metric.

    Written as a PNG, atomically. Uses matplotlib's Agg canvas directly, so no global backend is
    changed in the caller's process.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("the figure needs matplotlib (pip install matplotlib)") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    panels = evaluation.metrics
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, ev in zip(axes, panels, strict=False):
        ax.scatter(ev.scores, ev.accuracies, s=22, color="tab:blue", zorder=2)
        for name, x, y in zip(ev.models, ev.scores, ev.accuracies, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        tau = "n/a" if ev.weighted_tau is None else f"{ev.weighted_tau:.3f}"
        ax.set_title(f"{label(ev.metric)}  (tau_w = {tau})", fontsize=10)
        ax.set_xlabel("score")
        ax.set_ylabel("fine-tuned held-out accuracy")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
