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

    python benchmarks/transfer_zoo.py            # full: 9 models x 4 targets, 32 px
    python benchmarks/transfer_zoo.py --small    # smoke test: 3 models x 2 targets, minutes
    python benchmarks/transfer_zoo.py --out DIR  # keep the zoo, targets, results and figures
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ddscore_jax import cache, data, evaluate, finetune, model, sources, train, zoo

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
    finetune_settings: finetune.Settings


FULL = Config(
    image_size=32, sources=("digits", "textures", "faces", "scenes"),
    targets=(("defects", 40, 16), ("digits", 40, 16), ("faces", 30, 16), ("scenes", 40, 16)),
    short_models=True, random_model=True, pretrain_steps=150, pretrain_batch=64,
    finetune_settings=finetune.Settings(image_size=32, epochs=10),
)
# Sized to run in two to three minutes on two quiet cores, compilation included. The cost is the
# number of images through the network (pre-training and fine-tuning steps times batch size).
SMALL = Config(
    image_size=32, sources=("digits", "textures", "faces"),
    targets=(("defects", 20, 12), ("digits", 10, 5)),
    short_models=False, random_model=False, pretrain_steps=40, pretrain_batch=16,
    # One learning rate: a smoke test of the pipeline, not a ground truth.
    finetune_settings=finetune.Settings(image_size=32, epochs=6, learning_rates=(1e-3,)),
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
                        sha256=sources.params_digest(sd), model=zoo.ImportedModel(config, sd))


def _fresh(config: model.ResNetConfig, seed: int):
    # A ResNet18 with BatchNorm, initialised as torchvision does.
    return model.from_state_dict(model.init_state_dict(config, seed), config)


def build_zoo(cfg: Config, zoo_dir: Path, log) -> list[str]:
    """Pre-train a ResNet18 per source (and the short and random extras); write the zoo."""
    recipe = train.Recipe(batch_size=cfg.pretrain_batch, optimizer="adamw", learning_rate=1e-3,
                          weight_decay=1e-4, schedule="cosine")
    config = dataclasses.replace(model.CONFIGS[ARCH], num_classes=SOURCE_CLASSES)
    trainer = train.Trainer(config, recipe)
    additions = []
    for k, name in enumerate(cfg.sources):
        task = source_task(name)
        x, y = to_inputs(task.images, cfg.image_size), task.labels
        lengths = [("", cfg.pretrain_steps)]
        if cfg.short_models:
            lengths.append(("_short", max(1, cfg.pretrain_steps // 6)))
        for suffix, steps in lengths:
            started = time.monotonic()
            state = _fresh(config, SEED + k)
            state, loss = trainer.train(state, x, y, steps, seed=SEED + k)
            probe = np.random.default_rng(SEED).permutation(len(x))[:256]
            acc = trainer.accuracy(state, x[probe], y[probe], 256)
            log(f"  pre-trained {ARCH}_{name}{suffix}: {len(x)} images, {steps} steps, "
                f"loss {loss:.3f}, accuracy on {len(probe)} of them {acc:.3f}, "
                f"{time.monotonic() - started:.0f} s")
            additions.append(_addition(f"{ARCH}_{name}{suffix}", config, state))
    if cfg.random_model:
        additions.append(_addition(f"{ARCH}_random", config, _fresh(config, SEED + 99)))
    zoo.add(zoo_dir, additions)
    return [a.name for a in additions]


# ---------------------------------------------------------------------------------------------
# Scores, ground truth, evaluation.


def score_all(zoo_dir: Path, train_dir: Path, image_size: int, scores: Path) -> None:
    """``rank ZOO DATA/train --metric <all> --train-fraction 1 --json SCORES``, as a user would."""
    from ddscore_jax import api
    from ddscore_jax.metrics import METRICS

    ranking = api.rank(zoo_dir, train_dir, image_size=image_size, train_fraction=1.0,
                       metrics=list(METRICS), cache_dir=scores.parent / "features")
    scores.parent.mkdir(parents=True, exist_ok=True)
    zoo.write_json_atomic(scores, ranking.to_json())


def run(cfg: Config, out: Path, log) -> dict:
    cache.enable_compilation_cache()
    t0 = time.monotonic()
    zoo_dir = out / "zoo"
    log(f"building the zoo ({len(cfg.sources)} sources) ...")
    names = build_zoo(cfg, zoo_dir, log)
    timings = {"zoo": time.monotonic() - t0}
    report: dict = {
        "config": {k: v for k, v in cfg.__dict__.items() if k != "finetune_settings"},
        "finetune_settings": cfg.finetune_settings.__dict__, "models": names, "targets": {}}
    for target, per_class, train_per_class in cfg.targets:
        t1 = time.monotonic()
        folder = out / "targets" / target
        task = target_task(target, per_class)
        write_target(task, folder, train_per_class)
        log(f"target {target}: {len(task.classes)} classes, "
            f"{len(data.scan(folder / 'train'))} train / {len(data.scan(folder / 'valid'))} "
            f"held-out images")
        scores = out / "scores" / f"{target}.json"
        score_all(zoo_dir, folder / "train", cfg.image_size, scores)
        t2 = time.monotonic()
        results = out / "results" / f"{target}.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        doc = finetune.finetune(zoo_dir, folder, results, cfg.finetune_settings)
        acc = {m["name"]: m["held_out_accuracy"] for m in doc["models"]}
        log(f"  scored in {t2 - t1:.0f} s, fine-tuned in {time.monotonic() - t2:.0f} s; "
            "held-out accuracy: " + ", ".join(f"{n} {a:.3f}" for n, a in
                                              sorted(acc.items(), key=lambda kv: -kv[1])))
        result = evaluate.evaluate([scores], results)
        figure = out / "figures" / f"{target}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        evaluate.plot(result, figure, title=f"target: {target}")
        report["targets"][target] = {"accuracy": acc, **result.to_json()}
        timings[target] = time.monotonic() - t1
        log(f"  done in {timings[target]:.0f} s")
    timings["total"] = time.monotonic() - t0
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return report


def table(report: dict) -> str:
    """tau_w per metric (rows) and target (columns), and the mean over targets."""
    targets = list(report["targets"])
    metrics: list[str] = []
    for t in targets:
        for e in report["targets"][t]["metrics"]:
            if e["metric"] not in metrics:
                metrics.append(e["metric"])
    head = f"| metric | {' | '.join(targets)} | mean |"
    lines = [head, "|" + " --- |" * (len(targets) + 2)]
    for metric in metrics:
        values = []
        for t in targets:
            found = [e["weighted_tau"] for e in report["targets"][t]["metrics"]
                     if e["metric"] == metric]
            values.append(found[0] if found else None)
        real = [v for v in values if v is not None]
        mean = f"{np.mean(real):+.3f}" if real else "n/a"
        cells = ["n/a" if v is None else f"{v:+.3f}" for v in values]
        lines.append(f"| {evaluate.label(metric)} | {' | '.join(cells)} | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="3 models x 2 targets with few steps: a smoke test of minutes")
    parser.add_argument("--out", type=Path, help="keep everything in this folder")
    parser.add_argument("--json", type=Path, help="write the report (JSON) here")
    args = parser.parse_args(argv)
    cfg = SMALL if args.small else FULL
    out = args.out or Path(tempfile.mkdtemp(prefix="ddscore-transfer-"))
    if args.out and (out / "zoo").exists():
        print(f"{out}: already holds a benchmark; give an empty or new --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        report = run(cfg, out, log)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    command = "python benchmarks/transfer_zoo.py" + (" --small" if args.small else "")
    print(f"# {command}: {len(report['models'])} models, {len(report['targets'])} targets, "
          f"{cfg.image_size} px, {report['seconds']['total']:.0f} s")
    print("weighted Kendall tau (tau_w) of each metric's ranking against fine-tuned held-out "
          "accuracy")
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
