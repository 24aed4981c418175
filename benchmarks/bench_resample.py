"""What the ranking's uncertainty costs: the bootstrap replicates (ddscore_jax.resample) against a
cold ``rank`` of the same zoo and images, measured in one run.

A zoo of random-weight torchvision ResNet18s (randomised BatchNorm statistics, saved with torch and
imported by the real converter) and a folder of JPEGs (texture crops, _common.make_dataset). First
a cold ``rank`` (fresh feature and compilation caches, no resampling: extraction, compilation and
the point scores); then, on the cached features, ``rank`` without and with resampling, alternated,
so that the difference is the resampling alone (its compilation reported apart).

    python benchmarks/bench_resample.py                         # 10 models, 1000 images, 224 px
    python benchmarks/bench_resample.py --models 2 --images 60 --image-size 64   # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, make_dataset, torch_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--resamples", type=int, nargs="+", default=None,
                    help="replicate counts to time (default: the library's default, and 1000)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for zoo, data and caches")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-resample-"))
    # A fresh cache root: the cold rank compiles and extracts from nothing.
    os.environ["DDSCORE_JAX_CACHE"] = str(work / "cache")
    import torch

    from ddscore_jax import api
    from ddscore_jax.settings import ScoreSettings

    counts = args.resamples or sorted({ScoreSettings.resamples, 1000})
    print(f"machine: {machine()}")
    print(f"zoo: {args.models} x ResNet18 (random weights); {args.images} images, "
          f"{args.image_size} px; resamples timed: {counts}")
    data = make_dataset(work / "data", args.images)
    ckpts = work / "ckpts"
    ckpts.mkdir(parents=True, exist_ok=True)
    for i, net in enumerate(torch_models(args.models)):
        torch.save(net.state_dict(), ckpts / f"r18_{i:02d}.pth")
    zoo = work / "zoo"
    api.convert(ckpts, zoo)
    kw = {"image_size": args.image_size, "cache_dir": work / "features"}

    def timed(label: str, **extra) -> float:
        load = os.getloadavg()[0]
        t = time.perf_counter()
        ranking = api.rank(zoo, data, **kw, **extra)
        dt = time.perf_counter() - t
        print(f"{label}: {dt:.1f} s (load average at start {load:.2f}, at end "
              f"{os.getloadavg()[0]:.2f}); leader {ranking.best.name}, leader's group "
              f"{len(ranking.leader_group())} model(s)", flush=True)
        return dt

    cold = timed("cold rank, --resamples 0 (extract + compile + point scores)", resamples=0)
    # The first resampled run of each count also compiles its program: reported apart.
    first = {r: timed(f"first warm rank, --resamples {r} (compiles the bootstrap)", resamples=r)
             for r in counts}
    warm0, warm = [], {r: [] for r in counts}
    for k in range(args.repeats):
        warm0.append(timed(f"warm rank, --resamples 0 (repeat {k + 1})", resamples=0))
        for r in counts:
            warm[r].append(timed(f"warm rank, --resamples {r} (repeat {k + 1})", resamples=r))
    base = min(warm0)
    print(f"\nmachine at the end: {machine()}")
    print(f"cold rank (no resampling): {cold:.1f} s; warm rank without resampling: {base:.1f} s")
    for r in counts:
        cost = min(warm[r]) - base
        print(f"--resamples {r}: +{cost:.1f} s on cached features (+{first[r] - base:.1f} s "
              f"the first time, compiling) = {cost / cold:.1%} of the cold rank "
              f"({cost / (args.models * r) * 1e3:.2f} ms per model-replicate, 2 blocks)")


if __name__ == "__main__":
    main()
