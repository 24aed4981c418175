"""State under faults: two writers at once, kill -9 at every write step, tampered caches, hostile
zoo.json names, outputs that would overwrite inputs, SIGTERM and SIGINT. The real CLI in
subprocesses wherever the behaviour is a process's; the kills come from the fault hook
(``DDSCORE_JAX_FAULT``, see ``ddscore_jax.atomic.fault_point``), which signals the process itself at
a named step, so every step is hit exactly rather than by timing."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, error_line, save_pth, torch_resnet, write_image_folder

from ddscore_jax import api, atomic, cache, model, zoo
from ddscore_jax.model import ImportedModel

SIZE = "32"
RANK = ("--image-size", SIZE, "--batch-size", "2")
ZOO_OWN = {"zoo.json", "checkpoints", zoo.LOCK_FILE}  # all a zoo holds at rest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints (``old/m0.pth``, and ``new/`` with another ``m0.pth`` and ``m2.pth``) and a data
    set of 9 images."""
    root = tmp_path_factory.mktemp("faults")
    for sub, names in (("old", {"m0": 0}), ("new", {"m0": 10, "m2": 2}), ("more", {"m3": 3})):
        (root / sub).mkdir()
        for name, seed in names.items():
            save_pth(torch_resnet("resnet18", seed), root / sub / f"{name}.pth")
    return root, write_image_folder(root / "data", per_class=3)


def models_of(zoo_dir: Path) -> dict[str, str]:
    doc = json.loads((zoo_dir / "zoo.json").read_text())
    return {m["name"]: m["sha256"] for m in doc["models"]}


def assert_at_rest(zoo_dir: Path) -> None:
    """No leftovers: the zoo holds zoo.json, its lock and exactly the checkpoints it names."""
    assert {p.name for p in zoo_dir.iterdir()} == ZOO_OWN
    named = {m["checkpoint"] for m in json.loads((zoo_dir / "zoo.json").read_text())["models"]}
    assert {f"checkpoints/{p.name}" for p in (zoo_dir / "checkpoints").iterdir()} == named


def assert_cache_at_rest(cache_dir: Path) -> None:
    """Only finished entries (and the lock folder): no temporaries, no partial rows."""
    left = [p.name for p in cache_dir.iterdir()
            if not p.name.endswith(".npz") and p.name != cache.LOCKS]
    assert left == []
    assert not list(cache_dir.glob(".*.tmp"))


# ------------------------------------------------------------------------------ one writer

@pytest.fixture(scope="module")
def old_zoo(files, tmp_path_factory):
    """A zoo holding ``old/m0.pth``, made once; tests work on copies."""
    root, _ = files
    zoo_dir = tmp_path_factory.mktemp("old") / "zoo"
    assert cli("convert", root / "old", "--zoo", zoo_dir).returncode == 0
    return zoo_dir


def copy_of(zoo_dir: Path, dest: Path) -> Path:
    shutil.copytree(zoo_dir, dest, copy_function=shutil.copy2)  # same mtimes: same checkpoints
    return dest


# Five trials in the full suite (the race went wrong 3 times in 3 before the lock), one in the
# quick tier.
@pytest.mark.parametrize("trial", [0, *(pytest.param(t, marks=pytest.mark.slow)
                                        for t in range(1, 5))])
def test_two_converts_into_one_zoo_both_land(files, tmp_path, trial):
    root, _ = files
    cmd = [shutil.which("ddscore-jax") or sys.executable, "convert"]
    zoo_dir = tmp_path / "zoo"
    procs = [subprocess.Popen([*cmd, root / src, "--zoo", zoo_dir], stderr=subprocess.PIPE,
                              text=True) for src in ("new/m2.pth", "more/m3.pth")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
        p.stderr.close()
    assert sorted(models_of(zoo_dir)) == ["m2", "m3"]
    assert_at_rest(zoo_dir)


def test_a_failed_orbax_save_leaves_nothing(files, old_zoo, tmp_path):
    root, _ = files
    zoo_dir = copy_of(old_zoo, tmp_path / "zoo")
    before = (zoo_dir / "zoo.json").read_bytes()
    exe = shutil.which("ddscore-jax") or sys.executable
    # A 4 MB file-size limit: Orbax fails halfway through the 45 MB checkpoint (EFBIG; Python
    # ignores SIGXFSZ), as on a full disk.
    result = subprocess.run(
        [exe, "convert", root / "more", "--zoo", zoo_dir], capture_output=True, text=True,
        timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20,) * 2))
    assert result.returncode in (1, 2), result.stderr  # which line: test_faults_input.py
    assert (zoo_dir / "zoo.json").read_bytes() == before
    assert_at_rest(zoo_dir)


def test_two_ranks_on_one_cache_extract_once(small_zoo, tmp_path):
    zoo_dir, data, clean = small_zoo
    cache_dir = tmp_path / "cache"
    cmd = [shutil.which("ddscore-jax") or sys.executable, "rank", zoo_dir, data, *RANK,
           "--cache-dir", cache_dir, "--json", "-"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert {m["name"]: m["score"] for m in json.loads(out)["models"]} == {
            m["name"]: m["score"] for m in clean}
    # One extracted; the other waited for its locks and read what it wrote.
    assert sum("reused cached features of 2 model(s)" in err for _, err in outs) == 1
    assert len(list(cache_dir.glob("*.npz"))) == 2
    assert_cache_at_rest(cache_dir)


# ------------------------------------------------------------------------- kill -9 in convert

# Every step of the update; the quick tier keeps one before the commit (Orbax still writing) and
# the commit itself.
CONVERT_STEPS = ["convert:saving", "zoo.json:replaced",
                 *(pytest.param(s, marks=pytest.mark.slow) for s in (
                     "pending:written", "pending:replaced", "convert:saved", "convert:placed",
                     "zoo.json:written"))]


@pytest.mark.parametrize("step", CONVERT_STEPS)
def test_kill_during_convert_leaves_old_or_new(files, old_zoo, tmp_path, step):
    root, _ = files
    zoo_dir = copy_of(old_zoo, tmp_path / "zoo")
    old = models_of(zoo_dir)
    killed = cli("convert", root / "new", "--zoo", zoo_dir, "--overwrite",
                 env={"DDSCORE_JAX_FAULT": step})
    assert killed.returncode == -9, killed.stderr  # the hook reached the step

    # convert commits each checkpoint on its own, in order (m0, then m2): the zoo is the old one,
    # the old one with m0 replaced, or the new one; never a half-written model, and every
    # checkpoint zoo.json names loads.
    after = models_of(zoo_dir)
    assert after == old or (after["m0"] != old["m0"] and set(after) - {"m2"} == set(old)), after
    for e in zoo.read(zoo_dir):
        assert zoo.load_state_dict(zoo_dir, e)

    again = cli("convert", root / "new", "--zoo", zoo_dir, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert set(models_of(zoo_dir)) == {"m0", "m2"} and models_of(zoo_dir)["m0"] != old["m0"]
    assert_at_rest(zoo_dir)


# ----------------------------------------------------------------------- kill -9 in rank's cache

@pytest.fixture(scope="module")
def small_zoo(files, tmp_path_factory):
    root, data = files
    zoo_dir = tmp_path_factory.mktemp("zoo") / "zoo"
    assert cli("convert", root / "new", "--zoo", zoo_dir).returncode == 0
    clean = cli("rank", zoo_dir, data, *RANK, "--no-cache", "--json", "-")
    assert clean.returncode == 0, clean.stderr
    return zoo_dir, data, json.loads(clean.stdout)["models"]


def scores(result) -> dict[str, float]:
    assert result.returncode == 0, result.stderr
    return {m["name"]: m["score"] for m in json.loads(result.stdout)["models"]}


# A SIGTERM at the second batch makes the extraction save its rows (a chunk write); the kill then
# lands inside that save, or inside the final entry's write.
RANK_FAULTS = ["extract:batch@2=TERM,cache-chunk:written", "cache-entry:replaced",
               *(pytest.param(f, marks=pytest.mark.slow) for f in (
                   "extract:batch@2=TERM,cache-chunk:replaced", "cache-entry:written",
                   "cache-entry:replaced@2"))]


@pytest.mark.parametrize("fault", RANK_FAULTS)
def test_kill_during_rank_cache_writes(small_zoo, tmp_path, fault):
    zoo_dir, data, clean = small_zoo
    cache_dir = tmp_path / "cache"
    killed = cli("rank", zoo_dir, data, *RANK, "--cache-dir", cache_dir,
                 env={"DDSCORE_JAX_FAULT": fault})
    assert killed.returncode == -9, killed.stderr
    # Whatever is there as an entry is whole and right.
    for path in cache_dir.glob("*.npz"):
        with np.load(path) as z:
            assert z["layer3.0"].shape == (9, 256)

    again = cli("rank", zoo_dir, data, *RANK, "--cache-dir", cache_dir, "--json", "-")
    assert scores(again) == {m["name"]: m["score"] for m in clean}
    assert_cache_at_rest(cache_dir)


# ------------------------------------------------------------------------------- the cache

def test_tampered_or_misplaced_cache_entries_are_recomputed(small_zoo, tmp_path):
    zoo_dir, data, clean = small_zoo
    cache_dir = tmp_path / "cache"
    assert scores(cli("rank", zoo_dir, data, *RANK, "--cache-dir", cache_dir, "--json", "-"))
    a, b = sorted(cache_dir.glob("*.npz"))
    # New values in a valid .npz (the zip CRCs match), the record copied over unchanged.
    with np.load(a) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["layer3.0"][0, 0] += 1.0
    np.savez(a, **arrays)
    b.write_bytes(a.read_bytes())  # and the other model's entry replaced by this one
    again = cli("rank", zoo_dir, data, *RANK, "--cache-dir", cache_dir, "--json", "-")
    assert scores(again) == {m["name"]: m["score"] for m in clean}
    assert "changed after they were written" in again.stderr
    assert "were made from something else" in again.stderr
    assert again.stderr.count("recomputing") == 2
    third = cli("rank", zoo_dir, data, *RANK, "--cache-dir", cache_dir)
    assert "recomputing" not in third.stderr and "reused cached features of 2" in third.stderr


def imported(seed: int) -> ImportedModel:
    config = model.CONFIGS["resnet18"]
    return ImportedModel(config, model.init_state_dict(config, seed))


def add_model(zoo_dir: Path, name: str, seed: int, sha: str) -> None:
    zoo.add(zoo_dir, [zoo.Addition(name, zoo_dir / f"{name}.pth", "pytorch", sha, imported(seed))])


def test_one_sha256_two_checkpoints_two_cache_entries(tmp_path, files):
    _, data = files
    zoo_dir = tmp_path / "zoo"
    add_model(zoo_dir, "a", 0, "0" * 64)
    add_model(zoo_dir, "b", 1, "1" * 64)
    doc = json.loads((zoo_dir / "zoo.json").read_text())
    doc["models"][1]["sha256"] = "0" * 64  # an edited zoo.json: one hash, two checkpoints
    (zoo_dir / "zoo.json").write_text(json.dumps(doc))
    kw = dict(batch_size=4, image_size=int(SIZE), cache_dir=tmp_path / "cache")
    first = {m.name: m.score for m in api.rank(zoo_dir, data, **kw).models}
    assert first["a"] != first["b"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    second = api.rank(zoo_dir, data, **kw)
    assert sorted(second.cached) == ["a", "b"]
    assert {m.name: m.score for m in second.models} == first


def test_a_reader_of_a_replaced_model_is_told_to_run_again(tmp_path):
    # Readers take no lock: one that read zoo.json before an --overwrite finds the old checkpoint
    # gone, and says why instead of "missing".
    zoo_dir = tmp_path / "zoo"
    add_model(zoo_dir, "a", 0, "0" * 64)
    [before] = zoo.read(zoo_dir)
    zoo.add(zoo_dir, [zoo.Addition("a", zoo_dir / "a.pth", "pytorch", "1" * 64, imported(1))],
            overwrite=True)
    [after] = zoo.read(zoo_dir)
    assert after.checkpoint != before.checkpoint
    assert not (zoo_dir / before.checkpoint).exists()
    with pytest.raises(zoo.InputError, match="was replaced while this command ran"):
        zoo.load_state_dict(zoo_dir, before)
    assert zoo.load_state_dict(zoo_dir, after)


# ------------------------------------------------------------------- hostile names, clobbering

def test_a_zoo_name_that_escapes_is_refused(small_zoo, tmp_path):
    zoo_dir, data, _ = small_zoo
    hostile = tmp_path / "zoo"
    shutil.copytree(zoo_dir, hostile)
    doc = json.loads((hostile / "zoo.json").read_text())
    doc["models"][0]["name"] = "../../escaped"
    (hostile / "zoo.json").write_text(json.dumps(doc))
    out = tmp_path / "deep" / "er" / "feats"
    result = cli("extract", hostile, data, "--out", out, "--image-size", SIZE)
    assert result.returncode == 2
    assert "'../../escaped' is not a usable model name" in error_line(result)
    assert not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("command", ["rank", "zoo list"])
def test_json_over_the_zoo_manifest_is_refused(small_zoo, command):
    zoo_dir, data, _ = small_zoo
    before = (zoo_dir / "zoo.json").read_bytes()
    args = [zoo_dir, data, *RANK] if command == "rank" else [zoo_dir]
    result = cli(*command.split(), *args, "--json", zoo_dir / "zoo.json")
    assert result.returncode == 2
    assert "would overwrite an input" in error_line(result)
    assert (zoo_dir / "zoo.json").read_bytes() == before


def test_outputs_over_other_inputs_are_refused(small_zoo, tmp_path):
    zoo_dir, data, _ = small_zoo
    image = next((data / "ok").iterdir())
    before = image.read_bytes()
    assert cli("rank", zoo_dir, data, *RANK, "--json", image).returncode == 2
    feats = tmp_path / "feats"
    feats.mkdir()
    np.savez(feats / "x.npz", a=np.zeros(1))
    assert cli("score", feats, "--json", feats / "x.npz").returncode == 2
    assert cli("extract", zoo_dir, data, "--out", zoo_dir / "checkpoints").returncode == 2
    assert image.read_bytes() == before


# ---------------------------------------------------------------------------------- signals

def test_sigterm_during_rank_saves_and_says_so(small_zoo, tmp_path):
    zoo_dir, data, clean = small_zoo
    cache_dir = tmp_path / "cache"
    term = cli("rank", zoo_dir, data, *RANK, "--cache-dir", cache_dir,
               env={"DDSCORE_JAX_FAULT": "extract:batch@2=TERM"})
    assert term.returncode == 143, term.stderr
    assert error_line(term) == ("terminated: kept the features of 4 of 9 images for 2 model(s) "
                                "in the cache; the next run resumes from there")
    assert len(list(cache_dir.glob("*.partial/*.npz"))) == 2
    resumed = cli("rank", zoo_dir, data, *RANK, "--cache-dir", cache_dir, "--json", "-")
    assert scores(resumed) == {m["name"]: m["score"] for m in clean}
    assert_cache_at_rest(cache_dir)


def test_sigint_during_rank_exits_130_and_says_what_was_kept(small_zoo, tmp_path):
    zoo_dir, data, _ = small_zoo
    nocache = cli("rank", zoo_dir, data, *RANK, "--no-cache",
                  env={"DDSCORE_JAX_FAULT": "extract:batch@3=INT"})
    assert nocache.returncode == 130
    assert error_line(nocache) == "interrupted: nothing new was saved (--no-cache)"
    cached = cli("rank", zoo_dir, data, *RANK, "--cache-dir", tmp_path / "cache",
                 env={"DDSCORE_JAX_FAULT": "extract:batch@3=INT"})
    assert cached.returncode == 130
    assert error_line(cached).startswith("interrupted: kept the features of 6 of 9 images")


def test_sigint_during_convert_is_never_swallowed(files, old_zoo, tmp_path):
    root, _ = files
    zoo_dir = copy_of(old_zoo, tmp_path / "zoo")
    before = (zoo_dir / "zoo.json").read_bytes()
    # The interrupt arrives while Orbax's background threads are still writing.
    result = cli("convert", root / "new", "--zoo", zoo_dir, "--overwrite",
                 env={"DDSCORE_JAX_FAULT": "convert:saving=INT"})
    assert result.returncode == 130, result.stderr
    assert error_line(result) == f"interrupted: nothing was added to {zoo_dir}"
    assert "cannot schedule new futures" not in result.stderr
    assert "Traceback" not in result.stderr
    assert (zoo_dir / "zoo.json").read_bytes() == before
    assert_at_rest(zoo_dir)


# ---------------------------------------------------------------------------- atomic writes

def test_atomic_writes_never_touch_the_umask_and_sync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") or os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def umask(_mask):  # setting the umask from a worker thread races with every other thread
        raise AssertionError("atomic_path changed the process umask")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "umask", umask)
    target = tmp_path / "out.json"
    with atomic.atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK
    assert len(synced) == 2 and synced[1] is True  # the file, then its folder
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
