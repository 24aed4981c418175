"""Shared test helpers: real torchvision models, real image folders, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("crack", "ok", "scratch")


def torch_resnet(arch: str, seed: int, num_classes: int = 2):
    """A torchvision ResNet in eval mode with random weights and randomised BatchNorm statistics."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return randomise_batchnorm(getattr(torchvision.models, arch)(num_classes=num_classes))


def randomise_batchnorm(net):
    """Give every BatchNorm random running statistics and affine parameters; eval mode."""
    import torch

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return net.eval()


def torch_layer3_features(net, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """torchvision's own forward, with hooks on every conv4_x block, averaged over space."""
    import torch

    feats: dict[str, np.ndarray] = {}
    hooks = [
        block.register_forward_hook(
            lambda _m, _i, out, name=f"layer3.{i}": feats.__setitem__(
                name, out.mean(dim=(2, 3)).numpy()))
        for i, block in enumerate(net.layer3)
    ]
    with torch.no_grad():
        net(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
    for h in hooks:
        h.remove()
    return feats


def save_pth(net, path: Path, wrap: str | None = None, prefix: str = "") -> Path:
    """Save ``net``'s state_dict, optionally key-prefixed and nested under ``wrap``."""
    import torch

    sd = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    return path


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: relative to the feature scale, defined where ref has zeros."""
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def write_image_folder(root: Path, per_class: int | dict[str, int] = 4, classes=CLASSES,
                       seed: int = 0, size=(40, 52)) -> Path:
    """A folder-of-classes data set of random PNGs whose classes differ in mean colour."""
    rng = np.random.default_rng(seed)
    for c, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        count = per_class[cls] if isinstance(per_class, dict) else per_class
        for j in range(count):
            base = rng.integers(0, 256, size=(*size, 3))
            pixels = np.clip(base * 0.5 + 40 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"img_{j:03d}.png")
    return root


def cli(*args: str | os.PathLike, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the ``ddscore-jax`` command in a subprocess, as a user would: ``python -m`` with this
    interpreter, so it is this tree's code (an installed ``ddscore-jax`` first on PATH may be
    another checkout's)."""
    cmd = [sys.executable, "-m", "ddscore_jax.cli"]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=900)


def cli_in_process(*args: str | os.PathLike, env: dict | None = None
                   ) -> subprocess.CompletedProcess:
    """The same command in this process, through Typer's ``CliRunner`` isolation (its stdin,
    stdout, stderr and environment) and the real exit-code mapping (``_common.run``):
    for argument, usage and bad-input tests, which need no process of their own."""
    from typer.testing import CliRunner

    from ddscore_jax.cli._common import run
    from ddscore_jax.cli.app import app

    argv = ["ddscore-jax", *map(str, args)]
    with CliRunner().isolation(env=env) as (out, err, _):
        saved, sys.argv = sys.argv, argv
        try:
            run(app, process=False)  # no signal handlers or exception hooks in pytest
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = saved
            sys.stdout.flush()  # the isolation's text wrappers buffer
            sys.stderr.flush()
        return subprocess.CompletedProcess(argv, code, out.getvalue().decode(),
                                           err.getvalue().decode())


def error_line(result: subprocess.CompletedProcess) -> str:
    """The error line a failed command printed (its last stderr line)."""
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def hooked_features(net, blocks, images_nhwc: np.ndarray, count: int = 2) -> dict[str, np.ndarray]:
    """A library's own forward of ``net``, with hooks on the first ``count`` of ``blocks`` (its
    conv4_x blocks: torchvision/timm ``net.layer3``, transformers ``resnet.encoder.stages[2].
    layers``), each output averaged over space, as ``{"layer3.i": (N, C)}``."""
    import torch

    feats: dict[str, np.ndarray] = {}
    hooks = [block.register_forward_hook(
        lambda _m, _i, out, name=f"layer3.{i}": feats.__setitem__(name, out.mean(dim=(2, 3))
                                                                 .numpy()))
        for i, block in enumerate(list(blocks)[:count])]
    with torch.no_grad():
        net.eval()(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
    for h in hooks:
        h.remove()
    return feats


def snapshot(folder: Path) -> dict | None:
    """Everything under a folder, with a digest of each file's bytes: to prove a failed command
    changed nothing (digests, so that a zoo of large models is not held in memory twice)."""
    import hashlib

    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                         if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}
