"""Small helpers shared by the whole core: devices, seeds, broadcasting and noise."""

from __future__ import annotations

import random

import numpy as np
import torch


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
