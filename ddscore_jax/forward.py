"""The one forward engine: every batched forward of a zoo, over every local device (or host).

What runs. Each :class:`LoadedModel` says what it needs from one pass over the images: the first
``blocks`` conv4_x features (what the scores read), and/or its source classifier's softmax
probabilities (LEEP, NCE) or logits (fine-tuning's evaluation). A model asking for both gets them
from the same forward, and every model runs on the same decoded batch, so each image is decoded
once per command whatever the metrics.

Forward. BatchNorm is folded into the convolutions when the engine is built
(:func:`ddscore_jax.model.inference`), so the forward is convolutions, biases, ReLUs and pooling;
a features-only model is cut after conv4_x, so layer4 and fc never reach the device. Models of one
(folded) configuration and the same outputs share one compiled program; a zoo may mix
architectures and feature sizes, each group compiling its own. Where the backend runs a vmapped
convolution well (GPU, TPU) a group's parameters are stacked and vmapped, so one call runs every
model of it on a batch; on CPU, XLA lowers a vmapped convolution to a grouped one, which measures
several times slower than running the same compiled single-model program once per model, so there
we loop (figures in docs/extraction.md). Both are behind :class:`ZooForward`.

Shapes. Every batch is padded to one size (a multiple of the device count), so a data set of any
size compiles the forward once per architecture; with the persistent compilation cache
(:func:`ddscore_jax.cache.enable_compilation_cache`) a second command compiles nothing.

Devices. A one-axis mesh ``("batch",)`` over ``jax.devices()`` splits each batch across devices;
parameters are replicated. Under ``jax.distributed`` the same mesh spans every host: each process
decodes only its own rows of a batch (``jax.make_array_from_process_local_data``) and the features
are gathered back to every process. With one device it is the same code.

Resume. With :class:`ddscore_jax.cache.PartialFeatures` per model, finished rows are saved every
``save_every`` seconds and when the loop is interrupted; the next call starts after them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddscore_jax import data, model, ort_engine, pipeline
from ddscore_jax.atomic import fault_point
from ddscore_jax.cache import RECORD, PartialFeatures, read_record, write_features
from ddscore_jax.errors import InputError
from ddscore_jax.model import SCORE_BLOCKS, ResNetConfig
from ddscore_jax.progress import Progress
from ddscore_jax.settings import DTYPES, Dtype, Engine
from ddscore_jax.settings import ExtractSettings as _E  # the keyword defaults

HEADS = ("probabilities", "logits")
SAVE_EVERY = 30.0  # seconds between saves of an extraction's progress


@dataclass(frozen=True)
class LoadedModel:
    """A model and what the engine computes with it in one pass.

    ``blocks``: how many conv4_x blocks' pooled features (``"layer3.i"``, (n, d)); 0 for none.
    ``head``: ``"probabilities"`` (softmax of ``fc``) or ``"logits"``, (n, num_classes), or None.
    """

    name: str
    config: ResNetConfig
    state_dict: dict[str, np.ndarray]  # canonical (see ddscore_jax.model)
    blocks: int = len(SCORE_BLOCKS)
    head: str | None = None

    def __post_init__(self):
        if self.head is not None and self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head is not None and not self.config.num_classes:
            raise ValueError(f"{self.name}: {self.config.name} has no classifier (fc)")
        if not 0 <= self.blocks <= self.config.depths[2]:
            raise ValueError(f"{self.name}: blocks {self.blocks} not in 0..{self.config.depths[2]}")

    def outputs(self) -> dict[str, int]:
        """``{output name: width}`` in the order the engine returns them."""
        out = {b: self.config.feature_dim for b in model.block_names(self.config, self.blocks)}
        if self.head is not None:
            out[self.head] = self.config.num_classes
        return out


def default_strategy(backend: str | None = None) -> str:
    """``"loop"`` on CPU (vmapped convolutions lower to slow grouped ones), ``"vmap"`` elsewhere."""
    return "loop" if (backend or jax.default_backend()) == "cpu" else "vmap"


def initialize_distributed() -> None:
    """Join a multi-host run when ``DDSCORE_JAX_DISTRIBUTED=1``.

    JAX detects SLURM, Open MPI and Cloud TPU clusters; elsewhere set ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Must run before anything touches a device; a
    no-op without the variable or when already joined.
    """
    if os.environ.get("DDSCORE_JAX_DISTRIBUTED", "") not in ("", "0") and \
            not jax.distributed.is_initialized():
        # Gathering features across CPU hosts needs CPU collectives (GPUs use NCCL regardless).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=_env_int("JAX_NUM_PROCESSES"),
            process_id=_env_int("JAX_PROCESS_ID"),
        )


def _env_int(name: str) -> int | None:
    return int(os.environ[name]) if os.environ.get(name) else None


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("batch",)`` over ``devices`` (default: every device of every process,
    ordered by process so that each process's rows of a batch are contiguous)."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("batch",))


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def _outputs(config: ResNetConfig, state, x, blocks: int, head: str | None) -> dict:
    out = _cast(model.apply(config, state, x, stop_at=blocks, logits=head is not None),
                jnp.float32)
    if head == "probabilities":
        out["probabilities"] = jax.nn.softmax(out.pop("logits"), axis=-1)
    return out


# One compiled program per (folded config, outputs, dtype); the config is a frozen dataclass.
@partial(jax.jit, static_argnames=("config", "blocks", "head", "dtype"))
def _forward_one(state, images, config: ResNetConfig, blocks: int, head: str | None,
                 dtype: str = "float32"):
    return _outputs(config, state, images.astype(dtype), blocks, head)


@partial(jax.jit, static_argnames=("config", "blocks", "head", "dtype"))
def _forward_stacked(stacked, images, config: ResNetConfig, blocks: int, head: str | None,
                     dtype: str = "float32"):
    x = images.astype(dtype)
    return jax.vmap(lambda s: _outputs(config, s, x, blocks, head))(stacked)


def _to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    if isinstance(x, np.ndarray) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ZooForward:
    """Runs every model of a zoo on a batch of images; one compiled program per group of models
    with the same folded configuration and outputs.

    ``dtype="bfloat16"`` casts parameters and images for the forward (for accelerators; on CPU it
    is emulated and slower); outputs come back float32 either way. ``engine="onnxruntime"``
    (or "auto", see :func:`extract_features`) runs the same folded networks in onnxruntime on
    this host's CPU instead (``strategy``, ``mesh`` and the groups then play no part).
    """

    def __init__(self, models: Sequence[LoadedModel], strategy: str | None = None, *,
                 dtype: str = "float32", mesh: Mesh | None = None, engine: str = "jax"):
        if dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.models = list(models)
        self.strategy = strategy or default_strategy()
        self.dtype = dtype
        self.mesh = mesh or batch_mesh()
        # The optional CPU engine (ddscore_jax.ort_engine): one onnxruntime session per model,
        # run on this host when dispatched; the JAX state below is then never built.
        self.engine = ort_engine.resolve(engine, jax.default_backend(), dtype, self.mesh.size)
        self.ort = [ort_engine.OrtModel(m.config, m.state_dict, m.blocks, m.head)
                    for m in self.models] if self.engine == "onnxruntime" else None
        self.data_sharding = NamedSharding(self.mesh, P("batch"))
        replicated = NamedSharding(self.mesh, P())
        # group key: (folded config, blocks, head) -> model indices
        self.groups: dict[tuple[ResNetConfig, int, str | None], list[int]] = {}
        states = []
        for i, m in enumerate(self.models if self.ort is None else ()):
            # Features alone never need layer4 or fc: cut them before they reach the device.
            config, state = model.inference(m.config, m.state_dict, backbone=m.head is None)
            # Cast once here rather than per batch: bfloat16 parameters also halve their memory.
            states.append(_cast(state, dtype))
            self.groups.setdefault((config, m.blocks, m.head), []).append(i)
        if self.strategy == "vmap":
            self.params = {
                key: jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs),
                                                 *[states[i] for i in idx]), replicated)
                for key, idx in self.groups.items()}
        else:
            self.params = {key: [jax.device_put(states[i], replicated) for i in idx]
                           for key, idx in self.groups.items()}

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def padded_batch(self, batch_size: int) -> int:
        """``batch_size`` rounded up to a multiple of the device count (each gets equal rows)."""
        return -(-batch_size // self.n_devices) * self.n_devices

    def local_rows(self, padded: int) -> tuple[int, int]:
        """This process's rows ``[lo, hi)`` of a padded batch (all of them on one host)."""
        per_process = padded // jax.process_count()
        lo = jax.process_index() * per_process
        return lo, lo + per_process

    def dispatch(self, local_images: np.ndarray, padded: int) -> list[tuple[list[int], dict]]:
        """Start the forward of every model on one batch and return without waiting.

        ``local_images`` are this process's rows of a (padded, S, S, 3) batch (all rows on one
        host). Returns ``(model indices, {output: device array})`` per compiled call: the arrays
        are (len(indices), padded, width) for a vmapped group, (padded, width) for one model.
        :meth:`fetch` brings them to the host.
        """
        if self.ort is not None:  # synchronous; onnxruntime releases the GIL for decode threads
            return [([i], m(local_images)) for i, m in enumerate(self.ort)]
        x = jax.make_array_from_process_local_data(
            self.data_sharding, local_images, (padded, *local_images.shape[1:]))
        calls = []
        for (config, blocks, head), idx in self.groups.items():
            params = self.params[(config, blocks, head)]
            if self.strategy == "vmap":
                calls.append((idx, _forward_stacked(params, x, config, blocks, head, self.dtype)))
            else:
                for state, i in zip(params, idx, strict=True):
                    calls.append(([i], _forward_one(state, x, config, blocks, head, self.dtype)))
        return calls

    def fetch(self, calls: list[tuple[list[int], dict]]) -> list[dict[str, np.ndarray]]:
        """The result of :meth:`dispatch` on the host: per model ``{output: (padded, width)}``.

        Each call's arrays cross to the host once (gathered from every process when the mesh
        spans several), then are split per model there.
        """
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.n_models)]
        for idx, result in calls:
            host = {k: _to_host(v) for k, v in result.items()}
            for j, i in enumerate(idx):
                out[i] = {k: v[j] if self.strategy == "vmap" else v for k, v in host.items()}
        return out

    def __call__(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """``images`` (B, S, S, 3) -> per model (in input order) ``{output: (B, width)}``.

        Single-process convenience: pads B to a multiple of the device count and trims it back.
        """
        b = images.shape[0]
        padded = self.padded_batch(b)
        if padded != b:
            images = np.concatenate([images, np.zeros((padded - b, *images.shape[1:]),
                                                      images.dtype)])
        return [{k: v[:b] for k, v in outputs.items()}
                for outputs in self.fetch(self.dispatch(images, padded))]

    def run(self, images: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
        """Every model on in-memory ``images`` (n, S, S, 3), in batches padded to one shape (one
        compile whatever n): per model ``{output: (n, width)}``. Single process."""
        padded = self.padded_batch(batch_size)
        out = [{k: np.empty((len(images), w), np.float32) for k, w in m.outputs().items()}
               for m in self.models]
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            full = np.zeros((padded, *images.shape[1:]), np.float32)
            full[:len(chunk)] = chunk
            for o, r in zip(out, self.fetch(self.dispatch(full, padded)), strict=True):
                for k in o:
                    o[k][start:start + len(chunk)] = r[k][:len(chunk)]
        return out


def extract_features(
    models: Sequence[LoadedModel],
    dataset: data.Dataset,
    *,
    batch_size: int = _E.batch_size,
    image_size: int = _E.image_size,
    progress: Progress | None = None,
    dtype: Dtype = _E.dtype,
    workers: int | None = _E.workers,
    prefetch: int = 2,
    partials: Sequence[PartialFeatures] | None = None,
    save_every: float = SAVE_EVERY,
    mesh: Mesh | None = None,
    strategy: str | None = None,
    engine: Engine = _E.engine,
) -> list[dict[str, np.ndarray]]:
    """What every model asks for (:class:`LoadedModel`) on every image, from one decode pass:
    per model ``{output: (n, width) float32}`` (``"layer3.i"``: (n, d); ``"probabilities"`` or
    ``"logits"``: (n, num_classes)).

    ``workers`` decode threads (see :func:`ddscore_jax.pipeline.iter_batches`). ``partials``, one
    per model, makes the extraction resumable: rows already saved there are loaded, not
    recomputed, and new rows are saved every ``save_every`` seconds and on any interruption
    (KeyboardInterrupt included). The caller clears them once the final features are stored.
    ``engine``: "jax", "onnxruntime" (CPU, :mod:`ddscore_jax.ort_engine`) or "auto" (onnxruntime
    for a float32 forward on a one-device CPU mesh when it is installed, else jax).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise InputError(f"--workers must be at least 0, got {workers}")
    if partials is not None and len(partials) != len(models):
        raise ValueError(f"{len(partials)} partials for {len(models)} models")
    n = len(dataset)
    forward = ZooForward(models, strategy=strategy, dtype=dtype, mesh=mesh, engine=engine)
    padded = forward.padded_batch(batch_size)
    lo, hi = forward.local_rows(padded)
    outputs = [list(m.outputs()) for m in models]
    feats = [{k: np.empty((n, w), np.float32) for k, w in m.outputs().items()} for m in models]
    what = "extracting features" if any(m.blocks for m in models) else "source classifier"

    if jax.process_count() > 1:
        # Hosts would have to agree on one resume point and share the saved rows; not worth it
        # for now, so a multi-host extraction always starts from the beginning.
        partials = None
    done = 0
    if partials is not None:
        # Models extracted together progress together; resume from the least advanced one.
        loaded = [p.load(n, names) for p, names in zip(partials, outputs, strict=True)]
        done = min(k for k, _ in loaded) if loaded else 0
        if done:
            for out, (_, arrays) in zip(feats, loaded, strict=True):
                for b in out:
                    out[b][:done] = arrays[b][:done]
            if progress:
                progress(what, done, n)
    saved, last_save = done, time.monotonic()

    def save_progress() -> None:
        nonlocal saved, last_save
        if partials is not None and done > saved:
            for p, out in zip(partials, feats, strict=True):
                p.append(saved, done, {b: v[saved:done] for b, v in out.items()})
        saved, last_save = done, time.monotonic()

    def collect(batch: pipeline.Batch, calls) -> None:
        nonlocal done
        for out, result in zip(feats, forward.fetch(calls), strict=True):
            for b in out:
                out[b][batch.start:batch.stop] = result[b][: batch.size]
        done = batch.stop
        fault_point("extract:batch")

    inflight = None  # the previous batch, still computing while the next one is dispatched
    batches = pipeline.iter_batches(dataset, image_size, padded, start=done, rows=(lo, hi),
                                    workers=workers, prefetch=prefetch)
    try:
        for batch in batches:
            dispatched = (batch, forward.dispatch(batch.images, padded))
            if inflight is not None:
                collect(*inflight)
                if progress:
                    progress(what, done, n)
            inflight = dispatched
            if time.monotonic() - last_save >= save_every:
                save_progress()
        if inflight is not None:
            collect(*inflight)
            if progress:
                progress(what, done, n)
    except BaseException as e:
        batches.close()  # stop the decode threads now, not when the generator is collected
        if isinstance(e, InputError):
            # A bad image: the data set's fingerprint changes once it is fixed, so rows saved
            # under this one could never be resumed.
            raise
        try:
            save_progress()
        except Exception:  # noqa: BLE001, S110 - the original error is the one worth reporting
            pass
        if isinstance(e, KeyboardInterrupt) and partials is not None:
            e.add_note(f"kept the features of {saved} of {n} images for {len(models)} model(s) "
                       "in the cache; the next run resumes from there")
        raise
    return feats


def save_features(path: Path, feats: dict[str, np.ndarray], dataset: data.Dataset,
                  settings: dict) -> None:
    """Write ``<model>.npz`` (docs/interface.md) atomically, with the record of what the features
    were made from (``settings``: :func:`ddscore_jax.cache.feature_settings`), so that ``score``
    can refuse a folder mixing settings or data sets."""
    write_features(path, feats, dataset, settings)


@dataclass(frozen=True)
class FeatureFile:
    name: str
    features: dict[str, np.ndarray]
    labels: np.ndarray
    paths: np.ndarray
    classes: np.ndarray
    settings: dict | None = None  # what they were made from; None in a file without a record


def load_features(path: Path, blocks: Sequence[str] = SCORE_BLOCKS) -> FeatureFile:
    """Read and check one feature file. InputError names the file and what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types for a bad file
        raise InputError(f"{path}: unreadable feature file ({e})") from None
    settings = None
    if RECORD in arrays:
        try:
            settings, _ = read_record(arrays)
            if not isinstance(settings, dict):
                raise TypeError("settings are not an object")
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: feature file with an unreadable record of what it was "
                             f"made from ({type(e).__name__}: {e})") from None
    missing = [k for k in (*blocks, "labels", "paths", "classes") if k not in arrays]
    if missing:
        raise InputError(f"{path}: feature file lacks {', '.join(missing)}")
    n = len(arrays["labels"])
    for b in blocks:
        if arrays[b].ndim != 2 or arrays[b].shape[0] != n:
            raise InputError(f"{path}: {b} has shape {arrays[b].shape}, expected ({n}, d)")
    return FeatureFile(path.stem, {b: arrays[b] for b in blocks}, arrays["labels"],
                       arrays["paths"], arrays["classes"], settings)
