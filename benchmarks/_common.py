"""What the benchmark scripts share: a realistic image folder, random models on both sides, the
published pipeline (torchvision + DataLoader, two passes per model, NumPy score), and timing."""

from __future__ import annotations

import os

# OpenBLAS's threads spin while they wait; on 2 cores shared with other jobs a 2-thread SVD was
# measured 10-50x slower than a 1-thread one. NumPy, SciPy and JAX's CPU LAPACK calls all go
# through it, so every side gets one thread (set OPENBLAS_NUM_THREADS to override).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ddscore_jax.reference import published_score

TEXTURES = ("brick", "grass", "gravel")  # greyscale 512x512 photos shipped with scikit-image


def make_dataset(root: Path, n_images: int, size: int = 200, seed: int = 0) -> Path:
    """A NEU-like folder: 200x200 greyscale JPEGs, one class per texture, random crops and flips
    of real photographs (noise-free JPEGs decode much like real inspection images do)."""
    import skimage.data

    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == n_images:
        return root
    rng = np.random.default_rng(seed)
    photos = {t: getattr(skimage.data, t)() for t in TEXTURES}
    for i in range(n_images):
        cls = TEXTURES[i % len(TEXTURES)]
        photo = photos[cls]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crop = photo[y:y + size, x:x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(root / cls / f"{i:05d}.jpg", quality=90)
    return root


def torch_models(n: int, arch: str = "resnet18"):
    """``n`` torchvision ResNets in eval mode, random weights and randomised BatchNorm stats."""
    import torch
    import torchvision

    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = getattr(torchvision.models, arch)(num_classes=2)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.3)
                    m.running_var.uniform_(0.3, 3.0)
        nets.append(net.eval())
    return nets


def loaded_models(nets) -> list:
    """The same networks as ddscore-jax loads them (the real converter; BatchNorm is folded when
    the engine is built)."""
    from ddscore_jax.converters.state_dict import import_state_dict
    from ddscore_jax.forward import LoadedModel

    out = []
    for i, net in enumerate(nets):
        sd = {k: v.detach().float().numpy() for k, v in net.state_dict().items()
              if v.is_floating_point()}
        imported = import_state_dict(sd, f"bench{i}")[0]
        out.append(LoadedModel(f"bench{i}", imported.config, imported.state_dict))
    return out


def torch_loader(root: Path, image_size: int, batch_size: int, workers: int):
    """torchvision ``ImageFolder`` + ``DataLoader`` with the published transforms."""
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    ds = datasets.ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                       num_workers=workers)


class Layer3:
    """torchvision's own modules run to ``layer3[upto]``; returns every block's pooled output."""

    def __init__(self, net, upto: int):
        self.net, self.upto = net, upto

    def __call__(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer2(n.layer1(x))
        out = []
        for block in list(n.layer3)[: self.upto + 1]:
            x = block(x)
            out.append(x.mean(dim=(2, 3)))
        return out


def torch_single_pass(nets, root: Path, image_size: int, batch_size: int, workers: int):
    """Every model, one DataLoader pass each to ``layer3[1]``: ``[(n, 256) x 2]`` per model."""
    import torch

    feats = []
    with torch.inference_mode():
        for net in nets:
            f = Layer3(net, 1)
            parts = [f(x) for x, _ in torch_loader(root, image_size, batch_size, workers)]
            feats.append([torch.cat([p[b] for p in parts]).numpy() for b in range(2)])
    return feats


def published_pipeline(nets, root: Path, image_size: int, batch_size: int, workers: int,
                       train_fraction: float = 0.8, seed: int = 0):
    """The reference's procedure: per model and per block, a network truncated at that block and
    a full ImageFolder/DataLoader pass; then the four-step NumPy score of each block."""
    import torch

    labels = None
    scores = []
    with torch.inference_mode():
        for net in nets:
            blocks = []
            for upto in (0, 1):
                f = Layer3(net, upto)
                parts, ys = [], []
                for x, y in torch_loader(root, image_size, batch_size, workers):
                    parts.append(f(x)[upto])
                    ys.append(y)
                blocks.append(torch.cat(parts).numpy())
                labels = torch.cat(ys).numpy()
            idx = train_subset(len(labels), train_fraction, seed)
            scores.append(np.mean([published_score(b[idx], labels[idx]) for b in blocks]))
    return scores


def train_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    from ddscore_jax.ddscore import train_indices

    return train_indices(n, fraction, seed)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    """One line: CPU model, cores, load average (other jobs on the machine skew every figure)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}; {os.cpu_count()} cores; load average {load}"


def load_now() -> float:
    return os.getloadavg()[0]
