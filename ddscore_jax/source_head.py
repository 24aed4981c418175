"""The source classifier's predictions on the target images, for LEEP and NCE.

These two metrics read the checkpoint's own head (``layer4`` + ``fc``), not the conv4_x features,
so they need a full forward. Models whose source had no head get ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ddscore_jax import data, fullmodel, zoo
from ddscore_jax.extract import Progress
from ddscore_jax.pipeline import iter_batches


@partial(jax.jit, static_argnames=("graphdef",))
def _probabilities(graphdef, state, images):
    return jax.nn.softmax(nnx.merge(graphdef, state)(images), axis=-1)


def source_probabilities(zoo_dir: str | Path, entries: Sequence[zoo.ZooEntry],
                         dataset: data.Dataset, *, batch_size: int = 32, image_size: int = 224,
                         workers: int | None = None,
                         progress: Progress | None = None) -> dict[str, np.ndarray | None]:
    """``{name: (n, Z) softmax of the source classifier}``, or ``None`` where there is no head."""
    nets = {}
    for e in entries:
        head = zoo.load_head(zoo_dir, e)
        width = fullmodel.head_width(head)
        if width is None or not any(k.startswith(fullmodel.HEAD_STAGE) for k in head):
            continue
        graphdef, state, _ = fullmodel.build(e.arch, width, zoo.load_params(zoo_dir, e), head,
                                             keep_fc=True)
        nets[e.name] = (graphdef, state, np.empty((len(dataset), width), np.float32))
    n = len(dataset)
    if nets:
        for batch in iter_batches(dataset, image_size, batch_size, workers=workers):
            for graphdef, state, out in nets.values():
                probs = _probabilities(graphdef, state, batch.images)
                out[batch.start:batch.stop] = np.asarray(probs)[: batch.size]
            if progress:
                progress("source classifier", batch.stop, n)
    return {e.name: nets[e.name][2] if e.name in nets else None for e in entries}
