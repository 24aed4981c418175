"""How far the published D-deepscore script, which computes in float32, is from ours (float64).

    ddscore-jax extract ZOO DATA --out FEATS --image-size 64
    python benchmarks/published_float32.py FEATS

For every feature file and conv4_x block: the relative difference of the published script
(ddscore_jax/reference.py) run on float32 features, and on float64 features, from our score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ddscore_jax.ddscore import block_scores
from ddscore_jax.forward import load_features
from ddscore_jax.model import SCORE_BLOCKS
from ddscore_jax.reference import published_score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("feats", type=Path, help="folder of <model>.npz files from `extract`")
    args = p.parse_args()
    rel32, rel64 = [], []
    for path in sorted(args.feats.glob("*.npz")):
        f = load_features(path)
        for block in SCORE_BLOCKS:
            x = f.features[block].astype(np.float64)
            ours = float(block_scores(x, f.labels, precision="float64"))
            rel32.append(abs(published_score(x.astype(np.float32), f.labels) - ours) / abs(ours))
            rel64.append(abs(published_score(x, f.labels) - ours) / abs(ours))
            print(f"{path.stem} {block} {x.shape}: float32 {rel32[-1]:.1e}, "
                  f"float64 {rel64[-1]:.1e}")
    print(f"published float32 vs ours: {min(rel32):.1e} to {max(rel32):.1e} relative; "
          f"published float64 vs ours: at most {max(rel64):.1e}")


if __name__ == "__main__":
    main()
