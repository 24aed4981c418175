"""ONNX import: every graph PyTorch 2.14's exporters write for a torchvision ResNet18/34
imports to torchvision's features, ranks like its ``.pth``, and anything else is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import cli, error_line, rel_err, save_pth, torch_layer3_features, torch_resnet
from onnx_exports import (
    EXPORT_BATCH,
    VARIANTS,
    export,
    onnxruntime_logits,
    plain_conv_stack,
    preact_resnet18,
    relocate_external_data,
    truncated_after_layer2,
)

from ddscore_jax import model
from ddscore_jax.converters import load_checkpoint
from ddscore_jax.errors import InputError
from ddscore_jax.score import BLOCKS, score_models

jax.config.update("jax_default_matmul_precision", "highest")

IMAGE_SIZE = 64  # small images keep the suite fast; the graphs are the same at 224
# Imported conv4_x features vs torchvision's layer3 blocks, max|ours - torch| / max|torch| per
# block: measured 2.7e-7 .. 4.7e-7 over all variants (float32 through ~30 convolutions).
FEATURE_RTOL = 1e-5
# onnxruntime's logits vs torchvision's, the same measure: measured 3e-6 .. 6e-6 (through layer4 and
# fc, and the TorchScript exporter folds BatchNorm in float32).
LOGITS_RTOL = 1e-4
# Each imported parameter vs the .pth import's, max|diff| / max|pth|: BatchNorm folded by the
# exporter in float32, or by us in float64 from the same float32 values: measured <= 1.6e-7.
PARAM_RTOL = 1e-6
# D-deepscore (scores lie in [0, classes]) of the .pth import vs the ONNX import, |difference|.
# Unfolded graphs import bit-identically to the .pth (both fold with float32(1e-5)). Exporter-folded
# graphs carry weights the exporter rounded to float32 (~1.6e-7 of each tensor's scale), which moves
# the features by ~5e-7 relative; the score then moves by ~1e-6 when the train split is tiny
# (24 samples) but by <= 4e-7 at a realistic 240 samples (measured over 3 draws), hence SCORE_N.
SCORE_ATOL = 1e-6
SCORE_N = 300
# Every variant on resnet18; on resnet34 a folded, an unfolded and a dynamo graph (exports are
# most of this file's time).
RESNET34_VARIANTS = ("ts-opset13", "ts-unfolded-opset17-dynamic", "dynamo-unoptimized")
CASES = [("resnet18", v) for v in VARIANTS] + [("resnet34", v) for v in RESNET34_VARIANTS]
FEATURE_BATCH = 3  # one batch size for every Flax forward: one compilation per architecture
SEEDS = {"resnet18": 18, "resnet34": 34}

_forward = jax.jit(model.forward, static_argnums=(0, 3))


class _Exports:
    """Each torchvision network, its ``.pth`` import and its ONNX exports, made once per run."""

    def __init__(self, root: Path):
        self.root = root
        self._nets: dict[str, object] = {}
        self._paths: dict[tuple[str, str], Path] = {}
        self._pth: dict[str, object] = {}

    def net(self, arch: str):
        if arch not in self._nets:
            self._nets[arch] = torch_resnet(arch, SEEDS[arch], num_classes=2)
        return self._nets[arch]

    def onnx(self, arch: str, variant: str) -> Path:
        key = (arch, variant)
        if key not in self._paths:
            folder = self.root / f"{arch}-{variant}"
            folder.mkdir()
            self._paths[key] = export(self.net(arch), folder / f"{arch}.onnx", variant, IMAGE_SIZE)
        return self._paths[key]

    def pth_import(self, arch: str):
        if arch not in self._pth:
            self._pth[arch] = load_checkpoint(save_pth(self.net(arch), self.root / f"{arch}.pth"))
        return self._pth[arch]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("onnx-exports"))


def _images(n: int) -> np.ndarray:
    return np.random.default_rng().normal(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _ort_batch(variant: str) -> int:
    # A batch other than the export's proves the dynamic axis is really dynamic.
    return EXPORT_BATCH + 1 if "dynamic" in variant else EXPORT_BATCH


@pytest.mark.parametrize("arch,variant", CASES)
def test_onnxruntime_runs_the_export_like_torchvision(exports, arch, variant):
    import torch

    path = exports.onnx(arch, variant)
    images = _images(_ort_batch(variant))
    with torch.no_grad():
        ref = exports.net(arch)(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    logits = onnxruntime_logits(path, images)
    assert logits.shape == ref.shape == (len(images), 2)
    assert rel_err(logits, ref) < LOGITS_RTOL


@pytest.mark.parametrize("arch,variant", CASES)
def test_imported_features_match_torchvision(exports, arch, variant):
    imported = load_checkpoint(exports.onnx(arch, variant))
    assert imported.arch == arch
    images = _images(FEATURE_BATCH)
    ours = _forward(arch, model.flat_to_state(imported.params, arch), images, None)
    ref = torch_layer3_features(exports.net(arch), images)
    assert sorted(ours) == sorted(ref) == model.block_names(arch)
    errors = {block: rel_err(ours[block], ref[block]) for block in ref}
    assert max(errors.values()) < FEATURE_RTOL, errors

    # The same tree as the .pth import, head (layer4, fc) included: the names come from the
    # graph's shape, the values agree to float32 rounding (the exporter may have folded them).
    pth = exports.pth_import(arch)
    assert sorted(imported.params) == sorted(pth.params)
    assert sorted(imported.head) == sorted(pth.head)
    assert any(k.startswith("layer4.") for k in imported.head)
    ours_all, pth_all = imported.params | imported.head, pth.params | pth.head
    for key, theirs in pth_all.items():
        assert ours_all[key].shape == theirs.shape, key
        assert ours_all[key].dtype == np.float32, key
        assert rel_err(ours_all[key], theirs) < PARAM_RTOL, key


@pytest.mark.parametrize("arch,variant", [("resnet18", "ts-unfolded-opset13"),
                                          ("resnet34", "dynamo-unoptimized"),
                                          ("resnet18", "ts-opset13"),
                                          ("resnet18", "dynamo-dynamic")])
def test_pth_and_onnx_imports_score_alike(exports, arch, variant):
    rng = np.random.default_rng()
    n = SCORE_N
    labels = rng.permutation(np.arange(n) % 3)
    # Classes that differ in their images, as in the data the score is meant for.
    centres = rng.normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = (_images(n) + 0.5 * centres[labels]).astype(np.float32)
    features = {}
    for name, imported in (("pth", exports.pth_import(arch)),
                           ("onnx", load_checkpoint(exports.onnx(arch, variant)))):
        state = model.flat_to_state(imported.params, arch)
        # In FEATURE_BATCH chunks, to reuse the one compiled forward.
        chunks = [_forward(arch, state, images[i:i + FEATURE_BATCH], None)
                  for i in range(0, n, FEATURE_BATCH)]
        features[name] = {b: np.concatenate([np.asarray(c[b]) for c in chunks]) for b in BLOCKS}
    by_name = {s.name: s for s in score_models(features, labels, train_fraction=0.8, seed=0)}
    pth, onnx = by_name["pth"], by_name["onnx"]
    assert 0.0 < pth.score <= 3.0
    assert abs(pth.score - onnx.score) <= SCORE_ATOL, (pth, onnx)
    for block in BLOCKS:
        diff = abs(pth.block_scores[block] - onnx.block_scores[block])
        assert diff <= SCORE_ATOL, (block, diff)


# -- refused inputs -------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with its content's sha256 ("dir" for folders)."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir()
            else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def zoo(exports, tmp_path_factory) -> Path:
    """A zoo holding one model, imported through the real CLI from a dynamo export whose weights
    are in ``.onnx.data`` beside it."""
    folder = tmp_path_factory.mktemp("zoo") / "zoo"
    result = cli("convert", exports.onnx("resnet18", "dynamo-dynamic"), "--zoo", folder,
                 "--name", "r18_onnx")
    assert result.returncode == 0, result.stderr
    return folder


def test_cli_imports_an_onnx_export(zoo):
    entries = json.loads((zoo / "zoo.json").read_text())["models"]
    assert [(e["name"], e["arch"], e["source_format"]) for e in entries] == [
        ("r18_onnx", "resnet18", "onnx")]


def _preact(tmp: Path, exports: _Exports) -> Path:
    return export(preact_resnet18(), tmp / "preact_resnet18.onnx", "ts-opset13", IMAGE_SIZE)


def _plain(tmp: Path, exports: _Exports) -> Path:
    return export(plain_conv_stack(), tmp / "plain_stack.onnx", "ts-opset13", IMAGE_SIZE)


def _truncated(tmp: Path, exports: _Exports) -> Path:
    net = truncated_after_layer2(exports.net("resnet18"))
    return export(net, tmp / "resnet18_to_layer2.onnx", "ts-unfolded-opset13", IMAGE_SIZE)


def _not_onnx(tmp: Path, exports: _Exports) -> Path:
    path = tmp / "notes.onnx"
    path.write_text("a ResNet18, fine-tuned on NEU-DET\n")
    return path


def _escape(how: str):
    def build(tmp: Path, exports: _Exports) -> Path:
        outside = tmp / "elsewhere"
        location = {"dotdot": "../elsewhere/weights.bin", "symlink": "weights.bin",
                    "absolute": str(outside / "weights.bin")}[how]
        dest = relocate_external_data(exports.onnx("resnet18", "ts-opset13"), outside,
                                      tmp / "model" / f"escape_{how}.onnx", location)
        if how == "symlink":
            (dest.parent / "weights.bin").symlink_to(outside / "weights.bin")
        return dest
    return build


REFUSED = {
    "pre-activation-v2": (_preact, "pre-activation ResNet (v2"),
    "plain-conv-stack": (_plain, "plain conv stack"),
    "truncated-after-layer2": (_truncated, "conv4_x ('layer3') and layer4 missing"),
    "not-onnx": (_not_onnx, "not an ONNX model"),
    "external-data-dotdot": (_escape("dotdot"), "escapes the model's folder"),
    "external-data-symlink": (_escape("symlink"), "escapes the model's folder"),
    "external-data-absolute": (_escape("absolute"), "is an absolute path"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_cli_refuses(case, exports, zoo, tmp_path):
    build, problem = REFUSED[case]
    bad = build(tmp_path, exports)
    before = _snapshot(zoo)
    result = cli("convert", bad, "--zoo", zoo)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0] == error_line(result)
    assert bad.name in lines[0] and problem in lines[0], lines[0]
    assert _snapshot(zoo) == before


def test_external_data_inside_the_folder_is_read(exports, tmp_path):
    # The same relocation as the refused cases, pointing inside: the refusals are the policy's.
    dest = relocate_external_data(exports.onnx("resnet18", "ts-opset13"), tmp_path / "m" / "sub",
                                  tmp_path / "m" / "ok.onnx", "sub/weights.bin")
    imported = load_checkpoint(dest)
    reference = load_checkpoint(exports.onnx("resnet18", "ts-opset13"))
    for key, value in reference.params.items():
        np.testing.assert_array_equal(imported.params[key], value, err_msg=key)


@pytest.mark.parametrize("damage,problem", [("missing", "is missing"),
                                            ("short", "too short"),
                                            ("empty-model", "not an ONNX model"),
                                            ("zip-model", "not an ONNX model")])
def test_damaged_files_are_refused(exports, tmp_path, damage, problem):
    dest = relocate_external_data(exports.onnx("resnet18", "ts-opset13"), tmp_path,
                                  tmp_path / "m.onnx", "weights.bin")
    weights = tmp_path / "weights.bin"
    if damage == "missing":
        weights.unlink()
    elif damage == "short":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty-model":
        dest.write_bytes(b"")
    else:
        # A PyTorch checkpoint (a zip archive) renamed to .onnx.
        dest.write_bytes(save_pth(exports.net("resnet18"), tmp_path / "r.pth").read_bytes())
    with pytest.raises(InputError) as e:
        load_checkpoint(dest)
    assert str(e.value).startswith(f"{dest}: ") and problem in str(e.value), str(e.value)
