"""The data reader equals torchvision's ImageFolder: order, labels and pixels (bit for bit)."""

import numpy as np
import pytest
from helpers import write_image_folder
from PIL import Image

from ddscore_jax import data
from ddscore_jax.errors import InputError


def _torchvision_reference(folder, size=224):
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    return datasets.ImageFolder(str(folder), transform=tf)


def _mixed_folder(root, rng):
    """Every format and mode we promise: png/jpg/bmp/tif, grayscale, RGBA, palette, sub-folders."""
    for c in ("b_cls", "A_cls", "a_cls"):
        (root / c / "nested").mkdir(parents=True)
        for i, ext in enumerate((".png", ".JPG", ".jpeg", ".bmp", ".tif")):
            h, w = rng.integers(20, 300, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / c / f"{i}{ext}")
        Image.fromarray(rng.integers(0, 256, (33, 47), dtype=np.uint8)).save(
            root / c / "nested" / "gray.png")
        Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8)).save(
            root / c / "rgba.png")
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert("P").save(
            root / c / "palette.png")
        (root / c / "notes.txt").write_text("not an image")
    return root


def test_order_labels_and_pixels_equal_imagefolder(tmp_path):
    root = _mixed_folder(tmp_path / "d", np.random.default_rng())
    ours = data.scan(root)
    ref = _torchvision_reference(root)
    assert list(ours.classes) == ref.classes
    assert [str(root / p) for p in ours.paths] == [p for p, _ in ref.samples]
    assert ours.labels.tolist() == ref.targets
    assert ours.labels.dtype == np.int64
    pixels = data.load_batch(ours, range(len(ours)), 224)
    for i in range(len(ref)):
        expected = ref[i][0].numpy().transpose(1, 2, 0)
        np.testing.assert_array_equal(pixels[i], expected)  # bit-identical, not close


def test_train_then_valid_concatenated(tmp_path):
    write_image_folder(tmp_path / "train", per_class=3, seed=1)
    write_image_folder(tmp_path / "valid", per_class=2, seed=2)
    ds = data.scan(tmp_path)
    train = _torchvision_reference(tmp_path / "train")
    valid = _torchvision_reference(tmp_path / "valid")
    expected = [p for p, _ in train.samples] + [p for p, _ in valid.samples]
    assert [str(tmp_path / p) for p in ds.paths] == expected
    assert ds.labels.tolist() == train.targets + valid.targets
    assert ds.paths[0].startswith("train/") and ds.paths[-1].startswith("valid/")


def test_reduced_image_size(tmp_path):
    ds = data.scan(write_image_folder(tmp_path / "d", per_class=2))
    ref = _torchvision_reference(tmp_path / "d", size=64)
    batch = data.load_batch(ds, [0, 5], 64)
    assert batch.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(batch[1], ref[5][0].numpy().transpose(1, 2, 0))


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("empty", "no class folders"),
    ("one_class", "only one class"),
    ("empty_class", "class folder has no images"),
    ("mismatched_splits", "differ"),
])
def test_bad_layouts(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "empty":
        root.mkdir()
    elif case == "one_class":
        write_image_folder(root, classes=("only",))
    elif case == "empty_class":
        write_image_folder(root)
        (root / "zz_empty").mkdir()
    elif case == "mismatched_splits":
        write_image_folder(root / "train", classes=("a", "b"))
        write_image_folder(root / "valid", classes=("a", "c"))
    with pytest.raises(InputError, match=message):
        data.scan(root)


def test_corrupt_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "d")
    bad = root / "ok" / "img_001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    ds = data.scan(root)
    with pytest.raises(InputError, match="img_001.png"):
        data.load_batch(ds, range(len(ds)), 32)
