"""ONNX files as PyTorch 2.14's exporters write them, and networks the importer must refuse."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from helpers import randomise_batchnorm, torch_resnet

# Every exporter setting the ONNX importer must accept, each once. TorchScript exporter
# (dynamo=False): with constant folding, BatchNorm is folded into the convs; without it,
# BatchNormalization nodes read their parameters through Identity. Dynamo exporter: optimised
# (folded BN, ReduceMean head, weights in `.onnx.data` beside the model by default) and unoptimised
# (BatchNormalization plus Shape/Expand/CastLike/Constant plumbing). "external" re-saves the graph
# with one weights file per tensor in a sub-folder; "dynamic" exports a dynamic batch axis;
# "modules-as-functions" nests the graph in local functions, which the importer inlines.
VARIANTS: dict[str, dict] = {
    "ts-opset13": dict(dynamo=False, opset_version=13),
    "ts-opset15-dynamic-initializers-as-inputs": dict(
        dynamo=False, opset_version=15, dynamic=True, keep_initializers_as_inputs=True),
    "ts-opset18-dynamic": dict(dynamo=False, opset_version=18, dynamic=True),
    # Every torch module a local ONNX function (torch crashes on this without constant folding).
    "ts-opset15-modules-as-functions": dict(
        dynamo=False, opset_version=15, export_modules_as_functions=True),
    "ts-opset18-external": dict(dynamo=False, opset_version=18, external="per-tensor"),
    "ts-unfolded-opset13": dict(dynamo=False, opset_version=13, do_constant_folding=False),
    "ts-unfolded-opset17-dynamic": dict(
        dynamo=False, opset_version=17, do_constant_folding=False, dynamic=True),
    "dynamo-dynamic": dict(dynamo=True, dynamic=True),
    "dynamo-unoptimized": dict(dynamo=True, optimize=False),
}
EXPORT_BATCH = 2


def export(net, path: Path, variant: str, image_size: int) -> Path:
    """Export ``net`` with ``VARIANTS[variant]``'s settings to ``path``; return ``path``."""
    import torch

    opts = dict(VARIANTS[variant])
    dynamic = opts.pop("dynamic", False)
    external = opts.pop("external", None)
    example = (torch.randn(EXPORT_BATCH, 3, image_size, image_size),)
    if dynamic and opts["dynamo"]:
        opts["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic:
        opts.update(input_names=["images"], output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(net, example, str(path), verbose=False, **opts)
    if external:
        import onnx

        proto = onnx.load(str(path))
        path.unlink()
        (path.parent / "weights").mkdir()
        for i, t in enumerate(proto.graph.initializer):
            onnx.external_data_helper.set_external_data(t, location=f"weights/tensor{i}.bin")
        onnx.save_model(proto, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=False, size_threshold=0)
    return path


# The ResNet v1 family as its own libraries build it: torchvision's, and timm's ResNet-D (deep stem,
# average-pool shortcut), which torchvision does not have.
TIMM_ARCHS = ("resnet18d", "resnet50d")


def source_net(arch: str, seed: int, num_classes: int = 2):
    """torchvision's or timm's ``arch`` in eval mode, random weights, randomised BatchNorm."""
    if arch not in TIMM_ARCHS:
        return torch_resnet(arch, seed, num_classes=num_classes)
    import timm
    import torch

    torch.manual_seed(seed)
    return randomise_batchnorm(timm.create_model(arch, pretrained=False, num_classes=num_classes))


def onnxruntime_logits(path: Path, images_nhwc: np.ndarray) -> np.ndarray:
    """The whole ONNX graph run by onnxruntime on CPU: (N, classes) logits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # initializers listed as graph inputs are legal; no warnings
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))})[0]


def preact_resnet18(seed: int = 0):
    """He et al.'s pre-activation ResNet18 (v2): BN -> ReLU -> conv in every block, no stem BN."""
    import torch
    from torch import nn

    class PreActBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                             if stride != 1 or cin != cout else None)

        def forward(self, x):
            out = torch.relu(self.bn1(x))
            identity = x if self.shortcut is None else self.shortcut(out)
            out = self.conv1(out)
            return self.conv2(torch.relu(self.bn2(out))) + identity

    torch.manual_seed(seed)
    layers, cin = [], 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [PreActBlock(cin, width, stride), PreActBlock(width, width, 1)]
        cin = width
    net = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1), *layers,
                        nn.BatchNorm2d(512), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(512, 2))
    return randomise_batchnorm(net)


def plain_conv_stack(seed: int = 0):
    """A torchvision ResNet stem followed by conv-BN-ReLU layers with no residual connections."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers, cin = [], 64
    for width, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
        layers += [nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU()]
        cin = width
    net = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(cin, 2))
    return randomise_batchnorm(net)


def truncated_after_layer2(net):
    """torchvision ``net`` cut after its conv3_x stage (layer2), as a feature extractor would be."""
    from torch import nn

    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2).eval()


def relocate_external_data(model: Path, weights_dir: Path, dest: Path, location: str) -> Path:
    """Write ``model`` (inline weights) to ``dest`` with every initializer read from the external
    file ``location``, whose bytes are written to ``weights_dir/weights.bin``; return ``dest``.

    ``location`` is stored as given, so it may point anywhere: the importer decides what to read.
    """
    import onnx

    weights_dir.mkdir(parents=True, exist_ok=True)
    donor = weights_dir / "donor.onnx"
    onnx.save_model(onnx.load(str(model)), str(donor), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    proto = onnx.load(str(donor), load_external_data=False)
    donor.unlink()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(proto.SerializeToString())
    return dest


def timm_resnetv2(arch: str = "resnetv2_18", seed: int = 0):
    """timm's pre-activation ResNet (v2, ``resnetv2_18`` .. ``resnetv2_152``)."""
    import timm
    import torch

    torch.manual_seed(seed)
    return randomise_batchnorm(timm.create_model(arch, pretrained=False, num_classes=2))


def channels_last_input(net):
    """``net`` behind a channels-last input (N, H, W, 3) transposed to NCHW, as Keras models
    exported with tf2onnx begin."""
    import torch

    class ChannelsLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    return ChannelsLast().eval()


def export_channels_last(net, path: Path, image_size: int) -> Path:
    """:func:`channels_last_input` of ``net`` exported (TorchScript exporter, opset 13)."""
    import torch

    example = (torch.randn(EXPORT_BATCH, image_size, image_size, 3),)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(channels_last_input(net), example, str(path), dynamo=False,
                          opset_version=13)
    return path


def stride_on_first_conv(seed: int = 0):
    """A small torchvision Bottleneck ResNet (one block per stage) with each stage's stride moved
    from the 3x3 to the first 1x1 convolution: the original ResNet v1 (Caffe, MXNet/Gluon, the
    ONNX Model Zoo's resnet50-v1)."""
    import torch
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    net = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=2)
    for stage in (net.layer2, net.layer3, net.layer4):
        stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    return randomise_batchnorm(net)


def mixed_bn_eps(net):
    """``net`` with its stem BatchNorm's epsilon changed (1e-3) and every other left at 1e-5."""
    net.bn1.eps = 1e-3
    return net
