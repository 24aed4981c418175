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
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ddscore_jax import cache, data, evaluate, finetune, model, zoo

ARCH = "resnet18"
SEED = 0
CROP = 64  # crops of the scikit-image pictures, in source pixels, before resizing
TRAIN_ROWS = 0.7  # rows above this fraction of a picture feed the sources, rows below the targets
TEXTURES = ("brick", "grass", "gravel", "camera", "coins", "moon", "text", "page", "clock", "cell")
SCENES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel")
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
    finetune_settings=finetune.Settings(image_size=32, epochs=6),
)


# ---------------------------------------------------------------------------------------------
# Images: uint8, (n, h, w) grayscale or (n, h, w, 3) colour.


@dataclass(frozen=True)
class Labelled:
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def _picture(name: str, color: bool = False) -> np.ndarray:
    from skimage import data as skdata

    img = getattr(skdata, name)()
    mode = "RGB" if color else "L"
    if img.ndim == 2 and not color:
        return img
    return np.asarray(Image.fromarray(img[..., :3] if img.ndim == 3 else img).convert(mode))


def _rows(img: np.ndarray, part: str) -> np.ndarray:
    cut = int(TRAIN_ROWS * img.shape[0])
    return img[:cut] if part == "source" else img[cut:]


def _crops(img: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    ys, xs = rng.integers(0, h - CROP + 1, count), rng.integers(0, w - CROP + 1, count)
    return np.stack([img[y:y + CROP, x:x + CROP] for y, x in zip(ys, xs, strict=True)])


def _picture_crops(names, part: str, per_class: int, color: bool, seed: int) -> Labelled:
    rng = np.random.default_rng(seed)
    images = [_crops(_rows(_picture(n, color), part), per_class, rng) for n in names]
    labels = np.repeat(np.arange(len(names)), per_class)
    return Labelled(np.concatenate(images), labels, tuple(names))


def _digits(part: str) -> Labelled:
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.arange(len(d.target)) % 2 == (0 if part == "source" else 1)
    images = np.round(d.images[keep] * (255 / 16)).astype(np.uint8)  # pixel values run 0..16
    return Labelled(images, d.target[keep], tuple(str(i) for i in range(10)))


def _faces(part: str) -> Labelled:
    from skimage import data as skdata

    images = np.round(skdata.lfw_subset() * 255).astype(np.uint8)
    labels = np.repeat([1, 0], 100)  # the first 100 are faces
    # The first 70 of each class feed the source, the other 30 the target.
    keep = (np.arange(200) % 100 < 70) == (part == "source")
    return Labelled(images[keep], labels[keep], ("non-face", "face"))


def source_task(name: str) -> Labelled:
    if name == "digits":
        return _digits("source")
    if name == "faces":
        return _faces("source")
    if name == "textures":
        return _picture_crops(TEXTURES, "source", 100, False, SEED)
    if name == "scenes":
        return _picture_crops(SCENES, "source", 100, True, SEED)
    raise ValueError(name)


def _defect(crop: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    # A thin straight scratch or a soft round spot, brighter or darker than the surface.
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32)
    cy, cx = rng.uniform(0.3 * CROP, 0.7 * CROP, 2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dy, dx = np.sin(angle), np.cos(angle)
        along = (yy - cy) * dy + (xx - cx) * dx
        across = np.abs(-(yy - cy) * dx + (xx - cx) * dy)
        # Wide enough to survive the resize to 32 pixels.
        mask = np.clip(rng.uniform(2.5, 4.0) - across, 0, 1) * (
            np.abs(along) <= rng.uniform(0.3, 0.5) * CROP)
    else:
        ry, rx = rng.uniform(0.12, 0.22, 2) * CROP
        mask = np.clip((1.0 - np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)) * 4, 0, 1)
    value = 255.0 if rng.random() < 0.5 else 0.0
    out = crop.astype(np.float32) * (1 - mask) + value * mask
    return np.clip(out, 0, 255).round().astype(np.uint8)


def target_task(name: str, per_class: int) -> Labelled:
    rng = np.random.default_rng(SEED + 1)
    if name == "defects":
        classes = ("clean", "scratch", "spot")
        surfaces = [_rows(_picture(s), "target") for s in DEFECT_SURFACES]
        images, labels = [], []
        for c, kind in enumerate(classes):
            for i in range(per_class):
                crop = _crops(surfaces[i % len(surfaces)], 1, rng)[0]
                images.append(crop if kind == "clean" else _defect(crop, kind, rng))
                labels.append(c)
        return Labelled(np.stack(images), np.array(labels), classes)
    if name == "scenes":
        return _picture_crops(TARGET_SCENES, "target", per_class, True, SEED + 2)
    task = _digits("target") if name == "digits" else _faces("target")
    # At most per_class images of each class, drawn with a seed.
    keep = np.concatenate([rng.permutation(np.flatnonzero(task.labels == c))[:per_class]
                           for c in range(len(task.classes))])
    return Labelled(task.images[np.sort(keep)], task.labels[np.sort(keep)], task.classes)


def write_target(task: Labelled, folder: Path, train_per_class: int) -> None:
    """``folder/{train,valid}/<class>/NNN.png``: a seeded stratified split, train_per_class each."""
    rng = np.random.default_rng(SEED + 3)
    for c, cls in enumerate(task.classes):
        idx = rng.permutation(np.flatnonzero(task.labels == c))
        for part, chosen in (("train", idx[:train_per_class]), ("valid", idx[train_per_class:])):
            (folder / part / cls).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(task.images[i]).save(folder / part / cls / f"{i:04d}.png")


def to_inputs(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 images -> (n, S, S, 3) float32, preprocessed exactly as ``data.load_image`` does."""
    out = np.empty((len(images), image_size, image_size, 3), np.float32)
    for i, img in enumerate(images):
        rgb = Image.fromarray(img).convert("RGB").resize((image_size, image_size),
                                                         Image.BILINEAR)
        out[i] = (np.asarray(rgb, np.float32) / np.float32(255) - data.MEAN) / data.STD
    return out


# ---------------------------------------------------------------------------------------------
# The zoo.


def _digest(flat: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(flat):
        value = np.ascontiguousarray(flat[key], np.float32)
        h.update(f"{key}:{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _addition(name: str, config: model.ResNetConfig, state) -> zoo.Addition:
    sd = model.to_state_dict(state)
    return zoo.Addition(name=name, source=Path(f"benchmark:{name}"), source_format="benchmark",
                        sha256=_digest(sd), model=zoo.ImportedModel(config, sd))


def _fresh(config: model.ResNetConfig, seed: int):
    # torchvision's init, each residual branch's last conv and the classifier zeroed: without
    # BatchNorm nothing else keeps a deep random stack's activations in range.
    sd = model.init_state_dict(config, seed, zero_init_residual=True)
    sd["fc.weight"] = np.zeros_like(sd["fc.weight"])
    return model.from_state_dict(sd, config)


def build_zoo(cfg: Config, zoo_dir: Path, log) -> list[str]:
    """Pre-train a ResNet18 per source (and the short and random extras); write the zoo."""
    settings = finetune.Settings(image_size=cfg.image_size, batch_size=cfg.pretrain_batch,
                                 optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4,
                                 seed=SEED)
    config = model.ResNetConfig("basic", (2, 2, 2, 2), num_classes=SOURCE_CLASSES,
                                batchnorm=False)
    trainer = finetune.Trainer(config, settings)
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
            state, loss = trainer.train(state, x, y, steps=steps, seed=SEED + k)
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
