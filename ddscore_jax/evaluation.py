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

Each statistic has a 95% percentile bootstrap interval over the fine-tuning seeds and, where the
results record each run's right and wrong test images (``finetune`` results version 3), over
the test images too: each replicate draws, for every model independently, as many of its seed
runs as it has, with replacement, and redraws the test set, within each class as many images as
it has, with replacement, one draw shared by all models (they were tested on the same images);
the statistic is recomputed on the replicated mean accuracies (the point estimate uses the plain
mean). Every metric of a target sees the same replicates, so two metrics are compared on the
paired differences: metric A is called better than B (on tau_w) only when the 95% interval of
tau_w(A) - tau_w(B) lies above 0. Over several targets the mean of a statistic gets a two-level
interval: each replicate resamples the targets with replacement and, within each target drawn,
takes that target's replicate. With one seed per model and no per-image record there is no
per-target interval (``None``), and the mean's interval comes from the targets alone. Fewer than
``MIN_TARGETS_RESAMPLED`` targets are too few to resample: the mean's interval then comes from
within the targets alone and speaks for these targets only.

Beside every statistic, its **null distribution**: the same statistic for uniformly random
rankings of the same models against the same accuracies (``null``: mean, central 95%, 95th
percentile; ``null_p``: the one-sided share of random rankings at least as good as the metric),
per target and for the mean over targets (independent random rankings per target). With 7
models tau_w of a random ranking spreads over roughly +-0.6; that is what a value is read
against.

What the intervals leave out: other targets and zoos than those evaluated, and (with one
fine-tuning seed) the spread between seeds.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddscore_jax.atomic import atomic_path
from ddscore_jax.errors import InputError

# finetuning.RESULTS_KIND (not imported from there: that would load Flax for `evaluate`).
RESULTS_KIND = "ddscore-jax finetune results"
REL_AT = (1, 3)
DEFAULT_METRIC = "ddscore"
CONFIDENCE = 0.95
# Fewer targets than this are not resampled for the mean over targets: a bootstrap over two or
# three units is degenerate (with two, every replicate is A, B or their mean, and a metric ahead
# on both would be called better every time). Below it the mean's interval is over the seeds
# alone: a statement about these targets, not about targets in general.
MIN_TARGETS_RESAMPLED = 4
# Fewer replicates than this put a 95% percentile interval's ends on 2 or 3 draws each.
MIN_BOOTSTRAP = 100


@dataclass(frozen=True)
class Settings:
    """How ``evaluate`` resamples: the defaults of the library's keywords and of the CLI's options,
    and their validation (as :class:`ddscore_jax.finetuning.Settings` is for ``finetune``)."""

    bootstrap: int = 1000  # replicates per interval
    seed: int = 0  # of the replicates: the same seed repeats every interval exactly

    def check(self) -> Settings:
        """``self``, or InputError naming the bad option."""
        if self.bootstrap < MIN_BOOTSTRAP:
            raise InputError(f"--bootstrap must be at least {MIN_BOOTSTRAP}, got {self.bootstrap}")
        return self

    def to_json(self) -> dict:
        """The ``settings`` block of ``evaluate --json``: what the intervals were drawn with."""
        return {"bootstrap": self.bootstrap, "seed": self.seed, "confidence": CONFIDENCE}


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


STATISTICS = ("weighted_tau", "kendall_tau", "pearson", *(f"rel@{k}" for k in REL_AT))


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
    accuracies: list[float] = field(default_factory=list)  # mean over seeds
    accuracy_sd: list[float] = field(default_factory=list)  # over seeds (0 with one seed)
    seeds: list[int] = field(default_factory=list)  # seeds per model
    # 95% bootstrap interval per statistic (STATISTICS); None without seed spread or undefined.
    intervals: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    # Bootstrap replicates per statistic (NaN where undefined): for the paired comparisons and
    # the mean over targets, not written out.
    replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # Per statistic: its distribution for random rankings of the same models (null_summary),
    # the one-sided p of the observed value against it, and the draws (not written out).
    null: dict[str, dict] = field(default_factory=dict)
    null_p: dict[str, float | None] = field(default_factory=dict)
    null_replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def value(self, statistic: str) -> float | None:
        if statistic.startswith("rel@"):
            return self.rel_at.get(int(statistic[4:]))
        return getattr(self, statistic)

    def to_json(self) -> dict:
        return {"metric": self.metric, "n_models": self.n_models,
                "weighted_tau": self.weighted_tau, "kendall_tau": self.kendall_tau,
                "pearson": self.pearson,
                **{f"rel@{k}": v for k, v in self.rel_at.items()},
                "intervals": {k: None if v is None else list(v)
                              for k, v in self.intervals.items()},
                "null": self.null, "null_p": self.null_p,
                "models": [{"name": n, "score": s, "accuracy": a, "accuracy_sd": sd,
                            "seeds": k}
                           for n, s, a, sd, k in zip(self.models, self.scores, self.accuracies,
                                                     self.accuracy_sd, self.seeds, strict=True)]}


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


def _numeric_or_null(path: Path, name: str, what: str, value: object) -> None:
    # null is how `rank` writes a metric a model cannot have (LEEP without a classifier); any
    # other non-number (a string, NaN, an infinity) was not written by ddscore-jax.
    if value is not None and _number(value) is None:
        raise InputError(f"{path}: model {name!r} has a non-numeric {what} ({value!r})")


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
    if "dataset" in doc and not isinstance(doc["dataset"], dict):
        raise InputError(f"{path}: \"dataset\" is not an object (hand-edited?)")
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    # `rank --metric a,b` ranks by (and reports as "score") the first of settings["metrics"].
    named = settings.get("metrics")
    main = named[0] if isinstance(named, list) and named else settings.get("metric")
    if not isinstance(main, str):
        main = DEFAULT_METRIC
    found: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    for m in models:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise InputError(f"{path}: every model needs a \"name\"")
        if m["name"] in seen:
            raise InputError(f"{path}: model {m['name']!r} appears twice")
        seen.add(m["name"])
        _numeric_or_null(path, m["name"], "score", m.get("score"))
        extra = m.get("metrics", m.get("scores"))
        if isinstance(extra, dict):
            for metric, value in extra.items():
                if isinstance(value, dict):  # {"score": x, "block_scores": {...}} per metric
                    value = value.get("score")
                _numeric_or_null(path, m["name"], f"{metric} score", value)
                if _number(value) is not None:
                    found.setdefault(str(metric), {})[m["name"]] = _number(value)
        if _number(m.get("score")) is not None and not (isinstance(extra, dict) and main in extra):
            found.setdefault(main, {})[m["name"]] = _number(m["score"])
    if not found:
        raise InputError(f"{path}: no model has a numeric \"score\"")
    dataset = doc.get("dataset") if isinstance(doc.get("dataset"), dict) else {}
    return [MetricScores(k, v, str(path)) for k, v in found.items()], dataset


def _seed_values(entry: dict, path: Path | None = None) -> list[float] | None:
    """A model's held-out accuracy per fine-tuning seed, wherever a results file keeps them.
    With ``path``, an accuracy that is there but not a finite number in [0, 1] is refused."""
    if path is not None:
        name = entry.get("name")
        listed = entry.get("seed_accuracies")
        values = [*(listed if isinstance(listed, list) else [listed] if listed is not None
                    else []),
                  *(entry[k] for k in ("held_out_accuracy", "accuracy") if k in entry)]
        for v in values:
            if _number(v) is None:
                raise InputError(f"{path}: model {name!r} has a non-numeric or non-finite "
                                 f"accuracy ({v!r})")
            if not 0.0 <= float(v) <= 1.0:
                raise InputError(f"{path}: model {name!r} has an accuracy outside [0, 1] ({v!r})")
    # `finetune` writes "seed_accuracies" (numbers; its "seeds" are the seed numbers). Lists of
    # run objects under "seeds" or "runs" are read too; numbers there are not accuracies.
    for key in ("seed_accuracies", "accuracies", "seeds", "runs"):
        runs = entry.get(key)
        if not isinstance(runs, list) or not runs:
            continue
        if key in ("seeds", "runs"):
            values = [_number(r.get("held_out_accuracy", r.get("accuracy")))
                      if isinstance(r, dict) else None for r in runs]
        else:
            values = [_number(r) for r in runs]
        if all(v is not None for v in values):
            return values
    single = _number(entry.get("held_out_accuracy", entry.get("accuracy")))
    return None if single is None else [single]


def read_seed_accuracies(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """``{model: held-out accuracy per fine-tuning seed}`` from a ``finetune`` results file, and
    its ``dataset``. A model with one accuracy (one seed, or an older file) has one value.

    Also takes ``{"models": [{"name", "accuracy"}]}`` or a plain ``{name: accuracy}`` object.
    """
    path = Path(path)
    doc = _read_json(path)
    acc: dict[str, np.ndarray] = {}
    dataset: dict = {}
    if isinstance(doc, dict) and doc.get("kind") == RESULTS_KIND and \
            not isinstance(doc.get("models"), list):
        raise InputError(f"{path}: not a fine-tuning results file (\"models\" is not a list; "
                         "hand-edited?)")
    if isinstance(doc, dict) and isinstance(doc.get("models"), list):
        if "dataset" in doc and not isinstance(doc["dataset"], dict):
            raise InputError(f"{path}: \"dataset\" is not an object (hand-edited?)")
        dataset = doc.get("dataset", {})
        for m in doc["models"]:
            if not isinstance(m, dict) or not isinstance(m.get("name"), str):
                raise InputError(f"{path}: every model needs a \"name\"")
            if m["name"] in acc:
                raise InputError(f"{path}: model {m['name']!r} appears twice")
            values = _seed_values(m, path)
            if values is None:
                raise InputError(f"{path}: model {m['name']!r} has no numeric accuracy")
            acc[m["name"]] = np.asarray(values, dtype=np.float64)
    elif isinstance(doc, dict) and doc and all(_number(v) is not None for v in doc.values()):
        acc = {str(k): np.array([_number(v)]) for k, v in doc.items()}
    else:
        raise InputError(f"{path}: not an accuracies file (expected `finetune` results)")
    if not acc:
        raise InputError(f"{path}: no models")
    return acc, dataset


def test_correctness(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """``({model: (seeds, n_test) bool, right or wrong per test image}, test labels (n_test,))``
    from a ``finetune`` results file that records them (version 3: ``test_correct`` per model,
    ``dataset.test.labels``), in the seed order of ``seed_accuracies``; None when any model lacks
    them or they disagree with its accuracies (then only the seeds can be resampled)."""
    doc = _read_json(Path(path))
    dataset = doc.get("dataset") if isinstance(doc, dict) else None
    test = dataset.get("test") if isinstance(dataset, dict) else None
    labels = test.get("labels") if isinstance(test, dict) else None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(labels, list) or not labels or not isinstance(models, list) or not models:
        return None
    out = {}
    for m in models:
        rows = m.get("test_correct") if isinstance(m, dict) else None
        acc = m.get("seed_accuracies") if isinstance(m, dict) else None
        if (not isinstance(rows, list) or not rows or not isinstance(acc, list)
                or len(acc) != len(rows)
                or not all(isinstance(r, str) and len(r) == len(labels) and set(r) <= {"0", "1"}
                           for r in rows)):
            return None
        right = np.array([[c == "1" for c in r] for r in rows], dtype=bool)
        if not np.allclose(right.mean(axis=1), acc):
            return None
        out[m["name"]] = right
    return out, np.asarray(labels, dtype=np.int64)


def read_accuracies(path: str | os.PathLike) -> tuple[dict[str, float], dict]:
    """``{model: held-out accuracy (mean over seeds)}`` and the ``dataset`` of a results file."""
    acc, dataset = read_seed_accuracies(path)
    return {k: float(v.mean()) for k, v in acc.items()}, dataset


def is_accuracies_file(path: str | os.PathLike) -> bool:
    """Whether a JSON file holds fine-tuned accuracies rather than scores (its models have no
    ``score``), which is how ``evaluate`` tells where one target's files end."""
    doc = _read_json(Path(path))
    if not isinstance(doc, dict):
        return False
    if doc.get("kind") == RESULTS_KIND:
        return True  # whatever its shape: read_seed_accuracies says what is wrong with it
    models = doc.get("models")
    if isinstance(models, list):
        return bool(models) and not any(
            isinstance(m, dict) and ("score" in m or "metrics" in m or "scores" in m)
            for m in models)
    return bool(doc) and all(_number(v) is not None for v in doc.values())


def _point_statistics(s: np.ndarray, a: np.ndarray, order: np.ndarray,
                      rel_at: Sequence[int]) -> dict[str, float | None]:
    # The same code as the replicates, so that a point and its interval agree to the last bit.
    values = _replicate_statistics(s, a[None, :], order, rel_at)
    return {k: float(v[0]) if np.isfinite(v[0]) else None for k, v in values.items()}


def _replicate_statistics(s: np.ndarray, reps: np.ndarray, order: np.ndarray,
                          rel_at: Sequence[int]) -> dict[str, np.ndarray]:
    """Every statistic of ``s`` against each row of ``reps`` (B, models); NaN where undefined."""
    b, m = reps.shape
    out: dict[str, np.ndarray] = {}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        constant = np.ptp(reps, axis=1) == 0 if m else np.ones(b, bool)
        if m < 2 or np.ptp(s) == 0:
            nan = np.full(b, np.nan)
            out.update(weighted_tau=nan, kendall_tau=nan.copy(), pearson=nan.copy())
        else:
            # scipy's weightedtau (defaults), kendalltau (tau-b) and pearsonr written out,
            # vectorised over the replicates; tests hold them to scipy's.
            x = np.broadcast_to(s, reps.shape)
            out["weighted_tau"] = (_weighted_tau(x, reps, _lex_rank(x, reps))
                                   + _weighted_tau(reps, x, _lex_rank(reps, x))) / 2
            iu = np.triu_indices(m, 1)
            ds = np.sign(s[:, None] - s[None, :])[iu]  # (pairs,)
            da = np.sign(reps[:, :, None] - reps[:, None, :])[:, iu[0], iu[1]]  # (B, pairs)
            out["kendall_tau"] = (da @ ds) / np.sqrt(np.sum(ds**2) * np.sum(da**2, axis=1))
            sc = s - s.mean()
            rc = reps - reps.mean(axis=1, keepdims=True)
            out["pearson"] = (rc @ sc) / np.sqrt(np.sum(sc**2) * np.sum(rc**2, axis=1))
            for key in ("weighted_tau", "kendall_tau", "pearson"):
                out[key] = np.where(constant, np.nan, np.clip(out[key], -1.0, 1.0))
        best = reps.max(axis=1) if m else np.zeros(b)
        for k in rel_at:
            top = reps[:, order[:k]].max(axis=1) if m else np.zeros(b)
            out[f"rel@{k}"] = np.where(best > 0, top / np.where(best > 0, best, 1.0), np.nan)
    return out


def _lex_rank(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Per row, rank 0 for the largest (primary, secondary): scipy's ``weightedtau`` importance
    rank (the inverse of the reversed stable lexicographic sort)."""
    order = np.argsort(secondary, axis=1, kind="stable")
    order = np.take_along_axis(order, np.argsort(np.take_along_axis(primary, order, 1), axis=1,
                                                 kind="stable"), 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order[:, ::-1], np.broadcast_to(np.arange(order.shape[1]),
                                                            order.shape), 1)
    return rank


def _weighted_tau(x: np.ndarray, y: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Vigna's weighted tau per row with hyperbolic weights 1 / (rank + 1), additive over pairs,
    ties as in tau-b: scipy's ``_weightedrankedtau`` as a sum over all pairs."""
    w = 1.0 / (rank + 1.0)
    i, j = np.triu_indices(x.shape[1], 1)
    pair = w[:, i] + w[:, j]
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    return np.sum(pair * sx * sy, 1) / np.sqrt(np.sum(pair * np.abs(sx), 1)
                                               * np.sum(pair * np.abs(sy), 1))


def _interval(values: np.ndarray) -> tuple[float, float] | None:
    """The central ``CONFIDENCE`` percentile interval of bootstrap replicates; None when more than
    the excluded tail share of them is undefined."""
    finite = values[np.isfinite(values)]
    if len(finite) < CONFIDENCE * len(values) or not len(finite):
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def accuracy_replicates(seed_accuracies: Mapping[str, np.ndarray],
                        n_boot: int = Settings.bootstrap,
                        seed: int = Settings.seed, *,
                        correct: Mapping[str, np.ndarray] | None = None,
                        labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``{model: (n_boot,) bootstrap means of its seed accuracies}``: each replicate draws as many
    seeds as the model has, with replacement, independently per model.

    With ``correct`` (per model, (seeds, n_test) right/wrong per test image, seeds in the order
    of ``seed_accuracies``) and ``labels`` (n_test,), each replicate also redraws the test set:
    within each class as many of its test images as it has, with replacement (the split is
    stratified), the same draw for every model (they were tested on the same images); a seed's
    accuracy is then its mean correctness over the drawn images. This puts the held-out sampling
    noise into the intervals, beside the seeds'.
    """
    rng = np.random.default_rng(seed)
    weights = None
    if correct is not None and labels is not None:
        labels = np.asarray(labels)
        weights = np.zeros((n_boot, len(labels)))  # times each test image is drawn
        rows = np.arange(n_boot)[:, None]
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            draws = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
            np.add.at(weights, (np.broadcast_to(rows, draws.shape), draws), 1.0)
        weights /= len(labels)
    out = {}
    for name, values in seed_accuracies.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        draws = rng.integers(0, len(values), size=(n_boot, len(values)))
        if weights is None:
            out[name] = values[draws].mean(axis=1)
        else:
            per_seed = np.asarray(correct[name], np.float64) @ weights.T  # (seeds, n_boot)
            out[name] = np.take_along_axis(per_seed.T, draws, axis=1).mean(axis=1)
    return out


NULL_STATISTICS = STATISTICS


def null_replicates(accuracies: Sequence[float], n_boot: int = Settings.bootstrap,
                    seed: int = Settings.seed, rel_at: Sequence[int] = REL_AT
                    ) -> dict[str, np.ndarray]:
    """Every statistic for ``n_boot`` random rankings of these models (uniform permutations,
    against the same mean accuracies): what a metric with no information scores on this zoo.
    With 7 models tau_w takes few values and a wide spread; this is what an observed value is to
    be read against."""
    a = np.asarray(accuracies, dtype=np.float64)
    rng = np.random.default_rng(seed + 2)
    m = len(a)
    if m < 2:
        return {k: np.full(n_boot, np.nan) for k in NULL_STATISTICS}
    perms = np.argsort(rng.random((n_boot, m)), axis=1)
    ranks = np.argsort(perms, axis=1).astype(np.float64)  # a random score per model
    # tau_w, Kendall tau and Pearson are symmetric in their two arguments: the accuracies play
    # the scores' part here, so one vectorised call serves every random ranking.
    out = _replicate_statistics(a, -ranks, np.argsort(-a, kind="stable"), ())
    best = a.max()
    for k in rel_at:
        out[f"rel@{k}"] = (a[perms[:, :k]].max(axis=1) / best if best > 0
                           else np.full(n_boot, np.nan))
    return {k: out[k] for k in NULL_STATISTICS}


def null_summary(values: np.ndarray) -> dict:
    """``{"mean", "interval", "p95"}`` of a null distribution: its mean, its central 95% and its
    95th percentile (the value a metric must beat for one-sided p < 0.05)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"mean": None, "interval": None, "p95": None}
    return {"mean": float(finite.mean()), "interval": list(_interval(finite) or (None, None)),
            "p95": float(np.percentile(finite, 95))}


def null_p(observed: float | None, values: np.ndarray) -> float | None:
    """One-sided p: the share of random rankings that do at least as well as ``observed``."""
    finite = values[np.isfinite(values)]
    if observed is None or not len(finite):
        return None
    return float(np.mean(finite >= observed - 1e-12))


def evaluate_metric(scores: dict[str, float],
                    accuracies: Mapping[str, float | Sequence[float] | np.ndarray],
                    metric: str = DEFAULT_METRIC,
                    rel_at: Sequence[int] = REL_AT, *,
                    replicates: Mapping[str, np.ndarray] | None = None,
                    n_boot: int = Settings.bootstrap,
                    seed: int = Settings.seed,
                    images_resampled: bool = False) -> MetricEvaluation:
    """Compare one metric's scores with accuracies over the models both have.

    ``accuracies[name]`` is one accuracy or one per fine-tuning seed; the statistics use the mean,
    the intervals a bootstrap over the seeds (``replicates``, from :func:`accuracy_replicates`,
    when several metrics must share them; drawn here from ``seed`` otherwise;
    ``images_resampled``: they redraw the test images too, so there is spread even with one
    seed per model). The models keep
    the order of ``scores`` (a ranking lists them best first), which decides ties in ``rel@k``.
    """
    per_seed = {n: np.asarray(v, dtype=np.float64).reshape(-1) for n, v in accuracies.items()}
    names = [n for n in scores if n in per_seed]
    s = np.array([scores[n] for n in names], dtype=np.float64)
    a = np.array([per_seed[n].mean() for n in names], dtype=np.float64)
    seeds = [len(per_seed[n]) for n in names]
    sd = [float(per_seed[n].std(ddof=1)) if len(per_seed[n]) > 1 else 0.0 for n in names]
    order = np.argsort(-s, kind="stable")  # stable: equal scores stay in file order
    point = _point_statistics(s, a, order, rel_at)
    if replicates is None:
        replicates = accuracy_replicates({n: per_seed[n] for n in names}, n_boot, seed)
    reps = (np.stack([replicates[n] for n in names], axis=1) if names
            else np.zeros((n_boot, 0)))
    spread = images_resampled or any(k > 1 for k in seeds)
    boot = _replicate_statistics(s, reps, order, rel_at)
    if not spread:  # nothing to resample: the replicates are the point value itself
        boot = {k: np.full(len(reps), np.nan if v is None else v) for k, v in point.items()}
    intervals = {k: _interval(boot[k]) if spread and point[k] is not None else None
                 for k in point}
    null = null_replicates(a, n_boot, seed, rel_at)
    return MetricEvaluation(
        metric=metric, n_models=len(names),
        weighted_tau=point["weighted_tau"], kendall_tau=point["kendall_tau"],
        pearson=point["pearson"], rel_at={k: point[f"rel@{k}"] for k in rel_at},
        models=names, scores=s.tolist(), accuracies=a.tolist(), accuracy_sd=sd, seeds=seeds,
        intervals=intervals, replicates=boot,
        null={k: null_summary(v) for k, v in null.items()},
        null_p={k: null_p(point[k], v) for k, v in null.items()}, null_replicates=null)


def _better(metrics: Sequence[MetricEvaluation], statistic: str = "weighted_tau"
            ) -> list[tuple[str, str]]:
    """Pairs (A, B) where the 95% interval of statistic(A) - statistic(B), over shared bootstrap
    replicates, lies above 0. Only metrics evaluated on the same models are compared."""
    pairs = []
    for x in metrics:
        for y in metrics:
            if x is y or x.models != y.models:
                continue
            if x.intervals.get(statistic) is None or y.intervals.get(statistic) is None:
                continue  # no spread to judge by (one seed), or undefined
            diff = _interval(x.replicates[statistic] - y.replicates[statistic])
            if diff is not None and diff[0] > 0:
                pairs.append((x.metric, y.metric))
    return pairs


@dataclass
class Evaluation:
    metrics: list[MetricEvaluation]
    scores_files: list[str]
    accuracies_file: str
    dropped: dict[str, list[str]]  # per metric: models with a score but no accuracy
    target: str = ""
    better: list[tuple[str, str]] = field(default_factory=list)  # (A, B): A's tau_w is higher
    resampled: str = "seeds"  # what the intervals redraw: "seeds" or "seeds and test images"

    def to_json(self) -> dict:
        return {"target": self.target, "resampled": self.resampled,
                "metrics": [m.to_json() for m in self.metrics],
                "better_weighted_tau": [list(p) for p in self.better],
                "scores": self.scores_files, "accuracies": self.accuracies_file,
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
    parts = [finetuned.get(k) for k in ("held_out", "test", "selection")]
    roots = [p.get("root") for p in parts if isinstance(p, dict)]
    for leaky in (finetuned.get("root"), *roots):
        if _same_path(root, leaky):
            raise InputError(f"{scores_path}: scores were computed on {root}, which contains the "
                             f"held-out images of the fine-tuning; score DATA/train only")


def _check_together(scores_path: Path, scored: dict, results_path: Path, finetuned: dict,
                    accuracies: Mapping[str, np.ndarray]) -> None:
    """InputError, naming both files, unless the scores and the fine-tuning results are of one
    data set, one class list and one zoo: the same models, with the same checkpoints where both
    files record them. Models the scores refused (non-finite features) may be fine-tuned."""
    both = f"{scores_path} and {results_path}"
    doc = _read_json(scores_path)
    models = [m for m in doc["models"] if isinstance(m, dict)]
    names = [m["name"] for m in models]
    refused = doc.get("refused") if isinstance(doc.get("refused"), list) else []
    classes, tuned_classes = scored.get("classes"), finetuned.get("classes")
    if isinstance(classes, list) and isinstance(tuned_classes, list) and \
            classes != tuned_classes:
        raise InputError(f"{both}: different class lists ({classes} and {tuned_classes})")
    train = finetuned.get("train") if isinstance(finetuned.get("train"), dict) else {}
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    # `rank` names the data folder it scored; `score` names its feature folder, not comparable.
    if ("image_size" in settings and isinstance(scored.get("root"), str)
            and isinstance(train.get("root"), str)
            and not _same_path(scored["root"], train["root"])) or \
            (isinstance(scored.get("n_images"), int) and isinstance(train.get("n_images"), int)
             and scored["n_images"] != train["n_images"]):
        raise InputError(f"{both}: scores and fine-tuning results of different data sets "
                         f"(scores of {scored.get('root')}, {scored.get('n_images')} images; "
                         f"fine-tuned on {train.get('root')}, {train.get('n_images')} images)")
    untuned = [n for n in names if n not in accuracies]
    unscored = [n for n in accuracies if n not in names and n not in refused]
    if untuned or unscored:
        parts = ([f"models scored but not fine-tuned: {', '.join(untuned)}"] if untuned else []) \
            + ([f"models fine-tuned but not scored: {', '.join(unscored)}"] if unscored else [])
        raise InputError(f"{both}: {'; '.join(parts)} (scores and results of different zoos?)")
    tuned = _read_json(results_path)
    tuned_sha = {m.get("name"): m.get("sha256") for m in tuned.get("models", [])
                 if isinstance(m, dict)} if isinstance(tuned, dict) and \
        isinstance(tuned.get("models"), list) else {}
    zoo = doc.get("zoo") if isinstance(doc.get("zoo"), dict) else {}
    scored_sha = zoo.get("sha256") if isinstance(zoo.get("sha256"), dict) else {}
    for m in models:
        a, b = scored_sha.get(m["name"]), tuned_sha.get(m["name"])
        if isinstance(a, str) and isinstance(b, str) and a != b:
            raise InputError(f"{both}: model {m['name']!r} is another checkpoint in each "
                             f"(sha256 {a[:12]}... and {b[:12]}...): scores and results of "
                             "different zoos")


def _target_name(accuracies_path: str | os.PathLike, dataset: dict) -> str:
    root = dataset.get("root") if isinstance(dataset, dict) else None
    return Path(root).name if isinstance(root, str) and root else Path(accuracies_path).stem


def evaluate(scores_paths: Sequence[str | os.PathLike],
             accuracies_path: str | os.PathLike, *, n_boot: int = Settings.bootstrap,
             seed: int = Settings.seed) -> Evaluation:
    """Evaluate every metric of every SCORES file against the fine-tuned accuracies of one target,
    with bootstrap intervals over its fine-tuning seeds (shared by all metrics)."""
    if not scores_paths:
        raise InputError("evaluate: no SCORES file given")
    accuracies, finetuned = read_seed_accuracies(accuracies_path)
    all_metrics: list[MetricScores] = []
    for path in scores_paths:
        metrics, scored = read_scores(path)
        _check_no_leak(str(path), scored, finetuned)
        _check_together(Path(path), scored, Path(accuracies_path), finetuned, accuracies)
        all_metrics += metrics
    # The same metric from two files (two `rank` runs) is told apart by the file's name.
    names = [m.metric for m in all_metrics]
    for m in all_metrics:
        if names.count(m.metric) > 1:
            m.metric = f"{m.metric} ({Path(m.source).stem})"
    found = test_correctness(accuracies_path)
    correct, labels = found if found is not None else (None, None)
    replicates = accuracy_replicates(accuracies, n_boot, seed, correct=correct, labels=labels)
    results, dropped = [], {}
    for m in all_metrics:
        missing = [n for n in m.scores if n not in accuracies]
        if missing:
            dropped[m.metric] = missing
        ev = evaluate_metric(m.scores, accuracies, m.metric, replicates=replicates,
                             n_boot=n_boot, seed=seed, images_resampled=correct is not None)
        if ev.n_models == 0:
            raise InputError(f"{m.source}: no model of metric {m.metric!r} is in "
                             f"{accuracies_path}")
        results.append(ev)
    return Evaluation(results, [str(p) for p in scores_paths], str(accuracies_path), dropped,
                      target=_target_name(accuracies_path, finetuned), better=_better(results),
                      resampled="seeds and test images" if correct is not None else "seeds")


@dataclass
class Summary:
    """Every target's evaluation and, per metric, the mean of each statistic over the targets
    with a two-level bootstrap interval (targets, then seeds)."""

    targets: list[Evaluation]
    # mean[metric][statistic] = (mean over the targets where defined, interval or None)
    mean: dict[str, dict[str, tuple[float | None, tuple[float, float] | None]]]
    better: list[tuple[str, str]]  # (A, B): the interval of mean tau_w(A) - tau_w(B) is > 0
    # Whether the intervals resample the targets (MIN_TARGETS_RESAMPLED or more) or only the
    # seeds within these targets.
    targets_resampled: bool = True
    # null[metric][statistic]: the mean over these targets for independent random rankings of
    # each target's models (null_summary, plus "p": the share at least the observed mean).
    null: dict[str, dict[str, dict]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"targets": [t.to_json() for t in self.targets],
                "targets_resampled": self.targets_resampled,
                "null_mean_over_targets": self.null,
                "mean_over_targets": {
                    m: {k: {"mean": v, "interval": None if iv is None else list(iv)}
                        for k, (v, iv) in stats_.items()} for m, stats_ in self.mean.items()},
                "better_mean_weighted_tau": [list(p) for p in self.better]}


def summarize(evaluations: Sequence[Evaluation], *, n_boot: int = Settings.bootstrap,
              seed: int = Settings.seed) -> Summary:
    """Means over targets of every statistic, with intervals from resampling the targets (and,
    inside each target drawn, its seed replicate). All metrics share the target draws. With fewer
    than ``MIN_TARGETS_RESAMPLED`` targets every replicate keeps all of them (seeds only)."""
    metrics: list[str] = []
    for e in evaluations:
        metrics += [m.metric for m in e.metrics if m.metric not in metrics]
    rng = np.random.default_rng(seed + 1)
    resampled = len(evaluations) >= MIN_TARGETS_RESAMPLED
    draws = (rng.integers(0, len(evaluations), size=(n_boot, len(evaluations))) if resampled
             else np.broadcast_to(np.arange(len(evaluations)), (n_boot, len(evaluations))))
    mean: dict[str, dict] = {}
    boot: dict[str, dict[str, np.ndarray]] = {}
    null: dict[str, dict[str, dict]] = {}
    # Each target's random rankings in an order of their own, so that targets of the same size
    # (drawn from the same seed) do not rank alike in the same replicate.
    shuffles = [np.random.default_rng(seed + 3 + i).permutation(n_boot)
                for i in range(len(evaluations))]
    for metric in metrics:
        found = [next((m for m in e.metrics if m.metric == metric), None) for e in evaluations]
        mean[metric], boot[metric] = {}, {}
        for statistic in STATISTICS:
            points = np.array([np.nan if m is None or m.value(statistic) is None
                               else m.value(statistic) for m in found])
            if not np.isfinite(points).any():
                mean[metric][statistic] = (None, None)
                continue
            # (targets, n_boot) seed replicates; a target without the statistic stays NaN.
            reps = np.stack([
                np.full(n_boot, np.nan) if m is None or statistic not in m.replicates
                or len(m.replicates[statistic]) != n_boot else m.replicates[statistic]
                for m in found])
            picked = reps[draws, np.arange(n_boot)[:, None]]  # (n_boot, targets drawn)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = np.nanmean(picked, axis=1)
            boot[metric][statistic] = values
            nulls = [m.null_replicates[statistic][shuffles[i]] for i, m in enumerate(found)
                     if m is not None and len(m.null_replicates.get(statistic, ())) == n_boot]
            if nulls:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    drawn = np.nanmean(np.stack(nulls), axis=0)
                observed = float(np.nanmean(points))
                null.setdefault(metric, {})[statistic] = {**null_summary(drawn),
                                                          "p": null_p(observed, drawn)}
            interval = _interval(values) if (resampled and len(evaluations) > 1) or any(
                m is not None and m.intervals.get(statistic) for m in found) else None
            mean[metric][statistic] = (float(np.nanmean(points)), interval)
    better = []
    for a in metrics:
        for b in metrics:
            if a == b or "weighted_tau" not in boot[a] or "weighted_tau" not in boot[b]:
                continue
            if mean[a]["weighted_tau"][1] is None or mean[b]["weighted_tau"][1] is None:
                continue
            diff = _interval(boot[a]["weighted_tau"] - boot[b]["weighted_tau"])
            if diff is not None and diff[0] > 0:
                better.append((a, b))
    return Summary(list(evaluations), mean, better, targets_resampled=resampled, null=null)


def evaluate_targets(groups: Sequence[tuple[Sequence[str | os.PathLike], str | os.PathLike]],
                     *, n_boot: int = Settings.bootstrap, seed: int = Settings.seed) -> Summary:
    """:func:`evaluate` per target (its SCORES files and its ACCURACIES file), then
    :func:`summarize` over them. Target names (the data folder's name) are made unique."""
    Settings(n_boot, seed).check()
    evaluations = [evaluate(scores, acc, n_boot=n_boot, seed=seed) for scores, acc in groups]
    names = [e.target for e in evaluations]
    for e in evaluations:
        if names.count(e.target) > 1:
            e.target = f"{e.target} ({Path(e.accuracies_file).stem})"
    return summarize(evaluations, n_boot=n_boot, seed=seed)


def group_files(files: Sequence[str | os.PathLike]) -> list[tuple[list[Path], Path]]:
    """``SCORES... ACCURACIES [SCORES... ACCURACIES]...`` -> one (scores, accuracies) per target.

    An accuracies file (a ``finetune`` results file) closes each target's group.
    """
    groups, pending = [], []
    for f in map(Path, files):
        if is_accuracies_file(f):
            if not pending:
                raise InputError(f"{f}: needs at least one SCORES file before these accuracies "
                                 "(SCORES... ACCURACIES for each target)")
            groups.append((pending, f))
            pending = []
        else:
            pending.append(f)
    if pending or not groups:
        where = pending[-1] if pending else (files[-1] if files else "evaluate")
        raise InputError(f"{where}: needs at least one SCORES file and then the ACCURACIES "
                         "file (fine-tuning results) of its target")
    return groups


def label(metric: str) -> str:
    """A metric's display name."""
    base, _, rest = metric.partition(" ")
    return f"{LABELS.get(base, base)} {rest}".strip()


def plot(evaluation: Evaluation, path: str | os.PathLike, title: str | None = None) -> Path:
    """The paper's figure for one target: scores against fine-tuned accuracy, one labelled point per
    model with the seeds' standard deviation as error bars, one panel per metric.

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
    seeds = sorted({k for ev in panels for k in ev.seeds})
    for ax, ev in zip(axes, panels, strict=False):
        # Error bars: the standard deviation over the fine-tuning seeds (none with one seed).
        ax.errorbar(ev.scores, ev.accuracies, yerr=ev.accuracy_sd or None, fmt="o", ms=4.5,
                    color="tab:blue", ecolor="tab:gray", elinewidth=1, capsize=2, zorder=2)
        for name, x, y in zip(ev.models, ev.scores, ev.accuracies, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        tau = "n/a" if ev.weighted_tau is None else f"{ev.weighted_tau:+.2f}"
        interval = ev.intervals.get("weighted_tau")
        if interval is not None:
            tau += f" [{interval[0]:+.2f}, {interval[1]:+.2f}]"
        ax.set_title(f"{label(ev.metric)}: tau_w {tau}", fontsize=9)
        ax.set_xlabel("score")
        ax.set_ylabel("fine-tuned held-out accuracy")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        runs = "/".join(map(str, seeds))
        fig.suptitle(f"{title}\n(mean over {runs} fine-tuning seed(s), bars +-1 sd; tau_w with "
                     f"its {CONFIDENCE:.0%} bootstrap interval)", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
