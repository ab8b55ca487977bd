"""Image data sets: scikit-learn's digits (the offline default), a folder of images, torchvision.

Every loader returns images as float tensors (C, H, W) in [-1, 1], the range the diffusion
model works in. Items are dicts ``{"x": image, **cond}`` as the diffkit trainer expects, so a
label or a caption embedding travels with its image.

About quantisation (it sets the discretised decoder's bin width for bits/dim):
- 8-bit images have 256 levels; in [-1, 1] their bin width is ``2/255``.
- The digits have 17 levels (0..16) at 8x8. Doubling them to 16x16 with bilinear
  interpolation (``align_corners=False``) mixes neighbours with weights that are multiples of
  1/16, so the 16x16 values lie on a grid with step ``(2/16)/16 = 2/256`` covering [-1, 1]
  (257 levels). ``DIGITS_BIN_WIDTH`` is that step; use ``2/255`` for 8-bit data.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DIGITS_BIN_WIDTH",
    "EIGHT_BIT_BIN_WIDTH",
    "IMAGE_EXTENSIONS",
    "DIGIT_WORDS",
    "digit_captions",
    "load_digits",
    "ImageDataset",
    "ImageFolder",
    "torchvision_dataset",
    "to_model_range",
    "to_unit_range",
]

DIGITS_BIN_WIDTH = 2.0 / 256.0
EIGHT_BIT_BIN_WIDTH = 2.0 / 255.0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates used to train the text-conditioned digits model from labels.
CAPTION_TEMPLATES = (
    "a handwritten {d}",
    "a handwritten {w}",
    "the digit {w}",
    "the digit {d}",
    "the number {w}",
    "an image of a {d}",
    "{w}",
)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (samples can overshoot slightly)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def digit_captions(label: int) -> list[str]:
    """All training captions for a digit label, e.g. "a handwritten 7", "the digit seven"."""
    return [t.format(d=label, w=DIGIT_WORDS[label]) for t in CAPTION_TEMPLATES]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size); a no-op when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images.shape[-1])


def load_digits(
    image_size: int = 16, split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, 1, S, S) images in [-1, 1] and (N,) labels.

    ``split`` is "train", "test" or "all"; the split is a fixed permutation drawn from
    ``seed`` so the held-out images used by the benchmarks are never trained on.
    """
    from sklearn.datasets import load_digits as sk_digits  # sklearn ships the data offline

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # 0..16 -> [0,1]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images = to_model_range(resize(images, image_size))
    if split != "all":
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        n_test = int(round(test_fraction * len(images)))
        idx = perm[:n_test] if split == "test" else perm[n_test:]
        images, labels = images[idx], labels[idx]
    return images, labels


class ImageDataset(Dataset):
    """In-memory images with optional labels, yielding the dicts the trainer consumes.

    Args:
        images: (N, C, H, W) in [-1, 1].
        labels: optional (N,) class indices, yielded as ``labels``.
        caption_fn: optional ``label -> list of captions``; with ``text_encoder`` each item
            carries the hidden states of one caption drawn at random (``context`` (L, D) and
            ``context_mask`` (L,)). All captions are encoded once up front, since the encoder
            is frozen.
        text_encoder: a :class:`modalities.image.text.TextEncoder`.
        low_res_size: also yield ``low_res``, the image downsampled to this size, for
            training super-resolution models.
        hflip: random horizontal flips (natural images; never for digits).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        caption_fn: Callable[[int], list[str]] | None = None,
        text_encoder=None,
        low_res_size: int | None = None,
        hflip: bool = False,
    ):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = labels
        self.hflip = hflip
        self.low_res = None
        if low_res_size is not None:
            self.low_res = F.interpolate(images, size=(low_res_size, low_res_size), mode="area")
        self.captions = None
        if caption_fn is not None:
            if labels is None or text_encoder is None:
                raise ValueError("captions are built from labels and need a text_encoder")
            classes = sorted(set(labels.tolist()))
            self.captions = {c: caption_fn(c) for c in classes}
            flat = [cap for c in classes for cap in self.captions[c]]
            context, mask = text_encoder.encode(flat)
            self._context = {}
            i = 0
            for c in classes:
                n = len(self.captions[c])
                self._context[c] = (context[i : i + n], mask[i : i + n])
                i += n

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.images[i]
        low = None if self.low_res is None else self.low_res[i]
        if self.hflip and random.random() < 0.5:
            x = x.flip(-1)
            low = None if low is None else low.flip(-1)
        item = {"x": x}
        if low is not None:
            item["low_res"] = low
        if self.captions is not None:
            context, mask = self._context[int(self.labels[i])]
            j = random.randrange(len(context))
            item["context"], item["context_mask"] = context[j], mask[j]
        elif self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class ImageFolder:
    """Every readable image under a folder, as an in-memory (N, C, S, S) tensor in [-1, 1].

    Images are converted to grey or RGB and resized (bicubic, not cropped) to S x S.

    Images in sub-folders get a class label per sub-folder (sorted names, ``class_names``)
    when ``with_labels`` is set. Unreadable files are skipped with a warning and counted in
    ``num_skipped``; a folder without any readable image is an error.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3,
                 with_labels: bool = False):
        from PIL import Image, UnidentifiedImageError

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}"
            )
        self.class_names = sorted({p.parent.relative_to(root).as_posix() for p in files})
        class_index = {name: i for i, name in enumerate(self.class_names)}
        images, labels, self.skipped = [], [], []
        for path in files:
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB")
                    img = img.resize((image_size, image_size), Image.BICUBIC)
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError, ValueError) as err:
                self.skipped.append(path)
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                continue
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            images.append(torch.from_numpy(arr.copy()))
            labels.append(class_index[path.parent.relative_to(root).as_posix()])
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} of {len(files)} files under {root} "
                "as unreadable", stacklevel=2
            )
        if not images:
            raise ValueError(f"none of the {len(files)} image files under {root} could be read")
        self.images = to_model_range(torch.stack(images))
        self.labels = torch.tensor(labels) if with_labels else None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.images)


def _missing_data_set(name: str, cls: type, root: Path) -> str:
    """One line: where torchvision looks for ``name`` under ``root``, and what to put there."""
    import torchvision

    head = f"{name} is not under {root} and nothing is downloaded at run time"
    if getattr(cls, "base_folder", None) and getattr(cls, "url", None):  # CIFAR10, CIFAR100, STL10
        return (f"{head}: extract {cls.url} into {root}, so that {root / cls.base_folder} exists "
                "(or point --data-root at the folder that already holds it)")
    if issubclass(cls, torchvision.datasets.MNIST):  # MNIST, FashionMNIST, KMNIST, EMNIST, QMNIST
        files = ", ".join(Path(f).stem for f, _ in getattr(cls, "resources", ()))
        return (f"{head}: put the unzipped files ({files}) in {root / cls.__name__ / 'raw'} "
                "(or point --data-root at the folder that already holds them)")
    return (f"{head}: put it where torchvision.datasets.{name}(root={str(root)!r}) finds it "
            "(or point --data-root at the folder that already holds it)")


def torchvision_dataset(
    name: str, root: str | Path, image_size: int | None = None, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision data set (e.g. "CIFAR10", "MNIST") already on disk, as tensors.

    Nothing is downloaded (this project runs offline): place the data under ``root`` first.
    Returns (N, C, S, S) images in [-1, 1] and (N,) labels.
    """
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            'torchvision data sets need torchvision: pip install torchvision (or pip install -e ".[image]")'
        ) from err
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise ValueError(f"torchvision.datasets has no data set called {name!r}")
    try:
        ds = cls(root=str(root), train=train, download=False)
    except TypeError as err:  # e.g. SVHN, Flowers102: split= instead of train=
        raise ValueError(f"torchvision.datasets.{name} has no train/test split this loader reads "
                         "(CIFAR10, CIFAR100, MNIST and its kin do); use folder:PATH for other images") from err
    except RuntimeError as err:
        raise FileNotFoundError(_missing_data_set(name, cls, Path(root))) from err
    data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
    x = torch.from_numpy(np.asarray(data, dtype=np.float32) / 255.0)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST is (N,H,W); CIFAR (N,H,W,C)
    if image_size is not None:
        x = resize(x, image_size)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return to_model_range(x), labels

