"""The public entry points: :func:`extract`, :func:`score`, :func:`rank`. The CLI calls these."""

from __future__ import annotations

import csv
import errno
import html
import logging
import os
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import jax
import numpy as np

from ddscore_jax import cache, data, interrupts, ort_engine, resample, zoo
from ddscore_jax.atomic import atomic_path, check_writable, make_folder, refused
from ddscore_jax.ddscore import ModelScore, precision_for, train_indices
from ddscore_jax.errors import InputError, readable
from ddscore_jax.forward import (
    LoadedModel,
    extract_features,
    load_features,
    save_features,
)
from ddscore_jax.metrics import METRICS, score_all
from ddscore_jax.model import SCORE_BLOCKS
from ddscore_jax.progress import Progress, bars
from ddscore_jax.settings import Dtype, Engine, ExtractSettings, ScoreSettings
from ddscore_jax.settings import to_json as settings_json

log = logging.getLogger(__name__)

# Keyword defaults are read from the settings classes: one copy of each default.
_E, _S = ExtractSettings, ScoreSettings


@dataclass
class Ranking:
    """Models ranked best first, with the data set and every setting that changed the numbers.

    Each model's ``uncertainty`` holds its bootstrap intervals per metric (docs/uncertainty.md).
    """

    models: list[ModelScore]
    dataset: dict
    settings: dict
    cached: list[str] = field(default_factory=list)  # models whose features came from the cache
    refused: list[str] = field(default_factory=list)  # models not ranked: non-finite features
    # The zoo folder (rank only) and each model's checkpoint sha256, so that a saved ranking
    # can be checked against the zoo it is used with (finetune --top, shortlist, evaluate).
    zoo: dict | None = None

    @property
    def metric_names(self) -> list[str]:
        """The metrics of this ranking, the ranking one first."""
        return list(self.settings.get("metrics") or ["ddscore"])

    @property
    def best(self) -> ModelScore | None:
        """The top model (None for an empty ranking)."""
        return self.models[0] if self.models else None

    def leader_group(self, metric: str | None = None) -> list[str]:
        """The models that cannot be told from the leader under ``metric`` (default: the ranking
        one), in that metric's rank order, the leader first: the paired difference's 95%
        interval contains 0. Without resampling, the leader alone."""
        metric = metric or self.metric_names[0]
        if metric not in self.metric_names:
            raise InputError(f"{metric}: not a metric of this ranking "
                             f"({', '.join(self.metric_names)})")
        order = self._order(metric)
        if not order:
            return []
        if not any(metric in m.uncertainty for m in order):
            return [order[0].name]
        return [m.name for m in order
                if metric in m.uncertainty and m.uncertainty[metric].tied_with_best]

    def _order(self, metric: str) -> list[ModelScore]:
        # The models that have ``metric``, best first under it (the ranking order for the first).
        have = [m for m in self.models if not np.isnan(m.metrics.get(metric, m.score))]
        return sorted(have, key=lambda m: -m.metrics.get(metric, m.score))

    def to_json(self) -> dict:
        def first(m: ModelScore, key: str):
            value = getattr(m, key)
            return list(value) if isinstance(value, tuple) else value

        return {
            "models": [
                {"name": m.name, "rank": i + 1, "score": _finite(m.score),
                 "block_scores": m.block_scores,
                 "metrics": {k: _finite(v) for k, v in m.metrics.items()},
                 "metric_block_scores": {k: {b: _finite(v) for b, v in blocks.items()}
                                         for k, blocks in m.metric_block_scores.items()},
                 **{k: first(m, k) for k in ("interval", "rank_interval", "p_best",
                                             "tied_with_best")},
                 "uncertainty": {k: u.to_json() for k, u in m.uncertainty.items()}}
                for i, m in enumerate(self.models)
            ],
            "dataset": self.dataset,
            "settings": self.settings,
            "refused": self.refused,
            **({"zoo": self.zoo} if self.zoo is not None else {}),
        }

    def rows(self) -> tuple[list[str], list[list]]:
        """The CSV table (docs/interface.md): header and one row per model, None where a value
        is missing."""
        names = self.metric_names
        blocks = list(self.models[0].block_scores) if self.models else []
        header = ["rank", "name"]
        for metric in names:
            header += [metric, f"{metric}_lo", f"{metric}_hi", f"{metric}_rank_lo",
                       f"{metric}_rank_hi", f"{metric}_p_best", f"{metric}_tied_with_best"]
        header += blocks
        rows = []
        for i, m in enumerate(self.models):
            row: list = [i + 1, m.name]
            for metric in names:
                value = m.metrics.get(metric, m.score if metric == names[0] else float("nan"))
                u = m.uncertainty.get(metric)
                row += [_finite(value), *(u.interval if u else (None, None)),
                        *(u.rank_interval if u else (None, None)), u.p_best if u else None,
                        u.tied_with_best if u else None]
            row += [_finite(m.block_scores[b]) if b in m.block_scores else None for b in blocks]
            rows.append(row)
        return header, rows

    def to_csv(self, file: str | os.PathLike | IO[str]) -> None:
        """Write :meth:`rows` as CSV to a path (atomically) or an open text file; an empty cell
        for a missing value."""
        header, rows = self.rows()

        def write(out: IO[str]) -> None:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header)
            writer.writerows([["" if v is None else v for v in row] for row in rows])

        if hasattr(file, "write"):
            write(file)
        else:
            with atomic_path(Path(file)) as tmp, open(tmp, "w", newline="") as out:
                write(out)

    def to_pandas(self):
        """The :meth:`rows` table as a ``pandas.DataFrame`` indexed by model name. pandas is
        optional: InputError saying how to install it when it is missing."""
        try:
            import pandas as pd
        except ImportError:
            raise InputError("Ranking.to_pandas needs pandas, which is not installed "
                             "(pip install pandas)") from None
        header, rows = self.rows()
        return pd.DataFrame(rows, columns=header).set_index("name")

    def _repr_html_(self) -> str:
        # Jupyter: the ranking metric's table with its intervals (no pandas needed).
        metric = self.metric_names[0]
        group = set(self.leader_group())
        head = ("<tr><th>rank</th><th>model</th>"
                f"<th>{html.escape(metric)}</th><th>95% interval</th><th>rank interval</th>"
                "<th>P(best)</th></tr>")
        body = []
        for i, m in enumerate(self.models):
            u = m.uncertainty.get(metric)
            mark = " <b>*</b>" if m.name in group else ""
            cells = [str(i + 1), html.escape(m.name) + mark, _fmt(m.score),
                     f"[{_fmt(u.interval[0])}, {_fmt(u.interval[1])}]" if u else "",
                     f"{u.rank_interval[0]}-{u.rank_interval[1]}" if u else "",
                     f"{u.p_best:.2f}" if u else ""]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        note = ("<p>* leader's group: not told apart from the leader at 95% "
                f"({self.settings.get('resamples', 0)} bootstrap replicates)</p>"
                if any(m.uncertainty for m in self.models) else "")
        return f"<table>{head}{''.join(body)}</table>{note}"


def _fmt(x: float) -> str:
    return "" if x is None or np.isnan(x) else f"{x:.4g}"


def _finite(x: float) -> float | None:
    # JSON has no NaN: a metric a model cannot have (LEEP without a source head) is null.
    return None if np.isnan(x) else x


def load_zoo(zoo_dir: str | os.PathLike) -> tuple[list[zoo.ZooEntry], list[LoadedModel]]:
    """Every model of a zoo with its parameters, set to give its conv4_x features. InputError
    for a missing or empty zoo."""
    entries = zoo.read_nonempty(zoo_dir)
    return entries, [LoadedModel(e.name, e.config, zoo.load_state_dict(zoo_dir, e))
                     for e in entries]


def _output_folder(folder: str | os.PathLike) -> None:
    """Create an output folder before any work: a read-only, full or forbidden location, or a
    file in the way, fails now (an OSError the CLI reports in one line), not after extraction."""
    make_folder(folder)


def _cache_refusal(folder: Path) -> OSError | None:
    """The OSError of a feature cache location that refuses writes (a read-only mount, a
    forbidden folder), or None when features can be cached there (the folder is created). Any
    other OSError (a file in the way, a full disk) is raised: that one is the user's to fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        # ENOENT where the parent exists: a folder that takes no new entry (/proc).
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or refused(folder, e):
            return e
        raise
    return None


def _check_subset(labels: np.ndarray, classes: Sequence[str], train_fraction: float, seed: int,
                  where: str) -> None:
    """InputError unless the seeded subset the score uses has at least 2 classes, saying how many
    images of which classes it holds (before any extraction)."""
    idx = train_indices(len(labels), train_fraction, seed)
    present = np.unique(np.asarray(labels)[idx])
    if len(present) < 2:
        names = ", ".join(str(classes[c]) for c in present)
        raise InputError(
            f"{where}: the scored subset (--train-fraction {train_fraction} of {len(labels)} "
            f"images, --seed {seed}) has {len(idx)} image(s), all of class {names}; the score "
            "needs at least 2 classes in it (raise --train-fraction or add images)")


def _finite_only(features: dict[str, dict[str, np.ndarray]], where: str) -> list[str]:
    """Drop (in place) the models whose features hold a NaN or an infinity, with a warning
    naming each; returns their names. InputError when no model is left."""
    bad = [name for name, f in features.items()
           if not all(np.isfinite(np.asarray(v)).all() for v in f.values())]
    for name in bad:
        del features[name]
        log.warning("%s: its features are not finite (NaN or infinity: broken weights?); "
                    "not ranked", name)
    if bad and not features:
        raise InputError(f"{where}: no model has finite features ({', '.join(bad)}); "
                         "nothing to rank")
    return bad


def _warn_if_all_tie(ranked: list[ModelScore], n_images: int) -> None:
    scores = np.array([m.score for m in ranked if not np.isnan(m.score)])
    if len(scores) > 1 and np.ptp(scores) <= 1e-9 * max(1.0, float(np.max(np.abs(scores)))):
        log.warning("every model has the same score (%.6g) on these %d images: the ranking "
                    "carries no information (too few or identical images per class?)",
                    scores[0], n_images)


def extract(zoo_dir: str | os.PathLike, data_root: str | os.PathLike, out: str | os.PathLike, *,
            batch_size: int = _E.batch_size, image_size: int = _E.image_size,
            dtype: Dtype = _E.dtype, workers: int | None = _E.workers,
            progress: Progress | bool | None = None,
            engine: Engine = _E.engine) -> list[Path]:
    """Write ``out/<model>.npz`` (docs/interface.md) for every zoo model; return the files.
    ``progress=True`` draws progress bars on stderr."""
    ExtractSettings(batch_size, image_size, dtype, workers, engine).check()
    # Each file records the engine that ran ("auto" is onnxruntime on some machines).
    engine = ort_engine.resolve(engine, jax.default_backend(), dtype, jax.device_count())
    with bars(progress) as progress:
        return _extract(zoo_dir, data_root, out, batch_size, image_size, dtype, workers,
                        progress, engine)


def _extract(zoo_dir, data_root, out, batch_size, image_size, dtype, workers, progress,
             engine) -> list[Path]:
    _output_folder(out)
    dataset = data.scan(data_root)
    entries, models = load_zoo(zoo_dir)
    check_writable(Path(out) / f"{models[0].name}.npz")  # /proc takes a folder but no file
    fingerprint = cache.dataset_fingerprint(dataset)
    made_from = [cache.feature_settings(zoo_dir, e, fingerprint, image_size, dtype, engine)
                 for e in entries]
    cache.enable_compilation_cache()
    feats = extract_features(models, dataset, batch_size=batch_size, image_size=image_size,
                             dtype=dtype, workers=workers, progress=progress, engine=engine)
    written = []
    for m, f, settings in zip(models, feats, made_from, strict=True):
        path = Path(out) / f"{m.name}.npz"
        save_features(path, f, dataset, settings)
        written.append(path)
    return written


# What a feature file's record says it was made from, as ``score`` names a difference; the
# model and its checkpoint differ from file to file by design.
_MIXABLE = ("model_sha256", "checkpoint")
_SETTING_NAMES = {"image_size": "--image-size", "dtype": "--dtype", "engine": "--engine",
                  "version": "feature version (of the ddscore-jax that extracted them)",
                  "data": "data set (image names, labels, sizes or modification times)"}


def _check_one_origin(loaded, files: Sequence[Path]) -> None:
    """InputError unless every feature file records the same data set and settings (model and
    checkpoint aside): one line naming two files and the first setting they differ in. A file
    without a record (an older ddscore-jax wrote it) is refused: nothing says what it holds."""
    for f, path in zip(loaded, files, strict=True):
        if f.settings is None:
            raise InputError(f"{path}: feature file carries no record of what it was made from "
                             "(an older ddscore-jax wrote it); extract it again with "
                             "`ddscore-jax extract`")
    first, first_path = loaded[0], files[0]
    for f, path in zip(loaded[1:], files[1:], strict=True):
        keys = sorted({*first.settings, *f.settings} - set(_MIXABLE))
        for key in sorted(keys, key=lambda k: (k == "data", k)):  # the named option first
            a, b = first.settings.get(key), f.settings.get(key)
            if a != b:
                what = _SETTING_NAMES.get(key, key)
                shown = "" if key == "data" else f": {a} and {b}"
                raise InputError(f"{first_path} and {path}: features made with a different "
                                 f"{what}{shown}; extract every model with one setting on one "
                                 "data set into its own folder")
        for array in ("labels", "paths", "classes"):
            if not np.array_equal(getattr(f, array), getattr(first, array)):
                raise InputError(f"{first_path} and {path}: features of different data sets "
                                 f"(their {array} differ)")


def score(feats_dir: str | os.PathLike, *, train_fraction: float = _S.train_fraction,
          seed: int = _S.seed, precision: str | None = None,
          metrics: Sequence[str] = _S.metrics, progress: Progress | bool | None = None,
          resamples: int = _S.resamples) -> Ranking:
    """D-deepscore (or ``metrics``) of every ``*.npz`` feature file in ``feats_dir`` (all from one
    data set). Metrics that need the source classifier (LEEP, NCE) need ``rank``. ``progress``
    hears when the metrics compile (once per feature shape, all metrics together) and run
    (``True``: progress bars on stderr). ``resamples`` bootstrap replicates of the scored images
    give every model's intervals (docs/uncertainty.md); 0 turns them off."""
    settings = ScoreSettings(train_fraction, seed, tuple(metrics), resamples).check(METRICS)
    with bars(progress) as progress:
        return _score_files(feats_dir, settings, precision, progress)


def _score_files(feats_dir, settings: ScoreSettings, precision, progress) -> Ranking:
    train_fraction, seed = settings.train_fraction, settings.seed
    metrics = list(settings.metrics)
    for m in metrics:
        if METRICS[m].needs_head:
            raise InputError(f"--metric {m}: needs the source classifier's predictions, which "
                             "feature files do not hold; use `ddscore-jax rank` for it")
    cache.enable_compilation_cache()
    feats_dir = Path(feats_dir)
    if not feats_dir.is_dir():
        raise InputError(f"{feats_dir}: feature folder does not exist")
    files = sorted(feats_dir.glob("*.npz"))
    if not files:
        raise InputError(f"{feats_dir}: no feature files (*.npz)")
    loaded = [load_features(f) for f in files]
    _check_one_origin(loaded, files)
    first = loaded[0]
    precision = precision or precision_for()
    _check_subset(first.labels, [str(c) for c in first.classes], train_fraction, seed,
                  str(feats_dir))
    features = {f.name: f.features for f in loaded}
    refused = _finite_only(features, str(feats_dir))
    ranked = _score(features, first.labels, train_fraction, seed, precision, str(feats_dir),
                    metrics, progress=progress, resamples=settings.resamples)
    _warn_if_all_tie(ranked, len(first.labels))
    dataset = {"root": str(feats_dir), "n_images": int(len(first.labels)),
               "classes": [str(c) for c in first.classes]}
    return Ranking(ranked, dataset, settings_json(settings, precision), refused=refused,
                   # The feature files' records name each model's checkpoint (no zoo root).
                   zoo={"sha256": {f.name: f.settings["model_sha256"] for f in loaded}})


def _score(features, labels, train_fraction, seed, precision, where, metrics=("ddscore",),
           head_probs=None, progress=None, resamples=0) -> list[ModelScore]:
    """Every model under every metric; ranked by the first metric (models it cannot score last).
    With ``resamples``, each model's uncertainty from that many bootstrap replicates."""
    try:
        results = score_all(features, labels, metrics, head_probs=head_probs,
                            train_fraction=train_fraction, seed=seed, precision=precision,
                            progress=progress)
        spread = {m: {} for m in metrics}
        if resamples:
            points = {m: {n: r.score for n, r in results[m].items()} for m in metrics}
            spread = resample.uncertainty(features, labels, metrics, points,
                                          resamples=resamples, train_fraction=train_fraction,
                                          seed=seed, head_probs=head_probs,
                                          precision=precision, progress=progress)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    out = []
    for name in features:
        first = results[metrics[0]].get(name)
        out.append(ModelScore(
            name, first.score if first else float("nan"), first.block_scores if first else {},
            {m: results[m][name].score if name in results[m] else float("nan") for m in metrics},
            {m: results[m][name].block_scores for m in metrics if name in results[m]},
            {m: spread[m][name] for m in metrics if name in spread[m]}))
    # NaN (no source classifier for LEEP/NCE) sorts last.
    return sorted(out, key=lambda r: (np.isnan(r.score), -np.nan_to_num(r.score)))


def rank(zoo_dir: str | os.PathLike, data_root: str | os.PathLike, *,
         batch_size: int = _E.batch_size, image_size: int = _E.image_size,
         train_fraction: float = _S.train_fraction, seed: int = _S.seed,
         cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
         precision: str | None = None, dtype: Dtype = _E.dtype,
         workers: int | None = _E.workers,
         metrics: Sequence[str] = _S.metrics, progress: Progress | bool | None = None,
         engine: Engine = _E.engine, resamples: int = _S.resamples) -> Ranking:
    """Extract (or reuse cached) features of every zoo model on ``data_root`` and rank them by
    the first of ``metrics`` (D-deepscore by default), reporting all of them, each with its
    intervals from ``resamples`` bootstrap replicates of the scored images (0: none; seeded by
    ``seed``; docs/uncertainty.md). ``progress=True`` draws progress bars on stderr."""
    scoring = ScoreSettings(train_fraction, seed, tuple(metrics), resamples).check(METRICS)
    forward = ExtractSettings(batch_size, image_size, dtype, workers, engine).check()
    with bars(progress) as progress:
        return _rank(zoo_dir, data_root, scoring, forward, cache_dir, use_cache, precision,
                     progress)


def _rank(zoo_dir, data_root, scoring: ScoreSettings, forward: ExtractSettings, cache_dir,
          use_cache: bool, precision, progress) -> Ranking:
    train_fraction, seed = scoring.train_fraction, scoring.seed
    batch_size, image_size, dtype = forward.batch_size, forward.image_size, forward.dtype
    workers, engine = forward.workers, forward.engine
    # The engine that will run keys the cache ("auto" is onnxruntime on some machines, jax on
    # others); a refusal (onnxruntime not installed) comes here, before any work.
    engine = ort_engine.resolve(engine, jax.default_backend(), dtype, jax.device_count())
    forward = replace(forward, engine=engine)
    metrics = list(scoring.metrics)
    interrupts.kept("nothing new was saved" + ("" if use_cache else " (--no-cache)"))
    cache.enable_compilation_cache()  # the forward and the score compile once per machine
    dataset = data.scan(data_root)
    _check_subset(dataset.labels, dataset.classes, train_fraction, seed, str(data_root))
    entries = zoo.read_nonempty(zoo_dir)
    cache_dir = Path(cache_dir) if cache_dir else cache.cache_root() / "features"
    refusal = _cache_refusal(cache_dir) if use_cache else None
    if refusal is not None:  # the ranking does not need the cache: rank without it
        log.warning("%s: cannot write the feature cache (%s); ranking without it (nothing is "
                    "read from or saved to it)", readable(str(cache_dir)),
                    os.strerror(refusal.errno).lower())
        use_cache = False
    # The fingerprint stats every image: only a cached rank needs it.
    fingerprint = cache.dataset_fingerprint(dataset) if use_cache else ""
    n = len(dataset)
    # LEEP/NCE read the source classifier: only models whose checkpoint has one (fc) get it.
    want_head = any(METRICS[m].needs_head for m in metrics)
    features: dict[str, dict[str, np.ndarray]] = {}
    head_probs: dict[str, np.ndarray | None] = {}
    cached = []

    def plan(e: zoo.ZooEntry, entry: cache.Entry | None, quiet: bool) -> tuple[int, str | None]:
        # What is left to compute for model ``e``: (number of blocks, head). A damaged, tampered
        # or misplaced feature entry is reported (stderr, once) and recomputed.
        if entry is not None and e.name not in features:
            f = entry.load(e.name, n, SCORE_BLOCKS, quiet=quiet)
            if f is not None:
                features[e.name] = f
                cached.append(e.name)
        blocks, head = (0 if e.name in features else len(SCORE_BLOCKS)), None
        if want_head and e.config.num_classes:
            if head_probs.get(e.name) is None and entry is not None:
                head_probs[e.name] = cache.load_probabilities(
                    cache.probabilities_path(entry.path), n)
            if head_probs.get(e.name) is None:
                head = "probabilities"
        else:
            head_probs[e.name] = None
        return blocks, head

    if use_cache:
        cache.sweep(cache_dir)
    jobs = [(e, entry, *plan(e, entry, False)) for e, entry in (
        (e, cache.Entry.of(cache_dir, zoo_dir, e, fingerprint, image_size, dtype, engine)
         if use_cache else None) for e in entries)]
    jobs = [j for j in jobs if j[2] or j[3]]
    # One writer per entry: another rank extracting the same models finishes first, then we
    # read what it wrote.
    with cache.Entry.writing([j[1] for j in jobs]) if jobs and use_cache else nullcontext():
        if use_cache:
            jobs = [(e, entry, *plan(e, entry, True)) for e, entry, _, _ in jobs]
            jobs = [j for j in jobs if j[2] or j[3]]
        if jobs:
            models = [LoadedModel(e.name, e.config, zoo.load_state_dict(zoo_dir, e), blocks,
                                  head) for e, _, blocks, head in jobs]
            # Finished batches are kept beside each entry, so an interrupted rank resumes; a job
            # for the probabilities alone keeps them beside the probabilities' entry.
            partials = ([entry.partial if blocks else cache.PartialFeatures(
                            cache.partial_path(cache.probabilities_path(entry.path)))
                         for _, entry, blocks, _ in jobs] if use_cache else None)
            fresh = extract_features(models, dataset, batch_size=batch_size,
                                     image_size=image_size, dtype=dtype, workers=workers,
                                     partials=partials, progress=progress,
                                     engine=engine)
            # A few small writes: an interrupt waits for them, so each model's rows end up
            # either whole in the cache or still resumable beside it.
            with interrupts.deferred("the features being saved to the cache"):
                for (e, entry, blocks, head), out, part in zip(
                        jobs, fresh, partials or [None] * len(jobs), strict=True):
                    if blocks:
                        features[e.name] = {b: out[b] for b in SCORE_BLOCKS}
                        if use_cache:
                            entry.save(features[e.name], dataset)
                    if head:
                        head_probs[e.name] = out[head]
                        if use_cache:
                            cache.save_probabilities(cache.probabilities_path(entry.path),
                                                     out[head])
                    if part is not None:
                        part.clear()
    if use_cache:
        interrupts.kept(f"the features of all {len(entries)} model(s) are in the cache; the next "
                        "run only scores")
    precision = precision or precision_for()
    ordered = {e.name: features[e.name] for e in entries}
    refused = _finite_only(ordered, str(data_root))
    if head_probs:
        head_probs = {n: p for n, p in head_probs.items() if n in ordered}
    ranked = _score(ordered, dataset.labels, train_fraction, seed, precision, str(data_root),
                    metrics, head_probs, progress, scoring.resamples)
    _warn_if_all_tie(ranked, len(dataset))
    info = {"root": readable(str(Path(data_root).resolve())), "n_images": len(dataset),
            "classes": list(dataset.classes)}
    zoo_info = {"root": readable(str(Path(zoo_dir).resolve())),
                "sha256": {e.name: e.sha256 for e in entries}}
    return Ranking(ranked, info, settings_json(scoring, precision, forward), cached, refused,
                   zoo_info)


def convert(sources: str | os.PathLike | Sequence[str | os.PathLike],
            zoo_dir: str | os.PathLike, *, name: str | None = None, overwrite: bool = False,
            progress: Progress | bool | None = None):
    """Import checkpoints (files or folders, one or a list) into the zoo ``zoo_dir``, as
    ``ddscore-jax convert`` does: returns a ``ConvertResult`` (``written``, ``unchanged``,
    ``refused``). ``progress=True`` draws a progress bar on stderr."""
    from ddscore_jax.conversion import convert_sources  # the converters load only when asked

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    with bars(progress) as progress:
        return convert_sources(sources, zoo_dir, name=name, overwrite=overwrite,
                               progress=progress)


def finetune(zoo_dir: str | os.PathLike, data_root: str | os.PathLike,
             results: str | os.PathLike, settings=None, *,
             models: Sequence[str] | None = None, progress: Progress | bool | None = None,
             **options) -> dict:
    """Fine-tune the zoo's models (only ``models`` when given) on ``DATA/train`` and test them on
    ``DATA/valid``, as ``ddscore-jax finetune``: writes and returns the results document.
    ``settings`` is a ``ddscore_jax.finetuning.Settings``, or give its fields as keywords
    (``epochs=3``, ``learning_rates=(1e-3,)``). ``progress=True`` draws progress bars."""
    from ddscore_jax import finetuning

    if settings is not None and options:
        raise InputError("finetune: give either settings or keyword options, not both")
    if settings is None:
        try:
            settings = finetuning.Settings(**options)
        except TypeError as e:
            raise InputError(f"finetune: {e}") from None
    with bars(progress) as progress:
        return finetuning.finetune(zoo_dir, data_root, results, settings, progress=progress,
                                   models=models)


def evaluate(scores: str | os.PathLike | Sequence[str | os.PathLike],
             accuracies: str | os.PathLike, *, bootstrap: int | None = None,
             seed: int | None = None):
    """How well the rankings in ``scores`` (one or more ``rank``/``score`` JSON files) predict
    the fine-tuned accuracies of ``accuracies`` (a ``finetune`` results file), as
    ``ddscore-jax evaluate`` does for one target: an ``Evaluation`` (``to_json()``)."""
    from ddscore_jax import evaluation

    defaults = evaluation.Settings()
    settings = evaluation.Settings(defaults.bootstrap if bootstrap is None else bootstrap,
                                   defaults.seed if seed is None else seed).check()
    if isinstance(scores, (str, os.PathLike)):
        scores = [scores]
    return evaluation.evaluate(scores, accuracies, n_boot=settings.bootstrap, seed=settings.seed)


__all__: Sequence[str] = ["Ranking", "convert", "evaluate", "extract", "finetune", "load_zoo",
                          "rank", "score"]
