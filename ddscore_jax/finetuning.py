"""Ground truth for the ranking: fine-tune every zoo model on the target, measure held-out accuracy.

Protocol (docs/finetune.md has the reasons):

- Data. ``DATA`` holds ``train/``, ``valid/`` and, best, ``test/`` (class sub-folders, the same
  classes). Every model is fine-tuned on ``train/``; each run is tested once, after its last step,
  on the selection split and on the test split. ``valid/`` is the selection split and ``test/``
  the test split. Without ``test/``, ``valid/`` is cut in two, per class with a fixed seed
  (:data:`SPLIT_SEED`): the first half (rounded down) selects, the rest tests; with a grid of one
  learning rate there is nothing to choose and all of ``valid/`` tests. The scores to evaluate
  against these accuracies must come from ``DATA/train`` only (``rank ZOO DATA/train``), so that
  no metric sees a held-out image.
- Network. The whole imported ResNet (conv1 to ``layer4``, with its own BatchNorm layers) plus a
  new zero-initialised linear classifier with one output per target class. A zoo model without
  ``layer4`` (a backbone-only checkpoint) gets one initialised as torchvision does (Kaiming
  convolutions, BatchNorm at weight 1, bias 0), seeded; the results say which models had one.
- Training (:mod:`ddscore_jax.train`). BatchNorm as BatchNorm: batch statistics in training,
  running statistics updated (torch momentum 0.1) and used for testing. Softmax cross-entropy,
  AdamW (or SGD with momentum) with a fixed weight decay, gradients clipped to a global norm,
  cosine decay of the learning rate to zero over the run (or constant), every model on the same
  seeded sequence of batches, no augmentation unless ``flip``.
- Selection, as the transferability literature does it, without its optimism: per model, every
  learning rate of a small grid, each with ``seeds`` repeats; the rate is the one whose mean
  accuracy on the *selection* split is best, and the model's accuracy is the mean over seeds of
  its *test* accuracy at that rate (the seeds' accuracies, their spread and every run's test
  predictions are recorded beside it). No test image takes part in any choice.

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
# 3: a selection split beside the test split; runs record both accuracies and the predictions.
RESULTS_VERSION = 3
TRAIN = "train"
SELECTION = "valid"
TEST = "test"
HELD_OUT = SELECTION  # the held-out folder a DATA of two splits has (older name)
# The cut of valid/ into selection and test halves (when DATA has no test/) does not move with
# --seed: changing the training seeds must not change which images are tested.
SPLIT_SEED = 0
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
    """The training, selection and test images of ``DATA``, with the same classes.

    ``selection`` is None when nothing is chosen (one learning rate) and ``DATA`` has no
    ``test/``: then all of ``valid/`` tests. ``layout`` says where each part came from.
    """

    root: Path
    train: data.Dataset
    selection: data.Dataset | None
    test: data.Dataset
    layout: str

    @property
    def held_out(self) -> data.Dataset:
        return self.test


def _subset(dataset: data.Dataset, keep: np.ndarray) -> data.Dataset:
    keep = np.sort(keep)
    return data.Dataset(dataset.root, tuple(dataset.paths[i] for i in keep),
                        dataset.labels[keep], dataset.classes)


def halve(dataset: data.Dataset, seed: int = SPLIT_SEED) -> tuple[data.Dataset, data.Dataset]:
    """``(selection, test)``: per class, a seeded permutation's first half (rounded down) and the
    rest, so a class of one image is tested, never only selected on."""
    rng = np.random.default_rng(seed)
    pick, rest = [], []
    for c in range(len(dataset.classes)):
        idx = rng.permutation(np.flatnonzero(dataset.labels == c))
        pick.append(idx[:len(idx) // 2])
        rest.append(idx[len(idx) // 2:])
    return (_subset(dataset, np.concatenate(pick).astype(np.int64)),
            _subset(dataset, np.concatenate(rest).astype(np.int64)))


def scan_split(data_root: str | os.PathLike, *, choose: bool = True) -> Split:
    """Index ``DATA``'s splits (module docstring); ``choose``: whether a learning rate is to be
    chosen (more than one in the grid). InputError if a split is missing or the classes differ."""
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"{root}: data folder does not exist")
    for part in (TRAIN, SELECTION):
        if not (root / part).is_dir():
            raise InputError(f"{root}: fine-tuning needs {TRAIN}/ and {SELECTION}/ sub-folders "
                             f"(no {part}/), and best a {TEST}/ too: {SELECTION}/ selects the "
                             f"learning rate, {TEST}/ gives the accuracy, and scores to "
                             f"evaluate must come from {TRAIN}/ alone")
    parts = [TRAIN, SELECTION] + ([TEST] if (root / TEST).is_dir() else [])
    scanned = {part: data.scan(root / part) for part in parts}
    train = scanned[TRAIN]
    for part in parts[1:]:
        if scanned[part].classes != train.classes:
            raise InputError(f"{root / part}: classes {list(scanned[part].classes)} differ from "
                             f"those of {root / TRAIN} {list(train.classes)}")
    if TEST in scanned:
        return Split(root, train, scanned[SELECTION], scanned[TEST],
                     f"{SELECTION}/ selects, {TEST}/ tests")
    if not choose:
        return Split(root, train, None, scanned[SELECTION],
                     f"one learning rate, nothing chosen: all of {SELECTION}/ tests")
    selection, test = halve(scanned[SELECTION])
    if not len(selection):
        raise InputError(f"{root / SELECTION}: too few images to halve into a selection and a "
                         f"test split (one per class); add a {TEST}/ folder or more images")
    return Split(root, train, selection, test,
                 f"no {TEST}/: {SELECTION}/ halved per class (seed {SPLIT_SEED}), the first half "
                 "selects, the rest tests")


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

    ``best_learning_rate`` is the rate with the best mean *selection* accuracy (the smaller rate
    on a tie; the only rate when nothing is chosen); ``held_out_accuracy`` is the mean *test*
    accuracy over the seeds at that rate, with ``seed_accuracies``, ``held_out_accuracy_sd``
    (sample standard deviation, 0 for one seed) and ``test_correct`` (per seed, one character per
    test image in the order of ``dataset.test.labels``: 1 right, 0 wrong) at that rate.
    """
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        by_lr.setdefault(r["learning_rate"], []).append(r)
    test = {lr: float(np.mean([r["held_out_accuracy"] for r in rs])) for lr, rs in by_lr.items()}
    select = {lr: float(np.mean([r["selection_accuracy"] for r in rs]))
              for lr, rs in by_lr.items() if all(r.get("selection_accuracy") is not None
                                                 for r in rs)}
    if len(by_lr) > 1 and len(select) != len(by_lr):
        raise ValueError(f"{entry.name}: a grid of rates needs a selection accuracy per run")
    best = max(sorted(by_lr), key=lambda lr: select.get(lr, 0.0))
    chosen = sorted(by_lr[best], key=lambda r: r["seed"])
    acc = [r["held_out_accuracy"] for r in chosen]
    return {
        "name": entry.name, "arch": entry.config.name, "sha256": entry.sha256,
        "held_out_accuracy": test[best],
        "held_out_accuracy_sd": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
        "seed_accuracies": acc, "seeds": [r["seed"] for r in chosen],
        "best_learning_rate": best,
        "selected_on": "selection" if select else "nothing to choose",
        "selection_accuracy": select.get(best),
        "accuracy_by_learning_rate": {f"{lr:g}": test[lr] for lr in sorted(test)},
        "selection_accuracy_by_learning_rate": {f"{lr:g}": select[lr] for lr in sorted(select)},
        "n_held_out": chosen[0]["n_held_out"], "correct": [r["correct"] for r in chosen],
        "test_correct": [r["test_correct"] for r in chosen],
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
    ``settings``; test each run on the selection and test splits (:func:`scan_split`).

    Writes (and returns) the results document after every run: ``{"kind", "version", "dataset",
    "settings", "runs": [{"name", "sha256", "learning_rate", "seed", "held_out_accuracy" (test),
    "correct", "n_held_out", "test_correct", "test_predictions", "selection_accuracy" (None
    without a selection split), "selection_correct", "n_selection", "final_train_loss", "layer4",
    "batchnorm", "steps", "seconds", "settings", "train_fingerprint", "held_out_fingerprint",
    "selection_fingerprint"}], "models": [:func:`summarise`]}``; ``dataset`` names every split's
    folder and size, how they were made (``layout``), and the test labels in order,
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
    split = scan_split(data_root, choose=len(settings.learning_rates) > 1)
    entries = select(zoo.read_nonempty(zoo_dir), models, zoo_dir)
    train_fp = cache.dataset_fingerprint(split.train)
    held_fp = cache.dataset_fingerprint(split.test)
    select_fp = None if split.selection is None else cache.dataset_fingerprint(split.selection)
    run_settings = settings.run_settings()
    seeds = [settings.seed + k for k in range(settings.seeds)]
    grid = [(lr, s) for lr in settings.learning_rates for s in seeds]

    def same(r: dict, entry: zoo.ZooEntry) -> bool:
        return (r.get("name") == entry.name and r.get("sha256") == entry.sha256
                and r.get("settings") == run_settings and r.get("train_fingerprint") == train_fp
                and r.get("held_out_fingerprint") == held_fp
                and r.get("selection_fingerprint") == select_fp)

    def found(entry: zoo.ZooEntry, lr: float, seed: int) -> dict | None:
        return next((r for r in doc["runs"] if same(r, entry) and r.get("learning_rate") == lr
                     and r.get("seed") == seed), None)

    test_root = str(split.test.root.resolve())
    test_block = {"root": test_root, "n_images": len(split.test),
                  "labels": [int(v) for v in split.test.labels]}
    doc.update({
        "dataset": {"root": str(split.root.resolve()), "layout": split.layout,
                    "train": {"root": str((split.root / TRAIN).resolve()),
                              "n_images": len(split.train)},
                    "selection": None if split.selection is None else {
                        "root": str(split.selection.root.resolve()),
                        "n_images": len(split.selection)},
                    "test": test_block,
                    # The older name of the test split, which readers of version 2 look for.
                    "held_out": {"root": test_root, "n_images": len(split.test)},
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
    # Selection and test images in one array: each run's network sees them in one pass.
    n_select = 0 if split.selection is None else len(split.selection)
    x_held = _load_all(split.test, settings.image_size, "test", progress)
    if split.selection is not None:
        x_held = np.concatenate([_load_all(split.selection, settings.image_size, "selection",
                                           progress), x_held])
    y_train, y_held = split.train.labels, split.test.labels
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
        chose, pred = pred[:n_select], pred[n_select:]
        right = pred == y_held
        correct = int(np.sum(right))
        picked = (None if split.selection is None
                  else int(np.sum(chose == split.selection.labels)))
        doc["runs"].append({
            "name": entry.name, "sha256": entry.sha256, "learning_rate": lr, "seed": seed,
            "held_out_accuracy": correct / len(y_held), "n_held_out": len(y_held),
            "correct": correct, "test_correct": "".join("1" if v else "0" for v in right),
            "test_predictions": [int(v) for v in pred],
            "selection_accuracy": None if picked is None else picked / n_select,
            "selection_correct": picked, "n_selection": n_select,
            "final_train_loss": loss,
            "layer4": "pretrained" if pretrained else "fresh", "batchnorm": config.batchnorm,
            "steps": steps, "seconds": round(time.monotonic() - started, 2),
            "settings": run_settings, "train_fingerprint": train_fp,
            "held_out_fingerprint": held_fp, "selection_fingerprint": select_fp,
        })
        fault_point("finetune:run")
        save()
    return doc
