"""Transfer benchmark: how well does each transferability metric predict fine-tuned accuracy?

Builds everything from data that ships inside packages (nothing is downloaded):

- a zoo of ResNet18s, each pre-trained from scratch (whole network, conv1 to fc) on one source
  domain: scikit-learn's handwritten ``digits``; ``textures``, crops of ten scikit-image grayscale
  images (brick, grass, gravel, camera, ...); ``faces``, scikit-image's ``lfw_subset`` (face or
  not); ``scenes``, crops of eight scikit-image colour images (astronaut, chelsea, ...). The full
  run adds a briefly trained ``*_short`` model per source and a never-trained ``random`` control;
- a suite of targets, each a ``train/`` + ``valid/`` image folder written as PNG files from data
  the pre-training never saw: ``defects`` (clean / scratch / spot on the unseen rows of brick, grass
  and gravel), ``digits`` (the unseen half of the digits), ``faces`` (the unseen lfw images),
  ``scenes`` (the unseen rows of five colour images).

Then, per target, it does what a user would: scores every model on ``train/`` with every metric
(``rank --metric <all of them>``), fine-tunes every model (``finetune``; the ground truth is the
accuracy on ``valid/``), and compares the two (``evaluate``). Prints weighted Kendall tau per
metric and target.

Any image sets can take part, as folders of classes (torchvision ``ImageFolder`` layout; class
names with spaces work): ``--source NAME=DIR`` pre-trains one more ResNet18 (and its
short-trained copy) on every image of DIR (``--source-images-per-class`` caps it);
``--target NAME=DIR`` replaces the packaged targets by DIR (used as it is when it holds
``train/`` and ``valid/``, else split per class with a seed: ``--train-per-class`` images to
``train/``, up to ``--valid-per-class`` of the rest to ``valid/``, the selection split, and with
``--test-per-class`` up to that many of the rest to ``test/``, the test split). Scoring sees only
``train/``; ``finetune`` chooses each model's rate on the selection split and reports the test
split; a model pre-trained on a target's own folder is left out of that target's zoo.
``benchmarks/elpv_folder.py DIR`` writes the elpv solar-cell set (PyPI ``elpv-dataset``, CC
BY-NC-SA 4.0) as such a folder.

Resumable: an ``--out`` that holds a run continues it. Each pre-trained model joins the zoo as
it finishes (``zoo/pretraining.json`` records it and the plan, which must match), and
``finetune`` never repeats a finished run; ``--zoo-only`` stops after the zoo.

    python benchmarks/transfer_zoo.py            # full: 9 models x 4 targets, 32 px
    python benchmarks/transfer_zoo.py --small    # smoke test: 3 models x 2 targets, minutes
    python benchmarks/transfer_zoo.py --out DIR  # keep the zoo, targets, results and figures
    bash benchmarks/results/transfer_defects4_64px/run.sh   # the four real defect targets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ddscore_jax import cache, data, evaluation, finetuning, model, sources, train, zoo
from ddscore_jax.atomic import write_json_atomic
from ddscore_jax.errors import InputError

ARCH = "resnet18"
SEED = 0
TEXTURES = sources.TEXTURES
SCENES = sources.SCENES
TARGET_SCENES = SCENES[:5]
DEFECT_SURFACES = ("brick", "grass", "gravel")
# Pre-training gives every source this many outputs (the largest source has 10 classes), so all
# sources share one compiled train step; a 2-class source's other logits learn to stay low, which
# changes neither its features nor LEEP/NCE (classes it never predicts).
SOURCE_CLASSES = 10


@dataclass(frozen=True)
class Config:
    image_size: int
    sources: tuple[str, ...]
    short_models: bool  # add a briefly pre-trained copy of every source
    random_model: bool  # add a never-trained control
    pretrain_steps: int
    pretrain_batch: int
    # Per target: (name, images per class in train/ + valid/, of which in train/).
    targets: tuple[tuple[str, int, int], ...]
    finetune_settings: finetuning.Settings
    pretrain_flip: bool = False  # random horizontal flips in pre-training


FULL = Config(
    image_size=32, sources=("digits", "textures", "faces", "scenes"),
    targets=(("defects", 40, 16), ("digits", 40, 16), ("faces", 30, 16), ("scenes", 40, 16)),
    short_models=True, random_model=True, pretrain_steps=150, pretrain_batch=64,
    finetune_settings=finetuning.Settings(image_size=32, epochs=10),
)
# Sized to run in two to three minutes on two quiet cores, compilation included. The cost is the
# number of images through the network (pre-training and fine-tuning steps times batch size).
SMALL = Config(
    image_size=32, sources=("digits", "textures", "faces"),
    targets=(("defects", 20, 12), ("digits", 10, 5)),
    short_models=False, random_model=False, pretrain_steps=40, pretrain_batch=16,
    # One learning rate: a smoke test of the pipeline, not a ground truth.
    finetune_settings=finetuning.Settings(image_size=32, epochs=6, learning_rates=(1e-3,)),
)


# ---------------------------------------------------------------------------------------------
# Images: uint8, (n, h, w) grayscale or (n, h, w, 3) colour (ddscore_jax.sources).

Labelled = sources.Labelled
to_inputs = sources.to_inputs


def source_task(name: str) -> Labelled:
    if name == "digits":
        return sources.digits("source")
    if name == "faces":
        return sources.faces("source")
    if name == "textures":
        return sources.picture_crops(name, TEXTURES, "source", 100, seed=SEED)
    if name == "scenes":
        return sources.picture_crops(name, SCENES, "source", 100, color=True, seed=SEED)
    raise ValueError(name)


def target_task(name: str, per_class: int) -> Labelled:
    rng = np.random.default_rng(SEED + 1)
    if name == "defects":
        surfaces = [sources.rows(sources.picture(s), "target") for s in DEFECT_SURFACES]
        # Marks wider and spots larger than the demo's: they must survive the resize to 32 px.
        return sources.defects(surfaces, per_class, rng, scratch_width=(2.5, 4.0),
                               spot_radius=(0.12, 0.22))
    if name == "scenes":
        return sources.picture_crops(name, TARGET_SCENES, "target", per_class, color=True,
                                     seed=SEED + 2)
    task = sources.digits("target") if name == "digits" else sources.faces("target")
    # At most per_class images of each class, drawn with a seed.
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(task.labels == c))[:per_class]
                                   for c in range(len(task.classes))]))
    return Labelled(name, task.images[keep], task.labels[keep], task.classes)


def write_target(task: Labelled, folder: Path, train_per_class: int) -> None:
    """``folder/{train,valid}/<class>/NNN.png``: a seeded stratified split, train_per_class each."""
    rng = np.random.default_rng(SEED + 3)
    for c, cls in enumerate(task.classes):
        idx = rng.permutation(np.flatnonzero(task.labels == c))
        for part, chosen in (("train", idx[:train_per_class]), ("valid", idx[train_per_class:])):
            (folder / part / cls).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(task.images[i]).save(folder / part / cls / f"{i:04d}.png")


# ---------------------------------------------------------------------------------------------
# The zoo.


def _addition(name: str, config: model.ResNetConfig, state) -> zoo.Addition:
    sd = model.to_state_dict(state)
    return zoo.Addition(name=name, source=Path(f"benchmark:{name}"), source_format="benchmark",
                        sha256=sources.params_digest(sd), model=model.ImportedModel(config, sd))


def _fresh(config: model.ResNetConfig, seed: int):
    # A ResNet18 with BatchNorm, initialised as torchvision does.
    return model.from_state_dict(model.init_state_dict(config, seed), config)


PRETRAINING_LOG = "pretraining.json"


def build_zoo(cfg: Config, zoo_dir: Path, log, folders: Sequence[Folder] = (),
              images_per_class: int | None = None,
              short_folders_only: bool = False) -> dict[str, Path | None]:
    """Pre-train a ResNet18 per source (and the short and random extras); write the zoo.

    ``folders`` are more sources, each pre-trained on (at most ``images_per_class`` of each
    class of; all by default) its images; ``short_folders_only`` gives only them a
    short-trained copy. Resumable: each model joins the zoo as soon as it is trained, with its
    line in ``zoo_dir/pretraining.json``, and a model already there is not trained again (the
    log also holds the recipe, which a resumed run must share). Returns ``{model: the source
    folder it was pre-trained on, or None}``.
    """
    # Flips: the one augmentation the trainer has; pre-training sees each image several times.
    recipe = train.Recipe(batch_size=cfg.pretrain_batch, optimizer="adamw", learning_rate=1e-3,
                          weight_decay=1e-4, schedule="cosine", flip=cfg.pretrain_flip)
    plan_doc = {"image_size": cfg.image_size, "recipe": dataclasses.asdict(recipe),
                "pretrain_steps": cfg.pretrain_steps, "images_per_class": images_per_class,
                "sources": list(cfg.sources), "folders": {f.name: str(f.path) for f in folders},
                "short_models": cfg.short_models, "short_folders_only": short_folders_only,
                "random_model": cfg.random_model}
    log_path = zoo_dir / PRETRAINING_LOG
    present = {e.name for e in zoo.read(zoo_dir, allow_missing=True)}
    if present and not log_path.exists():
        raise ValueError(f"{zoo_dir}: holds a zoo of an older benchmark (no {PRETRAINING_LOG}); "
                         "give a new --out")
    done = json.loads(log_path.read_text()) if log_path.exists() else {"plan": plan_doc,
                                                                         "models": {}}
    if done["plan"] != plan_doc:
        raise ValueError(f"{zoo_dir}: holds a zoo pre-trained with other settings "
                         f"({log_path}); give a new --out")
    tasks = [(name, None) for name in cfg.sources] + [(f.name, f.path) for f in folders]
    lengths_of = {}
    for name, folder in tasks:
        lengths = [("", cfg.pretrain_steps)]
        if cfg.short_models and (folder is not None or not short_folders_only):
            lengths.append(("_short", max(1, cfg.pretrain_steps // 6)))
        lengths_of[name] = lengths
    origin: dict[str, Path | None] = {f"{ARCH}_{name}{suffix}": folder
                                      for name, folder in tasks for suffix, _ in lengths_of[name]}
    if cfg.random_model:
        origin[f"{ARCH}_random"] = None
    missing = [n for n in origin if n not in present or n not in done["models"]]
    if not missing:
        log(f"  the zoo is complete ({len(origin)} models): nothing to pre-train")
        return origin
    # Every folder, even one whose models are done: the head width depends on all of them.
    loaded = {f.name: load_folder(f.path, cfg.image_size, images_per_class, log)
              for f in folders}
    # One head width for every source (so one compiled train step): the widest source's.
    width = max([SOURCE_CLASSES] + [len(classes) for _, _, classes in loaded.values()])
    config = dataclasses.replace(model.CONFIGS[ARCH], num_classes=width)
    trainer = train.Trainer(config, recipe)

    def record(name: str, state, line: dict) -> None:
        zoo.add(zoo_dir, [_addition(name, config, state)], overwrite=True)
        done["models"][name] = line
        write_json_atomic(log_path, done)

    for k, (name, folder) in enumerate(tasks):
        if not any(f"{ARCH}_{name}{suffix}" in missing for suffix, _ in lengths_of[name]):
            continue
        if folder is None:
            task = source_task(name)
            x, y = to_inputs(task.images, cfg.image_size), task.labels
        else:
            x, y, _ = loaded[name]
        for suffix, steps in lengths_of[name]:
            full = f"{ARCH}_{name}{suffix}"
            if full not in missing:
                continue
            started = time.monotonic()
            state = _fresh(config, SEED + k)
            state, loss = trainer.train(state, x, y, steps, seed=SEED + k)
            probe = np.random.default_rng(SEED).permutation(len(x))[:128]
            acc = trainer.accuracy(state, x[probe], y[probe], 128)
            seconds = time.monotonic() - started
            log(f"  pre-trained {full}: {len(x)} images, {steps} steps, loss {loss:.3f}, "
                f"accuracy on {len(probe)} of them {acc:.3f}, {seconds:.0f} s, "
                f"load {os.getloadavg()[0]:.1f}")
            record(full, state, {"images": len(x), "steps": steps, "loss": loss,
                                 "train_accuracy_probe": acc, "seconds": round(seconds, 1)})
    if f"{ARCH}_random" in missing:
        record(f"{ARCH}_random", _fresh(config, SEED + 99), {"steps": 0})
    return origin


# ---------------------------------------------------------------------------------------------
# Image sets given as folders.


@dataclass(frozen=True)
class Folder:
    name: str
    path: Path


def parse_folder(text: str, option: str) -> Folder:
    """``NAME=DIR`` -> Folder; ValueError naming the option and the problem."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{option} {text!r}: expected NAME=DIR")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"{option} {text!r}: NAME may hold letters, digits, '_', '.', '-'")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{option} {text!r}: {folder} is not a folder")
    return Folder(name, folder.resolve())


def _has_split(folder: Path) -> bool:
    return all((folder / part).is_dir() for part in data.SPLITS)


def load_folder(folder: Path, image_size: int, per_class: int | None,
                log) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every image of a folder of classes (``train/`` and ``valid/`` together when it has them),
    at most ``per_class`` of each class drawn with the seed, preprocessed for the network."""
    from ddscore_jax import pipeline

    dataset = data.scan(folder)
    rng = np.random.default_rng(SEED + 5)
    keep = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(dataset.labels == c))[:per_class]
        for c in range(len(dataset.classes))]))
    dataset = data.Dataset(dataset.root, tuple(dataset.paths[i] for i in keep),
                           dataset.labels[keep], dataset.classes)
    x = np.empty((len(dataset), image_size, image_size, 3), np.float32)
    for batch in pipeline.iter_batches(dataset, image_size, 64):
        x[batch.start:batch.stop] = batch.images[:batch.stop - batch.start]
    log(f"  source {folder}: {len(dataset)} images, {len(dataset.classes)} classes")
    return x, dataset.labels, dataset.classes


def split_target(folder: Path, dest: Path, train_per_class: int,
                 valid_per_class: int | None, test_per_class: int | None = None) -> Path:
    """The target's split folder: ``folder`` itself when it has ``train/`` + ``valid/``, else a
    seeded stratified split of its images into ``dest`` (links to the originals). Per class:
    ``train_per_class`` to ``train/`` (half the class when it is smaller than twice that); with
    ``test_per_class``, up to ``valid_per_class`` of the others to ``valid/`` (the selection
    split; at most half of what is left) and up to ``test_per_class`` of the rest to ``test/``;
    without it, up to ``valid_per_class`` of the others to ``valid/`` alone."""
    if _has_split(folder):
        return folder
    dataset = data.scan(folder)
    rng = np.random.default_rng(SEED + 3)
    for c, cls in enumerate(dataset.classes):
        idx = rng.permutation(np.flatnonzero(dataset.labels == c))
        n_train = min(train_per_class, len(idx) // 2)
        if n_train < 1:
            raise ValueError(f"{folder / cls}: needs at least 2 images to split, has {len(idx)}")
        rest = idx[n_train:]
        if test_per_class is None:
            parts = [("valid", rest if valid_per_class is None else rest[:valid_per_class])]
        else:
            n_select = len(rest) // 2 if valid_per_class is None else min(valid_per_class,
                                                                          len(rest) // 2)
            parts = [("valid", rest[:n_select]), ("test", rest[n_select:][:test_per_class])]
        for part, chosen in (("train", idx[:n_train]), *parts):
            (dest / part / cls).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                src = dataset.root / dataset.paths[i]
                link = dest / part / cls / f"{i:05d}_{src.name}"
                if link.is_symlink() or link.exists():
                    continue  # a resumed run: the same seed made the same split
                try:
                    link.symlink_to(src)
                except OSError:  # no symlinks here: copy
                    shutil.copyfile(src, link)
    return dest


def target_zoo(zoo_dir: Path, dest: Path, excluded: Sequence[str]) -> Path:
    """``zoo_dir`` without the ``excluded`` models, as a zoo folder of its own (links to the
    checkpoints): a model pre-trained on a target's own images has no place in its ranking."""
    if not excluded:
        return zoo_dir
    doc = json.loads((zoo_dir / "zoo.json").read_text())
    doc["models"] = [m for m in doc["models"] if m["name"] not in excluded]
    for m in doc["models"]:
        link = dest / m["checkpoint"]
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():  # a resumed run: relink, the checkpoint may have been rewritten
            link.unlink()
        link.symlink_to((zoo_dir / m["checkpoint"]).resolve(), target_is_directory=True)
    write_json_atomic(dest / "zoo.json", doc)
    return dest


# ---------------------------------------------------------------------------------------------
# Scores, ground truth, evaluation.


def score_all(zoo_dir: Path, train_dir: Path, image_size: int, scores: Path) -> None:
    """``rank ZOO DATA/train --metric <all> --train-fraction 1 --json SCORES``, as a user would."""
    from ddscore_jax import api
    from ddscore_jax.metrics import METRICS

    ranking = api.rank(zoo_dir, train_dir, image_size=image_size, train_fraction=1.0,
                       metrics=list(METRICS), cache_dir=scores.parent / "features")
    scores.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(scores, ranking.to_json())


def run(cfg: Config, out: Path, log, *, sources: Sequence[Folder] = (),
        targets: Sequence[Folder] = (), train_per_class: int = 30,
        valid_per_class: int | None = 30, test_per_class: int | None = None,
        source_images_per_class: int | None = None,
        short_folders_only: bool = False, zoo_only: bool = False) -> dict:
    cache.enable_compilation_cache()
    t0 = time.monotonic()
    zoo_dir = out / "zoo"
    log(f"building the zoo ({len(cfg.sources) + len(sources)} sources) ...")
    origin = build_zoo(cfg, zoo_dir, log, sources, source_images_per_class,
                       short_folders_only)
    names = list(origin)
    timings = {"zoo": time.monotonic() - t0}
    pretraining = json.loads((zoo_dir / PRETRAINING_LOG).read_text())["models"]
    report: dict = {
        "config": {**{k: v for k, v in cfg.__dict__.items() if k != "finetune_settings"},
                   "short_folders_only": short_folders_only,
                   "source_images_per_class": source_images_per_class,
                   "train_per_class": train_per_class, "valid_per_class": valid_per_class,
                   "test_per_class": test_per_class},
        "finetune_settings": cfg.finetune_settings.__dict__, "models": names, "targets": {},
        "sources": {f.name: str(f.path) for f in sources}, "pretraining": pretraining}
    if zoo_only:
        report["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        return report
    if targets:
        plan = [(t.name, t.path) for t in targets]
    else:
        plan = [(name, None) for name, _, _ in cfg.targets]
    for target, source_folder in plan:
        t1 = time.monotonic()
        if source_folder is None:
            _, per_class, train_per_class_ = next(t for t in cfg.targets if t[0] == target)
            folder = out / "targets" / target
            write_target(target_task(target, per_class), folder, train_per_class_)
        else:
            folder = split_target(source_folder, out / "targets" / target, train_per_class,
                                  valid_per_class, test_per_class)
        # A model pre-trained on this target's own images is left out of its zoo.
        excluded = [m for m, f in origin.items() if f is not None and source_folder is not None
                    and f == source_folder]
        target_zoo_dir = target_zoo(zoo_dir, out / "zoos" / target, excluded)
        split = finetuning.scan_split(folder,
                                      choose=len(cfg.finetune_settings.learning_rates) > 1)
        train, held = split.train, split.test
        n_select = 0 if split.selection is None else len(split.selection)
        log(f"target {target}: {len(train.classes)} classes, {len(train)} train / {n_select} "
            f"selection / {len(held)} test images ({split.layout})"
            + (f"; left out: {', '.join(excluded)}" if excluded else ""))
        scores = out / "scores" / f"{target}.json"
        score_all(target_zoo_dir, folder / "train", cfg.image_size, scores)
        t2 = time.monotonic()
        results = out / "results" / f"{target}.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        doc = finetuning.finetune(target_zoo_dir, folder, results, cfg.finetune_settings,
                                progress=_run_logger(log, t0, report.setdefault("load", [])))
        acc = {m["name"]: m["held_out_accuracy"] for m in doc["models"]}
        log(f"  scored in {t2 - t1:.0f} s, fine-tuned in {time.monotonic() - t2:.0f} s; "
            "held-out accuracy: " + ", ".join(f"{n} {a:.3f}" for n, a in
                                              sorted(acc.items(), key=lambda kv: -kv[1])))
        result, found = evaluate_target(out, target, scores, results)
        report["targets"][target] = {"accuracy": acc, "excluded": excluded,
                                     "n_train": len(train), "n_selection": n_select,
                                     "n_held_out": len(held), **found}
        report.setdefault("_evaluations", []).append(result)
        timings[target] = time.monotonic() - t1
        log(f"  done in {timings[target]:.0f} s")
    summarise_targets(report)
    timings["total"] = time.monotonic() - t0
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    loads = [v for _, v in report.get("load", [])] or [os.getloadavg()[0]]
    report["wall"] = (f"{timings['total']:.0f} s in this process (zoo {timings['zoo']:.0f} s, "
                      "already built runs reused), 1-min load at each fine-tuning run's start "
                      f"{min(loads):.1f}-{max(loads):.1f} (median {np.median(loads):.1f}), "
                      f"started {_clock(time.time() - timings['total'])} UTC, "
                      f"finished {_clock(time.time())} UTC")
    return report


def _clock(t: float) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def evaluate_target(out: Path, target: str, scores: Path,
                    results: Path) -> tuple[evaluation.Evaluation, dict]:
    """``evaluate`` of one target (and its figure in ``out/figures``), the fine-tuning details
    per model, each model's accuracy interval and its difference from the ``random`` control's,
    each metric's top pick with its P(best) from ``rank``'s resampling, and tau_w against each
    single learning rate's accuracy (no selection)."""
    result = evaluation.evaluate([scores], results)
    result.target = target
    figure = out / "figures" / f"{target}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    evaluation.plot(result, figure, title=f"target: {target}")
    doc = json.loads(results.read_text())
    runs = {m["name"]: {k: m.get(k) for k in (
        "held_out_accuracy_sd", "seed_accuracies", "best_learning_rate", "selection_accuracy",
        "accuracy_by_learning_rate", "selection_accuracy_by_learning_rate", "layer4")}
        for m in doc["models"]}
    return result, {"finetune": runs, "resampled": result.resampled,
                    "accuracy_intervals": accuracy_intervals(results),
                    "top_pick": top_picks(scores, doc),
                    "weighted_tau_at_fixed_rate": fixed_rate_taus(scores, doc),
                    **result.to_json()}


CONTROL = f"{ARCH}_random"


def accuracy_intervals(results: Path) -> dict[str, dict]:
    """Per model: its test accuracy's 95% interval over seeds and test images, and (beside the
    ``random`` control) its difference from the control's, on the same draws of test images
    (paired), with that difference's interval."""
    acc, _ = evaluation.read_seed_accuracies(results)
    found = evaluation.test_correctness(results)
    correct, labels = found if found is not None else (None, None)
    reps = evaluation.accuracy_replicates(acc, correct=correct, labels=labels)
    out = {}
    for name, values in acc.items():
        line = {"accuracy": float(values.mean()),
                "interval": list(evaluation._interval(reps[name]) or (None, None))}
        if CONTROL in reps and name != CONTROL:
            diff = reps[name] - reps[CONTROL]
            line["minus_random"] = float(values.mean() - acc[CONTROL].mean())
            line["minus_random_interval"] = list(evaluation._interval(diff) or (None, None))
        out[name] = line
    return out


def top_picks(scores: Path, doc: dict) -> dict[str, dict]:
    """Per metric: the model it scores highest, that model's P(best) and whether it is in the
    leader's group (``rank``'s bootstrap, where the scores carry it), its fine-tuned accuracy
    and whether it is the best fine-tuned model (rel@1 = 1)."""
    ranking = json.loads(scores.read_text())
    acc = {m["name"]: m["held_out_accuracy"] for m in doc["models"]}
    best = max(acc.values())
    out = {}
    metrics, _ = evaluation.read_scores(scores)
    by_name = {m["name"]: m for m in ranking["models"]}
    for m in metrics:
        named = [n for n in m.scores if n in acc]
        if not named:
            continue
        pick = max(named, key=lambda n: m.scores[n])  # max keeps the first (file order) on ties
        u = (by_name[pick].get("uncertainty") or {}).get(m.metric) or {}
        out[m.metric] = {"model": pick, "p_best": u.get("p_best"),
                         "tied_with_best": u.get("tied_with_best"),
                         "accuracy": acc[pick], "is_best": acc[pick] == best}
    return out


def fixed_rate_taus(scores: Path, doc: dict) -> dict[str, dict[str, list | None]]:
    """``{learning rate: {metric: [tau_w, low, high]}}``: each metric against the accuracies of
    one learning rate of the grid for every model (mean over its seeds, bootstrap over them).

    The ground truth picks each model's rate on the selection split; a conclusion that holds at
    every fixed rate does not rest on that choice either. The intervals redraw the test images
    too where the runs record them.
    """
    metrics, _ = evaluation.read_scores(scores)
    names = {m["name"] for m in doc["models"]}
    labels = ((doc.get("dataset") or {}).get("test") or {}).get("labels")
    out: dict[str, dict[str, list | None]] = {}
    for lr in sorted({r["learning_rate"] for r in doc["runs"]}):
        chosen = sorted((r for r in doc["runs"] if r["learning_rate"] == lr
                         and r["name"] in names), key=lambda r: r["seed"])
        acc: dict[str, np.ndarray] = {}
        for r in chosen:
            acc[r["name"]] = np.append(acc.get(r["name"], np.empty(0)), r["held_out_accuracy"])
        images = bool(labels) and all(isinstance(r.get("test_correct"), str) for r in chosen)
        correct = ({n: np.array([[c == "1" for c in r["test_correct"]] for r in chosen
                                 if r["name"] == n]) for n in acc} if images else None)
        replicates = evaluation.accuracy_replicates(
            acc, correct=correct, labels=np.asarray(labels) if images else None)
        row = {}
        for m in metrics:
            ev = evaluation.evaluate_metric(m.scores, acc, m.metric, replicates=replicates,
                                            images_resampled=images)
            interval = ev.intervals.get("weighted_tau")
            row[m.metric] = (None if ev.weighted_tau is None
                             else [ev.weighted_tau, *(interval or (None, None))])
        out[f"{lr:g}"] = row
    return out


def summarise_targets(report: dict) -> None:
    """The mean over targets of every statistic (from ``report["_evaluations"]``), in place."""
    summary = evaluation.summarize(report.pop("_evaluations"))
    doc = summary.to_json()
    report["mean_over_targets"] = doc["mean_over_targets"]
    report["null_mean_over_targets"] = doc["null_mean_over_targets"]
    report["better_mean_weighted_tau"] = [list(p) for p in summary.better]
    report["targets_resampled"] = summary.targets_resampled


def reevaluate(out: Path, report: dict) -> dict:
    """A finished run's report with its evaluations, figures and means computed again from
    ``out/scores`` and ``out/results`` (no training: for a changed ``evaluate``)."""
    for target, found in report["targets"].items():
        result, again = evaluate_target(out, target, out / "scores" / f"{target}.json",
                                        out / "results" / f"{target}.json")
        found.update(again)
        report.setdefault("_evaluations", []).append(result)
    summarise_targets(report)
    return report


def _run_logger(log, t0: float, loads: list | None = None):
    """A ``finetune`` progress callback that logs each run as it starts (with the elapsed time
    and the 1-minute load average, also kept in ``loads``), so that a long benchmark shows
    where it is and what it shared the machine with."""
    seen: set[str] = set()

    def progress(description: str, done: int, total: int) -> None:
        if description.startswith("fine-tuning") and description not in seen:
            seen.add(description)
            load = os.getloadavg()[0]
            if loads is not None:
                loads.append([round(time.monotonic() - t0), round(load, 2)])
            log(f"  [{time.monotonic() - t0:5.0f} s, load {load:4.1f}] {description}")

    return progress


def _cell(value: float | None, interval, signed: bool = True) -> str:
    if value is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(value)
    if not interval or interval[0] is None:
        return text
    ends = "{:+.2f}" if signed else "{:.2f}"
    return f"{text} [{ends.format(interval[0])}, {ends.format(interval[1])}]"


STAT_LABELS = {"weighted_tau": "tau_w", "kendall_tau": "Kendall tau", "pearson": "Pearson",
               "rel@1": "rel@1", "rel@3": "rel@3"}


def _metrics(report: dict) -> list[str]:
    metrics: list[str] = []
    for t in report["targets"]:
        for e in report["targets"][t]["metrics"]:
            if e["metric"] not in metrics:
                metrics.append(e["metric"])
    return metrics


def table(report: dict, statistic: str = "weighted_tau") -> str:
    """One statistic per metric (rows) and target (columns), and the mean over targets; each with
    its 95% bootstrap interval where there is one (seeds and test images within a target;
    targets, seeds and test images for the mean, or no targets with fewer than
    ``evaluation.MIN_TARGETS_RESAMPLED``). The last row: the same statistic for a random
    ranking (the null), its mean and central 95%."""
    targets = list(report["targets"])
    signed = not statistic.startswith("rel@")
    head = f"| metric | {' | '.join(targets)} | mean |"
    lines = [head, "|" + " --- |" * (len(targets) + 2)]
    for metric in _metrics(report):
        cells = []
        for t in targets:
            found = [e for e in report["targets"][t]["metrics"] if e["metric"] == metric]
            cells.append(_cell(found[0][statistic], found[0]["intervals"][statistic], signed)
                         if found else "n/a")
        mean = report["mean_over_targets"].get(metric, {}).get(statistic)
        cells.append(_cell(mean["mean"], mean["interval"], signed) if mean else "n/a")
        lines.append(f"| {evaluation.label(metric)} | {' | '.join(cells)} |")
    first = _metrics(report)[0] if _metrics(report) else None
    if first is not None:
        cells = []
        for t in targets:
            found = [e for e in report["targets"][t]["metrics"] if e["metric"] == first]
            null = found[0].get("null", {}).get(statistic) if found else None
            cells.append(_cell(null["mean"], null["interval"], signed)
                         if null and null["mean"] is not None else "n/a")
        null = report.get("null_mean_over_targets", {}).get(first, {}).get(statistic)
        cells.append(_cell(null["mean"], null["interval"], signed)
                     if null and null["mean"] is not None else "n/a")
        lines.append(f"| *random ranking (null)* | {' | '.join(cells)} |")
    return "\n".join(lines)


def null_table(report: dict) -> str:
    """Per metric and target, the one-sided p of its tau_w against random rankings of the same
    models (the share of random rankings at least as good), and for the mean over targets."""
    targets = list(report["targets"])
    lines = [f"| metric | {' | '.join(targets)} | mean |", "|" + " --- |" * (len(targets) + 2)]
    for metric in _metrics(report):
        cells = []
        for t in targets:
            found = [e for e in report["targets"][t]["metrics"] if e["metric"] == metric]
            p = found[0].get("null_p", {}).get("weighted_tau") if found else None
            cells.append("n/a" if p is None else f"{p:.2f}")
        p = report.get("null_mean_over_targets", {}).get(metric, {}).get(
            "weighted_tau", {}).get("p")
        cells.append("n/a" if p is None else f"{p:.3f}")
        lines.append(f"| {evaluation.label(metric)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def top_pick_table(report: dict) -> tuple[str, str]:
    """Per metric and target: the top pick, its P(best) from ``rank``'s bootstrap and whether it
    is the best fine-tuned model; and the calibration summary (does a high P(best) go with a
    right pick?)."""
    targets = [t for t in report["targets"] if report["targets"][t].get("top_pick")]
    lines = [f"| metric | {' | '.join(targets)} |", "|" + " --- |" * (len(targets) + 1)]
    pairs = []
    for metric in _metrics(report):
        cells = []
        for t in targets:
            pick = report["targets"][t]["top_pick"].get(metric)
            if pick is None:
                cells.append("n/a")
                continue
            p = pick["p_best"]
            pairs.append((p, pick["is_best"]))
            cells.append(f"{pick['model'].removeprefix(ARCH + '_')} "
                         f"({'n/a' if p is None else f'{p:.2f}'}"
                         f"{', best' if pick['is_best'] else ''})")
        lines.append(f"| {evaluation.label(metric)} | {' | '.join(cells)} |")
    known = [(p, right) for p, right in pairs if p is not None]
    if not known:
        return "\n".join(lines), "no P(best) in the scores (rank without resampling)"
    right = [p for p, r in known if r]
    wrong = [p for p, r in known if not r]
    hi = [r for p, r in known if p >= 0.5]
    lo = [r for p, r in known if p < 0.5]
    summary = (f"{len(known)} top picks (metric x target): {len(right)} right; mean P(best) "
               f"{np.mean(right) if right else float('nan'):.2f} when right, "
               f"{np.mean(wrong) if wrong else float('nan'):.2f} when wrong; "
               f"P(best) >= 0.5: {sum(hi)}/{len(hi)} right; < 0.5: {sum(lo)}/{len(lo)} right")
    return "\n".join(lines), summary


def fixed_rate_table(report: dict) -> str:
    """tau_w per metric (rows) against each single learning rate's accuracy, per target."""
    cols = [(t, lr) for t, found in report["targets"].items()
            for lr in found.get("weighted_tau_at_fixed_rate", {})]
    if len(cols) <= len(report["targets"]):  # one rate: the same numbers as the tau_w table
        return ""
    metrics = list(report["mean_over_targets"])
    lines = ["| metric | " + " | ".join(f"{t} @ {lr}" for t, lr in cols) + " |",
             "|" + " --- |" * (len(cols) + 1)]
    for metric in metrics:
        cells = []
        for t, lr in cols:
            v = report["targets"][t]["weighted_tau_at_fixed_rate"][lr].get(metric)
            cells.append("n/a" if v is None else _cell(v[0], None if v[1] is None else v[1:]))
        lines.append(f"| {evaluation.label(metric)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def accuracy_table(report: dict) -> str:
    """Fine-tuned test accuracy per model (rows) and target: mean over seeds at the rate chosen
    on the selection split, its 95% interval (seeds and test images), that rate, and the
    difference from the ``random`` control with its paired interval."""
    targets = list(report["targets"])
    lines = ["| model | " + " | ".join(targets) + " |", "|" + " --- |" * (len(targets) + 1)]
    for name in report["models"]:
        cells = []
        for t in targets:
            found = report["targets"][t]
            m = found.get("finetune", {}).get(name)
            if m is None:
                cells.append("left out")
                continue
            iv = found.get("accuracy_intervals", {}).get(name, {})
            text = _cell(found["accuracy"][name], iv.get("interval"), signed=False)
            text += f" (lr {m['best_learning_rate']:g})"
            if iv.get("minus_random") is not None:
                text += "; vs random " + _cell(iv["minus_random"], iv["minus_random_interval"])
            cells.append(text)
        lines.append(f"| {name.removeprefix(ARCH + '_')} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _print_report(report: dict, command: str) -> None:
    seconds = report.get("seconds", {}).get("total")
    print(f"# {command.strip()}: {len(report['models'])} models, {len(report['targets'])} "
          f"targets, {report['config']['image_size']} px"
          + ("" if seconds is None else f", {seconds:.0f} s"))
    resampled = sorted({found.get("resampled", "seeds") for found in report["targets"].values()})
    for statistic in ("weighted_tau", "kendall_tau", "pearson", "rel@1", "rel@3"):
        print(f"\n{STAT_LABELS[statistic]} of each metric's ranking against fine-tuned test "
              f"accuracy, 95% bootstrap intervals (resampled: {', '.join(resampled)}"
              + ("; and targets for the mean" if report["targets_resampled"] else "") + ")")
        print(table(report, statistic))
    if len(report["targets"]) > 1 and not report["targets_resampled"]:
        print(f"(fewer than {evaluation.MIN_TARGETS_RESAMPLED} targets: the mean's interval is "
              "over the seeds and test images alone and speaks for these targets only)")
    print("\none-sided p of tau_w against random rankings of the same models")
    print(null_table(report))
    for a, b in report["better_mean_weighted_tau"]:
        print(f"over the targets, {evaluation.label(a)} ranks better than {evaluation.label(b)}")
    for target, found in report["targets"].items():
        for a, b in found["better_weighted_tau"]:
            print(f"on {target}, {evaluation.label(a)} ranks better than {evaluation.label(b)}")
    if any("finetune" in found for found in report["targets"].values()):
        print("\nfine-tuned test accuracy: mean over seeds at the rate chosen on the selection "
              "split [95% interval, seeds and test images]; vs random: the difference from the "
              "random control on the same test draws")
        print(accuracy_table(report))
    picks, summary = top_pick_table(report)
    print("\neach metric's top pick (its P(best) from rank's bootstrap; 'best': it is the best "
          "fine-tuned model)")
    print(picks)
    print(summary)
    fixed = fixed_rate_table(report)
    if fixed:
        print("\ntau_w against the accuracy at one fixed learning rate (no per-model choice)")
        print(fixed)
    if report.get("wall"):
        print(f"\nwall time and load: {report['wall']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="NAME=DIR folders are folders of classes (one sub-folder of images per class).")
    parser.add_argument("--small", action="store_true",
                        help="3 models x 2 targets with few steps: a smoke test of minutes")
    parser.add_argument("--out", type=Path, help="keep everything in this folder")
    parser.add_argument("--json", type=Path, help="write the report (JSON) here")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=DIR",
                        help="pre-train one more source model on DIR (repeatable)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=DIR",
                        help="a target (repeatable); given, they replace the packaged targets")
    parser.add_argument("--no-packaged-sources", action="store_true",
                        help="only the --source folders as sources")
    parser.add_argument("--packaged-sources", metavar="A,B",
                        help="only these of the packaged sources (comma-separated)")
    parser.add_argument("--short-models", choices=("all", "folders"), default="all",
                        help="which sources also get a short-trained copy (full run; default "
                             "all; folders: only the --source folders)")
    parser.add_argument("--image-size", type=int, help="pixels (default 32)")
    parser.add_argument("--train-per-class", type=int, default=30,
                        help="a folder target without train/ + valid/: images per class in "
                             "train/ (default 30; at most half the class)")
    parser.add_argument("--valid-per-class", type=int, default=30,
                        help="...and at most this many of the others in valid/, the selection "
                             "split (default 30)")
    parser.add_argument("--test-per-class", type=int,
                        help="...and at most this many of the rest in test/, the test split "
                             "(default: no test/; then finetune halves valid/ when it chooses)")
    parser.add_argument("--source-images-per-class", type=int,
                        help="pre-train a folder source on at most this many images per class")
    parser.add_argument("--pretrain-steps", type=int, help="steps per source model")
    parser.add_argument("--pretrain-batch", type=int, help="batch size of the pre-training")
    parser.add_argument("--pretrain-flip", action="store_true",
                        help="random horizontal flips in pre-training")
    parser.add_argument("--zoo-only", action="store_true",
                        help="build (or finish) the zoo in --out and stop; the same command "
                             "without it later resumes from that zoo")
    parser.add_argument("--epochs", type=float, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, help="fine-tuning batch size")
    parser.add_argument("--seeds", type=int, help="fine-tuning repeats per learning rate (the "
                        "intervals come from their spread)")
    parser.add_argument("--learning-rate", type=float, action="append", default=[],
                        help="fine-tuning learning-rate grid (repeatable)")
    parser.add_argument("--evaluate-only", type=Path, metavar="REPORT",
                        help="no training: evaluate a finished run again (its --json REPORT and "
                             "its --out folder), print the tables, rewrite REPORT (or --json)")
    args = parser.parse_args(argv)
    if args.evaluate_only:
        if args.out is None or not (args.out / "results").is_dir():
            print("--evaluate-only needs --out, the folder of the run it evaluates",
                  file=sys.stderr)
            return 2
        try:
            doc = json.loads(args.evaluate_only.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("targets"), dict):
                raise ValueError("not a report of this benchmark (no \"targets\" object)")
            report = reevaluate(args.out, doc)
        except (OSError, ValueError, InputError) as e:  # JSONDecodeError is a ValueError
            print(f"{args.evaluate_only}: {e}", file=sys.stderr)
            return 2
        _print_report(report, "python benchmarks/transfer_zoo.py " + " ".join(
            argv if argv is not None else sys.argv[1:]))
        # Atomic: the report being rewritten may be the only record of an hour's run.
        write_json_atomic(args.json or args.evaluate_only, report)
        return 0
    cfg = SMALL if args.small else FULL
    try:
        sources = [parse_folder(t, "--source") for t in args.source]
        targets = [parse_folder(t, "--target") for t in args.target]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    for kind, given in (("source", sources), ("target", targets)):
        names = [f.name for f in given]
        if len(set(names)) < len(names):
            print(f"--{kind}: each NAME once, got {', '.join(names)}", file=sys.stderr)
            return 2
    if args.no_packaged_sources:
        if not sources:
            print("--no-packaged-sources needs --source", file=sys.stderr)
            return 2
        cfg = replace(cfg, sources=(), random_model=cfg.random_model)
    if args.packaged_sources:
        chosen = tuple(args.packaged_sources.split(","))
        unknown = [n for n in chosen if n not in FULL.sources]
        if unknown:
            print(f"--packaged-sources: {', '.join(unknown)} not among "
                  f"{', '.join(FULL.sources)}", file=sys.stderr)
            return 2
        cfg = replace(cfg, sources=chosen)
    clash = {f.name for f in sources} & set(cfg.sources)
    if clash:
        print(f"--source {', '.join(sorted(clash))}: a packaged source has that name",
              file=sys.stderr)
        return 2
    size = args.image_size or cfg.image_size
    cfg = replace(cfg, image_size=size,
                  pretrain_steps=args.pretrain_steps or cfg.pretrain_steps,
                  pretrain_batch=args.pretrain_batch or cfg.pretrain_batch,
                  pretrain_flip=args.pretrain_flip or cfg.pretrain_flip,
                  finetune_settings=replace(
                      cfg.finetune_settings, image_size=size,
                      epochs=args.epochs or cfg.finetune_settings.epochs,
                      batch_size=args.batch_size or cfg.finetune_settings.batch_size,
                      seeds=args.seeds or cfg.finetune_settings.seeds,
                      learning_rates=tuple(args.learning_rate)
                      or cfg.finetune_settings.learning_rates))
    if args.zoo_only and args.out is None:
        print("--zoo-only needs --out (the zoo it builds is for a later run)", file=sys.stderr)
        return 2
    # An --out that holds a run resumes it: its finished models and fine-tuning runs are kept.
    out = args.out or Path(tempfile.mkdtemp(prefix="ddscore-transfer-"))
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        report = run(cfg, out, log, sources=sources, targets=targets,
                     train_per_class=args.train_per_class, valid_per_class=args.valid_per_class,
                     test_per_class=args.test_per_class,
                     source_images_per_class=args.source_images_per_class,
                     short_folders_only=args.short_models == "folders",
                     zoo_only=args.zoo_only)
    except ValueError as e:  # a zoo of other settings in --out
        print(e, file=sys.stderr)
        return 2
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    command = "python benchmarks/transfer_zoo.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    if args.zoo_only:
        print(f"zoo of {len(report['models'])} models in {out / 'zoo'} "
              f"({report['seconds']['zoo']:.0f} s)")
        return 0
    _print_report(report, command)
    if args.json:
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
