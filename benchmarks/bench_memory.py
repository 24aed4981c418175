"""Peak memory of an extraction against the data set's size (it must stay flat), one run.

Each size runs in a fresh subprocess (``extract_features`` on one model, as ``rank`` does), which
reports its own peak resident set size (``ru_maxrss``). Only the features grow with n: 2 blocks x
256 float32 = 2 KiB per image and model, i.e. 1 MiB per 512 images; the images themselves are
streamed through a few batch buffers.

    python benchmarks/bench_memory.py --sizes 128 512 1024 --image-size 224
    # a mixed zoo of 10 models, each engine:
    python benchmarks/bench_memory.py --sizes 128 --zoo resnet18:4,resnet50:3,resnext50_32x4d:2,\
resnet18d:1 --engine jax
"""

from __future__ import annotations

import _common  # noqa: F401 - first: it limits OpenBLAS's threads before NumPy loads it

# isort: split

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import machine, make_dataset

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from ddscore_jax import data, model
    from ddscore_jax.forward import LoadedModel, extract_features
    root, size, batch, zoo, engine = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4], sys.argv[5]
    ds = data.scan(root)
    models = []
    for item in zoo.split(","):
        name, count = item.split(":")
        config = model.CONFIGS[name]
        models += [LoadedModel(f"{name}-{i}", config, model.init_state_dict(config, seed=i))
                   for i in range(int(count))]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    feats = extract_features(models, ds, batch_size=batch, image_size=size, engine=engine)
    t = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": len(ds), "before_kib": base, "peak_kib": peak, "seconds": t}))
""")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--zoo", default="resnet18:1",
                   help="models as NAME:COUNT[,NAME:COUNT...] (names of ddscore_jax.model.CONFIGS)")
    p.add_argument("--engine", default="auto", help="auto, jax or onnxruntime")
    args = p.parse_args()
    print(f"machine: {machine()}", file=sys.stderr)
    batch_mib = args.batch_size * args.image_size ** 2 * 3 * 4 / 2**20
    print(f"zoo {args.zoo}, engine {args.engine}; one batch buffer: {batch_mib:.1f} MiB; "
          f"images at {args.image_size} px")
    print(f"{'images':>7s} {'peak RSS MiB':>13s} {'after imports MiB':>18s} "
          f"{'all images held would add MiB':>30s} {'s':>6s}")
    peaks = []
    for n in args.sizes:
        root = make_dataset(Path(tempfile.gettempdir()) / f"ddscore-bench-{n}", n)
        r = subprocess.run([sys.executable, "-c", CHILD, str(root), str(args.image_size),
                            str(args.batch_size), args.zoo, args.engine],
                           capture_output=True, text=True, check=True)
        info = json.loads(r.stdout.strip().splitlines()[-1])
        peaks.append(info["peak_kib"] / 1024)
        held = n * args.image_size ** 2 * 3 * 4 / 2**20
        print(f"{n:7d} {peaks[-1]:13.0f} {info['before_kib'] / 1024:18.0f} {held:30.0f} "
              f"{info['seconds']:6.1f}", flush=True)
    print(f"\npeak growth from {args.sizes[0]} to {args.sizes[-1]} images: "
          f"{peaks[-1] - peaks[0]:+.0f} MiB ({peaks[-1] / peaks[0]:.2f}x)")


if __name__ == "__main__":
    main()
