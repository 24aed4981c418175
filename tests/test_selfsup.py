"""Self-supervised and multi-head ResNets, in each project's own file layout, through the real CLI.

MoCo v1/v2 and v3, SimCLR (two PyTorch ports), BYOL, SwAV, Barlow Twins and DINO checkpoints
(:mod:`selfsup_layouts`) go into one ``convert``: each imports its backbone, without a classifier,
with one warning line naming what was left out (counted) and, where the project's convention
picks one of two encoders, which one; the features match torchvision's own forward of that
backbone to 1e-5 (relative). Two encoders that no convention decides stay refused.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import selfsup_layouts as L
import torch
from helpers import cli, cli_in_process, error_line, hooked_features, rel_err

from ddscore_jax import model, zoo
from ddscore_jax.converters import load_source

IMAGES = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
TOL = 1e-5

# name -> (file name, words its warning line must hold; None: no warning at all)
EXPECTED = {
    "moco_v2": ("checkpoint_0199.pth.tar", [
        "MoCo v1/v2", "query encoder", "'state_dict.module.encoder_q.*'",
        "not 'state_dict.module.encoder_k.*'", "state_dict.module.encoder_q.fc.* (4)",
        "state_dict.module.queue,", "state_dict.module.queue_ptr"]),
    "moco_v1": ("moco_v1.pth.tar", [
        "MoCo v1/v2", "state_dict.module.encoder_q.fc.* (2)", "state_dict.module.encoder_k.*"]),
    "moco_v3": ("checkpoint_0099.pth.tar", [
        "MoCo v3", "base encoder", "'state_dict.module.base_encoder.*'",
        "state_dict.module.base_encoder.fc.* (8)", "state_dict.module.predictor.* (6)",
        "state_dict.module.momentum_encoder.* (108)"]),
    "simclr_sthalles": ("checkpoint_0100.pth.tar", [
        "left out 4 tensors outside the ResNet: state_dict.backbone.fc.* (4)"]),
    "simclr_spijkervet": ("checkpoint_100.tar", [
        "left out 2 tensors outside the ResNet: projector.* (2)"]),
    "byol": ("byol_learner.pt", [
        "BYOL", "online network", "'online_encoder.net.*'", "not 'target_encoder.net.*'",
        "online_encoder.projector.* (8)", "online_predictor.* (8)", "target_encoder.projector"]),
    "swav": ("swav_checkpoint.pth.tar", [
        "left out 9 tensors outside the ResNet: state_dict.module.projection_head.* (8), "
        "state_dict.module.prototypes.weight"]),
    "barlow_twins": ("checkpoint.pth", [
        "left out 8 tensors outside the ResNet: model.module.projector.* (6), "
        "model.module.bn.* (2)"]),
    "barlow_twins_final": ("resnet50.pth", None),
    "dino": ("dino_checkpoint.pth", [
        "DINO", "teacher", "'teacher.module.backbone.*'", "not 'student.module.backbone.*'",
        "teacher.module.head.mlp.* (6)", "teacher.module.head.last_layer.* (2)",
        "student.module.head.mlp.* (6)", "dino_loss.center"]),
    "dino_resnet50_pretrain": ("dino_resnet50_pretrain.pth", None),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One folder of checkpoints, each in its project's layout, and the reference features."""
    root = tmp_path_factory.mktemp("selfsup") / "ckpts"
    root.mkdir()
    f = {name: root / file for name, (file, _) in EXPECTED.items()}
    nets = {
        "moco_v2": L.moco(f["moco_v2"], 100),
        "moco_v1": L.moco(f["moco_v1"], 101, mlp=False),
        "moco_v3": L.moco_v3(f["moco_v3"], 102),
        "simclr_sthalles": L.simclr_sthalles(f["simclr_sthalles"], 103),
        "simclr_spijkervet": L.simclr_spijkervet(f["simclr_spijkervet"], 104),
        "byol": L.byol(f["byol"], 105),
        "swav": L.swav(f["swav"], 106),
    }
    nets["barlow_twins"] = nets["barlow_twins_final"] = L.barlow_twins(
        f["barlow_twins"], f["barlow_twins_final"], 107)
    nets["dino"] = nets["dino_resnet50_pretrain"] = L.dino(f["dino"], f["dino_resnet50_pretrain"],
                                                           108)
    refs = {name: hooked_features(net, net.layer3, IMAGES) for name, net in nets.items()}
    return root, f, refs


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """One real ``convert`` of the folder; Spijkervet's ``.tar`` is named on its own (a folder's
    bare ``.tar`` files are skipped as data archives)."""
    root, files, _ = sources
    zoo_dir = tmp_path_factory.mktemp("selfsup_zoo") / "zoo"
    result = cli("convert", root, files["simclr_spijkervet"], "--zoo", zoo_dir)
    return zoo_dir, result


def test_every_layout_imports_with_one_warning_each(sources, converted):
    _, files, _ = sources
    zoo_dir, result = converted
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    entries = {e.name: e for e in zoo.read(zoo_dir)}
    stems = {name: file.split(".")[0] for name, (file, _) in EXPECTED.items()}
    assert sorted(entries) == sorted(stems.values())
    lines = result.stderr.splitlines()
    for name, (_, words) in EXPECTED.items():
        warned = [ln for ln in lines if ln.startswith(str(files[name]) + ":")]
        if words is None:
            assert warned == [], (name, warned)
        else:
            assert len(warned) == 1, (name, result.stderr)
            for w in words:
                assert w in warned[0], (name, w, warned[0])
        entry = entries[stems[name]]
        assert (entry.arch, entry.source_format) == ("resnet18", "pytorch"), name
        # The heads are projections, never a classifier: no fc is imported.
        assert zoo.load_model(zoo_dir, entry).config.num_classes == 0, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_features_match_torchvision(sources, converted, name):
    """The zoo model gives torchvision's own forward of the encoder the project evaluates."""
    _, _, refs = sources
    zoo_dir, result = converted
    assert result.returncode == 0, result.stderr
    stem = EXPECTED[name][0].split(".")[0]
    entry = next(e for e in zoo.read(zoo_dir) if e.name == stem)
    imported = zoo.load_model(zoo_dir, entry)
    config, state = model.inference(imported.config, imported.state_dict, backbone=True)
    ours = {k: np.asarray(v) for k, v in model.apply(config, state, IMAGES, stop_at=2).items()}
    for k, ref in refs[name].items():
        err = rel_err(ours[k], ref)
        print(f"{name} {k} rel_err={err:.2e}")  # pytest -s
        assert err < TOL, (name, k, err)


def test_a_warning_line_counts_exactly(sources):
    """The count is every tensor left out: MoCo v2's MLP head (4), queue, queue_ptr and the
    whole key encoder (its num_batches_tracked buffers aside)."""
    _, files, _ = sources
    loaded = load_source(files["moco_v2"])
    raw = torch.load(files["moco_v2"], weights_only=True)["state_dict"]
    key_encoder = [k for k in raw if k.startswith("module.encoder_k.")
                   and not k.endswith("num_batches_tracked")]
    assert f"left out {4 + 2 + len(key_encoder)} tensors" in loaded.note
    assert "\n" not in loaded.note


def test_two_encoders_no_convention_decides_are_refused(sources, tmp_path):
    """The same pair under names no project uses, or DINO's roles without its backbone
    wrapper: refused naming both, nothing guessed."""
    _, files, _ = sources
    raw = torch.load(files["moco_v2"], weights_only=True)
    raw["state_dict"] = {k.replace("encoder_q", "net_a").replace("encoder_k", "net_b"): v
                         for k, v in raw["state_dict"].items()}
    torch.save(raw, tmp_path / "ab.pth")
    result = cli_in_process("convert", tmp_path / "ab.pth", "--zoo", tmp_path / "zoo")
    assert result.returncode == 2
    line = error_line(result)
    assert "2 ResNets" in line and "'state_dict.module.net_a.'" in line \
        and "'state_dict.module.net_b.'" in line, line
    # MoCo's two roles with the same base but one of them nested deeper: not MoCo's layout.
    raw = torch.load(files["moco_v2"], weights_only=True)
    raw["state_dict"] = {k.replace("module.encoder_k.", "module.extra.encoder_k."): v
                         for k, v in raw["state_dict"].items()}
    torch.save(raw, tmp_path / "nested.pth")
    result = cli_in_process("convert", tmp_path / "nested.pth", "--zoo", tmp_path / "zoo")
    assert result.returncode == 2 and "2 ResNets" in error_line(result), result.stderr
    assert not (tmp_path / "zoo").exists()


def test_head_beside_a_block_layer_is_still_refused(sources, tmp_path):
    """Setting heads aside never drops a part of the network: a tensor inside a block (an SE
    layer) is refused as before, even in a self-supervised file."""
    _, files, _ = sources
    shutil.copy(files["simclr_spijkervet"], tmp_path / "x.pth")
    sd = torch.load(tmp_path / "x.pth", weights_only=True)
    sd["encoder.layer2.0.se.fc1.weight"] = torch.zeros(8, 128, 1, 1)
    torch.save(sd, tmp_path / "x.pth")
    result = cli_in_process("convert", tmp_path / "x.pth", "--zoo", tmp_path / "zoo")
    assert result.returncode == 2 and "squeeze-and-excitation" in error_line(result)
