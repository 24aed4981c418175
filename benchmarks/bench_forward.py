"""The forward alone, side by side in one run: a loop over models vs the stacked, vmapped zoo, and
float32 vs bfloat16; then what ``--dtype bfloat16`` does to the features and to the score.

Images are decoded once up front, so only the forward is timed; compile is excluded (warm-up).
This picks ``extract.default_strategy`` per backend: run it on each backend you deploy to.

    python benchmarks/bench_forward.py --models 3 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import _common  # noqa: F401 - first: it limits OpenBLAS's threads before NumPy loads it

# isort: split

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from _common import load_now, loaded_models, machine, make_dataset, median, timed, torch_models

from ddscore_jax import data
from ddscore_jax.extract import ZooForward, extract_features
from ddscore_jax.score import score_models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--score-images", type=int, default=384,
                   help="images for the bfloat16 score comparison (80%% of them are scored; "
                        "keep that above 256, the feature dimension, or every score saturates)")
    p.add_argument("--score-models", type=int, default=2)
    args = p.parse_args()
    b, s = args.batch_size, args.image_size
    root = make_dataset(Path(tempfile.gettempdir()) / f"ddscore-bench-{args.score_images}",
                        args.score_images)
    ds = data.scan(root)
    models = loaded_models(torch_models(args.models))
    images = data.load_batch(ds, range(b), s)
    print(f"machine: {machine()}; backend {jax.default_backend()}, {jax.device_count()} device(s)",
          file=sys.stderr)

    sides = {
        "loop, float32": ZooForward(models, strategy="loop"),
        "vmap, float32": ZooForward(models, strategy="vmap"),
        "loop, bfloat16": ZooForward(models, strategy="loop", dtype="bfloat16"),
        "vmap, bfloat16": ZooForward(models, strategy="vmap", dtype="bfloat16"),
    }
    for fwd in sides.values():
        fwd(images)  # compile
    times = {k: [] for k in sides}
    loads = []
    for _ in range(args.repeats):
        for k, fwd in sides.items():
            loads.append(load_now())
            times[k].append(timed(lambda fwd=fwd: fwd(images))[0])
    print(f"{args.models} x resnet18 to layer3[1], batch {b}, {s}x{s}; "
          f"load average median {median(loads):.2f}")
    base = median(times["loop, float32"])
    for k, v in times.items():
        print(f"{k:16s} {args.models * b / median(v):7.2f} image-model/s  "
              f"{base / median(v):5.2f}x of loop float32   runs: "
              + " ".join(f"{x:.2f}" for x in v))

    # What bfloat16 does to the numbers: features and the float64 score of every model.
    kw = dict(batch_size=32, image_size=s)
    f32 = extract_features(models[: args.score_models], ds, **kw)
    bf16 = extract_features(models[: args.score_models], ds, dtype="bfloat16", **kw)
    err = max(float(np.max(np.abs(a[k] - c[k])) / np.max(np.abs(a[k])))
              for a, c in zip(f32, bf16, strict=True) for k in a)
    sc32 = {m.name: m for m in score_models({f"m{i}": f for i, f in enumerate(f32)}, ds.labels)}
    sc16 = {m.name: m for m in score_models({f"m{i}": f for i, f in enumerate(bf16)}, ds.labels)}
    print(f"\nbfloat16 vs float32 forward on {len(ds)} images, {len(ds.classes)} classes: "
          f"max feature error {err:.1e} (relative to the largest feature)")
    for name in sorted(sc32):
        a, c = sc32[name].score, sc16[name].score
        print(f"  {name}: score float32 {a:.6f}  bfloat16 {c:.6f}  diff {c - a:+.2e} "
              f"({(c - a) / a:+.2e} relative)")
    rank32 = [m for m in sorted(sc32, key=lambda k: -sc32[k].score)]
    rank16 = [m for m in sorted(sc16, key=lambda k: -sc16[k].score)]
    print(f"  ranking float32 {rank32}, bfloat16 {rank16}: "
          f"{'same' if rank32 == rank16 else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
