"""The Flax forward equals torchvision's, through the real .pth import."""

import numpy as np
import pytest
from helpers import rel_err, save_pth, torch_layer3_features, torch_resnet

from ddscore_jax import model
from ddscore_jax.converters import load_checkpoint

# float32 through ~30 convolutions: measured ~4e-7; 1e-5 leaves room for other CPUs' kernels.
FEATURE_RTOL = 1e-5


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_features_match_torchvision(arch, tmp_path):
    net = torch_resnet(arch, seed=hash(arch) % 1000, num_classes=2)
    imported = load_checkpoint(save_pth(net, tmp_path / f"{arch}.pth"))
    assert imported.arch == arch
    images = np.random.default_rng().normal(size=(2, 224, 224, 3)).astype(np.float32)
    ours = model.forward(arch, model.flat_to_state(imported.params, arch), images)
    ref = torch_layer3_features(net, images)
    assert sorted(ours) == sorted(ref) == model.block_names(arch)
    for block in ref:
        assert ours[block].shape == (2, model.FEATURE_DIM)
        assert rel_err(ours[block], ref[block]) < FEATURE_RTOL, block


def test_num_blocks_stops_early_with_the_same_numbers(tmp_path):
    imported = load_checkpoint(save_pth(torch_resnet("resnet34", 3), tmp_path / "m.pth"))
    state = model.flat_to_state(imported.params, "resnet34")
    images = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
    full = model.forward("resnet34", state, images)
    first_two = model.forward("resnet34", state, images, num_blocks=2)
    assert sorted(first_two) == ["layer3.0", "layer3.1"]
    for block in first_two:
        np.testing.assert_array_equal(first_two[block], full[block])


@pytest.mark.parametrize("wrap,prefix", [(None, ""), (None, "module."), ("state_dict", ""),
                                         ("model", "module."), ("model_state_dict", "")])
def test_checkpoint_layouts_give_the_same_parameters(tmp_path, wrap, prefix):
    net = torch_resnet("resnet18", seed=7, num_classes=2)
    plain = load_checkpoint(save_pth(net, tmp_path / "plain.pth"))
    other = load_checkpoint(save_pth(net, tmp_path / "other.pt", wrap=wrap, prefix=prefix))
    assert other.arch == "resnet18"
    assert sorted(other.params) == sorted(plain.params)
    for k in plain.params:
        np.testing.assert_array_equal(other.params[k], plain.params[k])


def test_any_classifier_size_and_head_is_kept(tmp_path):
    for classes in (2, 1000):
        imported = load_checkpoint(save_pth(torch_resnet("resnet18", 0, classes),
                                            tmp_path / f"c{classes}.pth"))
        assert imported.head["fc.kernel"].shape == (512, classes)
        assert not any(k.startswith(("layer4", "fc")) for k in imported.params)


def test_parameter_tree_is_checked_against_init():
    params = model.init_flat("resnet18")
    params["layer1.0.conv1.kernel"] = params["layer1.0.conv1.kernel"][..., :10]
    with pytest.raises(ValueError, match="layer1.0.conv1.kernel"):
        model.flat_to_state(params, "resnet18")
    del params["conv1.bias"]
    with pytest.raises(ValueError, match="missing"):
        model.flat_to_state(params, "resnet18")
