"""Input pipeline alone (decode + resize + normalise, no forward), side by side in one run:
the single-threaded reader, ours with 1/2/4 threads, and Grain (if installed) with threads and
with worker processes. Every side's batches are checked bit-identical to the reader's.

    python benchmarks/bench_loader.py --images 256 --repeats 3
    # Grain is not a dependency; to include it: pip install grain
"""

from __future__ import annotations

import _common  # noqa: F401 - first: it limits OpenBLAS's threads before NumPy loads it

# isort: split

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import load_now, machine, make_dataset, median, timed

from ddscore_jax import data, pipeline


def ours(ds, size, batch, workers):
    return np.concatenate([b.images[: b.size] for b in
                           pipeline.iter_batches(ds, size, batch, workers=workers)])


def reader(ds, size, batch):
    return np.concatenate([data.load_batch(ds, range(s, min(s + batch, len(ds))), size)
                           for s in range(0, len(ds), batch)])


def grain_threads(ds, size, batch, threads):
    import grain

    paths = [str(ds.root / p) for p in ds.paths]
    it = (grain.MapDataset.source(paths)
          .map(lambda p: data.load_image(p, size))
          .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch))
          .batch(batch))
    return np.concatenate(list(it))


def _load(args):
    return data.load_image(*args)


def grain_processes(ds, size, batch, workers):
    import grain
    from absl import flags

    # Grain's worker processes read absl flags, which only absl.app.run would otherwise parse.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    items = [(str(ds.root / p), size) for p in ds.paths]
    it = (grain.MapDataset.source(items).map(_load).to_iter_dataset().batch(batch)
          .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
    return np.concatenate(list(it))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    root = make_dataset(Path(tempfile.gettempdir()) / f"ddscore-bench-{args.images}", args.images)
    ds = data.scan(root)
    s, b = args.image_size, args.batch_size
    print(f"machine: {machine()}", file=sys.stderr)

    sides = {"reader (load_batch, 1 thread)": lambda: reader(ds, s, b)}
    for w in (1, 2, 4):
        sides[f"ours, {w} thread(s)"] = lambda w=w: ours(ds, s, b, w)
    try:
        import grain  # noqa: F401
        for t in (2, 4):
            sides[f"grain, {t} threads"] = lambda t=t: grain_threads(ds, s, b, t)
        sides["grain, 2 processes"] = lambda: grain_processes(ds, s, b, 2)
    except ImportError:
        print("grain not installed: its sides are left out", file=sys.stderr)

    times = {k: [] for k in sides}
    same = {}
    loads = []
    reference = reader(ds, s, b)
    for _ in range(args.repeats):
        for k, fn in sides.items():
            loads.append(load_now())
            t, out = timed(fn)
            times[k].append(t)
            same[k] = _compare(out, reference)
    print(f"{len(ds)} images (200x200 JPEG) -> {s}x{s}, batch {b}")
    print(f"load average: median {median(loads):.2f} (2 cores)")
    base = median(times["reader (load_batch, 1 thread)"])
    for k, v in times.items():
        print(f"{k:32s} {len(ds) / median(v):8.1f} images/s  {base / median(v):5.2f}x  "
              f"{same[k]:28s} runs: " + " ".join(f"{x:.2f}" for x in v))


def _compare(out: np.ndarray, reference: np.ndarray) -> str:
    if out.shape == reference.shape and np.array_equal(out, reference):
        return "bit-identical to the reader"
    key = lambda a: sorted(a.reshape(len(a), -1).sum(axis=1).tolist())  # noqa: E731
    if out.shape == reference.shape and key(out) == key(reference):
        return "same images, OTHER ORDER"
    return "DIFFERENT PIXELS"


if __name__ == "__main__":
    main()
