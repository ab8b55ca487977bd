"""Small helpers shared by the whole core: devices, seeds, broadcasting, noise and file writes."""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# safetensors writes files with owner-only permissions; checkpoints and caches are shared
# (shipped with the package, read by other users' jobs), so written files are made world-readable.
FILE_MODE = 0o644


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device choice into a ``torch.device``.

    ``"auto"`` (or ``None``) picks CUDA when a GPU is visible, then Apple's MPS, else the CPU,
    so that library code never has to name a device itself.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device auto or cpu")
    return resolved


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """View per-example values of shape (B,) (or a scalar) so they broadcast against a (B, ...) tensor."""
    missing = ndim - values.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of {values.ndim} dims against {ndim} dims")
    return values.reshape(*values.shape, *([1] * missing))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch dimension: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise drawn from ``generator``.

    The noise is drawn on the generator's own device and moved afterwards, so a CPU generator
    reproduces the same numbers whether the model runs on the CPU or a GPU.
    """
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype or torch.float32)
    return noise.to(device=device) if device is not None else noise


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` when ``x`` holds NaN or Inf."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN or Inf values; clean or rescale the data before using it")


def module_device(module) -> torch.device:
    """Where a network's parameters live (the CPU for parameter-free callables such as exact models)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to the disk (a rename after this cannot expose a short file)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Write a single file so that ``path`` always holds either the old file or the whole new one.

    Yields a staging path beside ``path`` (same directory, so the final rename cannot cross file
    systems) for the caller to write. When the block ends without an error, the staging file is
    flushed to disk, made world-readable (``FILE_MODE``) and renamed over ``path`` in one step.
    When the block raises, the staging file is removed and ``path`` is untouched. The parent
    directory is created if needed.

        with replaced_atomically("runs/cache.safetensors") as staging:
            save_file(tensors, str(staging))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random suffix keeps two writers of the same path from writing into one staging file.
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        if not staging.is_file():
            raise FileNotFoundError(f"nothing was written to the staging file for {path}")
        fsync_file(staging)  # the bytes reach the disk before the name points at them
        staging.chmod(FILE_MODE)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
