"""Hostile inputs and a hostile environment: one line and exit 2 (docs/interface.md), no hang, no
silently wrong ranking. Process-level behaviour (blocking, exit, memory, disks) runs the real CLI or
a real child process; the rest runs in-process."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_in_process, error_line, save_pth, snapshot, torch_resnet, write_image_folder

from ddscore_jax import api, data
from ddscore_jax import zoo as zoo_lib
from ddscore_jax.cache import FEATURES_VERSION, checkpoint_fingerprint, dataset_fingerprint
from ddscore_jax.converters import load_checkpoint
from ddscore_jax.errors import InputError, environment_message
from ddscore_jax.forward import load_features, save_features


@contextlib.contextmanager
def _warns(caplog, pattern: str):
    """The block logs a warning matching ``pattern`` (the CLI prints it as one stderr line)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddscore_jax"):
        yield
    assert any(re.search(pattern, r.getMessage()) for r in caplog.records), caplog.text


# ---------------------------------------------------------------------------------------------
# Reading data


def test_fifo_named_like_an_image_is_skipped_not_opened(tmp_path, caplog):
    root = write_image_folder(tmp_path / "d", per_class=2, size=(32, 32))
    os.mkfifo(root / "ok" / "x.png")  # opening it would block for ever: nobody writes
    with _warns(caplog, "not regular files"):
        ds = data.scan(root)
    assert len(ds) == 6 and "ok/x.png" not in ds.paths


def test_symlink_loops_and_links_to_the_root_count_each_image_once(tmp_path, caplog):
    root = write_image_folder(tmp_path / "d", per_class=3, size=(32, 32))
    os.symlink(".", root / "ok" / "loop")
    os.symlink("..", root / "crack" / "root")  # would pull other classes in under 'crack'
    os.symlink("../ok/img_000.png", root / "scratch" / "dup.png")  # same file, second label
    with _warns(caplog, "counted once"):
        ds = data.scan(root)
    assert len(ds) == 9
    assert sorted(ds.paths) == sorted(f"{c}/img_{j:03d}.png" for c in ("crack", "ok", "scratch")
                                      for j in range(3))
    assert np.bincount(ds.labels).tolist() == [3, 3, 3]


def test_dangling_symlink_is_one_line(tmp_path):
    root = write_image_folder(tmp_path / "d", per_class=2, size=(32, 32))
    os.symlink("gone.png", root / "ok" / "dangling.png")
    with pytest.raises(InputError, match=r"dangling\.png: broken symbolic link"):
        data.scan(root)


def test_undecodable_names_read_and_reported_readably(tmp_path):
    root = write_image_folder(tmp_path / "d", per_class=2, size=(32, 32))
    bad_file = os.fsdecode(b"caf\xe9.png")
    shutil.copy(root / "ok" / "img_000.png", root / "ok" / bad_file)
    os.rename(root / "scratch", root / os.fsdecode(b"scr\xffatch"))
    ds = data.scan(root)
    assert "scr\\xffatch" in ds.classes  # readable, and encodable as UTF-8
    json.dumps(list(ds.classes)).encode("utf-8")
    pixels = data.load_batch(ds, range(len(ds)), 32)  # the raw names still open the files
    assert np.isfinite(pixels).all()
    dataset_fingerprint(ds)  # hashed as raw bytes, no UnicodeEncodeError
    feats = {"layer3.0": np.ones((len(ds), 4)), "layer3.1": np.ones((len(ds), 4))}
    save_features(tmp_path / "f" / "m.npz", feats, ds, made_from("m"))
    with np.load(tmp_path / "f" / "m.npz") as z:
        assert len(z["paths"]) == len(ds)


# ---------------------------------------------------------------------------------------------
# Parameters and features


@pytest.fixture(scope="module")
def state_dict():
    return torch_resnet("resnet18", 0).state_dict()


@pytest.mark.parametrize(("key", "value", "expect"), [
    ("layer2.0.conv1.weight", float("nan"), r"tensor layer2\.0\.conv1\S* has 1 NaN"),
    ("fc.weight", float("inf"), r"tensor fc\S* has 1 infinite"),
])
def test_non_finite_parameters_refused_by_name(tmp_path, state_dict, key, value, expect):
    import torch

    sd = dict(state_dict)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(InputError, match=expect):
        load_checkpoint(tmp_path / "m.pth")


def test_negative_running_var_refused(tmp_path, state_dict):
    import torch

    sd = dict(state_dict)
    sd["layer1.1.bn2.running_var"] = sd["layer1.1.bn2.running_var"].clone()
    sd["layer1.1.bn2.running_var"][3] = -0.5
    torch.save(sd, tmp_path / "m.pth")
    # Named as the BatchNorm variance where the converter keeps the checkpoint's own BatchNorm
    # tensors; where it folds them first, as the NaN the negative variance makes of its conv.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(InputError, match=r"layer1\.1\.(bn2\.running_var|conv2)"):
            load_checkpoint(tmp_path / "m.pth")


def test_converter_messages_name_wrong_dtype_and_unexpected_tensor(tmp_path, state_dict):
    import torch

    sd = dict(state_dict)
    sd["layer1.0.conv1.weight"] = (sd["layer1.0.conv1.weight"] * 100).to(torch.int64)
    torch.save(sd, tmp_path / "int.pth")
    with pytest.raises(InputError, match=r"layer1\.0\.conv1\.weight has dtype int64"):
        load_checkpoint(tmp_path / "int.pth")
    sd = dict(state_dict)
    sd["layer1.0.proj_conv.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(sd, tmp_path / "extra.pth")
    # Named as the unexpected tensor it is, not as a missing BatchNorm.
    with pytest.raises(InputError, match=r"tensor 'layer1\.0\.proj_conv\.weight' is not part"):
        load_checkpoint(tmp_path / "extra.pth")


def made_from(name: str) -> dict:
    """A feature file's record (cache.feature_settings) for features made up by a test."""
    return {"version": FEATURES_VERSION, "model_sha256": name, "checkpoint": name,
            "data": "made-up", "image_size": 32, "dtype": "float32", "engine": "jax"}


def _feature_folder(folder: Path, models: dict[str, np.ndarray], labels, tmp_path) -> Path:
    root = write_image_folder(tmp_path / "imgs", per_class=1, size=(8, 8))
    ds = data.Dataset(root, tuple(f"x{i}.png" for i in range(len(labels))),
                      np.asarray(labels, np.int64), ("a", "b", "c"))
    for name, f in models.items():
        save_features(folder / f"{name}.npz", {"layer3.0": f, "layer3.1": f}, ds, made_from(name))
    return folder


def test_model_with_non_finite_features_is_named_and_others_rank(tmp_path, caplog):
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    good, bad = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    bad[4, 2] = np.nan
    feats = _feature_folder(tmp_path / "f", {"good": good, "broken": bad}, labels, tmp_path)
    with _warns(caplog, "broken: its features are not finite"):
        ranking = api.score(feats)
    assert [m.name for m in ranking.models] == ["good"]
    assert ranking.to_json()["refused"] == ["broken"]
    os.remove(feats / "good.npz")
    with pytest.raises(InputError, match="no model has finite"):
        api.score(feats)


def test_all_models_tying_warns(tmp_path, caplog):
    f = np.random.default_rng(1).normal(size=(30, 8))
    feats = _feature_folder(tmp_path / "f", {"a": f, "b": f.copy()}, np.arange(30) % 3, tmp_path)
    with _warns(caplog, "carries no information"):
        api.score(feats)


def test_subset_seed_and_image_size_validated_up_front(tmp_path):
    f = np.random.default_rng(1).normal(size=(2, 8))
    feats = _feature_folder(tmp_path / "f", {"a": f}, [0, 1], tmp_path)
    with pytest.raises(InputError, match=r"has 1 image\(s\), all of class"):
        api.score(feats)
    with pytest.raises(InputError, match="--seed must be a non-negative"):
        api.score(feats, seed=-1)
    with pytest.raises(InputError, match="--image-size must be at most"):
        api.rank(tmp_path / "nozoo", tmp_path / "nodata", image_size=100000)


# ---------------------------------------------------------------------------------------------
# The environment


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR,
                                  errno.EISDIR, errno.ENOMEM])
def test_environment_errors_are_one_line_with_path_and_remedy(tmp_path, code):
    message = environment_message(OSError(code, os.strerror(code), str(tmp_path / "x" / "y.tmp")))
    assert message.startswith(str(tmp_path)) and "(" in message and "\n" not in message
    assert environment_message(OSError(errno.EIO, "io")) is None  # not ours to explain: a bug


def _tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield done
    for p in done:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def _fill(path: Path) -> None:
    with open(path / "filler", "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            pass


def _error_lines(r: subprocess.CompletedProcess) -> int:
    """Lines of stderr other than results and progress bars: what the user has to read."""
    return sum(1 for line in r.stderr.splitlines() if line.startswith(("error", "internal error",
                                                                        "  File", "Traceback")))


def _cli(*args, env: dict | None = None, fsize: int | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI of this interpreter's ddscore_jax (not whichever ``ddscore-jax`` is first on PATH),
    optionally with its file-size limit (RLIMIT_FSIZE) at ``fsize`` bytes: writes past it fail
    with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.run([sys.executable, "-m", "ddscore_jax.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feats")
    f = np.random.default_rng(2).normal(size=(30, 8))
    g = np.random.default_rng(3).normal(size=(30, 8))
    return _feature_folder(tmp / "f", {"a": f, "b": g}, np.arange(30) % 3, tmp)


def test_full_disk_under_json_is_one_line_and_leaves_nothing(tmp_path, mounts, feats):
    # Results big enough not to fit in the last free page: several metrics.
    args = ("score", feats, "--metric", "ddscore,hscore,knn,gbc", "--json")
    full = tmp_path / "full"
    if _tmpfs(full, "1m"):  # a real full disk where we may mount one (root)
        mounts.append(full)
        _fill(full)
        r = _cli(*args, full / "r.json")
        assert "no space left" in error_line(r)
    else:  # otherwise a file-size limit below the results' size
        full.mkdir()
        r = _cli(*args, full / "r.json", fsize=64)
        assert "file too large" in error_line(r)
    assert r.returncode == 2, r.stderr
    assert error_line(r).startswith(f"error: {full}"), r.stderr
    assert "Traceback" not in r.stderr and _error_lines(r) == 1  # (the table printed first)
    assert sorted(p.name for p in full.iterdir()) in ([], ["filler"])  # nothing half-written


def test_read_only_and_misplaced_outputs(tmp_path, mounts, feats):
    ro = tmp_path / "ro"
    assert _tmpfs(ro, "1m", "ro"), "mounting a read-only tmpfs failed"
    mounts.append(ro)
    r = _cli("score", feats, "--json", ro / "r.json")
    assert r.returncode == 2 and error_line(r) == (
        f"error: {ro}: read-only file system (choose a writable location)")
    r = _cli("score", feats, "--json", tmp_path)
    assert r.returncode == 2 and "names a folder" in error_line(r)


def test_cache_or_out_that_is_a_file(zoo, tmp_path):
    (tmp_path / "file").write_text("x")
    data_root = write_image_folder(tmp_path / "d", per_class=2, size=(32, 32))
    r = _cli("rank", zoo / "zoo", data_root, "--image-size", "32",
            env={"DDSCORE_JAX_CACHE": str(tmp_path / "file")})
    assert r.returncode == 2 and error_line(r) == (
        f"error: {tmp_path / 'file'}: a file is in the way where a folder is needed (give a "
        "folder path, or move the file)"), r.stderr
    r = _cli("extract", zoo / "zoo", data_root, "--image-size", "32", "--out", tmp_path / "file")
    assert r.returncode == 2 and "exists and is not a folder" in error_line(r), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    save_pth(torch_resnet("resnet18", 5), root / "m.pth")
    r = _cli("convert", root / "m.pth", "--zoo", root / "zoo")
    assert r.returncode == 0, r.stderr
    return root


def test_convert_into_read_only_zoo_exits_promptly(zoo, tmp_path, mounts):
    ro = tmp_path / "rozoo"
    assert _tmpfs(ro, "64m")
    mounts.append(ro)
    shutil.copytree(zoo / "zoo", ro, dirs_exist_ok=True)
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    # Orbax's signalling threads used to hold the exit for minutes after the error.
    r = _cli("convert", zoo / "m.pth", "--name", "other", "--zoo", ro, timeout=120)
    assert r.returncode == 2
    assert error_line(r).startswith(f"error: {ro}") and "read-only" in error_line(r).lower()
    assert _error_lines(r) == 1 and "Traceback" not in r.stderr


def test_edited_zoo_arch_is_one_line(zoo, tmp_path):
    edited = tmp_path / "zoo"
    shutil.copytree(zoo / "zoo", edited)
    doc = json.loads((edited / "zoo.json").read_text())
    doc["models"][0]["config"]["depths"] = [3, 4, 6, 3]  # a resnet34's: not its checkpoint's
    (edited / "zoo.json").write_text(json.dumps(doc))
    data_root = write_image_folder(tmp_path / "d", per_class=2, size=(32, 32))
    r = _cli("rank", edited, data_root, "--image-size", "32", "--no-cache")
    assert r.returncode == 2 and _error_lines(r) == 1, r.stderr
    assert error_line(r).startswith("error: "), r.stderr


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_zoo_arch_that_disagrees_with_its_config_is_refused(zoo, tmp_path, arch):
    edited = tmp_path / "zoo"
    shutil.copytree(zoo / "zoo", edited)
    doc = json.loads((edited / "zoo.json").read_text())
    doc["models"][0]["arch"] = arch  # edited by hand: the config still says resnet18
    (edited / "zoo.json").write_text(json.dumps(doc))
    data_root = write_image_folder(tmp_path / "d", per_class=2, size=(32, 32))
    for args in (("zoo", "list", edited), ("rank", edited, data_root, "--no-cache")):
        r = cli_in_process(*args)
        assert r.returncode == 2, r.stderr
        assert error_line(r) == (f"error: {edited / 'zoo.json'}: model 'm' has arch '{arch}' but "
                                 "its config is a resnet18; fix arch, or convert the model again")


# ---------------------------------------------------------------------------------------------
# Feature files record what they were made from; score refuses a mix


@pytest.fixture(scope="module")
def extracted(zoo, tmp_path_factory):
    """``extract`` of the one-model zoo with each setting: {setting: folder with m.npz}."""
    root = tmp_path_factory.mktemp("extracted")
    data_root = write_image_folder(root / "data", per_class=2, size=(32, 32))
    other = write_image_folder(root / "other", per_class=2, size=(32, 32), seed=7)  # same names
    made = {}
    for key, kw, images in (("base", {}, data_root), ("size48", {"image_size": 48}, data_root),
                            ("other_data", {}, other),
                            ("onnxruntime", {"engine": "onnxruntime"}, data_root)):
        kw = {"image_size": 32, "batch_size": 4, "engine": "jax", **kw}
        made[key] = root / key
        api.extract(zoo / "zoo", images, made[key], **kw)
    return made


def _mix(extracted: dict[str, Path], other: str, dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(extracted["base"] / "m.npz", dest / "a.npz")
    shutil.copy(extracted[other] / "m.npz", dest / "b.npz")
    return dest


@pytest.mark.parametrize(("other", "differs"), [
    ("size48", "--image-size: 32 and 48"),
    ("onnxruntime", "--engine: jax and onnxruntime"),
    ("other_data", "data set (image names, labels, sizes or modification times)"),
])
def test_score_refuses_features_made_differently(extracted, tmp_path, other, differs):
    mixed = _mix(extracted, other, tmp_path / "mixed")
    r = cli_in_process("score", mixed)
    assert r.returncode == 2, r.stderr
    assert error_line(r) == (f"error: {mixed / 'a.npz'} and {mixed / 'b.npz'}: features made "
                             f"with a different {differs}; extract every model with one setting "
                             "on one data set into its own folder")
    # The same two files side by side with one setting: ranked.
    same = tmp_path / "same"
    same.mkdir()
    for name in ("a", "b"):
        shutil.copy(extracted[other] / "m.npz", same / f"{name}.npz")
    assert cli_in_process("score", same).returncode == 0


def test_score_refuses_a_relabelled_feature_file(extracted, tmp_path):
    mixed = _mix(extracted, "base", tmp_path / "mixed")
    with np.load(mixed / "b.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["classes"] = np.array(["x", "y", "z"])  # the record still names the real data set
    np.savez(mixed / "b.npz", **arrays)
    r = cli_in_process("score", mixed)
    assert r.returncode == 2
    assert error_line(r).endswith("features of different data sets (their classes differ)")


def test_feature_file_without_a_record_is_refused(extracted, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    with np.load(extracted["base"] / "m.npz") as z:  # as an older ddscore-jax wrote it
        np.savez(old / "m.npz", **{k: z[k] for k in z.files if k != "cache_meta"})
    r = cli_in_process("score", old)
    assert r.returncode == 2
    assert error_line(r) == (f"error: {old / 'm.npz'}: feature file carries no record of what "
                             "it was made from (an older ddscore-jax wrote it); extract it again "
                             "with `ddscore-jax extract`")


def test_extract_records_what_the_features_were_made_from(extracted, zoo):
    [entry] = zoo_lib.read(zoo / "zoo")
    f = load_features(extracted["size48"] / "m.npz")
    assert f.settings == {"version": FEATURES_VERSION, "model_sha256": entry.sha256,
                          "checkpoint": checkpoint_fingerprint(zoo / "zoo", entry.checkpoint),
                          "data": f.settings["data"], "image_size": 48, "dtype": "float32",
                          "engine": "jax"}
    assert f.settings["data"] == load_features(extracted["base"] / "m.npz").settings["data"]


# ---------------------------------------------------------------------------------------------
# Weights that overflow in the forward; a full disk under convert


def test_weights_that_overflow_are_refused_at_convert(tmp_path):
    import torch

    sd = torch_resnet("resnet18", 3).state_dict()
    sd["conv1.weight"] = sd["conv1.weight"] * 1e38  # finite in the file, not after conv1
    torch.save(sd, tmp_path / "overflow.pth")
    r = cli_in_process("convert", tmp_path / "overflow.pth", "--zoo", tmp_path / "zoo")
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(
        rf"error: {re.escape(str(tmp_path))}/overflow\.pth: the forward overflows: "
        r"(conv1|layer\d\.\d)'s output is not finite .*", error_line(r)), r.stderr
    assert not (tmp_path / "zoo").exists()


def _zoo_at_rest_or_nothing(zoo_dir: Path, before: dict | None) -> None:
    if before is None:  # a new zoo: its folder and lock, nothing else
        assert sorted(p.name for p in zoo_dir.iterdir()) == [".ddscore-jax.lock"]
    else:
        assert snapshot(zoo_dir) == before


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_under_convert_is_one_line_and_leaves_nothing(zoo, tmp_path, mounts, existing):
    disk = tmp_path / "disk"
    assert _tmpfs(disk, "64m" if existing else "2m"), "mounting a tmpfs failed"
    mounts.append(disk)
    zoo_dir = disk / "zoo"
    if existing:
        shutil.copytree(zoo / "zoo", zoo_dir)
        _fill(disk)
        free = shutil.disk_usage(disk).free
        os.truncate(disk / "filler", os.path.getsize(disk / "filler") - (2 << 20) + free)
    before = snapshot(zoo_dir)
    r = _cli("convert", zoo / "m.pth", "--name", "other", "--zoo", zoo_dir, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.fullmatch(rf"error: {re.escape(str(zoo_dir))}: no space left on the device for "
                        r"other \(44\.\d MB needed, 2\.\d MB free; .*\)", error_line(r))
    _zoo_at_rest_or_nothing(zoo_dir, before)


@pytest.mark.parametrize("trial", [0, *(pytest.param(t, marks=pytest.mark.slow) for t in (1, 2))])
def test_a_write_that_fails_halfway_under_convert_is_one_line(zoo, tmp_path, trial):
    # Enough free space, but a file-size limit (EFBIG): Orbax fails halfway, its other writes
    # still in flight; they used to print tracebacks and recreate the temporary folder.
    zoo_dir = tmp_path / "zoo"
    r = _cli("convert", zoo / "m.pth", "--zoo", zoo_dir, fsize=4 << 20, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert error_line(r) == (f"error: {zoo_dir}: file too large for this file system or limit "
                             "(free some space or choose another location)")
    _zoo_at_rest_or_nothing(zoo_dir, None)


# ---------------------------------------------------------------------------------------------
# Outputs in a folder that refuses new files (/proc): the user's path, exit 2


def test_outputs_where_the_folder_refuses_files(zoo, feats, tmp_path):
    data_root = write_image_folder(tmp_path / "d", per_class=2, size=(32, 32))
    fine = tmp_path / "fine"
    for part in ("train", "valid"):
        write_image_folder(fine / part, per_class=2, size=(32, 32))
    zoo_dir = zoo / "zoo"
    cases = [
        (("score", feats, "--json", "/proc/r.json"), "/proc/r.json"),
        (("rank", zoo_dir, data_root, "--image-size", "32", "--json", "/proc/r.json"),
         "/proc/r.json"),
        (("zoo", "list", zoo_dir, "--json", "/proc/r.json"), "/proc/r.json"),
        (("extract", zoo_dir, data_root, "--out", "/proc/x"), "/proc/x"),
        (("extract", zoo_dir, data_root, "--out", "/proc"), "/proc/m.npz"),
        (("rank", zoo_dir, data_root, "--figure", "/proc/f.png"), "/proc/f.png"),
        (("convert", zoo / "m.pth", "--zoo", "/proc/z"), "/proc/z"),
        (("finetune", zoo_dir, fine, "--out", "/proc/r.json"), "/proc/r.json"),
        (("finetune", zoo_dir, fine, "--out", tmp_path / "ft.json", "--json", "/proc/r.json"),
         "/proc/r.json"),
        (("demo", "--cache-dir", "/proc/c"), "/proc/c"),
    ]
    for args, named in cases:
        r = cli_in_process(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert error_line(r) == (f"error: {named}: cannot be created: folder /proc refuses new "
                                 "files (choose another location)"), (args, r.stderr)
    assert not (tmp_path / "ft.json").exists()  # refused before any training
    # A cache folder that refuses files: rank goes on without the cache, and says so.
    r = _cli("rank", zoo_dir, data_root, "--image-size", "32", "--cache-dir", "/proc/c")
    assert r.returncode == 0, r.stderr
    assert "/proc/c: cannot write the feature cache (no such file or directory); ranking " \
        "without it" in r.stderr


# ---------------------------------------------------------------------------------------------
# Zip bomb: refused from the zip directory, before anything inflates


def test_zip_bomb_refused_before_inflating(tmp_path):
    save_pth(torch_resnet("resnet18", 0), tmp_path / "m.pth")
    declared = 512 << 20  # in a file of ~45 MiB, most of it the honest records
    with zipfile.ZipFile(tmp_path / "m.pth") as src, \
            zipfile.ZipFile(tmp_path / "bomb.pth", "w") as out:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                out.writestr(info, src.read(info.filename))
                continue
            zi = zipfile.ZipInfo(info.filename)
            zi.compress_type = zipfile.ZIP_DEFLATED
            with out.open(zi, "w", force_zip64=True) as f:
                chunk = bytes(32 << 20)
                for _ in range(declared // len(chunk)):
                    f.write(chunk)
    # A fresh parent measures its one child's peak memory (RUSAGE_CHILDREN is per parent).
    load = ("import sys; from pathlib import Path\n"
            "from ddscore_jax.converters import load_checkpoint\n"
            "from ddscore_jax.errors import InputError\n"
            "try: load_checkpoint(Path(sys.argv[1]))\n"
            "except InputError as e: print(e)\n")
    measure = ("import resource, subprocess, sys\n"
               "r = subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])\n"
               "print('peak_mib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10)\n")

    def peak(path: Path) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-c", measure, load, str(path)],
                           capture_output=True, text=True, timeout=300)
        return int(r.stdout.split("peak_mib")[-1]), r.stdout + r.stderr

    honest, _ = peak(tmp_path / "m.pth")  # the interpreter, jax, torch and one real import
    bomb, said = peak(tmp_path / "bomb.pth")
    assert "zip bomb" in said, said
    # Inflating the record would add its 512 MiB on top of the honest import's peak.
    assert bomb < honest + 64, (bomb, honest)


# ---------------------------------------------------------------------------------------------
# Metric hang: every metric, n > d and n < d, fresh processes


_METRICS_CHILD = """
import numpy as np
from ddscore_jax import metrics
rng = np.random.default_rng({seed})
for n, d in ((60, 12), (12, 40)):
    labels = np.arange(n) % 3
    x = rng.normal(size=(2, 2, n, d))
    for name, m in metrics.METRICS.items():
        if m.needs_head:
            p = rng.random((2, n, 10)); p /= p.sum(-1, keepdims=True)
            out = m.fn(p, labels)
        else:
            out = m.fn(x, labels)
        assert np.isfinite(out).all(), (name, n, d)
print("done")
"""


@pytest.mark.slow
def test_every_metric_finishes_in_20_fresh_processes():
    done, hung = 0, []
    for pair in range(10):  # two at a time: the machine has 2 cores
        procs = [(seed, subprocess.Popen([sys.executable, "-c", _METRICS_CHILD.format(seed=seed)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
                 for seed in (2 * pair, 2 * pair + 1)]
        for seed, p in procs:
            try:
                out, err = p.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                hung.append(seed)
                continue
            assert p.returncode == 0 and "done" in out, err
            done += 1
    assert not hung, f"processes {hung} hung (of 20)"
    assert done == 20
