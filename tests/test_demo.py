"""The demo's pieces: packaged source data, the target set, pre-training, and the cache.

The full demo (default config) runs through the CLI test; here the cache is exercised with a
two-step pre-training so that three builds fit in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddscore_jax import data, demo, sources, zoo
from ddscore_jax.errors import InputError

TINY = demo.DemoConfig(train_steps={"digits": 2, "textures": 2, "faces": 2})


def test_source_tasks_load_from_installed_packages():
    digits = demo.digits_task()
    assert digits.images.shape == (1797, 8, 8) and digits.images.dtype == np.uint8
    assert np.bincount(digits.labels).size == 10 and len(digits.classes) == 10

    textures = demo.textures_task(per_class=20)
    assert textures.images.shape == (20 * len(sources.TEXTURES), sources.CROP, sources.CROP)
    assert textures.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(textures.labels), [20] * len(sources.TEXTURES))

    faces = demo.faces_task()
    assert faces.images.shape == (200, 25, 25) and faces.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(faces.labels), [100, 100])


def test_pretraining_inputs_are_what_the_ranking_reads(tmp_path):
    # Pre-training skips the PNG round trip; it must still see exactly what data.load_image gives.
    crops = demo.textures_task(per_class=1).images[:3]
    for i, crop in enumerate(crops):
        Image.fromarray(crop, mode="L").save(tmp_path / f"{i}.png")
    x = sources.to_inputs(crops, demo.DEMO_IMAGE_SIZE)
    assert x.shape == (3, demo.DEMO_IMAGE_SIZE, demo.DEMO_IMAGE_SIZE, 3) and x.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(x[i], data.load_image(tmp_path / f"{i}.png",
                                                            demo.DEMO_IMAGE_SIZE))


def test_target_set_layout_and_defects(tmp_path):
    demo.write_target(tmp_path / "a")
    ds = data.scan(tmp_path / "a")
    assert ds.classes == sources.DEFECT_CLASSES
    np.testing.assert_array_equal(np.bincount(ds.labels), [demo.TARGET_PER_CLASS] * 3)

    brick = sources.picture(demo.TARGET_SURFACE)
    lo, hi = int(brick.min()), int(brick.max())
    assert lo > 0 and hi < 255  # so that a saturated pixel can only be a defect
    for path, label in zip(ds.paths, ds.labels, strict=True):
        img = np.asarray(Image.open(tmp_path / "a" / path))
        assert img.shape == (sources.CROP, sources.CROP) and img.dtype == np.uint8
        saturated = int(np.sum((img == 0) | (img == 255)))
        if ds.classes[label] == "clean":
            assert saturated == 0 and lo <= img.min() and img.max() <= hi, path
        else:
            assert saturated >= 20, (path, saturated)

    # Seeded: a second write is byte for byte the same.
    demo.write_target(tmp_path / "b")
    for path in ds.paths:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


def test_pretraining_beats_chance_on_held_out_digits():
    task = demo.digits_task()
    train, test = demo.split_task(task)
    trainer = demo.trainer(demo.DemoConfig())
    x, x_test = (sources.to_inputs(task.images[i], demo.DEMO_IMAGE_SIZE) for i in (train, test))
    untrained = trainer.accuracy(demo.init_state(0), x_test, task.labels[test])
    steps = demo.DemoConfig().train_steps["digits"]
    state, loss = trainer.train(demo.init_state(0), x, task.labels[train], steps, seed=0)
    accuracy = trainer.accuracy(state, x_test, task.labels[test])
    # Chance is 0.1. Tested in eval mode, with BatchNorm's running statistics still partly at
    # their initial values after 30 steps (momentum 0.1): about 0.5 (the training loss says more).
    assert accuracy > 0.4 and accuracy > untrained + 0.3, (accuracy, untrained)
    assert loss < 1.0, loss
    assert np.isfinite(loss)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DDSCORE_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "ddscore-jax" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "ddscore-jax" / "demo"


def test_default_cache_dir_honours_ddscore_jax_cache(monkeypatch, tmp_path):
    # The tool's one cache root, as `rank` uses it: DDSCORE_JAX_CACHE wins over XDG_CACHE_HOME.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("DDSCORE_JAX_CACHE", str(tmp_path / "mine"))
    assert demo.default_cache_dir() == tmp_path / "mine" / "demo"


def test_a_folder_that_is_not_a_demo_cache_is_left_alone(tmp_path):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="not a ddscore-jax demo cache"):
        demo.prepare_demo(tmp_path, config=TINY)
    assert (tmp_path / "zoo" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


class _Interrupt(Exception):
    pass


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _zoo_digests(zoo_dir: Path) -> dict[str, str]:
    return {e.name: sources.params_digest(zoo.load_state_dict(zoo_dir, e))
            for e in zoo.read(zoo_dir)}


def test_cache_is_built_once_and_rebuilt_when_incomplete(tmp_path):
    cache = tmp_path / "cache"

    # An interrupted build leaves neither a marker nor its build folder behind.
    def interrupt(description, completed, total):
        if description == "pre-training resnet18_digits" and completed == 1:
            raise _Interrupt
    with pytest.raises(_Interrupt):
        demo.prepare_demo(cache, interrupt, config=TINY)
    assert not demo.is_ready(cache, TINY)
    assert not list(cache.glob(".build-*"))

    # A killed build (no clean-up ran) leaves a build folder of a process that is gone.
    stale = cache / f".build-{_dead_pid()}-deadbeef"
    (stale / "zoo").mkdir(parents=True)

    calls = []
    zoo_dir, data_dir = demo.prepare_demo(cache, lambda *a: calls.append(a), config=TINY)
    assert (zoo_dir, data_dir) == (cache / "zoo", cache / "target")
    assert not stale.exists()
    assert demo.is_ready(cache, TINY) and not demo.is_ready(cache)  # config is part of the key
    stages = {}
    for description, completed, total in calls:
        assert 0 <= completed <= total
        stages[description] = (completed, total)
    assert all(c == t for c, t in stages.values()), stages
    assert stages["pre-training resnet18_textures"] == (2, 2)

    entries = zoo.read(zoo_dir)
    assert [e.name for e in entries] == ["resnet18_digits", "resnet18_textures",
                                         "resnet18_faces", "resnet18_random"]
    digests = _zoo_digests(zoo_dir)
    for e in entries:
        assert e.arch == "resnet18" and e.source_format == "demo"
        assert digests[e.name] == e.sha256
        recipe = json.loads((zoo_dir / e.source).read_text())
        assert recipe["model"] == e.name
    ds = data.scan(data_dir)
    assert ds.classes == sources.DEFECT_CLASSES and len(ds) == 3 * demo.TARGET_PER_CLASS

    # Complete: the second call returns at once, building nothing.
    stamp = os.stat(zoo_dir / zoo.ZOO_FILE).st_mtime_ns
    calls.clear()
    assert demo.prepare_demo(cache, lambda *a: calls.append(a), config=TINY) == (zoo_dir, data_dir)
    assert calls == [] and os.stat(zoo_dir / zoo.ZOO_FILE).st_mtime_ns == stamp

    # A marker from another demo version means a rebuild, which repeats the models exactly.
    marker = json.loads((cache / demo.MARKER).read_text())
    (cache / demo.MARKER).write_text(json.dumps({**marker, "version": demo.DEMO_VERSION - 1}))
    assert demo.prepare_demo(cache, lambda *a: calls.append(a), config=TINY) == (zoo_dir, data_dir)
    assert calls and demo.is_ready(cache, TINY)
    assert _zoo_digests(zoo_dir) == digests
    assert {e.name: e.sha256 for e in zoo.read(zoo_dir)} == digests
