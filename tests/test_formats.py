"""Every PyTorch-family checkpoint format, written by its own library, through the real CLI.

torchvision ``.pth``, timm hub folders (``save_for_hf``) and plain safetensors, transformers
``save_pretrained`` folders (one sharded), transformers' TimmWrapper, a Lightning ``.ckpt`` from a
real ``Trainer.fit``, and the ImageNet example's ``model_best.pth.tar``: random weights and
randomised BatchNorm statistics, one ``convert`` of the folder holding them all, and each zoo
model's features within 1e-5 (relative) of its library's own forward to ``layer3[0]``/``[1]``.
Then every refusal: one line naming the file, exit 2, the zoo byte for byte as it was.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, error_line, hooked_features, randomise_batchnorm, rel_err, snapshot

from ddscore_jax import model, zoo
from ddscore_jax.converters import layouts, load_source
from ddscore_jax.converters.files import checkpoint_stem
from ddscore_jax.errors import InputError

IMAGES = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
TOL = 1e-5


@dataclass
class Case:
    features: dict[str, np.ndarray]  # the library's own forward
    source_format: str
    arch: str  # ResNetConfig.name the tensors must give


def our_features(imported) -> dict[str, np.ndarray]:
    config, state = model.inference(imported.config, imported.state_dict, backbone=True)
    out = model.apply(config, state, IMAGES, stop_at=2)
    return {k: np.asarray(v) for k, v in out.items()}


def _timm(arch: str, seed: int, **kw):
    import timm

    torch.manual_seed(seed)
    return randomise_batchnorm(timm.create_model(arch, pretrained=False, **kw))


def _tv(arch: str, seed: int, **kw):
    import torchvision

    torch.manual_seed(seed)
    return randomise_batchnorm(getattr(torchvision.models, arch)(**kw))


def _hf(layer_type: str, depths, seed: int, head: bool = True, **kw):
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    sizes = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    config = ResNetConfig(layer_type=layer_type, depths=list(depths), hidden_sizes=sizes,
                          num_labels=4, **kw)
    torch.manual_seed(seed)
    return randomise_batchnorm((ResNetForImageClassification if head else ResNetModel)(config))


def _hf_blocks(net):
    resnet = getattr(net, "resnet", net)
    return resnet.encoder.stages[2].layers


def _lightning_ckpt(path: Path, seed: int):
    """A real ``Trainer.fit`` of one step, then ``trainer.save_checkpoint``: the module keeps its
    timm ResNet as ``self.model`` (keys ``state_dict.model.*``) beside a loss with a buffer."""
    import pytorch_lightning as pl

    class Classifier(pl.LightningModule):
        def __init__(self, lr: float = 0.05, arch: str = "resnet18"):
            super().__init__()
            self.save_hyperparameters()
            self.model = _timm(arch, seed, num_classes=3).train()
            self.loss = torch.nn.CrossEntropyLoss(weight=torch.ones(3))

        def training_step(self, batch, _):
            x, y = batch
            return self.loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = Classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(path)
    return module.model.eval()


def _imagenet_example(path: Path, seed: int):
    """pytorch/examples imagenet ``save_checkpoint``: DataParallel keys, SGD state, a tensor
    best_acc1."""
    net = _tv("resnet34", seed, num_classes=10)
    wrapped = torch.nn.DataParallel(net)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    wrapped(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    randomise_batchnorm(net)
    torch.save({"epoch": 3, "arch": "resnet34", "state_dict": wrapped.state_dict(),
                "best_acc1": torch.tensor(61.5), "optimizer": opt.state_dict(),
                "scheduler": {"step_size": 30, "last_epoch": 2}}, path)
    return net


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, dict[str, Case]]:
    """One folder of checkpoints, each written by its own library, and the reference features."""
    import safetensors.torch
    from timm.models import save_for_hf
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    root = tmp_path_factory.mktemp("formats") / "ckpts"
    root.mkdir()
    cases: dict[str, Case] = {}

    def case(name, net, blocks, fmt, arch):
        cases[name] = Case(hooked_features(net, blocks, IMAGES), fmt, arch)

    # torchvision: the whole family's block types, groups and widths, as .pth state dicts.
    for i, arch in enumerate(("resnet50", "resnext50_32x4d", "wide_resnet50_2")):
        net = _tv(arch, 10 + i, num_classes=5)
        torch.save(net.state_dict(), root / f"tv_{arch}.pth")
        case(f"tv_{arch}", net, net.layer3, "pytorch", arch)

    # timm: hub folders as save_for_hf (push_to_hub) writes them, and a plain safetensors file.
    net = _timm("resnet18", 20, num_classes=7)
    save_for_hf(net, root / "timm_resnet18", safe_serialization="both")  # safetensors preferred
    case("timm_resnet18", net, net.layer3, "safetensors", "resnet18")
    net = _timm("resnet50", 21, num_classes=7)
    save_for_hf(net, root / "timm_resnet50", safe_serialization=False)  # pytorch_model.bin only
    case("timm_resnet50", net, net.layer3, "pytorch", "resnet50")
    net = _timm("resnet50d", 22, num_classes=7)
    save_for_hf(net, root / "timm_resnet50d", safe_serialization=True)
    case("timm_resnet50d", net, net.layer3, "safetensors", "resnet50d")
    net = _timm("resnet18d", 23, num_classes=7)
    safetensors.torch.save_file(net.state_dict(), root / "timm_resnet18d.safetensors")
    case("timm_resnet18d", net, net.layer3, "safetensors", "resnet18d")

    # transformers: save_pretrained folders (the bottleneck one sharded), and a headless
    # ResNetModel as transformers 4.x wrote pytorch_model.bin (5.x writes safetensors only).
    net = _hf("basic", (2, 2, 2, 2), 30)
    net.save_pretrained(root / "hf_basic")
    case("hf_basic", net, _hf_blocks(net), "hf-transformers", "resnet18")
    net = _hf("bottleneck", (2, 2, 2, 2), 31)
    net.save_pretrained(root / "hf_bottleneck", max_shard_size="20MB")
    assert (root / "hf_bottleneck" / "model.safetensors.index.json").is_file()
    case("hf_bottleneck", net, _hf_blocks(net), "hf-transformers", "resnet26")
    net = _hf("basic", (3, 4, 6, 3), 32, head=False)
    (root / "hf_bin").mkdir()
    net.config.save_pretrained(root / "hf_bin")
    torch.save(net.state_dict(), root / "hf_bin" / "pytorch_model.bin")
    case("hf_bin", net, _hf_blocks(net), "hf-transformers", "resnet34")

    # transformers' TimmWrapper, built offline from its config (timm creates the network).
    torch.manual_seed(40)
    net = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet26d",
                                                              num_labels=6))
    randomise_batchnorm(net)
    net.save_pretrained(root / "timm_wrapper")
    case("timm_wrapper", net.timm_model, net.timm_model.layer3, "hf-transformers", "resnet26d")

    # Training checkpoints.
    net = _lightning_ckpt(root / "lit.ckpt", 50)
    case("lit", net, net.layer3, "lightning", "resnet18")
    net = _imagenet_example(root / "model_best.pth.tar", 51)
    case("model_best", net, net.layer3, "pytorch", "resnet34")
    return root, cases


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """One real ``ddscore-jax convert`` of the whole folder."""
    root, _ = sources
    zoo_dir = tmp_path_factory.mktemp("formats_zoo") / "zoo"
    result = cli("convert", root, "--zoo", zoo_dir)
    return zoo_dir, result


def test_convert_folder_of_every_format(sources, converted):
    _, cases = sources
    zoo_dir, result = converted
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    entries = {e.name: e for e in zoo.read(zoo_dir)}
    assert sorted(entries) == sorted(cases)
    for name, c in cases.items():
        assert (entries[name].source_format, entries[name].arch) == (c.source_format, c.arch), name
    # A second run finds every model (files and folders) unchanged.
    before = snapshot(zoo_dir)
    again = cli("convert", sources[0], "--zoo", zoo_dir)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("unchanged") == len(cases)
    assert snapshot(zoo_dir) == before


@pytest.mark.parametrize("name", [
    "tv_resnet50", "tv_resnext50_32x4d", "tv_wide_resnet50_2", "timm_resnet18", "timm_resnet50",
    "timm_resnet50d", "timm_resnet18d", "hf_basic", "hf_bottleneck", "hf_bin", "timm_wrapper",
    "lit", "model_best"])
def test_features_match_the_source_library(sources, converted, name):
    """The zoo model the CLI wrote gives its library's own conv4_x features."""
    _, cases = sources
    zoo_dir, result = converted
    assert result.returncode == 0, result.stderr
    entry = next(e for e in zoo.read(zoo_dir) if e.name == name)
    ours = our_features(zoo.load_model(zoo_dir, entry))
    ref = cases[name].features
    assert sorted(ours) == sorted(ref) == ["layer3.0", "layer3.1"]
    width = 256 if cases[name].arch.startswith(("resnet18", "resnet34")) else 1024
    for k in ref:
        assert ours[k].shape == ref[k].shape == (len(IMAGES), width)
        err = rel_err(ours[k], ref[k])
        print(f"{name} {entry.source_format} {entry.arch} {k} rel_err={err:.2e}")  # pytest -s
        assert err < TOL, (name, k, err)


def test_bfloat16_safetensors(tmp_path):
    """bfloat16 tensors (NumPy has no such dtype) import as their exact float32 values."""
    import safetensors.torch

    net = _timm("resnet18", 60, num_classes=3)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
          for k, v in net.state_dict().items()}
    safetensors.torch.save_file(sd, tmp_path / "bf16.safetensors")
    imported = load_source(tmp_path / "bf16.safetensors").model
    assert imported.config.name == "resnet18"
    np.testing.assert_array_equal(imported.state_dict["layer3.1.conv2.weight"],
                                  sd["layer3.1.conv2.weight"].float().numpy())


def test_prefix_stacks_and_layout_names():
    """DDP + torch.compile + an attribute prefix stack; transformers names map one to one."""
    sd = {f"_orig_mod.module.backbone.{k}": np.zeros(1)
          for k in ("conv1.weight", "layer1.0.conv1.weight")}
    sd["optimizer.state.0.momentum_buffer"] = np.zeros(1)
    found = layouts.find_resnet(sd, "x")
    assert (found.layout, found.prefix) == ("torchvision", "_orig_mod.module.backbone.")
    hf = {
        "resnet.embedder.embedder.convolution.weight": "conv1.weight",
        "resnet.embedder.embedder.normalization.running_var": "bn1.running_var",
        "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight": "layer1.0.conv1.weight",
        "resnet.encoder.stages.2.layers.1.layer.2.normalization.bias": "layer3.1.bn3.bias",
        "resnet.encoder.stages.3.layers.0.shortcut.convolution.weight":
            "layer4.0.downsample.0.weight",
        "resnet.encoder.stages.3.layers.0.shortcut.normalization.weight":
            "layer4.0.downsample.1.weight",
        "classifier.1.weight": "fc.weight",
    }
    found = layouts.find_resnet(hf, "x")
    assert (found.layout, found.prefix) == ("transformers", "resnet.")
    renamed = layouts.canonical({k: k for k in hf}, found, "x")
    assert {v: k for k, v in renamed.items()} == hf


def test_names_of_checkpoints(tmp_path):
    assert checkpoint_stem(Path("runs/model_best.pth.tar")) == "model_best"
    assert checkpoint_stem(Path("epoch=3-step=10.ckpt")) == "epoch=3-step=10"
    snap = tmp_path / "models--microsoft--resnet-50" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert checkpoint_stem(snap) == "microsoft--resnet-50"


# --- Refusals ------------------------------------------------------------------------------

def _make_refused(folder: Path) -> dict[str, str]:
    """Checkpoints that must be refused, each written by its library: file name -> the words its
    one-line refusal must contain."""
    import safetensors.torch

    net = _tv("resnet18", 70, num_classes=3)
    torch.jit.save(torch.jit.script(net), folder / "scripted.pt")
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 32, 32)), folder / "traced.pth")
    torch.save(net, folder / "whole_module.pth")
    sd = net.state_dict()
    torch.save({**{f"teacher.{k}": v for k, v in sd.items()},
                **{f"student.{k}": v for k, v in sd.items()}}, folder / "distill.pth")
    for arch in ("resnetv2_18", "seresnet18", "efficientnet_b0", "vit_tiny_patch16_224",
                 "resnet26t", "resnet50s"):
        safetensors.torch.save_file(_timm(arch, 71).state_dict(), folder / f"{arch}.safetensors")
    from timm.models import save_for_hf

    # Blur-pool downsampling has no tensors: only the hub folder's config.json tells.
    save_for_hf(_timm("resnetblur18", 74), folder / "timm_blur", safe_serialization=True)
    hf = _hf("bottleneck", (1, 1, 1, 1), 72, downsample_in_bottleneck=True)
    hf.save_pretrained(folder / "hf_v1_stride")
    hf = _hf("basic", (1, 1, 1, 1), 73, downsample_in_first_stage=True)
    hf.save_pretrained(folder / "hf_first_stage")
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return {
        "scripted.pt": "a TorchScript archive",
        "traced.pth": "a TorchScript archive",
        "whole_module.pth": "a whole pickled model",
        "distill.pth": "'teacher.' and 'student.'",
        "resnetv2_18.safetensors": "pre-activation ResNet",
        "seresnet18.safetensors": "squeeze-and-excitation",
        "efficientnet_b0.safetensors": "EfficientNet",
        "vit_tiny_patch16_224.safetensors": "vision transformer",
        "resnet26t.safetensors": "a tiered deep stem",
        "resnet50s.safetensors": "a deep stem ending in 128 channels",
        "timm_blur": "anti-aliased",
        "hf_v1_stride": "downsample_in_bottleneck",
        "hf_first_stage": "downsample_in_first_stage",
        "garbage.safetensors": "unreadable safetensors file",
    }


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("refused") / "bad"
    folder.mkdir()
    return folder, _make_refused(folder)


def test_each_refusal_says_why(refused):
    folder, expected = refused
    for name, words in expected.items():
        with pytest.raises(InputError) as e:
            load_source(folder / name)
        line = str(e.value)
        assert "\n" not in line and name in line and words in line, (name, line)
    # Re-saving as advised works: the TorchScript module's state_dict imports.
    scripted = torch.jit.load(folder / "scripted.pt")
    torch.save(scripted.state_dict(), folder.parent / "resaved.pth")
    assert load_source(folder.parent / "resaved.pth").model.config.name == "resnet18"


def test_cli_refusals_one_line_each_zoo_unchanged(converted, refused, tmp_path):
    """A folder of refused checkpoints: one line each, exit 2, the zoo byte for byte as it was;
    with one good checkpoint among them, that one is added and the rest still refused."""
    folder, expected = refused
    zoo_dir = converted[0]
    before = snapshot(zoo_dir)
    result = cli("convert", folder, "--zoo", zoo_dir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == len(expected), result.stderr
    for name, words in expected.items():
        assert any(name in ln and words in ln for ln in lines), (name, result.stderr)
    assert snapshot(zoo_dir) == before

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(folder / "scripted.pt", mixed)
    shutil.copy(folder / "seresnet18.safetensors", mixed)
    torch.save(_tv("resnet18", 80, num_classes=2).state_dict(), mixed / "fresh.pth")
    result = cli("convert", mixed, "--zoo", tmp_path / "new_zoo")
    assert result.returncode == 2
    assert "added fresh" in " ".join(result.stderr.split())
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 2 and "seresnet18" in error_line(result), result.stderr
    models = json.loads((tmp_path / "new_zoo" / "zoo.json").read_text())["models"]
    assert [(m["name"], m["arch"]) for m in models] == [("fresh", "resnet18")]
