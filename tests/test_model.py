"""The one ResNet: parity with torchvision and timm (features, logits, training-mode BatchNorm),
BatchNorm folding, the canonical mapping, the initialiser, and mixed zoos end to end.

Checkpoints are written by their own library with random weights and randomised BatchNorm
statistics; images are 64 px (65 where an odd size matters) to keep the big nets fast.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import (
    cli,
    error_line,
    randomise_batchnorm,
    rel_err,
    save_pth,
    torch_layer3_features,
    torch_resnet,
    write_image_folder,
)

from ddscore_jax import model, zoo
from ddscore_jax.converters import load_checkpoint
from ddscore_jax.converters.arch import detect_config
from ddscore_jax.ddscore import train_indices
from ddscore_jax.forward import load_features
from ddscore_jax.reference import published_score

# float32 through up to ~50 convolutions: measured 1e-7 to 2e-6; 1e-5 leaves room for other CPUs.
FEATURE_RTOL = 1e-5
BLOCKS = ("layer3.0", "layer3.1")


@pytest.fixture(autouse=True)
def _highest_precision():
    # TF32 on GPUs otherwise; a no-op on CPU.
    with jax.default_matmul_precision("highest"):
        yield


# Jitted: an eager NNX forward dispatches (and compiles) op by op, many times slower.
apply = jax.jit(model.apply, static_argnames=("config", "stop_at", "logits", "train"))


def timm_resnet(name: str, seed: int, num_classes: int = 3):
    import timm
    import torch

    torch.manual_seed(seed)
    return randomise_batchnorm(timm.create_model(name, pretrained=False, num_classes=num_classes))


def torch_logits(net, images_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
                   ).numpy()


def images(n: int = 2, size: int = 64, seed: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def check_parity(net, imported, x: np.ndarray) -> None:
    """Features (folded inference forward and the module as trained) and eval logits vs torch."""
    ref = torch_layer3_features(net, x)
    folded_config, state = model.inference(imported.config, imported.state_dict, backbone=True)
    assert not folded_config.batchnorm and folded_config.depths[3] == 0
    fast = apply(folded_config, state, x, stop_at=2)
    trained = apply(imported.config, model.from_state_dict(imported.state_dict, imported.config),
                    x, stop_at=None, logits=True)
    d = imported.config.feature_dim
    assert sorted(fast) == list(BLOCKS)
    for b in BLOCKS:
        assert fast[b].shape == (len(x), d) == ref[b].shape
        assert rel_err(fast[b], ref[b]) < FEATURE_RTOL, (b, rel_err(fast[b], ref[b]))
        assert rel_err(trained[b], ref[b]) < FEATURE_RTOL, b
    for b in ref:  # every conv4_x block, not only the two the score reads
        assert rel_err(trained[b], ref[b]) < FEATURE_RTOL, b
    assert rel_err(trained["logits"], torch_logits(net, x)) < FEATURE_RTOL


@pytest.mark.parametrize("arch,dim", [("resnet18", 256), ("resnet34", 256), ("resnet50", 1024),
                                      ("resnext50_32x4d", 1024), ("wide_resnet50_2", 1024)])
def test_torchvision_parity_through_the_pth_import(arch, dim, tmp_path):
    net = torch_resnet(arch, seed=len(arch), num_classes=3)
    imported = load_checkpoint(save_pth(net, tmp_path / f"{arch}.pth"))
    assert imported.config == dataclasses.replace(model.CONFIGS[arch], num_classes=3)
    assert imported.arch == arch
    # wide_resnet50_2 widens only each block's inner 3x3: its conv4_x output is 1024-d too.
    assert imported.config.feature_dim == dim
    check_parity(net, imported, images())


@pytest.mark.parametrize("name", ["resnet18d", "resnet50d"])
def test_timm_resnet_d_parity(name, tmp_path):
    net = timm_resnet(name, seed=5)
    imported = load_checkpoint(save_pth(net, tmp_path / f"{name}.pth"))
    assert imported.config == dataclasses.replace(model.CONFIGS[name], num_classes=3)
    assert imported.config.deep_stem and imported.config.avg_down
    # 65 px: odd sides reach the average-pool shortcut (ceil_mode, count_include_pad=False).
    check_parity(net, imported, images(size=65))


def test_training_mode_batchnorm_matches_torch():
    # One forward in training mode: batch statistics normalise, running statistics move with
    # torch's momentum 0.1 and its unbiased running variance.
    import torch

    net = timm_resnet("resnet18d", seed=2)
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items() if v.is_floating_point()}
    config = detect_config(sd, "timm")
    module = model.build(config, sd)
    x = images(4, 33, seed=3)
    ours = nnx.jit(lambda m, v: m.logits(v, train=True))(module, x)
    net.train()
    with torch.no_grad():
        ref = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert rel_err(ours, ref) < 1e-4  # batch statistics of 4 small images: rounding amplified
    after = model.to_state_dict(nnx.state(module))
    for k, v in net.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(after[k], v.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


def test_features_stop_after_the_last_block_asked_for():
    config = model.CONFIGS["resnet34"]
    sd = model.init_state_dict(config, seed=1)
    state = model.from_state_dict(sd, config)
    x = images(1, 32, seed=0)

    def convs(**kw) -> int:
        # A convolution with fewer output positions than taps is a matrix product
        # (model.conv_op): at 32 px, layer3's 3x3 convs and layer4's; fc is one more.
        jaxpr = str(jax.make_jaxpr(lambda v: model.apply(config, state, v, **kw))(x))
        return jaxpr.count("conv_general_dilated") + jaxpr.count("dot_general")

    # resnet34 has 6 conv4_x blocks: stopping after 2 never computes the other 4 (8 convs),
    # nor layer4 (3 blocks, 7 convs); logits compute everything (36 convs and fc).
    assert convs(stop_at=2) == 1 + 2 * (3 + 4 + 2) + 2
    assert convs(logits=True) == 36 + 1
    full = apply(config, state, x, stop_at=None)
    two = apply(config, state, x, stop_at=2)
    assert sorted(full) == model.block_names(config) and sorted(two) == list(BLOCKS)
    for b in two:
        np.testing.assert_array_equal(two[b], full[b])


def test_converter_batchnorm_parameters_go_through_folding(tmp_path):
    # The zoo keeps the source's BatchNorm; folding (at inference) is W * g / sqrt(v + eps) and
    # b' = beta - mean * g / sqrt(v + eps), computed here independently from torch's tensors.
    net = torch_resnet("resnet50", seed=9, num_classes=4)
    imported = load_checkpoint(save_pth(net, tmp_path / "r50.pth"))
    tsd = {k: v.double().numpy() for k, v in net.state_dict().items() if v.is_floating_point()}
    for k in ("layer2.0.bn3.running_var", "layer2.0.downsample.1.running_mean", "bn1.weight"):
        np.testing.assert_array_equal(imported.state_dict[k], tsd[k].astype(np.float32))
    folded_config, folded = model.fold(imported.config, imported.state_dict)
    assert not folded_config.batchnorm
    assert not any(".bn" in k or k.startswith("bn1") for k in folded)
    for conv, bn in (("conv1", "bn1"), ("layer3.1.conv2", "layer3.1.bn2"),
                     ("layer2.0.downsample.0", "layer2.0.downsample.1")):
        scale = tsd[f"{bn}.weight"] / np.sqrt(tsd[f"{bn}.running_var"] + np.float32(1e-5))
        want_w = tsd[f"{conv}.weight"] * scale[:, None, None, None]
        want_b = tsd[f"{bn}.bias"] - tsd[f"{bn}.running_mean"] * scale
        # Folded in float64, rounded once: within one float32 ulp of the exact value.
        np.testing.assert_allclose(folded[f"{conv}.weight"], want_w, rtol=2 ** -23, atol=1e-12)
        np.testing.assert_allclose(folded[f"{conv}.bias"], want_b, rtol=2 ** -23, atol=1e-9)
        assert not np.allclose(folded[f"{conv}.weight"], imported.state_dict[f"{conv}.weight"])
    # The folded network (conv + bias only) gives the unfolded one's logits.
    x = images(2, 64, seed=4)
    unfolded = apply(imported.config, model.from_state_dict(imported.state_dict, imported.config),
                     x, logits=True)["logits"]
    fast = apply(folded_config, model.from_state_dict(folded, folded_config), x,
                 logits=True)["logits"]
    assert rel_err(fast, unfolded) < 1e-5


def test_canonical_mapping_round_trips_and_lists_every_bad_key():
    config = model.CONFIGS["resnext50_32x4d"]
    sd = model.init_state_dict(config, seed=3)
    assert {k: v.shape for k, v in sd.items()} == model.expected_shapes(config)
    back = model.to_state_dict(model.from_state_dict(sd, config))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

    bad = dict(sd)
    del bad["layer1.0.bn2.running_var"], bad["fc.bias"]
    bad["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    bad["layer2.1.conv2.weight"] = bad["layer2.1.conv2.weight"][:, :2]
    bad["bn1.weight"] = bad["bn1.weight"][:10]
    with pytest.raises(ValueError) as e:
        model.from_state_dict(bad, config)
    msg = str(e.value)
    for key in ("layer1.0.bn2.running_var", "fc.bias", "layer9.0.conv1.weight",
                "layer2.1.conv2.weight (256, 2, 3, 3) != (256, 8, 3, 3)",
                "bn1.weight (10,) != (64,)"):
        assert key in msg, (key, msg)


def test_the_initialiser_is_torchvisions():
    config = dataclasses.replace(model.CONFIGS["resnet50"], num_classes=10)
    a = model.init_state_dict(config, seed=0, zero_init_residual=True)
    b = model.init_state_dict(config, seed=0, zero_init_residual=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    w = a["layer3.0.conv2.weight"]  # (256, 256, 3, 3): fan_out = 256 * 9
    assert abs(w.std() / np.sqrt(2 / (256 * 9)) - 1) < 0.01 and abs(w.mean()) < 1e-3
    assert np.all(a["layer1.0.bn1.weight"] == 1) and np.all(a["layer1.0.bn1.bias"] == 0)
    assert np.all(a["layer1.0.bn1.running_var"] == 1)
    assert np.all(a["layer2.3.bn3.weight"] == 0)  # zero_init_residual: the branch's last BN
    assert np.abs(a["fc.weight"]).max() <= 1 / np.sqrt(2048)
    folded = dataclasses.replace(model.CONFIGS["resnet18"], batchnorm=False)
    c = model.init_state_dict(folded, seed=0, zero_init_residual=True)
    assert np.all(c["layer1.1.conv2.weight"] == 0) and np.all(c["layer1.1.conv1.bias"] == 0)
    assert np.any(c["layer1.1.conv1.weight"] != 0)


def test_config_json_round_trip_and_names():
    for name, config in model.CONFIGS.items():
        assert config.name == name
        assert model.ResNetConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert model.CONFIGS["resnet18"].backbone().name == "resnet18"
    odd = model.ResNetConfig("bottleneck", (1, 1, 2, 1))
    assert odd.name == "resnet_bottleneck_1-1-2-1"
    with pytest.raises(ValueError, match="unknown ResNetConfig fields"):
        model.ResNetConfig.from_json({**odd.to_json(), "activation": "gelu"})


@pytest.mark.slow  # three CLI processes compiling ResNet50-size programs: minutes on 2 cores
def test_a_mixed_zoo_is_ranked_in_one_rank(tmp_path):
    # resnet18 (256-d features) + resnet50 + resnext50_32x4d (1024-d), through the real CLI.
    # Each model is scored on its own features; D-deepscore of each block equals the published
    # script's four steps on those features (float64).
    (tmp_path / "src").mkdir()
    for i, arch in enumerate(("resnet18", "resnet50", "resnext50_32x4d")):
        save_pth(torch_resnet(arch, seed=20 + i, num_classes=5), tmp_path / "src" / f"{arch}.pth")
    data_dir = write_image_folder(tmp_path / "data", per_class=5)
    env = {"DDSCORE_JAX_CACHE": str(tmp_path / "cache")}
    r = cli("convert", tmp_path / "src", "--zoo", tmp_path / "zoo", env=env)
    assert r.returncode == 0, r.stderr
    entries = {e.name: e for e in zoo.read(tmp_path / "zoo")}
    assert {n: e.arch for n, e in entries.items()} == {
        "resnet18": "resnet18", "resnet50": "resnet50", "resnext50_32x4d": "resnext50_32x4d"}
    doc = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert doc["format"] == 2
    assert {m["name"]: m["config"]["groups"] for m in doc["models"]}["resnext50_32x4d"] == 32

    r = cli("rank", tmp_path / "zoo", data_dir, "--image-size", "64", "--json", "-", env=env)
    assert r.returncode == 0, r.stderr
    ranking = json.loads(r.stdout)
    assert sorted(m["name"] for m in ranking["models"]) == sorted(entries)
    assert [m["rank"] for m in ranking["models"]] == [1, 2, 3]

    # The same programs as rank's: loaded from the persistent compilation cache.
    r = cli("extract", tmp_path / "zoo", data_dir, "--out", tmp_path / "feats",
            "--image-size", "64", env=env)
    assert r.returncode == 0, r.stderr
    for m in ranking["models"]:
        feats = load_features(tmp_path / "feats" / f"{m['name']}.npz")
        d = 256 if m["name"] == "resnet18" else 1024
        idx = train_indices(len(feats.labels), 0.8, 0)
        for b in BLOCKS:
            assert feats.features[b].shape == (15, d)
            want = published_score(feats.features[b][idx].astype(np.float64), feats.labels[idx])
            # C = 3 classes: each of the (at most) 3 terms is in [0, 1].
            assert 0 <= m["block_scores"][b] <= 3
            assert m["block_scores"][b] == pytest.approx(want, rel=1e-9), (m["name"], b)


def test_an_old_format_zoo_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    old = tmp_path / "zoo"
    (old / "checkpoints" / "net").mkdir(parents=True)
    (old / "zoo.json").write_text(json.dumps({"models": [{
        "name": "net", "arch": "resnet18", "source": "../net.pth", "source_format": "pytorch",
        "sha256": "0" * 64, "checkpoint": "checkpoints/net"}]}))
    before = (old / "zoo.json").read_text()
    data_dir = write_image_folder(tmp_path / "data", per_class=2)
    for args in (("rank", old, data_dir), ("zoo", "list", old)):
        r = cli(*args, env={"DDSCORE_JAX_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        line = error_line(r)
        assert "older ddscore-jax" in line and "ddscore-jax convert" in line, line
        assert str((tmp_path / "net.pth").resolve()) in line
    assert (old / "zoo.json").read_text() == before


@pytest.mark.parametrize("cin,cout,size,stride,hw", [
    (16, 24, 3, 1, 1), (16, 24, 3, 1, 2), (16, 24, 3, 2, 2), (16, 24, 3, 2, 4),
    (8, 12, 7, 2, 4), (16, 24, 3, 1, 5)])
def test_small_map_convolutions_are_the_convolution(cin, cout, size, stride, hw):
    # conv_op computes a convolution with fewer output positions than taps as a matrix product
    # (XLA:CPU runs its operand-swapped form in a naive loop); value and both gradients must
    # be lax's. The last case (25 outputs > 9 taps) is lax's own convolution.
    rng = np.random.default_rng(hw * 10 + stride)
    x = rng.normal(size=(4, hw, hw, cin)).astype(np.float32)
    w = rng.normal(size=(size, size, cin, cout)).astype(np.float32)
    pad = ((size // 2, size // 2),) * 2

    def lax(a, b):
        return jax.lax.conv_general_dilated(a, b, (stride, stride), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def ours(a, b):
        return model.conv_op(a, b, (stride, stride), pad)

    want, want_vjp = jax.vjp(lax, x, w)
    got, got_vjp = jax.vjp(ours, x, w)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-6
    g = rng.normal(size=want.shape).astype(np.float32)
    for a, b in zip(got_vjp(g), want_vjp(g), strict=True):
        assert rel_err(a, b) < 1e-6
