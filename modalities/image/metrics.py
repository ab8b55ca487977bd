"""Sample-quality measures for digits: a small digit classifier, its feature space, and the
Frechet distance in that space (an FID for 16x16 digits), plus a nearest-neighbour copy check.

The classifier is trained by the project (``train_digit_classifier``; the shipped weights in
``checkpoints/digits-classifier`` were written by ``benchmarks/image_quality.py
--train-classifier``). It is an ordinary diffkit checkpoint of the image modality without a
diffusion (``diffkit info`` describes it), loaded through the same allow-list as the
diffusion networks and never unpickled; its ``modality_config`` records how it was trained.

It sees only half of the digits' training split (``classifier_split``): a network's features
of its own training images are more confident than those of new images, so the real-data
floor of the Frechet distance must be measured on digits the classifier never saw (the other
half), like the generated samples and the held-out reference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffkit.checkpoint import checkpoint_exists, load_network, save_checkpoint
from diffkit.metrics import frechet_distance  # noqa: F401  (re-exported: part of this module's API)

from .data import load_digits

__all__ = [
    "CLASSIFIER_DIR",
    "DigitClassifier",
    "classifier_split",
    "train_digit_classifier",
    "load_digit_classifier",
    "save_digit_classifier",
    "frechet_distance",
    "nearest_neighbour_distances",
]

CLASSIFIER_DIR = Path(__file__).parent / "checkpoints" / "digits-classifier"
CLASSIFIER_CLASS = "modalities.image.metrics.DigitClassifier"


class DigitClassifier(nn.Module):
    """A three-convolution CNN for (B, 1, 16, 16) digits in [-1, 1]; ``features`` is 64-d.

    Other sizes are resized to 16x16 first, so 8x8 or 32x32 samples can be scored too.

    64 features (not hundreds) keep the Frechet distance's covariance well estimated from the
    few hundred held-out digits there are.
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 8x8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),   # 4x4
            nn.Flatten(), nn.Linear(64 * 16, feature_dim),
        )
        # Features are taken before this ReLU: no dead (constant zero) dimensions, so the
        # feature covariance stays full rank.
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))
        self.config = {"num_classes": num_classes, "feature_dim": feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Features of many images, in batches, in eval mode."""
        self.eval()
        return torch.cat([self.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self.head(self.embed(x)).argmax(1)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel, so the classifier does not key on exact position."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return pad[:, :, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def classifier_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the digits' train split: (the classifier's half, the half it never sees)."""
    n = len(load_digits(split="train")[0])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2 :]


def train_digit_classifier(epochs: int = 30, seed: int = 0, batch_size: int = 64,
                           progress: bool = False) -> tuple[DigitClassifier, float]:
    """Train on the classifier's half of the train split; return it and its held-out accuracy."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits(split="train")
    mine, _ = classifier_split()
    x, y = x[mine], y[mine]
    xt, yt = load_digits(split="test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=epochs * ((len(x) + batch_size - 1) // batch_size)
    )
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    acc = (model.predict(xt) == yt).float().mean().item()
    return model, acc


def save_digit_classifier(model: DigitClassifier, path: str | os.PathLike,
                          training: Mapping[str, Any], step: int = 0) -> Path:
    """Write the classifier as a diffkit checkpoint; ``training`` (data, accuracy, command,
    hardware, ...) becomes its ``modality_config``, ``step`` the optimizer steps taken."""
    return save_checkpoint(path, model=model, step=step, config={
        "modality": "image",
        "model": {"class": CLASSIFIER_CLASS, "kwargs": model.config},
        "diffusion": None,
        "modality_config": dict(training),
    })


def load_digit_classifier(path: str | os.PathLike = CLASSIFIER_DIR,
                          device: str | torch.device = "cpu") -> DigitClassifier:
    """The shipped (or a given) digit classifier, in eval mode without gradients."""
    if not checkpoint_exists(path):
        raise FileNotFoundError(
            f"no digit classifier at {path}; run: python benchmarks/image_quality.py "
            "--train-classifier"
        )
    return load_network(path, {CLASSIFIER_CLASS: DigitClassifier}, modality="image", device=device).net


def nearest_neighbour_distances(queries: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Pixel-space L2 distance from each query image to its nearest reference image (N,)."""
    q = queries.flatten(1).double()
    r = reference.flatten(1).double()
    return torch.cdist(q, r).min(dim=1).values.float()
