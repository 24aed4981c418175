"""Extraction throughput on this machine, side by side in one run (no timed tests).

Three ways to get the conv4_x features of the same models on the same JPEGs, every side decoding
with Pillow and resizing with the same bilinear filter:

- ours:         ``ddscore_jax.forward.extract_features`` (threaded decode, one pass for both
                blocks, every model on each decoded batch) with its default engine (on CPU:
                onnxruntime when installed), and with ``engine="jax"`` (XLA); then
                ``score_models`` for the end-to-end comparison; also with ``workers=0`` (decode
                inline, no overlap);
- torchvision:  its ResNet run to ``layer3[1]`` in one DataLoader pass per model (the fastest
                PyTorch way to the same features), with 0 and with N DataLoader workers;
- published:    the reference's procedure: per model and per block, a network truncated at that
                block and a full ImageFolder/DataLoader pass (two passes per model), then the
                four-step NumPy score.

Sides run interleaved, ``--repeats`` times, so that load from other jobs hits them alike; the
medians and their ratios are printed. Compilation is excluded (warmed up first, as the persistent
compilation cache does for every command after the first); so is PyTorch's first-call warm-up.

    python benchmarks/bench_extract.py --images 128 --models 2 --repeats 3
    python benchmarks/bench_extract.py --data ../shared/data/defects/magnetic_tile --no-published
    python benchmarks/bench_extract.py --arch resnet50 --no-published
"""

from __future__ import annotations

import _common  # noqa: F401 - first: it limits OpenBLAS's threads before NumPy loads it

# isort: split

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import (
    load_now,
    loaded_models,
    machine,
    make_dataset,
    median,
    published_pipeline,
    timed,
    torch_models,
    torch_single_pass,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-workers", type=int, default=2,
                   help="DataLoader workers of the faster torchvision side (the other uses 0)")
    p.add_argument("--published-workers", type=int, default=0,
                   help="DataLoader workers of the published pipeline (DataLoader's default: 0)")
    p.add_argument("--data", type=Path, default=None, help="image folder [default: synthetic]")
    p.add_argument("--limit", type=int, default=None,
                   help="use only N images of --data (linked, class folders kept)")
    p.add_argument("--arch", default="resnet18", help="torchvision ResNet of every model")
    p.add_argument("--no-published", action="store_true",
                   help="skip the published pipeline and ours extract + score (the slow sides)")
    args = p.parse_args()

    import warnings

    import torch

    from ddscore_jax import data

    # DataLoader workers fork a process that has JAX's threads; they only run Pillow and torch's
    # transforms, never JAX, so the warning's deadlock (a JAX lock held across fork) cannot bite.
    warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
    from ddscore_jax.ddscore import score_models
    from ddscore_jax.forward import ZooForward, extract_features

    root = args.data or make_dataset(
        Path(tempfile.gettempdir()) / f"ddscore-bench-{args.images}", args.images)
    if args.limit:
        root = subset(root, args.limit)
    dataset = data.scan(root)
    nets = torch_models(args.models, args.arch)
    models = loaded_models(nets)
    n, m, s, b = len(dataset), len(models), args.image_size, args.batch_size
    print(f"machine: {machine()}", file=sys.stderr)
    print(f"{n} images of {root}, {m} x {args.arch}, {s}x{s}, batch {b}, torch threads "
          f"{torch.get_num_threads()}", file=sys.stderr)

    def ours(engine="auto"):
        return extract_features(models, dataset, batch_size=b, image_size=s, engine=engine)

    def ours_rank():
        feats = ours()
        return score_models({f"m{i}": f for i, f in enumerate(feats)}, dataset.labels)

    # Warm-up: compile our forward (batch shape) and let PyTorch pick its kernels.
    small = data.Dataset(dataset.root, dataset.paths[:b], dataset.labels[:b], dataset.classes)
    extract_features(models, small, batch_size=b, image_size=s, engine="jax")
    score_models({"w": ours()[0]}, dataset.labels)  # also compiles the score, and checks below
    engine = ZooForward(models[:1], engine="auto").engine

    sides = {
        "ours": ours,
        "ours, jax engine": lambda: ours("jax"),
        # No decode threads: every batch is decoded inline, between forwards (no overlap).
        "ours, decode inline (workers=0)":
            lambda: extract_features(models, dataset, batch_size=b, image_size=s, workers=0),
        "torchvision, 0 workers": lambda: torch_single_pass(nets, root, s, b, 0),
        f"torchvision, {args.torch_workers} workers":
            lambda: torch_single_pass(nets, root, s, b, args.torch_workers),
        "ours, extract + score": ours_rank,
        "published pipeline": lambda: published_pipeline(nets, root, s, b,
                                                         args.published_workers),
    }
    if args.no_published:
        del sides["ours, extract + score"], sides["published pipeline"]
    times: dict[str, list[float]] = {k: [] for k in sides}
    loads = []
    results = {}
    for r in range(args.repeats):
        for name, fn in sides.items():
            loads.append(load_now())
            t, results[name] = timed(fn)
            times[name].append(t)
            print(f"  repeat {r + 1}: {name}: {t:.1f} s", file=sys.stderr, flush=True)

    # The sides compute the same thing: check before quoting speeds.
    tv_f = results["torchvision, 0 workers"]
    err = max(float(np.max(np.abs(results[k][i][blk] - tv_f[i][j])) / np.max(np.abs(tv_f[i][j])))
              for k in ("ours", "ours, jax engine")
              for i in range(m) for j, blk in enumerate(("layer3.0", "layer3.1")))
    print(f"\nfeatures: max |ours - torchvision| / max|torchvision| = {err:.1e} (both engines)")
    if not args.no_published:
        ours_scores = [x.score for x in sorted(results["ours, extract + score"],
                                               key=lambda x: int(x.name[1:]))]
        pub_scores = results["published pipeline"]
        score_diff = max(abs(a - c) for a, c in zip(ours_scores, pub_scores, strict=True))
        print(f"scores: max |ours - published| = {score_diff:.1e}")

    med = {k: median(v) for k, v in times.items()}
    rate = {k: n * m / v for k, v in med.items()}
    print(f"load average: at start {loads[0]:.2f}, min {min(loads):.2f}, median "
          f"{median(loads):.2f}, max {max(loads):.2f} (2 cores: above ~1.5 other jobs were "
          "competing)")
    print(f"\n{'side':34s} {'median s':>9s} {'image-model/s':>14s}   all runs (s)")
    for k in sides:
        label = f"ours ({engine} engine)" if k == "ours" else k
        print(f"{label:34s} {med[k]:9.2f} {rate[k]:14.2f}   "
              + " ".join(f"{t:.1f}" for t in times[k]))
    best_tv = min((k for k in sides if k.startswith("torchvision")), key=lambda k: med[k])
    for k in ("ours", "ours, jax engine"):
        label = f"ours ({engine} engine)" if k == "ours" else k
        print(f"\nratio {label} / torchvision single pass ({best_tv}): "
              f"{med[best_tv] / med[k]:.2f}x  (target >= 1.5)")
        print(f"ratio {label} / torchvision single pass (0 workers): "
              f"{med['torchvision, 0 workers'] / med[k]:.2f}x")
    print(f"ratio ours / ours with inline decode: "
          f"{med['ours, decode inline (workers=0)'] / med['ours']:.2f}x")
    if not args.no_published:
        print(f"ratio ours (extract + score) / published pipeline: "
              f"{med['published pipeline'] / med['ours, extract + score']:.2f}x  (target >= 2)")


def subset(root: Path, limit: int) -> Path:
    """The first ``limit`` images of ``root`` (sorted, spread over its class folders in turn),
    linked into a temporary folder with the same class folders."""
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    files = {c: sorted(p for p in c.iterdir() if p.is_file()) for c in classes}
    picked = []
    while len(picked) < limit and any(files.values()):
        for c in classes:
            if files[c] and len(picked) < limit:
                picked.append(files[c].pop(0))
    out = Path(tempfile.mkdtemp(prefix=f"ddscore-bench-{root.name}-{limit}-"))
    for p in picked:
        (out / p.parent.name).mkdir(exist_ok=True)
        (out / p.parent.name / p.name).symlink_to(p.resolve())
    return out


if __name__ == "__main__":
    main()
