"""ONNX import: every graph PyTorch 2.14's exporters write for the ResNet v1 family
(torchvision ResNet18..152, ResNeXt, Wide ResNet; timm's ResNet-D) imports to the source library's
features and its own parameters, ranks like its ``.pth``, and anything else is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import cli, error_line, rel_err, save_pth, torch_layer3_features
from helpers import cli_in_process as invoke
from onnx_exports import (
    EXPORT_BATCH,
    VARIANTS,
    export,
    export_channels_last,
    mixed_bn_eps,
    onnxruntime_logits,
    plain_conv_stack,
    preact_resnet18,
    relocate_external_data,
    source_net,
    stride_on_first_conv,
    timm_resnetv2,
    truncated_after_layer2,
)

from ddscore_jax import model
from ddscore_jax.converters import load_checkpoint
from ddscore_jax.ddscore import score_models
from ddscore_jax.errors import InputError
from ddscore_jax.model import SCORE_BLOCKS as BLOCKS

jax.config.update("jax_default_matmul_precision", "highest")

IMAGE_SIZE = 64  # small images keep the suite fast; the graphs are the same at 224
# Imported conv4_x features vs the source library's layer3 blocks, max|ours - torch| /
# max|torch| per block: measured 2.7e-7 .. 4.7e-7 over all variants (float32 through ~30 to
# ~150 convolutions).
FEATURE_RTOL = 1e-5
# onnxruntime's logits vs the source library's, the same measure: measured 3e-6 .. 6e-6 (through
# layer4 and fc, and the TorchScript exporter folds BatchNorm in float32).
LOGITS_RTOL = 1e-4
# Exporter-folded convolutions vs the source's own BatchNorm folded by the model (in float64),
# max|diff| / max|folded| per tensor: the exporter folds in float32, measured <= 1.6e-7.
PARAM_RTOL = 1e-6
# D-deepscore (scores lie in [0, classes]) of the .pth import vs the ONNX import, |difference|
# over the score and every block score. Unfolded graphs import bit-identically to the .pth.
# Exporter-folded graphs carry weights the exporter rounded to float32 (~1.6e-7 of each tensor's
# scale), which moves the features by ~5e-7 relative and the score (~1.8 here) by up to: resnet18
# 8.5e-7, resnet50 1.4e-6 (max over 30 image draws; medians 3e-7 and 7e-7). 1e-6, set from three
# draws, failed one CI run in ten, so the bound is 3.5x the measured maximum, and each case's
# images are seeded so a run is reproducible. A real import fault (a transposed kernel, a wrong
# eps, a missing block) moves the score by 1e-3 or more.
SCORE_ATOL = 5e-6
SCORE_N = 300
# Every variant on resnet18 and three on resnet34; on each Bottleneck family a folded and an
# unfolded graph, TorchScript and dynamo exporters between them; timm's ResNet-D once. Exports and
# first compilations are most of this file's time, so the rest of the matrix is marked slow.
FAST_CASES = [("resnet18", v) for v in VARIANTS] + [
    ("resnet34", "ts-opset13"), ("resnet34", "ts-unfolded-opset17-dynamic"),
    ("resnet34", "dynamo-unoptimized"),
    ("resnet50", "ts-opset13"), ("resnet50", "ts-unfolded-opset13"),
    ("resnext50_32x4d", "dynamo-dynamic"), ("resnext50_32x4d", "ts-unfolded-opset13"),
    ("wide_resnet50_2", "ts-opset13"), ("wide_resnet50_2", "ts-unfolded-opset13"),
    ("resnet18d", "dynamo-unoptimized"),
]
SLOW_CASES = [
    ("resnet50", "dynamo-dynamic"), ("resnet50", "dynamo-unoptimized"),
    ("resnet50", "ts-opset15-modules-as-functions"), ("resnet50", "ts-opset18-external"),
    ("resnext50_32x4d", "ts-opset13"), ("wide_resnet50_2", "dynamo-unoptimized"),
    ("resnet101", "ts-opset13"), ("resnet152", "dynamo-unoptimized"),
    ("resnet50d", "ts-unfolded-opset17-dynamic"), ("resnet50d", "dynamo-dynamic"),
    ("resnet18d", "ts-opset13"),
]
# onnxruntime checks the exports themselves (that each graph computes its source's logits): every
# resnet18/34 variant and one graph per other family in the default run.
ORT_FAST = {c for c in FAST_CASES if c[0] in ("resnet18", "resnet34")} | {
    ("resnet50", "ts-opset13"), ("resnext50_32x4d", "ts-unfolded-opset13"),
    ("wide_resnet50_2", "ts-opset13"), ("resnet18d", "dynamo-unoptimized")}


def _cases(fast: set | list) -> list:
    return [pytest.param(*c, id="-".join(c), marks=() if c in fast else pytest.mark.slow)
            for c in FAST_CASES + SLOW_CASES]


CASES = _cases(FAST_CASES)
ORT_CASES = _cases(ORT_FAST)
FEATURE_BATCH = 3  # one batch size for every Flax forward: one compilation per architecture

_features = jax.jit(model.apply, static_argnums=(0,), static_argnames=("stop_at",))


def _unfolded(variant: str) -> bool:
    """Whether the exporter keeps BatchNormalization nodes (no constant folding, no optimiser)."""
    return "unfolded" in variant or "unoptimized" in variant


def _expected_config(arch: str, variant: str) -> model.ResNetConfig:
    return dataclasses.replace(model.CONFIGS[arch], num_classes=2, batchnorm=_unfolded(variant))


class _Exports:
    """Each source network, its ``.pth`` import and its ONNX exports, made once per run."""

    def __init__(self, root: Path):
        self.root = root
        self._nets: dict[str, object] = {}
        self._paths: dict[tuple[str, str], Path] = {}
        self._pth: dict[str, object] = {}

    def net(self, arch: str):
        if arch not in self._nets:
            seed = sum(map(ord, arch))  # a different network for every architecture
            self._nets[arch] = source_net(arch, seed, num_classes=2)
        return self._nets[arch]

    def state_dict(self, arch: str) -> dict[str, np.ndarray]:
        """The source network's own parameters, as the canonical dict holds them."""
        return {k: v.numpy() for k, v in self.net(arch).state_dict().items()
                if not k.endswith(".num_batches_tracked")}

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


def _images(n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    rng = rng or np.random.default_rng(0)  # reproducible runs
    return rng.normal(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _ort_batch(variant: str) -> int:
    # A batch other than the export's proves the dynamic axis is really dynamic.
    return EXPORT_BATCH + 1 if "dynamic" in variant else EXPORT_BATCH


def _forward(imported, images: np.ndarray) -> dict[str, np.ndarray]:
    """The zoo's inference network (BatchNorm folded, cut after conv4_x): every conv4_x block."""
    config, state = model.inference(imported.config, imported.state_dict, backbone=True)
    return {k: np.asarray(v) for k, v in _features(config, state, images, stop_at=None).items()}


@pytest.mark.parametrize("arch,variant", ORT_CASES)
def test_onnxruntime_runs_the_export_like_its_source(exports, arch, variant):
    import torch

    path = exports.onnx(arch, variant)
    images = _images(_ort_batch(variant))
    with torch.no_grad():
        ref = exports.net(arch)(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    logits = onnxruntime_logits(path, images)
    assert logits.shape == ref.shape == (len(images), 2)
    assert rel_err(logits, ref) < LOGITS_RTOL


@pytest.mark.parametrize("arch,variant", CASES)
def test_imported_features_match_the_source(exports, arch, variant):
    imported = load_checkpoint(exports.onnx(arch, variant))
    # The architecture, read from the graph alone.
    assert imported.config == _expected_config(arch, variant)
    images = _images(FEATURE_BATCH)
    ours = _forward(imported, images)
    ref = torch_layer3_features(exports.net(arch), images)
    assert set(ours) == set(ref) == set(model.block_names(imported.config))
    errors = {block: rel_err(ours[block], ref[block]) for block in ref}
    assert max(errors.values()) < FEATURE_RTOL, errors


@pytest.mark.parametrize("arch,variant", CASES)
def test_imported_parameters_are_the_sources_own(exports, arch, variant):
    """Names from the graph's shape, values the source's: an unfolded graph gives every BatchNorm
    parameter bit for bit; a folded one gives what the model's own folding of the source gives,
    to the exporter's float32 rounding. ``fc`` is the source's (out, in) matrix either way."""
    imported = load_checkpoint(exports.onnx(arch, variant))
    source = exports.state_dict(arch)
    if _unfolded(variant):
        want = source
    else:
        _, want = model.fold(dataclasses.replace(imported.config, batchnorm=True), source)
    assert sorted(imported.state_dict) == sorted(want)
    for key, theirs in want.items():
        ours = imported.state_dict[key]
        assert ours.shape == theirs.shape and ours.dtype == np.float32, key
        if _unfolded(variant) or key.startswith("fc."):
            np.testing.assert_array_equal(ours, theirs, err_msg=key)
        else:
            assert rel_err(ours, theirs) < PARAM_RTOL, key


@pytest.mark.parametrize("arch,variant", [("resnet18", "ts-unfolded-opset13"),
                                          ("resnet34", "dynamo-unoptimized"),
                                          ("resnet18", "ts-opset13"),
                                          ("resnet18", "dynamo-dynamic"),
                                          ("resnet50", "ts-opset13")])
def test_pth_and_onnx_imports_score_alike(exports, arch, variant):
    rng = np.random.default_rng(zlib.crc32(f"{arch}-{variant}".encode()))
    n = SCORE_N
    labels = rng.permutation(np.arange(n) % 3)
    # Classes that differ in their images, as in the data the score is meant for.
    centres = rng.normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = (_images(n, rng) + 0.5 * centres[labels]).astype(np.float32)
    features = {}
    for name, imported in (("pth", exports.pth_import(arch)),
                           ("onnx", load_checkpoint(exports.onnx(arch, variant)))):
        # In FEATURE_BATCH chunks, to reuse the one compiled forward.
        chunks = [_forward(imported, images[i:i + FEATURE_BATCH])
                  for i in range(0, n, FEATURE_BATCH)]
        features[name] = {b: np.concatenate([c[b] for c in chunks]) for b in BLOCKS}
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


def test_cli_imports_a_bottleneck_export_beside_a_basicblock_one(exports, tmp_path):
    folder = tmp_path / "zoo"
    for arch, variant in (("resnet18", "ts-opset13"), ("resnext50_32x4d", "ts-unfolded-opset13")):
        result = cli("convert", exports.onnx(arch, variant), "--zoo", folder, "--name", arch)
        assert result.returncode == 0, result.stderr
    entries = json.loads((folder / "zoo.json").read_text())["models"]
    assert [(e["name"], e["arch"]) for e in entries] == [
        ("resnet18", "resnet18"), ("resnext50_32x4d", "resnext50_32x4d")]
    want = _expected_config("resnext50_32x4d", "ts-unfolded-opset13")
    assert model.ResNetConfig.from_json(entries[1]["config"]) == want


def test_a_backbone_without_layer4_imports(exports, tmp_path):
    """A graph that ends after conv4_x (a feature extractor) is all the features need."""
    from torch import nn

    net = exports.net("resnet18")
    backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                             net.layer3).eval()
    imported = load_checkpoint(export(backbone, tmp_path / "r18_backbone.onnx",
                                      "ts-unfolded-opset13", IMAGE_SIZE))
    assert imported.config == _expected_config("resnet18", "unfolded").backbone()
    images = _images(FEATURE_BATCH)
    ours, ref = _forward(imported, images), torch_layer3_features(net, images)
    assert max(rel_err(ours[b], ref[b]) for b in ref) < FEATURE_RTOL


def _preact(tmp: Path, exports: _Exports) -> Path:
    return export(preact_resnet18(), tmp / "preact_resnet18.onnx", "ts-opset13", IMAGE_SIZE)


def _plain(tmp: Path, exports: _Exports) -> Path:
    return export(plain_conv_stack(), tmp / "plain_stack.onnx", "ts-opset13", IMAGE_SIZE)


def _truncated(tmp: Path, exports: _Exports) -> Path:
    net = truncated_after_layer2(exports.net("resnet18"))
    return export(net, tmp / "resnet18_to_layer2.onnx", "ts-unfolded-opset13", IMAGE_SIZE)


def _timm_v2(tmp: Path, exports: _Exports) -> Path:
    return export(timm_resnetv2(), tmp / "resnetv2_18.onnx", "ts-opset13", IMAGE_SIZE)


def _nhwc(tmp: Path, exports: _Exports) -> Path:
    return export_channels_last(exports.net("resnet18"), tmp / "keras_resnet18.onnx", IMAGE_SIZE)


def _stride_on_1x1(tmp: Path, exports: _Exports) -> Path:
    return export(stride_on_first_conv(), tmp / "resnet_v1.onnx", "ts-opset13", IMAGE_SIZE)


def _mixed_eps(tmp: Path, exports: _Exports) -> Path:
    net = mixed_bn_eps(source_net("resnet18", 1))
    return export(net, tmp / "resnet18_eps.onnx", "ts-unfolded-opset13", IMAGE_SIZE)


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
    "timm-resnetv2-50": (_timm_v2, "pre-activation ResNet (v2"),
    "nhwc-input": (_nhwc, "NHWC layout"),
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
    result = invoke("convert", bad, "--zoo", zoo)  # in-process: a refusal needs no process
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0] == error_line(result)
    assert bad.name in lines[0] and problem in lines[0], lines[0]
    assert _snapshot(zoo) == before


# Refused by the importer the same way; the CLI's handling of a refusal is the cases above.
REFUSED_BY_LOADER = {
    "stride-on-first-1x1": (_stride_on_1x1, "stride is on the first 1x1 convolution"),
    "mixed-bn-epsilons": (_mixed_eps, "BatchNormalization epsilons differ"),
}


@pytest.mark.parametrize("case", REFUSED_BY_LOADER)
def test_loader_refuses(case, exports, tmp_path):
    build, problem = REFUSED_BY_LOADER[case]
    bad = build(tmp_path, exports)
    with pytest.raises(InputError) as e:
        load_checkpoint(bad)
    message = str(e.value)
    assert message.startswith(f"{bad}: ") and problem in message, message
    assert "\n" not in message


def test_external_data_inside_the_folder_is_read(exports, tmp_path):
    # The same relocation as the refused cases, pointing inside: the refusals are the policy's.
    dest = relocate_external_data(exports.onnx("resnet18", "ts-opset13"), tmp_path / "m" / "sub",
                                  tmp_path / "m" / "ok.onnx", "sub/weights.bin")
    imported = load_checkpoint(dest)
    reference = load_checkpoint(exports.onnx("resnet18", "ts-opset13"))
    assert imported.config == reference.config
    assert sorted(imported.state_dict) == sorted(reference.state_dict)
    for key, value in reference.state_dict.items():
        np.testing.assert_array_equal(imported.state_dict[key], value, err_msg=key)


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
