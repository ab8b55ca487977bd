"""The front door every modality shares: a loaded checkpoint, its sampling defaults, and a cached loader.

A modality's ``generate`` starts the same way everywhere: find the checkpoint, load the
network and its diffusion once (cached by path, file time and device, so repeated calls do not
reload weights, and a rewritten checkpoint, e.g. by ``diffkit calibrate``, is loaded afresh),
then read the sampling defaults the checkpoint recorded, falling back to the modality's own.

    @dataclass
    class ImageModel(LoadedModel):
        fallbacks: ClassVar[SamplingDefaults] = SamplingDefaults(sampler="dpm++2m", steps=20)

    load = cached_loader("image", NETWORKS, lambda loaded: ImageModel.from_loaded(loaded, info))
    model = load("runs/x/checkpoint", device="auto")
    model.default("sampler")      # the checkpoint's recorded default, else the modality's
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from .checkpoint import CheckpointError, LoadedNetwork, load_network
from .sampling import sampler_spec
from .utils import resolve_device

__all__ = ["SamplingDefaults", "LoadedModel", "cached_loader"]

_UNSET = object()


@dataclass(frozen=True)
class SamplingDefaults:
    """A modality's sampling defaults, checked when made: a bad one fails at import, not at sampling time."""

    sampler: str = "unipc"
    steps: int = 20
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        sampler_spec(self.sampler)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if isinstance(self.guidance_scale, bool) or not math.isfinite(float(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")

    def get(self, key: str, fallback: Any = None) -> Any:
        return getattr(self, key) if key in {f.name for f in fields(self)} else fallback


@dataclass
class LoadedModel:
    """A loaded diffusion checkpoint: the network (EMA weights when present), its diffusion and
    the modality's metadata ``info`` (``config["modality_config"]``)."""

    path: Path
    net: torch.nn.Module
    diffusion: Any
    info: dict = field(default_factory=dict)
    fallbacks: ClassVar[SamplingDefaults] = SamplingDefaults()

    def default(self, key: str, fallback: Any = _UNSET) -> Any:
        """A sampling default: the checkpoint's recorded one (``info["defaults"]``), else
        ``fallback`` when given, else the modality's (:attr:`fallbacks`)."""
        recorded = self.info.get("defaults") or {}
        if key in recorded:
            return recorded[key]
        return self.fallbacks.get(key) if fallback is _UNSET else fallback


def cached_loader(modality: str, networks: Mapping[str, type], build: Callable[[LoadedNetwork], LoadedModel],
                  *, maxsize: int = 4) -> Callable[..., LoadedModel]:
    """``load(checkpoint, device="auto")`` for a modality: :func:`diffkit.load_network` with
    ``networks`` (the only classes a config may name), then ``build(loaded)``; cached by path,
    config file time and device. A checkpoint without a diffusion cannot be sampled and is
    refused. ``load.cache_clear()`` empties the cache."""

    @functools.lru_cache(maxsize=maxsize)
    def load_cached(path: str, _stamp: int, device: str) -> LoadedModel:
        loaded = load_network(path, networks, modality=modality, device=device)
        if loaded.diffusion is None:
            raise CheckpointError(f"checkpoint {path} has no diffusion config; it cannot be sampled")
        return build(loaded)

    def load(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> LoadedModel:
        path = Path(checkpoint).expanduser().resolve()
        config_file = path / "config.json"
        stamp = config_file.stat().st_mtime_ns if config_file.is_file() else 0
        return load_cached(str(path), stamp, str(resolve_device(device)))

    load.cache_clear = load_cached.cache_clear  # type: ignore[attr-defined]
    return load
