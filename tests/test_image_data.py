"""Image data: the digits, the folder loader (and its bad-input handling), datasets."""

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modalities.image.data import (
    DIGITS_BIN_WIDTH,
    ImageDataset,
    ImageFolder,
    digit_captions,
    load_digits,
    torchvision_dataset,
)


def test_digits_range_shape_and_quantisation_grid():
    x, y = load_digits(16, split="all")
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1
    # The documented bin width: bilinear 2x resizing puts the 17-level data on a 2/256 grid.
    k = (x + 1) / DIGITS_BIN_WIDTH
    assert torch.equal(k, k.round())


def test_digits_split_is_fixed_and_disjoint():
    train, _ = load_digits(split="train")
    test, _ = load_digits(split="test")
    again, _ = load_digits(split="test")
    assert len(train) + len(test) == 1797
    assert torch.equal(test, again)
    dist = torch.cdist(test.flatten(1), train.flatten(1))
    # The digits hold a few exact duplicates; a leaky split would give hundreds of zeros.
    assert (dist.min(1).values == 0).sum() < 5


def test_digit_captions():
    caps = digit_captions(7)
    assert "a handwritten 7" in caps and "the digit seven" in caps


def _png(path, value, size=(10, 10), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8), mode).save(path)


def test_folder_loader_skips_and_counts_unreadable_files(tmp_path):
    _png(tmp_path / "cats" / "a.png", 0)
    _png(tmp_path / "cats" / "b.png", 255, mode="RGB")
    _png(tmp_path / "dogs" / "c.png", 128)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="unreadable") as record:
        folder = ImageFolder(tmp_path, image_size=8, channels=3, with_labels=True)
    assert any("broken.png" in str(w.message) for w in record)
    assert folder.num_skipped == 1 and len(folder) == 3
    assert folder.images.shape == (3, 3, 8, 8)
    assert folder.images.min() == -1 and folder.images.max() == 1
    assert folder.class_names == ["cats", "dogs"]
    assert folder.labels.tolist() == [0, 0, 1]


def test_folder_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path, image_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", image_size=8)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="none of the 1 image files"):
            ImageFolder(tmp_path, image_size=8)


def test_image_dataset_items():
    x, y = load_digits(split="train")
    ds = ImageDataset(x[:10], y[:10], low_res_size=8)
    item = ds[3]
    assert set(item) == {"x", "labels", "low_res"}
    assert item["low_res"].shape == (1, 8, 8)
    torch.testing.assert_close(item["low_res"].mean(), item["x"].mean())  # area downsampling
    with pytest.raises(ValueError, match="labels for"):
        ImageDataset(x[:10], y[:3])


def test_a_torchvision_data_set_missing_from_root_says_where_to_put_it(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError) as info:
        torchvision_dataset("CIFAR10", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "nothing is downloaded" in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "cifar-10-python.tar.gz" in message
    with pytest.raises(FileNotFoundError, match="unzipped files .*train-images-idx3-ubyte") as info:
        torchvision_dataset("MNIST", tmp_path)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)
    with pytest.raises(ValueError, match="no train/test split"):
        torchvision_dataset("SVHN", tmp_path)


def test_torchvision_data_sets_say_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install torchvision"):
        torchvision_dataset("CIFAR10", tmp_path)
