"""The feature cache: what invalidates an entry, atomic writes, and resuming through ``rank``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddscore_jax import api, cache, data, model, zoo
from ddscore_jax.model import ImportedModel

SIZE = 32
BLOCKS = ("layer3.0", "layer3.1")


def write_folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for c, cls in enumerate(("bad", "good")):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            px = np.clip(rng.integers(0, 256, (36, 44, 3)) * 0.5 + 60 * c, 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / cls / f"{j}.png")
    return root


def add_model(zoo_dir: Path, name: str, seed: int) -> None:
    # The sha256 stands for the checkpoint file's hash; a new seed is a new checkpoint.
    zoo.add(zoo_dir, [zoo.Addition(name, zoo_dir / f"{name}.pth", "pytorch", f"{seed:064x}",
                                   ImportedModel(model.CONFIGS["resnet18"],
                                                 model.init_state_dict(model.CONFIGS["resnet18"],
                                                                       seed)))],
            overwrite=True)


@pytest.fixture()
def workspace(tmp_path):
    zoo_dir = tmp_path / "zoo"
    add_model(zoo_dir, "alpha", 0)
    add_model(zoo_dir, "beta", 1)
    return zoo_dir, write_folder(tmp_path / "data"), tmp_path / "features"


def rank(workspace, **kw):
    zoo_dir, data_dir, cache_dir = workspace
    return api.rank(zoo_dir, data_dir, cache_dir=cache_dir,
                    **{"batch_size": 4, "image_size": SIZE, **kw})


def scores(ranking) -> dict[str, float]:
    return {m.name: m.score for m in ranking.models}


def test_a_change_invalidates_exactly_what_it_affects(workspace):
    zoo_dir, data_dir, cache_dir = workspace
    first = rank(workspace)
    assert first.cached == []
    again = rank(workspace)
    assert sorted(again.cached) == ["alpha", "beta"]
    assert scores(again) == scores(first)

    add_model(zoo_dir, "beta", 7)  # a new checkpoint under the same name
    assert rank(workspace).cached == ["alpha"]

    # Another image size misses both models; the old entries are still there to come back to.
    assert rank(workspace, image_size=40).cached == []
    assert sorted(rank(workspace).cached) == ["alpha", "beta"]

    # One image rewritten (its size changes): every model's features of this data set miss.
    img = data_dir / "good" / "1.png"
    Image.fromarray(np.zeros((36, 44, 3), np.uint8)).save(img)
    changed = rank(workspace)
    assert changed.cached == []
    assert scores(changed) != scores(first)

    # Same bytes, new mtime: the fingerprint cannot prove the content is the same, so it misses.
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert rank(workspace).cached == []

    # Nothing half-written or unfinished is left behind (lock files are kept on purpose: removing
    # one would race with a process waiting on it).
    leftovers = [p.name for p in cache_dir.iterdir()
                 if not p.name.endswith(".npz") and p.name != cache.LOCKS]
    assert leftovers == []


def test_the_key_covers_model_data_size_and_dtype(tmp_path):
    key = dict(cache_dir=tmp_path, model_sha256="a" * 64, data_fingerprint="f" * 64,
               image_size=224)
    base = cache.entry_path(**key)
    assert base == cache.entry_path(**key, dtype="float32")
    for change in ({"model_sha256": "b" * 64}, {"data_fingerprint": "e" * 64},
                   {"image_size": 192}, {"dtype": "bfloat16"}, {"engine": "onnxruntime"}):
        assert cache.entry_path(**{**key, **change}) != base, change
    assert cache.entry_path(**key, engine="jax") == base  # the defaults: float32, the JAX engine


def recorded_settings(entry: Path) -> dict:
    with np.load(entry, allow_pickle=False) as z:
        return json.loads(str(z["cache_meta"]))["settings"]


def test_each_engine_keeps_its_own_features(workspace, caplog):
    # The engines agree to float32 rounding, not bit for bit: one's features are never served
    # as the other's, and "auto" shares the entries of the engine it resolves to.
    _, _, cache_dir = workspace
    ort_first = rank(workspace, engine="onnxruntime")
    assert ort_first.cached == []
    assert rank(workspace, engine="jax").cached == []
    assert sorted(rank(workspace, engine="onnxruntime").cached) == ["alpha", "beta"]
    jax_again = rank(workspace, engine="jax")
    assert sorted(jax_again.cached) == ["alpha", "beta"]
    assert sorted(rank(workspace, engine="auto").cached) == ["alpha", "beta"]  # CPU: onnxruntime
    entries = sorted(cache_dir.glob("*.npz"))
    assert sorted(recorded_settings(p)["engine"] for p in entries) == ["jax"] * 2 + [
        "onnxruntime"] * 2
    for name, score in scores(jax_again).items():
        assert score == pytest.approx(scores(ort_first)[name], rel=1e-4)

    # A model's onnxruntime entry copied over its JAX one is refused, naming the engine, and
    # recomputed.
    by = {(s["model_sha256"], s["engine"]): p for p in entries if (s := recorded_settings(p))}
    sha = next(iter(by))[0]
    by[sha, "jax"].write_bytes(by[sha, "onnxruntime"].read_bytes())
    caplog.clear()
    assert len(rank(workspace, engine="jax").cached) == 1
    assert "were made from something else (differs in engine)" in caplog.text


def test_the_data_fingerprint_sees_labels_names_sizes_and_mtimes(tmp_path):
    root = write_folder(tmp_path / "d")
    before = cache.dataset_fingerprint(data.scan(root))
    assert cache.dataset_fingerprint(data.scan(root)) == before
    (root / "good" / "2.png").rename(root / "bad" / "9.png")  # one image changes class
    assert cache.dataset_fingerprint(data.scan(root)) != before


def chunk(rows: int, start: int) -> dict[str, np.ndarray]:
    return {b: np.arange(start, start + rows, dtype=np.float32)[:, None] * np.ones((1, 4))
            for b in BLOCKS}


def test_partial_features_keep_the_contiguous_prefix(tmp_path):
    partial = cache.PartialFeatures(tmp_path / "x.partial")
    assert partial.load(10, BLOCKS) == (0, {})
    partial.append(0, 3, chunk(3, 0))
    partial.append(3, 5, chunk(2, 3))
    partial.append(7, 9, chunk(2, 7))  # after a gap: not part of the prefix
    done, arrays = partial.load(10, BLOCKS)
    assert done == 5
    np.testing.assert_array_equal(arrays["layer3.0"][:, 0], np.arange(5))

    # A chunk beyond the data set (another data set would have another key, but be safe).
    assert partial.load(4, BLOCKS)[0] == 3
    # A damaged chunk ends the prefix there; what follows it is recomputed.
    (tmp_path / "x.partial" / "0000000003-0000000005.npz").write_bytes(b"truncated")
    assert partial.load(10, BLOCKS)[0] == 3
    partial.clear()
    assert not (tmp_path / "x.partial").exists()


class Exploding:
    """An array whose conversion fails halfway through a write, like a full disk or a Ctrl-C."""

    def __array__(self, dtype=None, copy=None):
        raise KeyboardInterrupt


def test_a_failed_chunk_write_leaves_nothing_behind(tmp_path):
    partial = cache.PartialFeatures(tmp_path / "x.partial")
    partial.append(0, 3, chunk(3, 0))
    before = sorted(p.name for p in (tmp_path / "x.partial").iterdir())
    with pytest.raises(KeyboardInterrupt):
        partial.append(3, 6, {"layer3.0": Exploding(), "layer3.1": Exploding()})
    assert sorted(p.name for p in (tmp_path / "x.partial").iterdir()) == before
    assert partial.load(10, BLOCKS)[0] == 3


def test_an_interrupted_rank_resumes(workspace):
    zoo_dir, data_dir, cache_dir = workspace
    clean = api.rank(zoo_dir, data_dir, batch_size=2, image_size=SIZE, use_cache=False)

    calls = []

    def interrupt(_desc, completed, _total):
        calls.append(completed)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rank(workspace, batch_size=2, progress=interrupt)
    # The first 4 of 6 images are kept, per model, beside the entries they will become.
    assert len(list(cache_dir.glob("*.partial"))) == 2
    assert not list(cache_dir.glob("*.npz"))

    calls.clear()
    resumed = rank(workspace, batch_size=2, progress=lambda d, c, _t: calls.append(c)
                   if d == "extracting features" else None)
    assert calls == [4, 6]  # the resume point, then the one remaining batch (scoring aside)
    assert resumed.cached == []
    assert scores(resumed) == scores(clean)
    assert not list(cache_dir.glob("*.partial"))
    assert len(list(cache_dir.glob("*.npz"))) == 2


def test_no_cache_neither_fingerprints_the_data_nor_writes(workspace, monkeypatch):
    # The data fingerprint stats every image; a rank that uses no cache has no use for it.
    zoo_dir, data_dir, cache_dir = workspace
    fingerprinted = []
    real = cache.dataset_fingerprint
    monkeypatch.setattr(cache, "dataset_fingerprint",
                        lambda ds: fingerprinted.append(len(ds)) or real(ds))
    uncached = rank(workspace, use_cache=False)
    assert fingerprinted == [] and not cache_dir.exists()
    cached = rank(workspace)
    assert fingerprinted == [6]
    assert scores(uncached) == scores(cached)
