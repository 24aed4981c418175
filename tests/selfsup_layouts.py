"""Self-supervised checkpoints in the layouts their projects' own code saves, with random weights.

Each builder is the project's model class reduced to the attributes its ``state_dict`` shows
(read from the project's repository), around a torchvision ResNet with randomised BatchNorm
statistics, saved as the project's training script saves it. Each returns the network whose
features the import must give (the encoder the project's linear evaluation loads) and the
module holding its conv4_x blocks. Small ResNet-18s and few channels keep them fast.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from helpers import randomise_batchnorm
from torch import nn


def _resnet(seed: int, **kw) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return randomise_batchnorm(torchvision.models.resnet18(**kw))


def _perturbed(net: nn.Module, seed: int) -> nn.Module:
    """A momentum encoder after some training: a copy that no longer equals the original."""
    other = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.is_floating_point() and t.ndim > 1:  # weights; BatchNorm is randomised below
                t.add_(0.01 * torch.randn(t.shape, generator=g))
    return randomise_batchnorm(other)


def _sgd(module: nn.Module) -> dict:
    """An optimizer state after one step, as the training scripts save beside the model."""
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    return opt.state_dict()


class _DataParallel(nn.Module):
    """The ``module.`` prefix that DistributedDataParallel gives every key (DDP itself needs a
    process group; nn.DataParallel on CPU names its keys the same way)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


# --- MoCo v1/v2: facebookresearch/moco, moco/builder.py + main_moco.py ----------------------

class MoCo(nn.Module):
    def __init__(self, seed: int, dim: int = 128, K: int = 64, mlp: bool = True):
        super().__init__()
        self.encoder_q = _resnet(seed, num_classes=dim)
        if mlp:  # builder.py's "brute-force replacement"
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(),
                                              self.encoder_q.fc)
        self.encoder_k = _perturbed(self.encoder_q, seed + 1)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def moco(path: Path, seed: int, mlp: bool = True):
    """``main_moco.py``: save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer'}) of the
    DDP-wrapped MoCo, as ``checkpoint_0199.pth.tar``."""
    model = _DataParallel(MoCo(seed, mlp=mlp))
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": model.state_dict(),
                "optimizer": _sgd(model)}, path)
    return model.module.encoder_q.eval()


# --- MoCo v3: facebookresearch/moco-v3, moco/builder.py MoCo_ResNet + main_moco.py ---------

def _build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    mlp = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class MoCoV3(nn.Module):
    def __init__(self, seed: int, dim: int = 32, mlp_dim: int = 64):
        super().__init__()
        self.T = 1.0
        self.criterion = nn.CrossEntropyLoss()
        # main_moco.py: partial(torchvision_models.__dict__[arch], zero_init_residual=True)
        self.base_encoder = _resnet(seed, num_classes=mlp_dim, zero_init_residual=True)
        hidden_dim = self.base_encoder.fc.weight.shape[1]
        del self.base_encoder.fc
        self.base_encoder.fc = _build_mlp(2, hidden_dim, mlp_dim, dim)
        self.momentum_encoder = _perturbed(self.base_encoder, seed + 1)
        self.predictor = _build_mlp(2, dim, mlp_dim, dim, False)


def moco_v3(path: Path, seed: int):
    """``main_moco.py``: save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'})
    of the DDP-wrapped MoCo_ResNet."""
    model = _DataParallel(MoCoV3(seed))
    scaler = torch.amp.GradScaler("cpu")
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": model.state_dict(),
                "optimizer": _sgd(model), "scaler": scaler.state_dict()}, path)
    return model.module.base_encoder.eval()


# --- SimCLR: sthalles/SimCLR models/resnet_simclr.py + simclr.py ------------------------------

class ResNetSimCLR(nn.Module):
    def __init__(self, seed: int, out_dim: int = 32):
        super().__init__()
        self.backbone = _resnet(seed, num_classes=out_dim)
        dim_mlp = self.backbone.fc.in_features
        self.backbone.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.backbone.fc)


def simclr_sthalles(path: Path, seed: int):
    """``simclr.py``: save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer'}) of the
    un-wrapped model, as ``checkpoint_0100.pth.tar``."""
    model = ResNetSimCLR(seed)
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": model.state_dict(),
                "optimizer": _sgd(model)}, path)
    return model.backbone.eval()


# --- SimCLR: Spijkervet/SimCLR simclr/simclr.py + main.py save_model -------------------------

class SpijkervetSimCLR(nn.Module):
    def __init__(self, seed: int, projection_dim: int = 16):
        super().__init__()
        self.encoder = _resnet(seed)
        n_features = self.encoder.fc.in_features
        self.encoder.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(n_features, n_features, bias=False), nn.ReLU(),
                                       nn.Linear(n_features, projection_dim, bias=False))


def simclr_spijkervet(path: Path, seed: int):
    """``save_model``: torch.save(model.state_dict(), 'checkpoint_{epoch}.tar')."""
    model = SpijkervetSimCLR(seed)
    torch.save(model.state_dict(), path)
    return model.encoder.eval()


# --- BYOL: lucidrains/byol-pytorch byol_pytorch.py --------------------------------------------

def _byol_mlp(dim, projection_size, hidden_size):
    return nn.Sequential(nn.Linear(dim, hidden_size), nn.BatchNorm1d(hidden_size),
                         nn.ReLU(inplace=True), nn.Linear(hidden_size, projection_size))


class NetWrapper(nn.Module):
    def __init__(self, net, projection_size, projection_hidden_size):
        super().__init__()
        self.net = net
        self.projector = _byol_mlp(512, projection_size, projection_hidden_size)


class BYOL(nn.Module):
    """After its first forward: the singleton projector and target encoder exist."""

    def __init__(self, seed: int, projection_size: int = 16, hidden: int = 32):
        super().__init__()
        self.net = _resnet(seed)
        self.online_encoder = NetWrapper(self.net, projection_size, hidden)
        self.target_encoder = _perturbed(self.online_encoder, seed + 1)
        self.online_predictor = _byol_mlp(projection_size, projection_size, hidden)


def byol(path: Path, seed: int):
    """The learner's whole state, as one saves it to resume: torch.save(learner.state_dict())."""
    learner = BYOL(seed)
    torch.save(learner.state_dict(), path)
    return learner.net.eval()


# --- SwAV: facebookresearch/swav src/resnet50.py + main_swav.py --------------------------------

class SwAVResNet(nn.Module):
    """SwAV's own ResNet: torchvision's names, a zero pad before a padding-2 stem conv, no fc,
    a projection head and prototypes."""

    def __init__(self, seed: int, hidden_mlp: int = 64, output_dim: int = 16,
                 nmb_prototypes: int = 30):
        super().__init__()
        tv = _resnet(seed)
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=2, bias=False)
        self.conv1.weight = tv.conv1.weight
        self.bn1, self.relu, self.maxpool = tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (tv.layer1, tv.layer2, tv.layer3,
                                                              tv.layer4)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.projection_head = nn.Sequential(nn.Linear(512, hidden_mlp),
                                             nn.BatchNorm1d(hidden_mlp), nn.ReLU(inplace=True),
                                             nn.Linear(hidden_mlp, output_dim))
        self.prototypes = nn.Linear(output_dim, nmb_prototypes, bias=False)

    def forward(self, x):  # forward_backbone
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        return self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


def swav(path: Path, seed: int):
    """``main_swav.py``: torch.save({'epoch', 'state_dict', 'optimizer'}) of the DDP model, as
    ``checkpoint.pth.tar``."""
    model = _DataParallel(SwAVResNet(seed))
    torch.save({"epoch": 400, "state_dict": model.state_dict(), "optimizer": _sgd(model)}, path)
    return model.module.eval()


# --- Barlow Twins: facebookresearch/barlowtwins main.py ----------------------------------------

class BarlowTwins(nn.Module):
    def __init__(self, seed: int, sizes=(512, 64, 64)):
        super().__init__()
        self.backbone = _resnet(seed, zero_init_residual=True)
        self.backbone.fc = nn.Identity()
        layers = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False),
                       nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)


def barlow_twins(checkpoint: Path, final: Path, seed: int):
    """``main.py``: dict(epoch, model=model.state_dict(), optimizer) as ``checkpoint.pth``, and
    at the end ``model.module.backbone.state_dict()`` as ``resnet50.pth``."""
    model = _DataParallel(BarlowTwins(seed))
    torch.save(dict(epoch=1000, model=model.state_dict(), optimizer=_sgd(model)), checkpoint)
    torch.save(model.module.backbone.state_dict(), final)
    return model.module.backbone.eval()


# --- DINO: facebookresearch/dino main_dino.py + utils.MultiCropWrapper + DINOHead -------------

class DINOHead(nn.Module):
    def __init__(self, in_dim=512, out_dim=64, hidden_dim=32, bottleneck_dim=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head


def dino(checkpoint: Path, backbone_only: Path, seed: int):
    """``main_dino.py``: save_on_master({'student', 'teacher', 'optimizer', 'epoch', 'args',
    'dino_loss'}) with both networks in DDP (a ResNet has BatchNorm), as ``checkpoint.pth``;
    and the released ``dino_resnet50_pretrain.pth`` layout, the teacher's backbone alone."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation, as DINO calls it
        student = _DataParallel(MultiCropWrapper(_resnet(seed), DINOHead()))
        teacher = _DataParallel(MultiCropWrapper(_perturbed(student.module.backbone, seed + 1),
                                                 DINOHead()))
    args = argparse.Namespace(arch="resnet18", out_dim=64, momentum_teacher=0.996,
                              output_dir="./out", local_crops_scale=(0.05, 0.4))
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": _sgd(student), "epoch": 100, "args": args,
                "dino_loss": {"center": torch.zeros(1, 64)}}, checkpoint)
    torch.save(teacher.module.backbone.state_dict(), backbone_only)
    return teacher.module.backbone.eval()
