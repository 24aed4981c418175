"""Ground truth for the ranking: fine-tune every zoo model on the target, measure held-out accuracy.

Protocol (docs/finetune.md has the reasons):

- Data. ``DATA`` must hold ``train/`` and ``valid/`` (class sub-folders, the same classes). Every
  model is fine-tuned on ``train/`` and tested at the end of each run on ``valid/``: the held-out
  split. The scores to evaluate against these accuracies must come from ``DATA/train`` only
  (``rank ZOO DATA/train``), so that no metric sees a held-out image.
- Network. The whole imported ResNet (conv1 to ``layer4``, with its own BatchNorm layers) plus a
  new zero-initialised linear classifier with one output per target class. A zoo model without
  ``layer4`` (a backbone-only checkpoint) gets one initialised as torchvision does (Kaiming
  convolutions, BatchNorm at weight 1, bias 0), seeded; the results say which models had one.
- Training (:mod:`ddscore_jax.train`). BatchNorm as BatchNorm: batch statistics in training,
  running statistics updated (torch momentum 0.1) and used for testing. Softmax cross-entropy,
  AdamW (or SGD with momentum) with a fixed weight decay, gradients clipped to a global norm,
  cosine decay of the learning rate to zero over the run (or constant), every model on the same
  seeded sequence of batches, no augmentation unless ``flip``.
- Selection, as the transferability literature does it: per model, every learning rate of a
  small grid, each with ``seeds`` repeats; a model's accuracy is the mean over seeds at the rate
  whose mean is best (the seeds' accuracies and their spread are recorded beside it).

Results are a JSON file rewritten atomically after every run (model, learning rate, seed), so an
interrupted run keeps what it finished, and a run already in the file with the same checkpoint,
data and settings is not repeated.

Faults. ``kill -9`` or SIGTERM at any moment leaves the old results file or the new one (the write
is an atomic rename; SIGTERM and Ctrl-C wait for a write under way, so a finished run is kept).
Two ``finetune`` may write one results file at once: each write takes the file's lock
(``.<results>.lock`` beside it, kept) and merges what the other wrote since (its runs, and its
lines for models this one does not fine-tune) before replacing the file; each also re-reads the
file before every run and skips a run the other has finished. A model's line (``models``) is
written only once every run of its grid is in.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import nnx

from ddscore_jax import atomic, cache, data, interrupts, lock, model, train, zoo
from ddscore_jax.atomic import fault_point
from ddscore_jax.errors import InputError
from ddscore_jax.model import ImportedModel, ResNetConfig
from ddscore_jax.progress import Progress
from ddscore_jax.settings import FinetuneSettings

RESULTS_KIND = "ddscore-jax finetune results"
RESULTS_VERSION = 2
HELD_OUT = "valid"
TRAIN = "train"
# The settings class lives with the other commands' (light, so that the CLI parses without JAX).
Settings = FinetuneSettings


def recipe(settings: Settings, learning_rate: float) -> train.Recipe:
    """The trainer's recipe for ``settings`` at one learning rate of the grid."""
    return train.Recipe(batch_size=settings.batch_size, optimizer=settings.optimizer,
                        learning_rate=learning_rate, momentum=settings.momentum,
                        weight_decay=settings.weight_decay, schedule=settings.schedule,
                        clip_norm=settings.clip_norm, flip=settings.flip)


def network(imported: ImportedModel, num_classes: int, *,
            seed: int = 0) -> tuple[ResNetConfig, nnx.State, bool]:
    """The network to fine-tune from a zoo model: ``(config, state, layer4_pretrained)``.

    Every layer the source has, BatchNorm included, as it is. ``layer4`` is the source's when it
    has one, otherwise initialised as torchvision initialises it (:func:`model.init_state_dict`,
    seeded; a source without BatchNorm, a constant-folded graph, gets each block's last conv
    zeroed instead, since nothing else would keep a fresh stage's activations in range). The
    classifier is new and zero (big_vision's fine-tuning default: every class starts at the same
    logit, and the first steps move the head, not the pre-trained weights by random gradients).
    ValueError naming the parameters that do not fit.
    """
    config = imported.config
    full = config.with_classifier(num_classes)
    params = model.init_state_dict(full, seed, zero_init_residual=not full.batchnorm)
    params.update({k: v for k, v in imported.state_dict.items() if not k.startswith("fc.")})
    params["fc.weight"] = np.zeros_like(params["fc.weight"])
    params["fc.bias"] = np.zeros_like(params["fc.bias"])
    return full, model.from_state_dict(params, full), bool(config.depths[3])


# ---------------------------------------------------------------------------------------------
# The command: every zoo model on DATA/train, tested on DATA/valid, results resumable.


@dataclass(frozen=True)
class Split:
    """``DATA/train`` and ``DATA/valid`` as two data sets with the same classes."""

    root: Path
    train: data.Dataset
    held_out: data.Dataset


def scan_split(data_root: str | os.PathLike) -> Split:
    """Index ``DATA/train`` and ``DATA/valid``; InputError if either is missing or they differ."""
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"{root}: data folder does not exist")
    for part in (TRAIN, HELD_OUT):
        if not (root / part).is_dir():
            raise InputError(f"{root}: fine-tuning needs {TRAIN}/ and {HELD_OUT}/ sub-folders "
                             f"(no {part}/); {HELD_OUT}/ is the held-out test split, and scores "
                             f"to evaluate must come from {TRAIN}/ alone")
    train, held = data.scan(root / TRAIN), data.scan(root / HELD_OUT)
    if train.classes != held.classes:
        raise InputError(f"{root / HELD_OUT}: classes {list(held.classes)} differ from those of "
                         f"{root / TRAIN} {list(train.classes)}")
    return Split(root, train, held)


def _load_all(dataset: data.Dataset, image_size: int, what: str,
              progress: Progress | None) -> np.ndarray:
    from ddscore_jax import pipeline

    out = np.empty((len(dataset), image_size, image_size, 3), np.float32)
    for batch in pipeline.iter_batches(dataset, image_size, 64):
        out[batch.start:batch.stop] = batch.images[:batch.stop - batch.start]
        if progress:
            progress(f"loading {what} images", batch.stop, len(dataset))
    return out


def read_results(path: str | os.PathLike) -> dict:
    """A results file as a dict (an empty one if ``path`` does not exist). InputError if bad.

    A file of an older version keeps its other models' entries; its runs are not reused."""
    path = Path(path)
    if not path.exists():
        return {"kind": RESULTS_KIND, "version": RESULTS_VERSION, "runs": [], "models": []}
    try:
        doc = json.loads(path.read_text())
        if doc.get("kind") != RESULTS_KIND or not isinstance(doc.get("models"), list):
            raise ValueError("not a fine-tuning results file")
        if doc.get("version") != RESULTS_VERSION or not isinstance(doc.get("runs"), list):
            doc.update(version=RESULTS_VERSION, runs=[])
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: cannot reuse as a results file ({e})") from None
    return doc


def _run_key(r: dict) -> str:
    """What identifies a run: two runs with one key are the same training, bit for bit."""
    return json.dumps([r.get(k) for k in ("name", "sha256", "learning_rate", "seed", "settings",
                                          "train_fingerprint", "held_out_fingerprint")],
                      sort_keys=True)


def _merge(doc: dict, disk: dict, names: set[str]) -> None:
    """Add to ``doc`` (in place) what another writer put in the results file ``disk`` since
    ``doc`` was read: runs it does not hold, and lines of models not among ``names`` (the models
    ``doc``'s writer summarises itself)."""
    known = {_run_key(r) for r in doc["runs"]}
    doc["runs"] += [r for r in disk["runs"] if isinstance(r, dict) and _run_key(r) not in known]
    listed = {m.get("name") for m in doc["models"] if isinstance(m, dict)}
    doc["models"] += [m for m in disk["models"] if isinstance(m, dict)
                      and m.get("name") not in names and m.get("name") not in listed]


def summarise(entry: zoo.ZooEntry, runs: list[dict], settings: Settings) -> dict:
    """A model's line of the results from its runs (every learning rate x seed of the grid).

    ``held_out_accuracy`` is the mean over seeds at ``best_learning_rate``, the rate with the best
    mean (the smaller rate on a tie); ``seed_accuracies`` and ``held_out_accuracy_sd`` (sample
    standard deviation, 0 for one seed) are at that rate.
    """
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        by_lr.setdefault(r["learning_rate"], []).append(r)
    means = {lr: float(np.mean([r["held_out_accuracy"] for r in rs])) for lr, rs in by_lr.items()}
    best = max(sorted(means), key=lambda lr: means[lr])
    chosen = sorted(by_lr[best], key=lambda r: r["seed"])
    acc = [r["held_out_accuracy"] for r in chosen]
    return {
        "name": entry.name, "arch": entry.config.name, "sha256": entry.sha256,
        "held_out_accuracy": means[best],
        "held_out_accuracy_sd": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
        "seed_accuracies": acc, "seeds": [r["seed"] for r in chosen],
        "best_learning_rate": best,
        "accuracy_by_learning_rate": {f"{lr:g}": means[lr] for lr in sorted(means)},
        "n_held_out": chosen[0]["n_held_out"], "correct": [r["correct"] for r in chosen],
        "final_train_loss": float(np.mean([r["final_train_loss"] for r in chosen])),
        "layer4": chosen[0]["layer4"], "batchnorm": chosen[0]["batchnorm"],
        "steps": chosen[0]["steps"],
        "seconds": round(sum(r["seconds"] for r in runs), 2),
        "settings": settings.to_json(),
        "train_fingerprint": chosen[0]["train_fingerprint"],
        "held_out_fingerprint": chosen[0]["held_out_fingerprint"],
    }


def select(entries: list[zoo.ZooEntry], models: Sequence[str] | None,
           zoo_dir: str | os.PathLike) -> list[zoo.ZooEntry]:
    """The zoo entries named by ``models`` (all for None), in zoo order; InputError for a name
    the zoo lacks, or an empty selection."""
    if models is None:
        return entries
    wanted = list(dict.fromkeys(models))
    known = {e.name for e in entries}
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise InputError(f"{zoo_dir}: no model named {', '.join(unknown)} in this zoo "
                         f"(it has {', '.join(e.name for e in entries)})")
    if not wanted:
        raise InputError(f"{zoo_dir}: no model selected to fine-tune")
    return [e for e in entries if e.name in wanted]


def finetune(zoo_dir: str | os.PathLike, data_root: str | os.PathLike,
             results: str | os.PathLike, settings: Settings = Settings(), *,  # noqa: B008
             progress: Progress | None = None, models: Sequence[str] | None = None) -> dict:
    """Fine-tune every model of ``zoo_dir`` on ``DATA/train`` at every learning rate and seed of
    ``settings``; test each run on ``DATA/valid``.

    Writes (and returns) the results document after every run: ``{"kind", "version", "dataset",
    "settings", "runs": [{"name", "sha256", "learning_rate", "seed", "held_out_accuracy",
    "correct", "n_held_out", "final_train_loss", "layer4", "batchnorm", "steps", "seconds",
    "settings", "train_fingerprint", "held_out_fingerprint"}], "models": [:func:`summarise`]}``,
    models in zoo order, each once all its runs are done. Runs already there with the same
    checkpoint, data, settings, rate and seed are kept, not repeated; entries of models not in
    this zoo are kept too. ``models`` fine-tunes only those zoo models (InputError naming any
    the zoo lacks); the others' entries in the results are kept as they are.
    """
    settings.check()
    results = Path(results)
    if not results.parent.is_dir():
        raise InputError(f"{results}: folder {results.parent} does not exist")
    if results.is_dir():
        raise InputError(f"{results}: --out names a folder; give a file path")
    atomic.check_writable(results)  # before hours of training, not after the first run
    doc = read_results(results)
    split = scan_split(data_root)
    entries = select(zoo.read_nonempty(zoo_dir), models, zoo_dir)
    train_fp = cache.dataset_fingerprint(split.train)
    held_fp = cache.dataset_fingerprint(split.held_out)
    run_settings = settings.run_settings()
    seeds = [settings.seed + k for k in range(settings.seeds)]
    grid = [(lr, s) for lr in settings.learning_rates for s in seeds]

    def same(r: dict, entry: zoo.ZooEntry) -> bool:
        return (r.get("name") == entry.name and r.get("sha256") == entry.sha256
                and r.get("settings") == run_settings and r.get("train_fingerprint") == train_fp
                and r.get("held_out_fingerprint") == held_fp)

    def found(entry: zoo.ZooEntry, lr: float, seed: int) -> dict | None:
        return next((r for r in doc["runs"] if same(r, entry) and r.get("learning_rate") == lr
                     and r.get("seed") == seed), None)

    doc.update({
        "dataset": {"root": str(split.root.resolve()),
                    "train": {"root": str((split.root / TRAIN).resolve()),
                              "n_images": len(split.train)},
                    "held_out": {"root": str((split.root / HELD_OUT).resolve()),
                                 "n_images": len(split.held_out)},
                    "classes": list(split.train.classes)},
        "settings": settings.to_json(),
    })
    names = {e.name for e in entries}
    order = {e.name: i for i, e in enumerate(entries)}

    def refresh() -> None:
        # A model's line stands for its whole grid: it appears once every run of it is in.
        kept = [m for m in doc["models"] if m.get("name") not in names]
        mine = []
        for e in entries:
            runs = [found(e, lr, s) for lr, s in grid]
            if all(runs):
                mine.append(summarise(e, runs, settings))
        doc["models"] = sorted(mine, key=lambda m: order[m["name"]]) + kept

    lock_file = results.with_name(f".{results.name}.lock")

    def catch_up() -> None:
        # Runs another finetune finished in this file meanwhile (the file is replaced
        # atomically: read without the lock, it is whole).
        if results.exists():
            _merge(doc, read_results(results), names)

    def save() -> None:
        # Merge-on-write under the file's lock: a second writer's runs are never overwritten.
        with lock.exclusive(lock_file, f"results file {results}"), \
                interrupts.deferred("the results being written"):
            # Under the lock no other writer is live: a temporary here is a killed one's.
            for stale in results.parent.glob(f".{results.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            catch_up()
            refresh()
            atomic.write_json_atomic(results, doc, step="results")
            # Before the deferred signal is raised: the exit line says what this write kept.
            done = sum(found(e, lr, s) is not None for e in entries for lr, s in grid)
            interrupts.kept(f"{done} of {len(entries) * len(grid)} fine-tuning run(s) are in "
                            f"{results}; the next run resumes from there")

    todo = [(e, lr, s) for e in entries for lr, s in grid if found(e, lr, s) is None]
    before = json.dumps(doc["models"], sort_keys=True)
    refresh()
    interrupts.kept(f"nothing new was written to {results}")
    if not todo:
        if json.dumps(doc["models"], sort_keys=True) != before:
            save()
        return doc

    cache.enable_compilation_cache()
    x_train = _load_all(split.train, settings.image_size, "training", progress)
    x_held = _load_all(split.held_out, settings.image_size, "held-out", progress)
    y_train, y_held = split.train.labels, split.held_out.labels
    steps = train.schedule_length(settings.batch_size, settings.epochs, len(y_train))[1]
    loaded: dict[str, ImportedModel] = {}
    for k, (entry, lr, seed) in enumerate(todo):
        catch_up()
        if found(entry, lr, seed) is not None:
            continue  # another finetune on this file did it meanwhile
        if entry.name not in loaded:
            loaded = {entry.name: zoo.load_model(zoo_dir, entry)}  # one model in memory at a time
        try:
            config, state, pretrained = network(loaded[entry.name], len(split.train.classes),
                                                seed=seed)
        except ValueError as e:
            raise InputError(f"{Path(zoo_dir) / entry.checkpoint}: {e}") from None
        trainer = train.Trainer(config, recipe(settings, lr))
        description = f"fine-tuning {entry.name}, lr {lr:g}, seed {seed} ({k + 1}/{len(todo)})"
        started = time.monotonic()

        def on_step(i: int, total: int, description: str = description) -> None:
            if progress:
                progress(description, i, total)

        state, loss = trainer.train(state, x_train, y_train, steps, seed=seed, on_step=on_step)
        pred = np.argmax(trainer.logits(state, x_held, min(settings.batch_size, 256)), axis=1)
        correct = int(np.sum(pred == y_held))
        doc["runs"].append({
            "name": entry.name, "sha256": entry.sha256, "learning_rate": lr, "seed": seed,
            "held_out_accuracy": correct / len(y_held), "n_held_out": len(y_held),
            "correct": correct, "final_train_loss": loss,
            "layer4": "pretrained" if pretrained else "fresh", "batchnorm": config.batchnorm,
            "steps": steps, "seconds": round(time.monotonic() - started, 2),
            "settings": run_settings, "train_fingerprint": train_fp,
            "held_out_fingerprint": held_fp,
        })
        fault_point("finetune:run")
        save()
    return doc
