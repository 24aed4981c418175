"""The extraction engine: the threaded input pipeline, the zoo forward, sharding, resume, and the
persistent compilation cache. Small images (32 px) keep every compile and forward cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ddscore_jax import cache, data, model, pipeline, zoo
from ddscore_jax.errors import InputError
from ddscore_jax.forward import (
    LoadedModel,
    ZooForward,
    _forward_one,
    batch_mesh,
    extract_features,
)
from ddscore_jax.model import ImportedModel

SIZE = 32  # the smallest image size the ResNet takes (5 stride-2 steps)
REPO = Path(__file__).resolve().parents[1]


def write_mixed_folder(root: Path, per_class: int = 5, seed: int = 0) -> Path:
    """Two classes of images in every form the reader meets: RGB JPEG, grey PNG, RGBA PNG and
    palette GIF-like PNG, of different sizes (so resizing really happens)."""
    rng = np.random.default_rng(seed)
    for c, cls in enumerate(("defect", "ok")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            px = np.clip(rng.integers(0, 256, (h, w, 3)) * 0.6 + 50 * c, 0, 255).astype(np.uint8)
            img = Image.fromarray(px)
            kind = (j + c) % 4
            if kind == 0:
                img.save(root / cls / f"{j:03d}.jpg", quality=90)
            elif kind == 1:
                img.convert("L").save(root / cls / f"{j:03d}.png")
            elif kind == 2:
                img.convert("RGBA").save(root / cls / f"{j:03d}.png")
            else:
                img.convert("P").save(root / cls / f"{j:03d}.png")
    return root


def random_state_dict(config: model.ResNetConfig, seed: int) -> dict[str, np.ndarray]:
    """torchvision's init with random BatchNorm statistics and affine parameters, so that
    folding really changes the weights."""
    sd = model.init_state_dict(config, seed)
    rng = np.random.default_rng(seed + 1000)
    for k, v in sd.items():
        if k.endswith("running_mean") or (k.endswith(".bias") and v.ndim == 1
                                          and not k.startswith("fc")):
            sd[k] = rng.normal(0.0, 0.3, v.shape).astype(np.float32)
        elif k.endswith("running_var"):
            sd[k] = rng.uniform(0.3, 3.0, v.shape).astype(np.float32)
        elif k.endswith(".weight") and v.ndim == 1:
            sd[k] = rng.normal(1.0, 0.3, v.shape).astype(np.float32)
    return sd


def random_models(n: int, arch: str = "resnet18", **kw) -> list[LoadedModel]:
    config = model.CONFIGS[arch]
    return [LoadedModel(f"m{i}", config, random_state_dict(config, i), **kw) for i in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> data.Dataset:
    return data.scan(write_mixed_folder(tmp_path_factory.mktemp("mixed"), per_class=5))


# ---------------------------------------------------------------- input pipeline


@pytest.mark.parametrize("workers,prefetch", [(0, 1), (1, 1), (3, 2), (8, 4)])
def test_batches_are_bit_identical_to_the_single_threaded_reader(dataset, workers, prefetch):
    reference = data.load_batch(dataset, range(len(dataset)), SIZE)
    batches = list(pipeline.iter_batches(dataset, SIZE, 4, padded_size=6, workers=workers,
                                         prefetch=prefetch))
    assert [(b.start, b.stop) for b in batches] == [(0, 4), (4, 8), (8, 10)]
    for b in batches:
        assert b.images.shape == (6, SIZE, SIZE, 3) and b.images.dtype == np.float32
        # Bitwise, not approximately: threads must not change a single pixel.
        np.testing.assert_array_equal(b.images[: b.size], reference[b.start:b.stop])
        assert not b.images[b.size:].any()  # the padding is zeros


def test_rows_select_a_hosts_share_of_each_batch(dataset):
    reference = data.load_batch(dataset, range(len(dataset)), SIZE)
    # Batches of 4 split over 2 "hosts": host 1 decodes rows 2:4 of each batch, nothing else.
    batches = list(pipeline.iter_batches(dataset, SIZE, 4, rows=(2, 4), start=1, workers=2))
    assert [(b.start, b.stop) for b in batches] == [(1, 5), (5, 9), (9, 10)]
    np.testing.assert_array_equal(batches[0].images, reference[3:5])
    np.testing.assert_array_equal(batches[1].images, reference[7:9])
    assert not batches[2].images.any()  # the last batch (row 9 only) has nothing for host 1


def test_a_bad_image_is_an_input_error_naming_it(tmp_path):
    root = write_mixed_folder(tmp_path / "data", per_class=4)
    (root / "ok" / "002.png").write_bytes(b"not an image at all")
    ds = data.scan(root)
    with pytest.raises(InputError, match=r"ok/002\.png: cannot read image"):
        for _ in pipeline.iter_batches(ds, SIZE, 3, workers=2):
            pass


def _peak_streaming(ds: data.Dataset, image_size: int, batch_size: int,
                    monkeypatch) -> tuple[int, int]:
    """(peak traced bytes, most batch buffers alive at once) while streaming ``ds``.

    Batch buffers live in their own mmaps, which tracemalloc does not see, so they are counted
    directly: the real allocator, with a weak reference kept to each buffer it hands out.
    """
    refs: list[weakref.ref] = []
    most = 0
    real_zeros = pipeline._zeros

    def counted(shape):
        nonlocal most
        buf = real_zeros(shape)
        refs.append(weakref.ref(buf))
        most = max(most, sum(r() is not None for r in refs))
        return buf

    monkeypatch.setattr(pipeline, "_zeros", counted)
    tracemalloc.start()
    try:
        for _ in pipeline.iter_batches(ds, image_size, batch_size, workers=2, prefetch=2):
            pass
        return tracemalloc.get_traced_memory()[1], most
    finally:
        tracemalloc.stop()
        monkeypatch.undo()


def test_memory_is_bounded_by_the_prefetch_depth_not_the_data_set(tmp_path, monkeypatch):
    # Both sets are long enough to reach the steady state (more batches than the prefetch depth).
    small = data.scan(write_mixed_folder(tmp_path / "small", per_class=12))
    large = data.scan(write_mixed_folder(tmp_path / "large", per_class=60))
    size, batch = 64, 4
    batch_bytes = batch * size * size * 3 * 4
    traced_small, buffers_small = _peak_streaming(small, size, batch, monkeypatch)
    traced_large, buffers_large = _peak_streaming(large, size, batch, monkeypatch)
    # 5x the images, the same number of batch buffers: prefetch 2, the one being consumed and the
    # consumer's previous one; holding the large set would take one per batch.
    assert buffers_large <= 4 and buffers_large == buffers_small, (buffers_small, buffers_large)
    # Everything else (decode scratch) stays below a few batches too, whatever the set's size.
    assert traced_large < 8 * batch_bytes, (traced_large, batch_bytes)
    assert traced_small < 8 * batch_bytes, (traced_small, batch_bytes)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("engine", ["jax", "onnxruntime"])
def test_features_match_the_forward_on_the_reference_batch(dataset, engine):
    models = random_models(2)
    feats = extract_features(models, dataset, batch_size=4, image_size=SIZE, workers=2,
                             engine=engine)
    images = data.load_batch(dataset, range(len(dataset)), SIZE)
    for m, f in zip(models, feats, strict=True):
        # The module as trained, BatchNorm unfolded, eval mode: the engine's folded forward must
        # give its numbers.
        ref = jax.jit(model.build(m.config, m.state_dict).features)(images)
        assert sorted(f) == ["layer3.0", "layer3.1"]
        for block in ("layer3.0", "layer3.1"):
            assert f[block].shape == (len(dataset), 256)
            assert f[block].dtype == np.float32
            # Batch 4 (padded) vs one batch of 10: different programs, float32 rounding only.
            np.testing.assert_allclose(f[block], np.asarray(ref[block]), rtol=1e-5, atol=1e-6)


# A small Bottleneck ResNeXt-D (groups, deep stem, average-pool shortcut, 1024-d features) and a
# BasicBlock net with a classifier: a mixed zoo that compiles in seconds.
SMALL_BOTTLENECK = model.ResNetConfig("bottleneck", (1, 1, 2, 1), groups=4, base_width=8,
                                      deep_stem=True, stem_width=16, avg_down=True, num_classes=5)
SMALL_BASIC = model.ResNetConfig("basic", (1, 1, 2, 1), num_classes=3)


@pytest.mark.parametrize("engine", ["jax", "onnxruntime"])
def test_one_pass_serves_features_and_probabilities_of_a_mixed_zoo(dataset, monkeypatch, engine):
    decoded = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda p, s: decoded.append(p) or real(p, s))
    sd_basic = random_state_dict(SMALL_BASIC, 1)
    sd_bottle = random_state_dict(SMALL_BOTTLENECK, 2)
    models = [LoadedModel("basic", SMALL_BASIC, sd_basic),
              LoadedModel("basic+head", SMALL_BASIC, sd_basic, head="probabilities"),
              LoadedModel("bottleneck+head", SMALL_BOTTLENECK, sd_bottle, head="probabilities"),
              LoadedModel("bottleneck logits", SMALL_BOTTLENECK, sd_bottle, blocks=0,
                          head="logits")]
    out = extract_features(models, dataset, batch_size=4, image_size=SIZE, workers=2,
                           engine=engine)
    # Every image decoded once, for all four jobs together.
    assert sorted(decoded) == sorted(dataset.root / p for p in dataset.paths)
    n = len(dataset)
    assert {k: v.shape for k, v in out[0].items()} == {"layer3.0": (n, 256), "layer3.1": (n, 256)}
    assert {k: v.shape for k, v in out[2].items()} == {
        "layer3.0": (n, 1024), "layer3.1": (n, 1024), "probabilities": (n, 5)}
    assert list(out[3]) == ["logits"]
    # Features from the full pass equal those of the pass cut after conv4_x (other programs:
    # float32 rounding at most).
    for b in ("layer3.0", "layer3.1"):
        np.testing.assert_allclose(out[1][b], out[0][b], rtol=1e-6, atol=1e-7)
    # Against the module as trained (BatchNorm unfolded, eval mode), on the decoded images.
    x = data.load_batch(dataset, range(n), SIZE)
    for job, sd, config in ((out[1], sd_basic, SMALL_BASIC), (out[2], sd_bottle, SMALL_BOTTLENECK)):
        ref = jax.jit(lambda v, c=config, s=sd: model.build(c, s)(v, stop_at=2, logits=True))(x)
        np.testing.assert_allclose(job["probabilities"], jax.nn.softmax(ref["logits"]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(job["probabilities"].sum(1), 1.0, rtol=1e-6)
        for b in ("layer3.0", "layer3.1"):
            np.testing.assert_allclose(job[b], ref[b], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.nn.softmax(out[3]["logits"]), out[2]["probabilities"],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no classifier"):
        LoadedModel("x", SMALL_BASIC.backbone(), {}, head="probabilities")


def test_a_second_rank_with_leep_decodes_nothing(tmp_path, monkeypatch):
    from ddscore_jax import api

    zoo_dir = tmp_path / "zoo"
    zoo.add(zoo_dir, [
        zoo.Addition("basic", tmp_path / "basic.pth", "pytorch", "1" * 64,
                     ImportedModel(SMALL_BASIC, random_state_dict(SMALL_BASIC, 1))),
        zoo.Addition("bottleneck", tmp_path / "b.pth", "pytorch", "2" * 64,
                     ImportedModel(SMALL_BOTTLENECK, random_state_dict(SMALL_BOTTLENECK, 2))),
        zoo.Addition("headless", tmp_path / "h.pth", "pytorch", "3" * 64,
                     ImportedModel(SMALL_BASIC.backbone(),
                                   random_state_dict(SMALL_BASIC.backbone(), 3)))])
    data_dir = write_mixed_folder(tmp_path / "data", per_class=4)
    kw = dict(image_size=SIZE, batch_size=4, cache_dir=tmp_path / "cache", workers=1)
    decoded = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda p, s: decoded.append(p) or real(p, s))
    api.rank(zoo_dir, data_dir, **kw)  # features only
    assert len(decoded) == 8
    first = api.rank(zoo_dir, data_dir, metrics=("leep", "nce", "ddscore"), **kw)
    # The probabilities needed one more pass (features came from the cache) ...
    assert len(decoded) == 16 and sorted(first.cached) == ["basic", "bottleneck", "headless"]
    second = api.rank(zoo_dir, data_dir, metrics=("leep", "nce", "ddscore"), **kw)
    # ... and the second rank decoded nothing: features and probabilities both cached.
    assert len(decoded) == 16
    assert second.to_json()["models"] == first.to_json()["models"]
    by_name = {m["name"]: m for m in first.to_json()["models"]}
    assert by_name["headless"]["metrics"]["leep"] is None  # no classifier, no LEEP
    assert by_name["bottleneck"]["metrics"]["leep"] is not None
    # D-deepscore ranks 256-d and 1024-d models together.
    assert all(0 <= m["metrics"]["ddscore"] <= 2 for m in by_name.values())
    # From an empty cache, features and probabilities come from one decode of each image.
    fresh = api.rank(zoo_dir, data_dir, metrics=("leep", "nce", "ddscore"),
                     **{**kw, "cache_dir": tmp_path / "cache2"})
    assert len(decoded) == 24 and fresh.to_json()["models"] == first.to_json()["models"]


def test_the_ragged_last_batch_does_not_recompile(tmp_path):
    models = random_models(1)
    extract_features(models, data.scan(write_mixed_folder(tmp_path / "d0", per_class=2)),
                     batch_size=4, image_size=SIZE, workers=1, engine="jax")
    compiled = _forward_one._cache_size()
    for i, per_class in enumerate((3, 5, 6)):  # 6, 10, 12 images: ragged and whole last batches
        ds = data.scan(write_mixed_folder(tmp_path / f"d{i + 1}", per_class=per_class))
        feats = extract_features(models, ds, batch_size=4, image_size=SIZE, workers=1,
                                 engine="jax")
        assert feats[0]["layer3.0"].shape[0] == len(ds)
    assert _forward_one._cache_size() == compiled


def test_vmapped_and_looped_forward_agree(dataset):
    models = random_models(2)
    images = data.load_batch(dataset, range(4), SIZE)
    looped = ZooForward(models, strategy="loop")(images)
    vmapped = ZooForward(models, strategy="vmap")(images)
    for a, b in zip(looped, vmapped, strict=True):
        for block in a:
            # A grouped convolution sums in another order: float32 rounding only.
            np.testing.assert_allclose(a[block], b[block], rtol=1e-5, atol=1e-6)


def test_bfloat16_forward_returns_float32_features_close_to_float32(dataset):
    models = random_models(1)
    f32 = extract_features(models, dataset, batch_size=4, image_size=SIZE)[0]
    bf16 = extract_features(models, dataset, batch_size=4, image_size=SIZE, dtype="bfloat16")[0]
    for block in f32:
        assert bf16[block].dtype == np.float32
        rel = np.max(np.abs(bf16[block] - f32[block])) / np.max(np.abs(f32[block]))
        # bfloat16 keeps 8 mantissa bits (~0.4% per rounding); measured ~0.7% after 10 convs.
        assert 0 < rel < 3e-2, rel
    with pytest.raises(InputError, match="--dtype"):
        extract_features(models, dataset, batch_size=4, image_size=SIZE, dtype="float16")


# ---------------------------------------------------------------- devices

_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from ddscore_jax import data, model
    from ddscore_jax.forward import LoadedModel, ZooForward, batch_mesh, extract_features
    assert jax.device_count() == 4, jax.devices()
    ds = data.scan(sys.argv[1])
    config = model.CONFIGS["resnet18"]
    models = [LoadedModel(f"m{i}", config, model.init_state_dict(config, seed=i))
              for i in range(2)]
    kw = dict(batch_size=3, image_size=32, workers=2)
    one = extract_features(models, ds, mesh=batch_mesh(jax.devices()[:1]), **kw)
    four = extract_features(models, ds, mesh=batch_mesh(), **kw)
    # Where the batch really went: one quarter of the padded batch (3 -> 4) on each device.
    fwd = ZooForward(models, mesh=batch_mesh())
    x = jax.make_array_from_process_local_data(fwd.data_sharding, np.zeros((4, 32, 32, 3),
                                               np.float32))
    shards = sorted((s.device.id, s.data.shape[0]) for s in x.addressable_shards)
    np.savez(sys.argv[2], **{f"{k}/{i}/{b}": f[b] for k, fs in (("one", one), ("four", four))
                             for i, f in enumerate(fs) for b in f})
    print(json.dumps({"n": len(ds), "shards": shards}))
""")


def test_four_devices_give_the_features_of_one(tmp_path):
    # 7 images: not a multiple of the 4 devices, nor of the batch size 3.
    root = write_mixed_folder(tmp_path / "data", per_class=4)
    sorted((root / "ok").iterdir())[-1].unlink()
    out = tmp_path / "feats.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _SHARDED, str(root), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["n"] == 7
    assert info["shards"] == [[0, 1], [1, 1], [2, 1], [3, 1]]
    with np.load(out) as z:
        for i in range(2):
            for block in ("layer3.0", "layer3.1"):
                one, four = z[f"one/{i}/{block}"], z[f"four/{i}/{block}"]
                assert one.shape == four.shape == (7, 256)
                # A per-device batch of 1 vs a batch of 4 is another program: float32 rounding.
                np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-6)


_HOST = textwrap.dedent("""
    import sys
    import numpy as np
    from ddscore_jax.forward import initialize_distributed
    initialize_distributed()  # from DDSCORE_JAX_DISTRIBUTED and JAX_* variables, as the CLI does
    import jax
    from ddscore_jax import data, model
    from ddscore_jax.forward import LoadedModel, extract_features
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    config = model.CONFIGS["resnet18"]
    models = [LoadedModel("m0", config, model.init_state_dict(config, seed=0))]
    feats = extract_features(models, data.scan(sys.argv[1]), batch_size=3, image_size=32,
                             workers=1)
    np.savez(sys.argv[2], **{f"{i}/{b}": f[b] for i, f in enumerate(feats) for b in f})
""")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_give_the_features_of_one(tmp_path):
    # Two processes of 2 CPU devices each, joined by jax.distributed on this machine: the same
    # code path a multi-host run takes. Each decodes only its half of every batch.
    root = write_mixed_folder(tmp_path / "data", per_class=4)
    sorted((root / "ok").iterdir())[-1].unlink()  # 7 images
    base = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu", "DDSCORE_JAX_DISTRIBUTED": "1", "JAX_NUM_PROCESSES": "2",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}"}
    procs = [subprocess.Popen([sys.executable, "-c", _HOST, str(root), str(tmp_path / f"{i}.npz")],
                              env={**base, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    config = model.CONFIGS["resnet18"]
    ref = extract_features([LoadedModel("m0", config, model.init_state_dict(config, seed=0))],
                           data.scan(root), batch_size=3, image_size=SIZE)
    for i in range(2):
        with np.load(tmp_path / f"{i}.npz") as z:
            for m in range(1):
                for block in ("layer3.0", "layer3.1"):
                    # Every host ends with all 7 rows; per-device batches of 1 vs 3: rounding.
                    np.testing.assert_allclose(z[f"{m}/{block}"], ref[m][block], rtol=1e-5,
                                               atol=1e-6)


def test_one_device_mesh_is_the_default_path(dataset):
    models = random_models(1)
    a = extract_features(models, dataset, batch_size=4, image_size=SIZE, engine="jax")
    b = extract_features(models, dataset, batch_size=4, image_size=SIZE, engine="jax",
                         mesh=batch_mesh(jax.devices()[:1]))
    np.testing.assert_array_equal(a[0]["layer3.1"], b[0]["layer3.1"])


# ---------------------------------------------------------------- resume


class Interrupt:
    """A progress callback that presses Ctrl-C after ``after`` batches, and counts batches."""

    def __init__(self, after: int | None = None):
        self.after, self.calls = after, []

    def __call__(self, _desc: str, completed: int, _total: int) -> None:
        self.calls.append(completed)
        if self.after is not None and len(self.calls) >= self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("save_every", [0.0, float("inf")])
def test_an_interrupted_extraction_resumes_where_it_stopped(dataset, tmp_path, save_every):
    # save_every=0 saves after every batch (a crash loses nothing); inf saves only when the
    # interrupt unwinds the loop. Either way the second run starts after the saved rows.
    models = random_models(2)
    kw = dict(batch_size=3, image_size=SIZE, workers=2)
    clean = extract_features(models, dataset, **kw)

    partials = [cache.PartialFeatures(tmp_path / f"m{i}.partial") for i in range(2)]
    first = Interrupt(after=2)
    with pytest.raises(KeyboardInterrupt):
        extract_features(models, dataset, partials=partials, save_every=save_every,
                         progress=first, **kw)
    assert first.calls == [3, 6]
    assert all(p.load(len(dataset), ("layer3.0",))[0] == 6 for p in partials)

    second = Interrupt()
    resumed = extract_features(models, dataset, partials=partials, save_every=save_every,
                               progress=second, **kw)
    # It reported the resume point, then did only the two remaining batches (6:9, 9:10).
    assert second.calls == [6, 9, 10]
    for r, c in zip(resumed, clean, strict=True):
        for block in c:
            # Same programs on the same pixels: bitwise equal to the uninterrupted run.
            np.testing.assert_array_equal(r[block], c[block])


# ---------------------------------------------------------------- persistent compilation cache

_COUNT_COMPILES = textwrap.dedent("""
    import json, sys
    import jax
    counts = {"hits": 0, "requests": 0}
    def listen(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            counts["hits"] += 1
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            counts["requests"] += 1
    jax.monitoring.register_event_listener(listen)
    from ddscore_jax.cli.app import main
    sys.argv = ["ddscore-jax", *sys.argv[1:]]
    try:
        main()
    except SystemExit as e:
        assert not e.code, e.code
    print(json.dumps(counts), file=sys.stderr)
""")


def make_zoo(root: Path, n: int = 1) -> Path:
    additions = [zoo.Addition(f"net{i}", root / f"net{i}.pth", "pytorch", f"{i:064x}",
                              ImportedModel(model.CONFIGS["resnet18"],
                                            random_state_dict(model.CONFIGS["resnet18"], i)))
                 for i in range(n)]
    zoo.add(root, additions)
    return root


def test_a_second_command_compiles_nothing(tmp_path):
    zoo_dir = make_zoo(tmp_path / "zoo")
    data_dir = write_mixed_folder(tmp_path / "data", per_class=3)
    env = {**os.environ, "DDSCORE_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run() -> dict:
        # --no-cache: the features are recomputed, so the forward really runs both times.
        r = subprocess.run([sys.executable, "-c", _COUNT_COMPILES, "rank", str(zoo_dir),
                            str(data_dir), "--image-size", str(SIZE), "--batch-size", "4",
                            "--no-cache", "--engine", "jax"],  # the forward compiles too
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stderr.strip().splitlines()[-1])

    first = run()
    programs = list((tmp_path / "cache" / "jax").iterdir())
    assert first["requests"] > 0 and first["hits"] == 0 and programs
    second = run()
    # Every program the second command needed came from the cache written by the first.
    assert second["requests"] == first["requests"]
    assert second["hits"] == second["requests"]
    assert sorted(p.name for p in (tmp_path / "cache" / "jax").iterdir()) == \
        sorted(p.name for p in programs)
