"""The public entry points: :func:`extract`, :func:`score`, :func:`rank`. The CLI calls these."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import numpy as np

from ddscore_jax import cache, data, interrupts, ort_engine, zoo
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
from ddscore_jax.progress import Progress
from ddscore_jax.settings import Dtype, Engine, ExtractSettings, ScoreSettings
from ddscore_jax.settings import to_json as settings_json

log = logging.getLogger(__name__)

# Keyword defaults are read from the settings classes: one copy of each default.
_E, _S = ExtractSettings, ScoreSettings


@dataclass
class Ranking:
    """Models ranked best first, with the data set and every setting that changed the numbers."""

    models: list[ModelScore]
    dataset: dict
    settings: dict
    cached: list[str] = field(default_factory=list)  # models whose features came from the cache
    refused: list[str] = field(default_factory=list)  # models not ranked: non-finite features

    def to_json(self) -> dict:
        return {
            "models": [
                {"name": m.name, "rank": i + 1, "score": _finite(m.score),
                 "block_scores": m.block_scores,
                 "metrics": {k: _finite(v) for k, v in m.metrics.items()},
                 "metric_block_scores": {k: {b: _finite(v) for b, v in blocks.items()}
                                         for k, blocks in m.metric_block_scores.items()}}
                for i, m in enumerate(self.models)
            ],
            "dataset": self.dataset,
            "settings": self.settings,
            "refused": self.refused,
        }


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
    Path(folder).mkdir(parents=True, exist_ok=True)


def _cache_refusal(folder: Path) -> OSError | None:
    """The OSError of a feature cache location that refuses writes (a read-only mount, a
    forbidden folder), or None when features can be cached there (the folder is created). Any
    other OSError (a file in the way, a full disk) is raised: that one is the user's to fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
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
            progress: Progress | None = None,
            engine: Engine = _E.engine) -> list[Path]:
    """Write ``out/<model>.npz`` (docs/interface.md) for every zoo model; return the files."""
    ExtractSettings(batch_size, image_size, dtype, workers, engine).check()
    _output_folder(out)
    dataset = data.scan(data_root)
    _, models = load_zoo(zoo_dir)
    cache.enable_compilation_cache()
    feats = extract_features(models, dataset, batch_size=batch_size, image_size=image_size,
                             dtype=dtype, workers=workers, progress=progress, engine=engine)
    written = []
    for m, f in zip(models, feats, strict=True):
        path = Path(out) / f"{m.name}.npz"
        save_features(path, f, dataset)
        written.append(path)
    return written


def score(feats_dir: str | os.PathLike, *, train_fraction: float = _S.train_fraction,
          seed: int = _S.seed, precision: str | None = None,
          metrics: Sequence[str] = _S.metrics, progress: Progress | None = None) -> Ranking:
    """D-deepscore (or ``metrics``) of every ``*.npz`` feature file in ``feats_dir`` (all from one
    data set). Metrics that need the source classifier (LEEP, NCE) need ``rank``. ``progress``
    hears when the metrics compile (once per feature shape, all metrics together) and run."""
    settings = ScoreSettings(train_fraction, seed, tuple(metrics)).check()
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
    first = loaded[0]
    for f, path in zip(loaded[1:], files[1:], strict=True):
        if not (np.array_equal(f.labels, first.labels) and np.array_equal(f.paths, first.paths)):
            raise InputError(f"{path}: features are of another data set than {files[0].name}")
    precision = precision or precision_for()
    _check_subset(first.labels, [str(c) for c in first.classes], train_fraction, seed,
                  str(feats_dir))
    features = {f.name: f.features for f in loaded}
    refused = _finite_only(features, str(feats_dir))
    ranked = _score(features, first.labels, train_fraction, seed, precision, str(feats_dir),
                    metrics, progress=progress)
    _warn_if_all_tie(ranked, len(first.labels))
    dataset = {"root": str(feats_dir), "n_images": int(len(first.labels)),
               "classes": [str(c) for c in first.classes]}
    return Ranking(ranked, dataset, settings_json(settings, precision), refused=refused)


def _score(features, labels, train_fraction, seed, precision, where, metrics=("ddscore",),
           head_probs=None, progress=None) -> list[ModelScore]:
    """Every model under every metric; ranked by the first metric (models it cannot score last)."""
    try:
        results = score_all(features, labels, metrics, head_probs=head_probs,
                            train_fraction=train_fraction, seed=seed, precision=precision,
                            progress=progress)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    out = []
    for name in features:
        first = results[metrics[0]].get(name)
        out.append(ModelScore(
            name, first.score if first else float("nan"), first.block_scores if first else {},
            {m: results[m][name].score if name in results[m] else float("nan") for m in metrics},
            {m: results[m][name].block_scores for m in metrics if name in results[m]}))
    # NaN (no source classifier for LEEP/NCE) sorts last.
    return sorted(out, key=lambda r: (np.isnan(r.score), -np.nan_to_num(r.score)))


def rank(zoo_dir: str | os.PathLike, data_root: str | os.PathLike, *,
         batch_size: int = _E.batch_size, image_size: int = _E.image_size,
         train_fraction: float = _S.train_fraction, seed: int = _S.seed,
         cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
         precision: str | None = None, dtype: Dtype = _E.dtype,
         workers: int | None = _E.workers,
         metrics: Sequence[str] = _S.metrics, progress: Progress | None = None,
         engine: Engine = _E.engine) -> Ranking:
    """Extract (or reuse cached) features of every zoo model on ``data_root`` and rank them by
    the first of ``metrics`` (D-deepscore by default), reporting all of them."""
    scoring = ScoreSettings(train_fraction, seed, tuple(metrics)).check()
    forward = ExtractSettings(batch_size, image_size, dtype, workers, engine).check()
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
                    metrics, head_probs, progress)
    _warn_if_all_tie(ranked, len(dataset))
    info = {"root": readable(str(Path(data_root).resolve())), "n_images": len(dataset),
            "classes": list(dataset.classes)}
    return Ranking(ranked, info, settings_json(scoring, precision, forward), cached, refused)


__all__: Sequence[str] = ["Ranking", "extract", "rank", "score", "load_zoo"]
