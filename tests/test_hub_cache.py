"""The Hugging Face cache as ``convert`` sources: its root, a repository folder, a repo id.

The cache is laid out as huggingface_hub documents it (blobs/<sha256>, snapshots/<rev>/<file>
symlinks into blobs, refs/main), holding folders that timm (``save_for_hf``) and transformers
(``save_pretrained``) wrote, an older revision that ``refs/main`` no longer names, a language
model and a dataset; ``huggingface_hub.scan_cache_dir`` reads it back as valid. Every command
runs with ``HF_HUB_OFFLINE=1``: nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, cli_in_process, error_line, hooked_features, randomise_batchnorm, rel_err

from ddscore_jax import model, zoo

IMAGES = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
OFFLINE = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """No test here reaches the network, this process included (the commands get it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def add_to_cache(cache: Path, repo_id: str, folder: Path, revision: str, main: bool = True,
                 kind: str = "models") -> Path:
    """Lay ``folder``'s files into the cache as a download of ``repo_id`` at ``revision``
    leaves them: each file's bytes once in blobs/, a relative symlink per file in the snapshot,
    ``refs/main`` naming the revision."""
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return repo


def _timm_resnet18(seed: int):
    import timm

    torch.manual_seed(seed)
    return randomise_batchnorm(timm.create_model("resnet18", pretrained=False, num_classes=5))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A hub cache with two ResNets, an old revision of one, a BERT and a dataset; and the
    features each ResNet's library gives (the revision refs/main names)."""
    from timm.models import save_for_hf
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

    work = tmp_path_factory.mktemp("hub")
    root = work / "home" / "hub"
    refs = {}
    old, new = _timm_resnet18(1), _timm_resnet18(2)
    save_for_hf(old, work / "timm_old", safe_serialization=True)
    save_for_hf(new, work / "timm_new", safe_serialization=True)
    add_to_cache(root, "timm/resnet18.test", work / "timm_old", "a" * 40, main=False)
    add_to_cache(root, "timm/resnet18.test", work / "timm_new", "b" * 40)
    refs["timm--resnet18.test"] = hooked_features(new, new.layer3, IMAGES)

    torch.manual_seed(3)
    hf = randomise_batchnorm(ResNetModel(ResNetConfig(layer_type="basic", depths=[1, 1, 1, 1],
                                                      hidden_sizes=[64, 128, 256, 512])))
    hf.save_pretrained(work / "hf_resnet")
    add_to_cache(root, "someone/tiny-resnet", work / "hf_resnet", "c" * 40)
    refs["someone--tiny-resnet"] = hooked_features(hf, hf.encoder.stages[2].layers, IMAGES,
                                                   count=1)

    bert = BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                num_attention_heads=1, intermediate_size=8))
    bert.save_pretrained(work / "bert")
    add_to_cache(root, "someone/tiny-bert", work / "bert", "d" * 40)
    (work / "data").mkdir()
    (work / "data" / "train.csv").write_text("a,b\n1,2\n")
    add_to_cache(root, "someone/table", work / "data", "e" * 40, kind="datasets")
    return root, refs


def test_the_cache_is_valid_for_huggingface_hub(cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    root, _ = cache
    info = scan_cache_dir(root)
    assert info.warnings == []
    repos = {(r.repo_type, r.repo_id): r for r in info.repos}
    assert sorted(repos) == [("dataset", "someone/table"), ("model", "someone/tiny-bert"),
                             ("model", "someone/tiny-resnet"), ("model", "timm/resnet18.test")]
    timm_repo = repos[("model", "timm/resnet18.test")]
    assert {r.commit_hash: set(r.refs) for r in timm_repo.revisions} == {
        "a" * 40: set(), "b" * 40: {"main"}}
    path = try_to_load_from_cache("timm/resnet18.test", "model.safetensors", cache_dir=root)
    assert Path(path).parent.name == "b" * 40 and Path(path).resolve().parent.name == "blobs"


def _check_features(zoo_dir: Path, name: str, refs) -> None:
    entry = next(e for e in zoo.read(zoo_dir) if e.name == name)
    imported = zoo.load_model(zoo_dir, entry)
    config, state = model.inference(imported.config, imported.state_dict, backbone=True)
    ours = model.apply(config, state, IMAGES, stop_at=len(refs[name]))
    for k, ref in refs[name].items():
        assert rel_err(np.asarray(ours[k]), ref) < 1e-5, (name, k)


def test_convert_the_cache_root(cache, tmp_path):
    """Every model repository holding a ResNet is added (at the revision refs/main names); the
    language model is skipped with one line; the dataset is not a model."""
    root, refs = cache
    result = cli_in_process("convert", root, "--zoo", tmp_path / "zoo", env=OFFLINE)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    names = sorted(e.name for e in zoo.read(tmp_path / "zoo"))
    assert names == ["someone--tiny-resnet", "timm--resnet18.test"]
    skipped = [ln for ln in result.stderr.splitlines() if ln.startswith("skipped: ")]
    assert len(skipped) == 1 and "models--someone--tiny-bert" in skipped[0] \
        and "model_type 'bert', not a ResNet" in skipped[0], result.stderr
    for name in names:
        _check_features(tmp_path / "zoo", name, refs)
    entry = next(e for e in zoo.read(tmp_path / "zoo") if e.name == "timm--resnet18.test")
    assert entry.source.endswith("snapshots/" + "b" * 40)


def test_convert_a_repository_folder_and_a_repo_id(cache, tmp_path):
    """A ``models--org--name`` folder stands for its refs/main snapshot; a repo id is found in
    the cache HF_HUB_CACHE names, or HF_HOME/hub; a missing id is refused in one line."""
    root, refs = cache
    result = cli_in_process("convert", root / "models--timm--resnet18.test", "--zoo",
                            tmp_path / "a", env=OFFLINE)
    assert result.returncode == 0, result.stderr
    _check_features(tmp_path / "a", "timm--resnet18.test", refs)

    result = cli_in_process("convert", "timm/resnet18.test", "someone/tiny-resnet", "--zoo",
                            tmp_path / "b", env={**OFFLINE, "HF_HUB_CACHE": str(root),
                                                 "HF_HOME": str(tmp_path / "none")})
    assert result.returncode == 0, result.stderr
    assert sorted(e.name for e in zoo.read(tmp_path / "b")) == ["someone--tiny-resnet",
                                                                 "timm--resnet18.test"]
    _check_features(tmp_path / "b", "someone--tiny-resnet", refs)

    # HF_HOME/hub where neither HF_HUB_CACHE nor the legacy variable is set.
    result = cli_in_process("convert", "timm/resnet18.test", "--zoo", tmp_path / "c",
                            env={**OFFLINE, "HF_HUB_CACHE": None, "HUGGINGFACE_HUB_CACHE": None,
                                 "HF_HOME": str(root.parent)})
    assert result.returncode == 0, result.stderr

    result = cli("convert", "timm/not-cached", "--zoo", tmp_path / "d",
                 env={**OFFLINE, "HF_HUB_CACHE": str(root)})
    assert result.returncode == 2
    line = error_line(result)
    assert "timm/not-cached" in line and "HF_HUB_OFFLINE" in line and str(root) in line, line
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "d").exists()


def test_without_the_hub_extra(cache, tmp_path, monkeypatch):
    """With huggingface_hub not importable the same cache is read from disk, and a missing repo
    id is refused with how to get it."""
    root, refs = cache
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    env = {"HF_HUB_CACHE": str(root)}
    result = cli_in_process("convert", root, "--zoo", tmp_path / "a", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(e.name for e in zoo.read(tmp_path / "a")) == ["someone--tiny-resnet",
                                                                 "timm--resnet18.test"]
    assert "model_type 'bert'" in result.stderr
    _check_features(tmp_path / "a", "timm--resnet18.test", refs)
    result = cli_in_process("convert", "timm/resnet18.test", "--zoo", tmp_path / "b", env=env)
    assert result.returncode == 0, result.stderr
    result = cli_in_process("convert", "timm/not-cached", "--zoo", tmp_path / "c", env=env)
    assert result.returncode == 2
    line = error_line(result)
    assert "hf download timm/not-cached" in line and "ddscore-jax[hub]" in line, line
