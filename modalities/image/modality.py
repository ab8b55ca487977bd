"""The image modality: load a checkpoint, sample images, run the image tasks, save PNG grids.

    import diffkit
    imgs = diffkit.generate(modality="image")                                # shipped digits model
    imgs = diffkit.generate(modality="image", labels=[3] * 64, num_samples=64, seed=0)
    imgs = diffkit.generate(modality="image", prompt="a handwritten seven")  # shipped text model

Images are (N, C, H, W) float tensors in [0, 1] at this API; the networks work in [-1, 1].
The tasks are conditions of the same ``generate`` (and thin functions around it):

- inpainting: ``known`` image + ``mask`` (True / white = keep that pixel), through the core's
  replacement conditioning, so kept pixels come back exactly;
- super-resolution: ``low_res`` image, for a checkpoint trained with a low-resolution input;
- image-to-image and denoising: ``init`` image + ``strength`` in (0, 1] (SDEdit: noise the
  image to that fraction of the chain and denoise it).

With no ``checkpoint`` the shipped models in ``checkpoints/`` are used: the text-conditioned
one when a prompt is given, the super-resolution one for ``low_res``, otherwise the
class-conditional digits model.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import diffkit
from diffkit.frontdoor import LoadedModel, SamplingDefaults, cached_loader
from diffkit.guidance import check_guidance_interval
from diffkit.runs import add_guidance_interval_argument, resolve_steps, seeded_generator
from diffkit.utils import module_device

from .data import to_model_range, to_unit_range
from .text import TextEncoder, load_text_encoder
from .unet import UNet

__all__ = [
    "CHECKPOINTS_DIR",
    "DEFAULT_CHECKPOINT",
    "TEXT_CHECKPOINT",
    "SUPER_RESOLUTION_CHECKPOINT",
    "ImageModality",
    "ImageModel",
    "load_image_model",
    "image_metadata",
    "load_image",
    "save_grid",
    "make_grid",
    "inpaint",
    "super_resolve",
    "img2img",
    "bits_per_dim",
]

CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "digits"
TEXT_CHECKPOINT = CHECKPOINTS_DIR / "digits-text"
SUPER_RESOLUTION_CHECKPOINT = CHECKPOINTS_DIR / "digits-sr"

# Network classes a checkpoint may name. A fixed table, not an import of whatever string the
# config holds: loading a checkpoint must never run code the checkpoint chooses.
NETWORKS = {"modalities.image.unet.UNet": UNet}


ImageInput = torch.Tensor | np.ndarray | str | os.PathLike


# ---------------------------------------------------------------------------------- loading
@dataclass
class ImageModel(LoadedModel):
    """A loaded image checkpoint: the network (EMA weights when present), its diffusion and
    what the modality needs to know about its inputs."""

    # Used when a checkpoint does not say (e.g. one straight from a training run).
    fallbacks: ClassVar[SamplingDefaults] = SamplingDefaults(sampler="dpm++2m", steps=20, guidance_scale=1.0)

    @property
    def channels(self) -> int:
        return self.net.in_channels

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @property
    def num_classes(self) -> int | None:
        return self.net.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.info.get("class_names")

    @property
    def is_text_conditional(self) -> bool:
        return self.net.context_dim is not None

    @property
    def is_super_resolution(self) -> bool:
        return self.net.low_res_channels > 0

    @property
    def low_res_size(self) -> int | None:
        return self.info.get("low_res_size")

    def text_encoder(self) -> TextEncoder:
        encoder = load_text_encoder(self.info.get("text_encoder"),
                                    max_length=int(self.info.get("text_max_length", 16)),
                                    device=module_device(self.net))
        if encoder.dim != self.net.context_dim:
            raise ValueError(
                f"text encoder {encoder.path} gives {encoder.dim}-d states but checkpoint "
                f"{self.path} was trained on {self.net.context_dim}-d ones"
            )
        return encoder


def load_image_model(checkpoint: str | os.PathLike | None = None,
                     device: str | torch.device = "auto") -> ImageModel:
    """Load an image checkpoint directory (default: the shipped digits model) onto ``device``.

    Loaded models are cached (keyed by path, file time and device), so repeated generate
    calls do not reload weights.
    """
    return _load(checkpoint if checkpoint is not None else DEFAULT_CHECKPOINT, device)


_load = cached_loader("image", NETWORKS, lambda loaded: ImageModel(loaded.path, loaded.net, loaded.diffusion,
                                                                    image_metadata(loaded.config)))


def image_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """What the image modality records about a checkpoint (class names, text encoder, sampling
    defaults, ...): ``config["modality_config"]`` (older layouts are migrated on reading, by
    :func:`diffkit.checkpoint.migrate_config`)."""
    return dict(config.get("modality_config") or {})


# ---------------------------------------------------------------------------------- inputs
def load_image(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """An image file as a (1, C, H, W) float tensor in [0, 1] (grey for C=1, RGB for C=3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())[None]


def _as_images(value: ImageInput, name: str, channels: int, size: int | None, n: int,
               allow_single_channel: bool = False) -> torch.Tensor:
    """Validate an image argument and broadcast it to (n, C, H, W) float in [0, 1].

    Accepts (H, W), (C, H, W) or (N, C, H, W) tensors/arrays, or an image file path.
    ``size`` None means any size (low-resolution inputs are checked separately).
    """
    if isinstance(value, (str, os.PathLike)):
        x = load_image(value, channels)
    else:
        x = torch.as_tensor(value).float()
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{name} must be an image (H, W), (C, H, W) or (N, C, H, W); got shape "
                         f"{tuple(x.shape)}")
    ok_channels = (channels, 1) if allow_single_channel else (channels,)
    if x.shape[1] not in ok_channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the checkpoint works on {channels}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"{name} is {x.shape[-2]}x{x.shape[-1]} but this checkpoint needs "
                         f"{size}x{size}; resize it first")
    if x.shape[0] not in (1, n):
        raise ValueError(f"{name} holds {x.shape[0]} images for {n} samples; pass 1 or {n}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1] (got values in [{x.min():.3g}, {x.max():.3g}])")
    return x.expand(n, -1, -1, -1)


def _labels(labels: int | Sequence[int] | torch.Tensor, model: ImageModel, n: int) -> torch.Tensor:
    if model.num_classes is None:
        raise ValueError(f"checkpoint {model.path} is not class-conditional; it takes no labels")
    y = torch.as_tensor(labels)
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError(f"labels must be whole class indices, got {y.tolist()}")
    y = y.long().flatten()
    if y.numel() == 1:
        y = y.expand(n)
    if y.numel() != n:
        raise ValueError(f"got {y.numel()} labels for {n} samples; pass one label or {n}")
    bad = (y < 0) | (y >= model.num_classes)
    if bad.any():
        raise ValueError(f"labels must be in [0, {model.num_classes - 1}] for checkpoint "
                         f"{model.path}; got {sorted(set(y[bad].tolist()))}")
    return y.clone()


def _prompts(prompt: str | Sequence[str], model: ImageModel, n: int) -> list[str]:
    if not model.is_text_conditional:
        raise ValueError(f"checkpoint {model.path} is not text-conditional, so it cannot follow a "
                         "prompt; leave checkpoint unset to use the shipped text-conditioned model")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) == 1:
        prompts = prompts * n
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or {n} strings (one per sample)")
    return prompts


# ---------------------------------------------------------------------------------- generate
def _default_checkpoint(prompt, low_res) -> Path:
    if prompt is not None and low_res is not None:
        raise ValueError("no shipped checkpoint takes both a prompt and low_res; pass checkpoint=")
    if prompt is not None:
        return TEXT_CHECKPOINT
    if low_res is not None:
        return SUPER_RESOLUTION_CHECKPOINT
    return DEFAULT_CHECKPOINT


def generate_images(
    *,
    checkpoint: str | os.PathLike | None = None,
    num_samples: int = 16,
    seed: int | None = None,
    device: str | torch.device = "auto",
    sampler: str | None = None,
    steps: int | None = None,
    progress: bool = False,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    prompt: str | Sequence[str] | None = None,
    guidance_scale: float | None = None,
    guidance_interval: Sequence[float | None] | None = None,
    known: ImageInput | None = None,
    mask: ImageInput | None = None,
    init: ImageInput | None = None,
    strength: float | None = None,
    low_res: ImageInput | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Sample ``num_samples`` images (N, C, H, W) in [0, 1]; see the module docstring.

    Args:
        checkpoint: an image checkpoint directory; None picks a shipped one.
        seed: the same seed (and batch_size) gives the same images; None draws fresh ones.
        sampler, steps: any of ``diffkit.SAMPLERS`` and a step count >= 1; None takes the
            checkpoint's default.
        labels: one class index or one per sample (class-conditional checkpoints). Without
            labels a class-conditional model samples its unconditional (null-class) mode.
        prompt: one prompt or one per sample (text-conditional checkpoints).
        guidance_scale: classifier-free guidance weight for labels/prompt (1 = none).
        guidance_interval: (low, high) on sigma/alpha: guide only there, one network call
            instead of two elsewhere (None for an open end; ``(0, None)`` guides every step);
            default the checkpoint's.
        known, mask: inpainting; ``mask`` is True (or white) where ``known`` is kept.
        init, strength: image-to-image / denoising from ``init`` noised to ``strength``.
        low_res: the low-resolution image(s) for a super-resolution checkpoint.
        batch_size: images per network call batch, to bound memory.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolve_steps(steps, ImageModel.fallbacks.steps)  # bad steps fail before any loading
    if checkpoint is None:
        checkpoint = _default_checkpoint(prompt, low_res)
    model = load_image_model(checkpoint, device)
    dev = module_device(model.net)
    n, c, s = num_samples, model.channels, model.image_size

    cond: dict[str, torch.Tensor] = {}
    conditional = False
    if labels is not None:
        cond["labels"] = _labels(labels, model, n)
        conditional = True
    elif model.num_classes is not None:
        cond["labels"] = torch.zeros(n, dtype=torch.long)
    if prompt is not None:
        prompts = _prompts(prompt, model, n)  # validate before loading the encoder
        context, context_mask = model.text_encoder().encode(prompts)
        cond["context"], cond["context_mask"] = context, context_mask
        conditional = True
    elif model.is_text_conditional:
        # No prompt: a placeholder context; drop_cond below selects the learned null prompt.
        cond["context"] = torch.zeros(n, 1, model.net.context_dim)
        cond["context_mask"] = torch.ones(n, 1, dtype=torch.bool)
    if model.is_super_resolution:
        if low_res is None:
            raise ValueError(f"checkpoint {model.path} is a super-resolution model: pass low_res=")
        lr = _as_images(low_res, "low_res", c, model.low_res_size, n)
        if model.low_res_size is None and lr.shape[-1] >= s:
            raise ValueError(f"low_res must be smaller than the {s}x{s} output")
        cond["low_res"] = to_model_range(lr)
    elif low_res is not None:
        raise ValueError(f"checkpoint {model.path} is not a super-resolution model; it takes no "
                         "low_res (leave checkpoint unset to use the shipped one)")
    uses_null = (model.num_classes is not None and labels is None) or (
        model.is_text_conditional and prompt is None)
    if uses_null:
        if conditional:
            raise ValueError("this checkpoint is conditioned on both labels and text; give both")
        cond["drop_cond"] = torch.ones(n, dtype=torch.bool)

    if guidance_scale is None:
        guidance_scale = model.default("guidance_scale") if conditional else 1.0
    elif guidance_scale != 1.0 and not conditional:
        raise ValueError("guidance_scale needs a condition to guide towards (labels or prompt)")
    if guidance_interval is not None and not conditional:
        raise ValueError("guidance_interval limits classifier-free guidance: it needs labels or a prompt")
    guidance_interval = check_guidance_interval(
        model.default("guidance_interval", None) if guidance_interval is None else guidance_interval)

    tasks: dict[str, Any] = {}
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both known= (the image) and mask= (True = keep)")
    if known is not None:
        known_img = _as_images(known, "known", c, s, n)
        keep = _as_images(mask, "mask", c, s, n, allow_single_channel=True) > 0.5
        tasks["known"], tasks["mask"] = to_model_range(known_img), keep.expand(n, c, s, s)
    if (init is None) != (strength is None):
        raise ValueError("image-to-image needs both init= (the image) and strength= in (0, 1]")
    if init is not None:
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        tasks["init"], tasks["strength"] = to_model_range(_as_images(init, "init", c, s, n)), float(strength)

    sampler = sampler or model.default("sampler")
    steps = resolve_steps(steps, model.default("steps"))
    if sampler not in diffkit.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(diffkit.SAMPLERS)}")
    gen = seeded_generator(seed)
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        b = part.stop - part.start
        batch_cond = {k: v[part].to(dev) for k, v in cond.items()}
        batch_tasks = {k: v[part].to(dev) if torch.is_tensor(v) else v for k, v in tasks.items()}
        wrappers = [diffkit.ClipX0(-1.0, 1.0)]
        if "known" in batch_tasks:
            wrappers.append(diffkit.KnownValues(batch_tasks.pop("mask"), batch_tasks.pop("known")))
        start = "prior"
        if "init" in batch_tasks:
            start = diffkit.WarmStart(batch_tasks.pop("init"), batch_tasks.pop("strength"))
        x = model.diffusion.sample(
            model.net, (b, c, s, s), sampler=sampler, steps=steps, start=start, generator=gen, device=dev,
            guidance_scale=float(guidance_scale), guidance_interval=guidance_interval, wrappers=wrappers,
            progress=progress,
            **batch_tasks, **batch_cond,
        )
        out.append(x.float().cpu())
    images = to_unit_range(torch.cat(out))
    if known is not None:
        # The core keeps known values exactly in [-1, 1]; this undoes the float rounding of the
        # range conversion so kept pixels are bit-identical to the input.
        images = torch.where(tasks["mask"].cpu(), known_img, images)
    return images


# ---------------------------------------------------------------------------------- tasks
def _count(image: ImageInput) -> int:
    if isinstance(image, (str, os.PathLike)):
        return 1
    x = torch.as_tensor(image)
    return x.shape[0] if x.ndim == 4 else 1


def inpaint(known: ImageInput, mask: ImageInput, *, num_samples: int | None = None,
            **kwargs: Any) -> torch.Tensor:
    """Fill the pixels of ``known`` where ``mask`` is False; kept pixels come back exactly.

    ``known``: (N, C, H, W) / (C, H, W) in [0, 1] or an image file; ``mask``: the same spatial
    size, True (or white) = keep. Other keyword arguments as in ``generate`` (labels, prompt,
    seed, sampler, steps, checkpoint, ...).
    """
    return generate_images(known=known, mask=mask, num_samples=num_samples or _count(known), **kwargs)


def super_resolve(low_res: ImageInput, *, num_samples: int | None = None,
                  **kwargs: Any) -> torch.Tensor:
    """Upsample ``low_res`` images (e.g. 8x8 digits) with a super-resolution checkpoint
    (default: the shipped 8x8 -> 16x16 digits model)."""
    return generate_images(low_res=low_res, num_samples=num_samples or _count(low_res), **kwargs)


def img2img(init: ImageInput, strength: float = 0.5, *, num_samples: int | None = None,
            **kwargs: Any) -> torch.Tensor:
    """SDEdit: noise ``init`` to ``strength`` of the chain and denoise it with the model.

    Small strengths (0.1-0.4) denoise or clean up an image while keeping its content; large
    ones (0.6-0.9) keep only its layout (e.g. turn a rough sketch into a digit, guided by
    ``labels``/``prompt``); 1 ignores ``init``.
    """
    return generate_images(init=init, strength=strength, num_samples=num_samples or _count(init),
                           **kwargs)


def bits_per_dim(
    images: ImageInput,
    *,
    checkpoint: str | os.PathLike | None = None,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    low_res: ImageInput | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Negative log-likelihood bound of ``images`` (N, C, H, W) in [0, 1], in bits/dim (N,).

    The variational bound with the discretised decoder, whose bin width is the checkpoint's
    (the data's quantisation step in [-1, 1]: 2/255 for 8-bit images, 2/256 for the 16x16
    digits; see :mod:`modalities.image.data`), over all T steps or a ``steps``-point chain.
    Class- and text-conditional models are scored unconditionally (the null condition) unless
    ``labels`` are given; super-resolution models need ``low_res``.
    """
    if steps is not None:
        resolve_steps(steps, 0)
    model = load_image_model(checkpoint if checkpoint is not None
                             else _default_checkpoint(None, low_res), device)
    dev = module_device(model.net)
    n = _count(images)
    x = to_model_range(_as_images(images, "images", model.channels, model.image_size, n))
    cond: dict[str, torch.Tensor] = {}
    if model.num_classes is not None:
        cond["labels"] = torch.zeros(n, dtype=torch.long) if labels is None else _labels(labels, model, n)
    elif labels is not None:
        _labels(labels, model, n)  # raises the not-class-conditional error
    if model.is_text_conditional:
        cond["context"] = torch.zeros(n, 1, model.net.context_dim)
        cond["context_mask"] = torch.ones(n, 1, dtype=torch.bool)
    if (model.num_classes is not None and labels is None) or model.is_text_conditional:
        cond["drop_cond"] = torch.ones(n, dtype=torch.bool)
    if model.is_super_resolution:
        if low_res is None:
            raise ValueError(f"checkpoint {model.path} is a super-resolution model: pass low_res=")
        cond["low_res"] = to_model_range(_as_images(low_res, "low_res", model.channels,
                                                    model.low_res_size, n))
    gen = seeded_generator(seed)
    bin_width = float(model.info.get("bin_width", model.diffusion.bin_width))
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        out.append(model.diffusion.nll(
            model.net, x[part].to(dev), steps=steps, decoder="discretized", bin_width=bin_width,
            generator=gen, progress=progress, **{k: v[part].to(dev) for k, v in cond.items()},
        ).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------- saving
def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2,
              pad_value: float = 0.5) -> torch.Tensor:
    """Tile (N, C, H, W) images in [0, 1] into one (C, H', W') image, ``nrow`` per row
    (default: a near-square grid), separated by ``padding`` pixels of ``pad_value``."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def check_grid_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if a PNG grid can be written there, else a ValueError that says why."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"images are saved as a PNG grid; give a .png path, not {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a .png file path such as samples.png")
    return path


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid (8-bit; grey or RGB)."""
    from PIL import Image

    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    grid = make_grid(images.clamp(0, 1), nrow)
    arr = (grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    path = check_grid_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)
    return path


# ---------------------------------------------------------------------------------- modality
class ImageModality:
    """The ``image`` modality object registered with diffkit (see docs/interfaces.md)."""

    name = "image"

    def calibration_inputs(self, checkpoint: str, *, batch: int, data: int, device, generator: torch.Generator):
        """What ``diffkit calibrate`` fits on: draws as :func:`generate_images` makes them (class
        labels with the checkpoint's guidance, or the null prompt, or training digits' low-res
        inputs) and training digits for the variances, scored with the null condition."""
        from diffkit.calibration import CalibrationInputs

        from .data import load_digits, resize

        model = load_image_model(checkpoint, device)
        c, s = model.channels, model.image_size
        images, _ = load_digits(image_size=s, split="train")
        images = images[torch.randperm(len(images), generator=generator)]
        dev = module_device(model.net)

        def null(n: int, source: torch.Tensor) -> dict:
            cond: dict[str, torch.Tensor] = {}
            if model.num_classes is not None or model.is_text_conditional:
                cond["drop_cond"] = torch.ones(n, dtype=torch.bool, device=dev)
            if model.num_classes is not None:
                cond["labels"] = torch.zeros(n, dtype=torch.long, device=dev)
            if model.is_text_conditional:
                cond["context"] = torch.zeros(n, 1, model.net.context_dim, device=dev)
                cond["context_mask"] = torch.ones(n, 1, dtype=torch.bool, device=dev)
            if model.is_super_resolution:
                cond["low_res"] = resize(source, model.low_res_size).to(dev)
            return cond

        cond = null(batch, images[:batch])
        sample_kwargs: dict[str, Any] = {"wrappers": [diffkit.ClipX0(-1.0, 1.0)]}
        if model.num_classes is not None:
            cond = {"labels": torch.randint(0, model.num_classes, (batch,), generator=generator).to(dev)}
            sample_kwargs["guidance_scale"] = float(model.default("guidance_scale"))
        if c != images.shape[1]:
            raise ValueError(f"checkpoint {checkpoint} makes {c}-channel images; its calibration data are the "
                             "one-channel digits, so calibrate it with --data 0")
        examples = images[:data].to(dev) if data > 0 else None
        return CalibrationInputs(model.net, model.diffusion, (batch, c, s, s), cond, sample_kwargs, examples,
                                 null(len(examples), images[:data]) if examples is not None else {})

    def generate(self, *, checkpoint=None, num_samples: int | None = None, seed: int | None = None,
                 device="auto", sampler: str | None = None, steps: int | None = None,
                 progress: bool = False, **cond: Any) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1]; conditions as in :func:`generate_images`.

        Without ``num_samples``: one image per label or prompt when several are given, else 16.
        """
        if num_samples is None:
            given = [cond.get("labels"), cond.get("prompt")]
            counts = [len(v) for v in given if v is not None and not isinstance(v, (str, int)) and len(v) > 1]
            num_samples = counts[0] if counts else 16
        return generate_images(checkpoint=checkpoint, num_samples=num_samples, seed=seed,
                               device=device, sampler=sampler, steps=steps, progress=progress,
                               **cond)

    def save(self, samples: torch.Tensor, path: str | os.PathLike) -> list[Path]:
        """A PNG grid of the samples; returns [the PNG's path]."""
        return [save_grid(samples, path)]

    def check_output(self, path: str | os.PathLike) -> None:
        """What :meth:`save` would refuse, before any sampling."""
        check_grid_path(path)

    def add_cli_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``diffkit generate image``; their names match generate's arguments."""
        group = parser.add_argument_group(
            "image options",
            "With no --checkpoint the shipped digits models are used (the text one for --prompt, "
            "the super-resolution one for --low-res). Image inputs are files (PNG, ...).",
        )
        group.add_argument("--labels", type=int, nargs="+", metavar="Y",
                           help="class label(s): one for all samples or one per sample")
        group.add_argument("--prompt", metavar="TEXT",
                           help='text prompt for a text-conditioned model, e.g. "a handwritten 7"')
        group.add_argument("--guidance-scale", type=float, metavar="W",
                           help="classifier-free guidance weight for --labels/--prompt "
                                "(1 = none; default: the checkpoint's)")
        add_guidance_interval_argument(group)
        group.add_argument("--known", metavar="IMAGE",
                           help="inpainting: the image whose pixels are kept where --mask is white")
        group.add_argument("--mask", metavar="IMAGE",
                           help="inpainting: white = keep the pixel of --known, black = generate it")
        group.add_argument("--init", metavar="IMAGE",
                           help="image-to-image / denoising: start from this image (with --strength)")
        group.add_argument("--strength", type=float, metavar="S",
                           help="image-to-image: how far to noise --init, in (0, 1]")
        group.add_argument("--low-res", metavar="IMAGE",
                           help="super-resolution: the low-resolution input image")
        group.add_argument("--batch-size", type=int, default=256, metavar="B",
                           help="images per batch while sampling (default: 256)")
