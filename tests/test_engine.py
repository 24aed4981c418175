"""The onnxruntime engine (docs/extraction.md): the ONNX graph built from the zoo's own parameters
gives the source library's features and logits, and the JAX forward's, to float32 rounding, for
every ResNet v1 variant the model covers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import randomise_batchnorm, rel_err, write_image_folder

from ddscore_jax import data, model, ort_engine
from ddscore_jax.converters.state_dict import import_state_dict
from ddscore_jax.errors import InputError
from ddscore_jax.forward import LoadedModel, ZooForward, extract_features

IMAGE_SIZE = 64
# max|ours - source| / max|source| per output, float32 through ~20-50 convolutions: measured
# 1.5e-7 .. 3.6e-7 for the features, 6e-7 .. 7.5e-7 for the logits (torchvision and timm, 64 and
# 72 px). The JAX forward runs the same folded weights: measured <= 2.7e-7 apart.
FEATURE_RTOL = 1e-5
LOGITS_RTOL = 1e-5


def _source(library: str, arch: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    if library == "torchvision":
        import torchvision

        net = getattr(torchvision.models, arch)(num_classes=5)
    else:
        import timm

        net = timm.create_model(arch, pretrained=False, num_classes=5)
    net = randomise_batchnorm(net)
    sd = {k: v.numpy() for k, v in net.state_dict().items() if v.is_floating_point()}
    return net, import_state_dict(sd, arch)[0]


def _torch_outputs(net, images: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    feats: dict[str, np.ndarray] = {}
    hooks = [block.register_forward_hook(
        lambda _m, _i, out, name=f"layer3.{i}": feats.__setitem__(
            name, out.mean(dim=(2, 3)).numpy()))
        for i, block in enumerate(net.layer3)]
    with torch.no_grad():
        logits = net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    for h in hooks:
        h.remove()
    feats["logits"] = logits.numpy()
    feats["probabilities"] = torch.softmax(logits, -1).numpy()
    return feats


CASES = [
    ("torchvision", "resnet18", IMAGE_SIZE),
    ("torchvision", "resnet50", IMAGE_SIZE),
    ("torchvision", "resnext50_32x4d", IMAGE_SIZE),
    # ResNet-D: deep stem and average-pool shortcut; 72 px gives odd sides (ceil_mode pooling).
    ("timm", "resnet18d", 72),
    ("timm", "resnet26d", 72),
]


@pytest.mark.parametrize(("library", "arch", "size"), CASES)
def test_graph_matches_source_library(library, arch, size):
    net, src = _source(library, arch)
    images = np.random.default_rng(1).standard_normal((3, size, size, 3)).astype(np.float32)
    want = _torch_outputs(net, images)

    feats = ort_engine.OrtModel(src.config, src.state_dict, blocks=2, threads=1)(images)
    assert sorted(feats) == ["layer3.0", "layer3.1"]
    for k, v in feats.items():
        assert v.shape == (3, src.config.feature_dim)
        assert rel_err(v, want[k]) < FEATURE_RTOL, k

    head = ort_engine.OrtModel(src.config, src.state_dict, blocks=1, head="probabilities",
                               threads=1)(images)
    assert sorted(head) == ["layer3.0", "probabilities"]
    assert rel_err(head["layer3.0"], want["layer3.0"]) < FEATURE_RTOL
    assert np.abs(head["probabilities"] - want["probabilities"]).max() < LOGITS_RTOL
    logits = ort_engine.OrtModel(src.config, src.state_dict, blocks=0, head="logits",
                                 threads=1)(images)
    assert sorted(logits) == ["logits"]
    assert rel_err(logits["logits"], want["logits"]) < LOGITS_RTOL


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_graph_matches_jax_forward(arch):
    _, src = _source("torchvision", arch, seed=3)
    images = np.random.default_rng(2).standard_normal((4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
        np.float32)
    config, state = model.inference(src.config, src.state_dict, backbone=True)
    jax_feats = model.apply(config, state, images, stop_at=2)
    ort_feats = ort_engine.OrtModel(src.config, src.state_dict, blocks=2, threads=1)(images)
    for k in ("layer3.0", "layer3.1"):
        assert rel_err(ort_feats[k], np.asarray(jax_feats[k])) < FEATURE_RTOL, k


def test_folded_source_builds_the_same_graph():
    """A source without BatchNorm (conv biases, ``batchnorm=False``) runs as it is."""
    _, src = _source("torchvision", "resnet18", seed=4)
    folded_config, folded_sd = model.fold(src.config, src.state_dict)
    images = np.random.default_rng(3).standard_normal((2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
        np.float32)
    a = ort_engine.OrtModel(src.config, src.state_dict, threads=1)(images)
    b = ort_engine.OrtModel(folded_config, folded_sd, threads=1)(images)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_graph_refuses_what_it_cannot_build():
    _, src = _source("torchvision", "resnet18")
    backbone = src.config.backbone()
    with pytest.raises(ValueError, match="no classifier"):
        ort_engine.build_graph(backbone, src.state_dict, head="logits")
    with pytest.raises(ValueError, match="blocks 3"):
        ort_engine.build_graph(src.config, src.state_dict, blocks=3)
    with pytest.raises(ValueError, match="unknown head"):
        ort_engine.build_graph(src.config, src.state_dict, head="softmax")


def test_default_engine():
    assert ort_engine.default_engine("cpu") == "onnxruntime"  # the test extra installs it
    assert ort_engine.default_engine("gpu") == "jax"
    assert ort_engine.default_engine("tpu") == "jax"
    assert ort_engine.default_engine("cpu", dtype="bfloat16") == "jax"
    assert ort_engine.default_engine("cpu", devices=2) == "jax"


def test_engine_choice_is_checked():
    with pytest.raises(InputError, match="--engine must be one of"):
        ort_engine.resolve("tensorrt", "cpu")
    with pytest.raises(InputError, match="float32 only"):
        ort_engine.resolve("onnxruntime", "cpu", "bfloat16")
    with pytest.raises(InputError, match="one device"):
        ort_engine.resolve("onnxruntime", "cpu", devices=4)
    assert ort_engine.resolve("auto", "cpu", "bfloat16") == "jax"
    assert ort_engine.resolve("jax", "cpu") == "jax"


def test_extraction_is_the_same_on_both_engines(tmp_path):
    """The whole extraction (decode, padded ragged batches, features and a head) through
    onnxruntime gives the JAX engine's outputs to float32 rounding."""
    root = write_image_folder(tmp_path / "images", per_class=3)
    ds = data.scan(root)
    _, a = _source("torchvision", "resnet18", seed=5)
    _, b = _source("torchvision", "resnet50", seed=6)
    models = [LoadedModel("a", a.config, a.state_dict),
              LoadedModel("b", b.config, b.state_dict, blocks=1, head="probabilities")]
    kw = dict(batch_size=4, image_size=IMAGE_SIZE)
    jax_out = extract_features(models, ds, engine="jax", **kw)
    ort_out = extract_features(models, ds, engine="onnxruntime", **kw)
    assert ZooForward(models, engine="auto").engine == "onnxruntime"
    for j, o in zip(jax_out, ort_out, strict=True):
        assert sorted(j) == sorted(o)
        for k in j:
            assert o[k].shape == j[k].shape == (len(ds), j[k].shape[1])
            assert rel_err(o[k], j[k]) < FEATURE_RTOL, k


def test_cli_engine_switch(tmp_path):
    """``extract --engine`` through the real CLI: both engines write the same features; an
    unknown engine is one line and exit code 2, with nothing written."""
    from helpers import cli, error_line, save_pth, torch_resnet
    from helpers import cli_in_process as invoke

    ckpt = save_pth(torch_resnet("resnet18", seed=7), tmp_path / "r18.pth")
    zoo_dir, images = tmp_path / "zoo", write_image_folder(tmp_path / "images", per_class=2)
    assert cli("convert", ckpt, "--zoo", zoo_dir).returncode == 0
    feats = {}
    for engine in ("jax", "onnxruntime"):
        out = tmp_path / engine
        r = cli("extract", zoo_dir, images, "--out", out, "--image-size", IMAGE_SIZE,
                "--engine", engine)
        assert r.returncode == 0, r.stderr
        with np.load(out / "r18.npz") as z:
            feats[engine] = {k: z[k] for k in ("layer3.0", "layer3.1")}
    for k in feats["jax"]:
        assert rel_err(feats["onnxruntime"][k], feats["jax"][k]) < FEATURE_RTOL
    r = invoke("extract", zoo_dir, images, "--out", tmp_path / "bad", "--engine", "tensorrt")
    assert r.returncode == 2
    # A listed choice (--help shows them): Click refuses it, in one line.
    assert error_line(r).startswith("error: Invalid value for '--engine'"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()
