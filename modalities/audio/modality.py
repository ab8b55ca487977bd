"""The audio modality: load a checkpoint, sample speech, score it, write WAV files.

    import diffkit
    out = diffkit.generate(modality="audio", labels=[7] * 8, num_samples=8, steps=6, seed=0)
    out.audio            # (8, 1, T) float in [-1, 1]
    out.sample_rate      # 8000 for the digits model
    diffkit.generate(modality="audio", labels=[7] * 8, num_samples=8, save="samples/")   # WAVs + spectrogram PNG

Four kinds of checkpoint, told apart by ``modality_config["kind"]``:
- ``waveform``: DiffWave over raw samples, optionally class-conditional;
- ``vocoder``: DiffWave conditioned on log-mel frames (``generate(mel=...)`` / :func:`vocode`);
- ``ddsp-vocoder``: the learned harmonic-plus-noise vocoder (:mod:`modalities.audio.vocoder`),
  no diffusion: one network call per clip (``generate(mel=...)`` / :func:`vocode`). The
  shipped ``checkpoints/digits-vocoder`` is one, and the spectrogram route's default;
- ``mel``: a :class:`~modalities.audio.model.MelDenoiser` over log-mel frames, whose frames
  become audio through a vocoder checkpoint or Griffin-Lim (the spectrogram route). The
  shipped ``checkpoints/digits`` is one: generate without a checkpoint takes this route and
  turns its frames into sound with ``checkpoints/digits-vocoder`` (``vocoder="griffin-lim"``
  selects Griffin-Lim).

All networks take the continuous noise level sqrt(alpha_bar) as their time input, so a
checkpoint samples on any grid: a step count listed in the checkpoint's ``fast_schedules``
uses those betas (DiffWave-schedule checkpoints list DiffWave's fast schedule for 6 steps:
1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5), other step counts respace the training schedule
(fractional times beyond its T steps). Sampling itself is the core's (``Diffusion.sample``;
the checkpoint records its default sampler: DDPM ancestral for DiffWave, as the paper,
DPM-Solver++(2M) for the mel model); this module only chooses grids and conditions.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import diffkit
from diffkit import SamplingGrid
from diffkit.frontdoor import LoadedModel, SamplingDefaults, cached_loader
from diffkit.guidance import check_guidance_interval, check_guidance_scale
from diffkit.runs import add_guidance_interval_argument, resolve_steps, seeded_generator
from diffkit.utils import module_device

from .data import window_mask
from .mel import MelConfig, griffin_lim, log_mel
from .model import DiffWave, MelDenoiser
from .vocoder import HarmonicVocoder

__all__ = [
    "AudioModality",
    "AudioModel",
    "AudioSamples",
    "BIN_WIDTH_16BIT",
    "CHECKPOINTS_DIR",
    "DEFAULT_CHECKPOINT",
    "FAST_BETAS",
    "bits_per_sample",
    "bits_per_sample_of",
    "generate_audio",
    "load_audio_model",
    "load_vocoder",
    "LearnedVocoder",
    "sampling_grid",
    "save_audio",
    "spectrogram_image",
    "vocode",
]

CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "digits"
MEL_CHECKPOINT = CHECKPOINTS_DIR / "digits-mel"
VOCODER_CHECKPOINT = CHECKPOINTS_DIR / "digits-vocoder"

# The network classes a checkpoint may name: a fixed allow-list, so that loading a checkpoint
# never runs code the checkpoint chooses.
NETWORKS = {"modalities.audio.model.DiffWave": DiffWave, "modalities.audio.model.MelDenoiser": MelDenoiser}

# DiffWave's fast inference schedule (Kong et al. 2021, Table 4): six noise levels.
FAST_BETAS = (1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)
# 16-bit PCM has 65536 levels over [-1, 1]: bins of 2/65535 (as 2/255 for 8-bit images).
BIN_WIDTH_16BIT = 2.0 / 65535.0

ROUTES = ("waveform", "mel")
KINDS = ("waveform", "vocoder", "mel")

HOW_TO_TRAIN = (
    "train one with `python recipes/audio_train.py` (spoken digits on the CPU) and pass "
    "checkpoint=runs/audio-mel/checkpoint (--checkpoint on the command line), or export it with "
    "`python recipes/audio_train.py --export modalities/audio/checkpoints/digits` to make it the default"
)


# ---------------------------------------------------------------------------------- samples
@dataclass
class AudioSamples:
    """Generated audio: ``audio`` (N, 1, T) float in [-1, 1] at ``sample_rate`` Hz."""

    audio: torch.Tensor
    sample_rate: int
    labels: torch.Tensor | None = None
    class_names: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.audio.shape[0]

    @property
    def duration(self) -> float:
        """Seconds per clip."""
        return self.audio.shape[-1] / self.sample_rate


# ---------------------------------------------------------------------------------- loading
@dataclass
class AudioModel(LoadedModel):
    """A loaded audio checkpoint: the network (EMA weights), its diffusion and its metadata."""

    # Used when a checkpoint does not record its own sampling defaults.
    fallbacks: ClassVar[SamplingDefaults] = SamplingDefaults(sampler="ddpm", steps=50, guidance_scale=1.0)

    @property
    def kind(self) -> str:
        return self.info.get("kind", "waveform")

    @property
    def sample_rate(self) -> int:
        return int(self.info["sample_rate"])

    @property
    def length(self) -> int:
        """Samples per clip (the training window)."""
        return int(self.info["length"])

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    @property
    def class_names(self) -> list[str] | None:
        return self.info.get("class_names")

    @property
    def mel_config(self) -> MelConfig | None:
        mel = self.info.get("mel")
        return MelConfig.from_dict(mel) if mel else None


def load_audio_model(checkpoint: str | os.PathLike | None = None,
                     device: str | torch.device = "auto") -> AudioModel:
    """Load an audio checkpoint directory (default: the shipped digits model) onto ``device``.

    Cached by path, file time and device, so repeated generate calls do not reload weights.
    """
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not (Path(checkpoint) / "config.json").is_file():
            raise ValueError(f"no audio checkpoint is shipped yet (expected {checkpoint}); {HOW_TO_TRAIN}")
    return _load(checkpoint, device)


def _audio_model(loaded) -> AudioModel:
    path = loaded.path
    if loaded.diffusion.time_input != "noise_level":
        raise diffkit.CheckpointError(
            f"checkpoint {path} was trained with time_input={loaded.diffusion.time_input!r}; the audio networks "
            "are conditioned on the noise level (time_input='noise_level'); retrain it with recipes/audio_train.py")
    info = dict(loaded.modality_config)
    missing = [k for k in ("sample_rate", "length") if k not in info]
    if missing:
        raise diffkit.CheckpointError(f"checkpoint {path} does not record its audio {' and '.join(missing)} "
                                      "(modality_config); was it written by recipes/audio_train.py?")
    if info.get("kind", "waveform") not in KINDS:
        raise diffkit.CheckpointError(f"checkpoint {path} is of unknown audio kind {info.get('kind')!r}")
    return AudioModel(Path(path), loaded.net, loaded.diffusion, info)


_load = cached_loader("audio", NETWORKS, _audio_model)


# ---------------------------------------------------------------------------------- learned vocoder
LEARNED_VOCODER_KIND = "ddsp-vocoder"
VOCODER_NETWORKS = {"modalities.audio.vocoder.HarmonicVocoder": HarmonicVocoder}


@dataclass
class LearnedVocoder:
    """A loaded harmonic-plus-noise vocoder checkpoint: the network (EMA weights) and its metadata."""

    path: Path
    net: HarmonicVocoder
    info: dict[str, Any]
    kind: ClassVar[str] = LEARNED_VOCODER_KIND

    @property
    def sample_rate(self) -> int:
        return int(self.info["sample_rate"])

    @property
    def mel_config(self) -> MelConfig:
        return MelConfig.from_dict(self.info["mel"])

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, seed: int | None = 0, batch_size: int = 64) -> torch.Tensor:
        """(N, n_mels, frames) log-mel -> (N, 1, frames * hop) audio in [-1, 1]; ``seed`` fixes the noise."""
        dev = module_device(self.net)
        gen = seeded_generator(seed)  # on the CPU: the same noise on every device
        out = []
        for start in range(0, frames.shape[0], batch_size):
            part = frames[start : start + batch_size].to(dev).float()
            controls = self.net(part)
            noise_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            out.append(self.net.synthesise(controls, noise_gen).clamp(-1.0, 1.0).float().cpu())
        return torch.cat(out)


def checkpoint_kind(checkpoint: str | os.PathLike) -> str | None:
    """``modality_config["kind"]`` of a checkpoint directory, without loading it (None when unreadable)."""
    try:
        config = json.loads((Path(checkpoint).expanduser() / "config.json").read_text())
        return (config.get("modality_config") or {}).get("kind", "waveform")
    except (OSError, ValueError, AttributeError):
        return None


@functools.lru_cache(maxsize=4)
def _load_vocoder_cached(path: str, _stamp: int, device: str) -> LearnedVocoder:
    loaded = diffkit.load_network(path, VOCODER_NETWORKS, modality="audio", device=device)
    info = dict(loaded.modality_config)
    if info.get("kind") != LEARNED_VOCODER_KIND or not info.get("mel") or "sample_rate" not in info:
        raise diffkit.CheckpointError(f"checkpoint {path} is not a learned vocoder (modality_config kind "
                                      f"{info.get('kind')!r}); train one with `python recipes/audio_train.py "
                                      "--preset ddsp`")
    return LearnedVocoder(Path(path), loaded.net.float().eval(), info)


def load_vocoder(checkpoint: str | os.PathLike | None = None, device: str | torch.device = "auto") -> LearnedVocoder:
    """Load a learned (harmonic-plus-noise) vocoder checkpoint; default: the shipped ``digits-vocoder``."""
    if checkpoint is None:
        checkpoint = VOCODER_CHECKPOINT
    path = Path(checkpoint).expanduser().resolve()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no vocoder checkpoint at {path}; train one with `python recipes/audio_train.py --preset "
                         "ddsp --export DIR`")
    return _load_vocoder_cached(str(path), config_file.stat().st_mtime_ns, str(diffkit.resolve_device(device)))


def mel_mismatch(vocoder_cfg: MelConfig, model_cfg: MelConfig) -> str:
    """The mel settings that differ, e.g. ``hop_length 64 vs 128, n_mels 64 vs 80`` ('' when none)."""
    a, b = vocoder_cfg.to_dict(), model_cfg.to_dict()
    return ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b.get(k))


def _check_vocoder_mel(voc_path, voc_cfg: MelConfig, model_path, model_cfg: MelConfig) -> None:
    diff = mel_mismatch(voc_cfg, model_cfg)
    if diff:
        raise ValueError(f"vocoder {voc_path} was trained on other mel settings than mel model {model_path} "
                         f"(vocoder vs mel model: {diff}); use a vocoder trained with the mel model's settings, "
                         "or vocoder='griffin-lim'")


# ---------------------------------------------------------------------------------- grids
def sampling_grid(diffusion: diffkit.Diffusion, steps: int, sampler: str = AudioModel.fallbacks.sampler,
                  fast_schedules: dict[str, Sequence[float]] | None = None) -> SamplingGrid:
    """The grid for ``steps`` network evaluations.

    A step count with a fast inference schedule (the checkpoint's ``fast_schedules``; without
    one, DiffWave's six betas for 6) uses those noise levels; up to T steps respace the
    training schedule; more than T place fractional training times evenly from T-1 to 0
    (the network takes any noise level, so a 1000-step chain on a 50-step schedule is fine).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    # A checkpoint's own table replaces DiffWave's (a mel model on a cosine schedule records {}).
    schedules = {"6": FAST_BETAS} if fast_schedules is None else dict(fast_schedules)
    if str(steps) in schedules:
        return SamplingGrid.from_betas(diffusion.schedule, schedules[str(steps)])
    T = diffusion.num_timesteps
    if steps <= T:
        return diffusion.sampling_grid(steps, sampler=sampler)
    return SamplingGrid.from_times(diffusion.schedule, torch.linspace(T - 1, 0, steps, dtype=torch.float64))


# ---------------------------------------------------------------------------------- inputs
def _labels(labels: int | Sequence[int] | torch.Tensor, model: AudioModel, n: int) -> torch.Tensor:
    if model.num_classes is None:
        raise ValueError(f"checkpoint {model.path} is not class-conditional; it takes no labels")
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError) as err:
        raise ValueError(f"labels must be class indices (integers), got {labels!r}") from err
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"labels must be class indices (integers), got {labels!r}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError(f"labels must be whole class indices, got {y.tolist()}")
    y = y.long().flatten()
    if y.numel() == 1:
        y = y.expand(n)
    if y.numel() != n:
        raise ValueError(f"got {y.numel()} labels for {n} samples; pass one label or {n} "
                         f"(or num_samples={y.numel()})")
    bad = (y < 0) | (y >= model.num_classes)
    if bad.any():
        raise ValueError(f"labels must be in 0..{model.num_classes - 1} for checkpoint {model.path}; "
                         f"got {sorted(set(y[bad].tolist()))}")
    return y.clone()


def _as_audio(audio: Any, name: str = "audio") -> torch.Tensor:
    """(T,), (N, T) or (N, 1, T) audio in [-1, 1] -> (N, 1, T) float."""
    x = torch.as_tensor(audio).float()
    if x.ndim == 1:
        x = x[None]
    if x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3 or x.shape[1] != 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must be mono audio (T,), (N, T) or (N, 1, T); got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if x.min() < -1 or x.max() > 1:
        raise ValueError(f"{name} must lie in [-1, 1] (got values in [{x.min():.3g}, {x.max():.3g}]); "
                         "scale it, e.g. int16 samples / 32768")
    return x


def _check_mel(mel: Any, model: AudioModel, n: int | None) -> torch.Tensor:
    cfg = model.mel_config
    m = torch.as_tensor(mel).float()
    if m.ndim == 2:
        m = m[None]
    frames = model.length // cfg.hop_length
    if m.ndim != 3 or m.shape[1] != cfg.n_mels:
        raise ValueError(f"mel must be (N, {cfg.n_mels}, frames) log-mel frames (modalities.audio.mel.log_mel); "
                         f"got shape {tuple(m.shape)}")
    if m.shape[-1] != frames:
        raise ValueError(f"mel has {m.shape[-1]} frames but checkpoint {model.path} makes clips of {model.length} "
                         f"samples, i.e. {frames} frames at hop {cfg.hop_length}")
    if n is not None and m.shape[0] not in (1, n):
        raise ValueError(f"mel holds {m.shape[0]} spectrograms for {n} samples; pass 1 or {n}")
    if not torch.isfinite(m).all():
        raise ValueError("mel contains NaN or Inf")
    return m if n is None else m.expand(n, -1, -1)


# ---------------------------------------------------------------------------------- generate
def _sample(model: AudioModel, shape: tuple[int, ...], *, gen: torch.Generator, sampler: str | None,
            steps: int | None, guidance_scale: float, guidance_interval: Sequence[float | None] | None,
            progress: bool, batch_size: int,
            cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the core's sampler in batches; the network gets cond[k][batch rows]."""
    sampler = sampler or model.default("sampler")
    if guidance_interval is None:
        guidance_interval = model.default("guidance_interval", None)
    steps = resolve_steps(steps, model.default("steps"))
    grid = sampling_grid(model.diffusion, steps, sampler, model.info.get("fast_schedules"))
    dev = module_device(model.net)
    n = shape[0]
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        x = model.diffusion.sample(
            model.net, (part.stop - part.start, *shape[1:]), sampler=sampler, grid=grid, generator=gen,
            device=dev, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
            wrappers=[diffkit.ClipX0(-1.0, 1.0)],
            progress=progress, **{k: v[part].to(dev) for k, v in cond.items()},
        )
        out.append(x.float().cpu())
    return torch.cat(out).clamp(-1.0, 1.0)


def generate_audio(
    *,
    checkpoint: str | os.PathLike | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    device: str | torch.device = "auto",
    sampler: str | None = None,
    steps: int | None = None,
    progress: bool = False,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_interval: Sequence[float | None] | None = None,
    route: str | None = None,
    vocoder: str | os.PathLike | None = None,
    mel: Any = None,
    batch_size: int = 64,
) -> AudioSamples:
    """Sample ``num_samples`` clips; see the module docstring.

    Args:
        checkpoint: an audio checkpoint directory; None picks the shipped one for the route.
        num_samples: clips to draw; None: one per label (or per mel) given, else 16.
        seed: the same seed (and batch_size) gives the same audio; None draws fresh audio.
        sampler, steps: any of ``diffkit.SAMPLERS`` (default: the checkpoint's, DDPM);
            ``steps=6`` is DiffWave's fast schedule.
        labels: one class index (the digit) or one per sample; without labels a
            class-conditional model samples its unconditional (null-class) mode.
        guidance_scale: classifier-free guidance weight for labels (1 = none).
        guidance_interval: (low, high) on sigma/alpha: guide only there, one network call
            instead of two elsewhere (None for an open end; ``(0, None)`` guides every step);
            default the checkpoint's.
        route: ``waveform`` (DiffWave on samples) or ``mel`` (a mel-diffusion checkpoint,
            then ``vocoder``: a vocoder checkpoint, or "griffin-lim"). Default: the
            checkpoint's own route; the shipped ``digits`` model is a mel model, so with no
            checkpoint generate runs the spectrogram route (see the README for why).
        mel: log-mel frames (N, n_mels, frames) to vocode, for a vocoder checkpoint.
        batch_size: clips per sampling batch, to bound memory.
    """
    if num_samples is None:
        num_samples = _count(labels, mel)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if route is not None and route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    if route == "waveform" and vocoder is not None:
        raise ValueError("vocoder= belongs to route='mel' (spectrogram, then vocoder)")
    if checkpoint is not None and checkpoint_kind(checkpoint) == LEARNED_VOCODER_KIND:
        given = [name for name, value in (("labels", labels), ("guidance_scale", guidance_scale),
                                          ("guidance_interval", guidance_interval), ("route", route),
                                          ("vocoder", vocoder), ("sampler", sampler), ("steps", steps))
                 if value is not None]
        if given:
            raise ValueError(f"checkpoint {checkpoint} is a learned vocoder: it takes mel= frames only, not "
                             f"{', '.join(given)}")
        if mel is None:
            raise ValueError(f"checkpoint {checkpoint} is a vocoder: pass mel= log-mel frames (N, n_mels, frames)")
        voc = load_vocoder(checkpoint, device)
        frames = _check_frames(mel, voc.mel_config, checkpoint, num_samples)
        return AudioSamples(audio=voc(frames, seed=seed, batch_size=batch_size), sample_rate=voc.sample_rate)
    if checkpoint is None:
        checkpoint = _default_checkpoint(route)
    model = load_audio_model(checkpoint, device)
    if route is None:  # the checkpoint's own route: a mel model's frames go through a vocoder
        route = "mel" if model.kind == "mel" else "waveform"
        if route == "waveform" and vocoder is not None:
            raise ValueError(f"vocoder= belongs to route='mel'; checkpoint {model.path} is a {model.kind} model")
    n = num_samples
    expected = {"waveform": ("waveform", "vocoder"), "mel": ("mel",)}[route]
    if model.kind not in expected:
        raise ValueError(f"checkpoint {model.path} is a {model.kind} model; route={route!r} needs "
                         f"{' or '.join(expected)}" + ("; use route='mel'" if model.kind == "mel" else ""))

    cond: dict[str, torch.Tensor] = {}
    conditional = labels is not None
    if labels is not None:
        cond["labels"] = _labels(labels, model, n)
    elif model.num_classes is not None:
        # No label: the learned null class, i.e. the unconditional model.
        cond["labels"] = torch.zeros(n, dtype=torch.long)
        cond["drop_cond"] = torch.ones(n, dtype=torch.bool)
    if guidance_scale is None:
        guidance_scale = model.default("guidance_scale") if conditional else 1.0
    elif guidance_scale != 1.0 and not conditional:
        raise ValueError("guidance_scale needs labels to guide towards")
    if guidance_interval is not None and not conditional:
        raise ValueError("guidance_interval limits classifier-free guidance: it needs labels")
    check_guidance_interval(guidance_interval)
    guidance_scale = check_guidance_scale(guidance_scale)

    gen = seeded_generator(seed)
    common = dict(gen=gen, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                  guidance_interval=guidance_interval, progress=progress, batch_size=batch_size)
    if model.kind == "vocoder":
        if mel is None:
            raise ValueError(f"checkpoint {model.path} is a vocoder: pass mel= log-mel frames (N, "
                             f"{model.mel_config.n_mels}, {model.length // model.mel_config.hop_length})")
        frames = _check_mel(mel, model, n).to(module_device(model.net))
        # Upsampled once here, not at every step: the sampler calls the network `steps` times.
        with torch.no_grad():
            cond["mel_features"] = model.net.upsample_mel(frames)
        audio = _sample(model, (n, 1, model.length), cond=cond, **common)
    elif mel is not None:
        raise ValueError(f"checkpoint {model.path} is a {model.kind} model; mel= is for vocoder checkpoints")
    elif model.kind == "waveform":
        audio = _sample(model, (n, 1, model.length), cond=cond, **common)
    else:  # a mel-diffusion model: frames, then a vocoder
        cfg = model.mel_config
        frames = _sample(model, (n, cfg.n_mels, model.length // cfg.hop_length), cond=cond, **common)
        audio = _frames_to_audio(frames, model, vocoder, seed, device, progress, batch_size)
    return AudioSamples(audio=audio, sample_rate=model.sample_rate,
                        labels=cond["labels"].clone() if conditional else None, class_names=model.class_names)


def _default_checkpoint(route: str | None) -> Path:
    """The shipped checkpoint for a route: ``digits`` (whatever its route), or for route="mel"
    a separate ``digits-mel`` when ``digits`` is a waveform model."""
    shipped = (DEFAULT_CHECKPOINT / "config.json").is_file()
    if route == "mel":
        if (MEL_CHECKPOINT / "config.json").is_file():
            return MEL_CHECKPOINT
        if shipped and load_audio_model(DEFAULT_CHECKPOINT, "cpu").kind == "mel":
            return DEFAULT_CHECKPOINT
        raise ValueError(f"no mel-diffusion checkpoint is shipped (expected {MEL_CHECKPOINT}); train one with "
                         "`python recipes/audio_train.py --preset mel` and pass checkpoint=")
    if route == "waveform" and shipped and load_audio_model(DEFAULT_CHECKPOINT, "cpu").kind == "mel":
        raise ValueError(f"the shipped digits model ({DEFAULT_CHECKPOINT}) is a mel-diffusion model; the waveform "
                         "route needs a DiffWave checkpoint: train one with `python recipes/audio_train.py "
                         "--preset cpu` (or gpu) and pass checkpoint=")
    if not shipped:
        raise ValueError(f"no audio checkpoint is shipped (expected {DEFAULT_CHECKPOINT}); {HOW_TO_TRAIN}")
    return DEFAULT_CHECKPOINT


def _count(labels, mel) -> int:
    """How many clips the conditions ask for: one per label, one per mel, else 16."""
    if labels is not None:
        return int(torch.as_tensor(labels).numel())
    if mel is not None:
        frames = torch.as_tensor(mel)
        return frames.shape[0] if frames.ndim == 3 else 1
    return 16


def _check_frames(mel: Any, cfg: MelConfig, path, n: int | None) -> torch.Tensor:
    """Log-mel frames (N, n_mels, frames) for a learned vocoder (any number of frames)."""
    m = torch.as_tensor(mel).float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1] != cfg.n_mels or m.shape[-1] < 1:
        raise ValueError(f"mel must be (N, {cfg.n_mels}, frames) log-mel frames (modalities.audio.mel.log_mel) for "
                         f"vocoder {path}; got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError("mel contains NaN or Inf")
    if n is not None and m.shape[0] not in (1, n):
        raise ValueError(f"mel holds {m.shape[0]} spectrograms for {n} samples; pass 1 or {n}")
    return m if n is None else m.expand(n, -1, -1)


def default_vocoder() -> str | Path:
    """The spectrogram route's default second stage: the shipped learned vocoder, else Griffin-Lim."""
    return VOCODER_CHECKPOINT if (VOCODER_CHECKPOINT / "config.json").is_file() else "griffin-lim"


def _frames_to_audio(frames, model: AudioModel, vocoder, seed, device, progress, batch_size) -> torch.Tensor:
    if vocoder is None:
        vocoder = default_vocoder()
    if str(vocoder) == "griffin-lim":
        return griffin_lim(frames, model.mel_config, length=model.length, generator_seed=seed)
    if checkpoint_kind(vocoder) == LEARNED_VOCODER_KIND:
        voc = load_vocoder(vocoder, device)
        _check_vocoder_mel(voc.path, voc.mel_config, model.path, model.mel_config)
        audio = voc(frames, seed=seed, batch_size=batch_size)
        return audio[..., : model.length]
    voc = load_audio_model(vocoder, device)
    if voc.kind != "vocoder":
        raise ValueError(f"vocoder {voc.path} is a {voc.kind} model, not a vocoder")
    _check_vocoder_mel(voc.path, voc.mel_config, model.path, model.mel_config)
    return vocode(frames, checkpoint=voc.path, seed=seed, device=device, progress=progress,
                  batch_size=batch_size).audio


def vocode(mel: Any, *, checkpoint: str | os.PathLike | None = None, seed: int | None = 0,
           device: str | torch.device = "auto", sampler: str | None = None, steps: int | None = None,
           progress: bool = False, batch_size: int = 64) -> AudioSamples:
    """Log-mel frames (N, n_mels, frames) -> audio, with a vocoder checkpoint (default: the shipped one).

    A learned (harmonic-plus-noise) vocoder takes no ``sampler`` or ``steps``; a DiffWave
    vocoder samples with them (default: its own)."""
    if checkpoint is None:
        if not (VOCODER_CHECKPOINT / "config.json").is_file():
            raise ValueError(f"no vocoder checkpoint is shipped yet (expected {VOCODER_CHECKPOINT}); train one "
                             "with `python recipes/audio_train.py --preset ddsp` and pass checkpoint=")
        checkpoint = VOCODER_CHECKPOINT
    return generate_audio(checkpoint=checkpoint, num_samples=None, seed=seed, device=device, sampler=sampler,
                          steps=steps, progress=progress, mel=mel, batch_size=batch_size)


# ---------------------------------------------------------------------------------- likelihood
def bits_per_sample_of(net, diffusion: diffkit.Diffusion, audio: torch.Tensor, *, steps: int | None = None,
                       generator: torch.Generator | None = None, bin_width: float = BIN_WIDTH_16BIT,
                       mask: torch.Tensor | None = None, progress: bool = False, **cond) -> torch.Tensor:
    """The variational bound -log2 p(audio) / T of quantised audio (N, 1, T), one value per clip.

    The core's bound with the discretised decoder: each sample's bin of width ``bin_width``
    (16-bit PCM: 2/65535 on [-1, 1]) integrated under the model's last Gaussian. With
    ``mask`` (True = a real sample) only those samples are counted and averaged over.
    """
    extra = {} if mask is None else {"mask": mask}
    return diffusion.nll(net, audio, steps=steps, decoder="discretized", bin_width=bin_width,
                         generator=generator, progress=progress, **extra, **cond)


def bits_per_sample(
    audio: Any,
    *,
    checkpoint: str | os.PathLike | None = None,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Bits per audio sample of 16-bit audio (T,), (N, T) or (N, 1, T) in [-1, 1] under a waveform
    or vocoder checkpoint.

    An upper bound on the negative log-likelihood (the variational bound over all T training
    steps, or over a ``steps``-point chain), with the discretised decoder at the 16-bit bin
    width 2/65535. Class-conditional models are scored unconditionally (the null class)
    unless ``labels`` are given. A vocoder scores each clip given its own log-mel frames,
    -log2 p(audio | log_mel(audio)) / T: how much the waveform holds beyond the spectrogram.
    ``lengths`` (the clips' lengths before they were centred in the window,
    ``AudioData.lengths``) restrict the count to real samples, leaving out the zero padding
    (which a model finds easy). Returns (N,) float tensor.
    """
    if checkpoint is not None and checkpoint_kind(checkpoint) == LEARNED_VOCODER_KIND:
        raise ValueError(f"checkpoint {checkpoint} is a learned harmonic-plus-noise vocoder: it is not a density "
                         "over waveforms; bits_per_sample needs a waveform model or a DiffWave vocoder")
    model = load_audio_model(checkpoint, device)
    if model.kind not in ("waveform", "vocoder"):
        raise ValueError(f"checkpoint {model.path} is a {model.kind} model; bits_per_sample needs a waveform model "
                         "or a vocoder (which scores audio given its own log-mel frames)")
    x = _as_audio(audio)
    n = x.shape[0]
    cond: dict[str, torch.Tensor] = {}
    if model.kind == "vocoder" and labels is not None:
        raise ValueError(f"checkpoint {model.path} is a vocoder: it is conditioned on the clips' log-mel frames, "
                         "not on labels")
    if labels is not None:
        cond["labels"] = _labels(labels, model, n)
    elif model.num_classes is not None:
        cond["labels"] = torch.zeros(n, dtype=torch.long)
        cond["drop_cond"] = torch.ones(n, dtype=torch.bool)
    mask = None
    if lengths is not None:
        if torch.as_tensor(lengths).numel() != n:
            raise ValueError(f"got {torch.as_tensor(lengths).numel()} lengths for {n} clips; pass one per clip")
        mask = window_mask(lengths, x.shape[-1])
    dev = module_device(model.net)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        clips = x[part].to(dev)
        part_cond = {k: v[part].to(dev) for k, v in cond.items()}
        if model.kind == "vocoder":
            with torch.no_grad():
                part_cond["mel_features"] = model.net.upsample_mel(log_mel(clips, model.mel_config))
        out.append(bits_per_sample_of(model.net, model.diffusion, clips, steps=steps, generator=gen,
                                      mask=None if mask is None else mask[part].to(dev), progress=progress,
                                      **part_cond).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------- saving
# A perceptually ordered dark-to-bright colour ramp (close to matplotlib's "magma"), so the
# PNG needs only Pillow.
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def _colourise(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] (H, W) -> (H, W, 3) uint8 through the colour ramp."""
    pos = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


def spectrogram_image(audio: torch.Tensor, sample_rate: int, columns: int | None = None,
                      n_fft: int = 256, hop: int = 64, top_db: float = 80.0, padding: int = 4,
                      titles: Sequence[str] | None = None) -> np.ndarray:
    """A grid of log-magnitude spectrograms of (N, 1, T) audio, low frequencies at the bottom.

    Each panel spans 0..sample_rate/2 Hz and the clip's duration; colours cover ``top_db``
    decibels below the loudest bin of all clips (so panels are comparable). ``titles`` (one
    per clip, e.g. the labels) are written in the panels' top-left corners. Returns
    (H, W, 3) uint8.
    """
    audio = _as_audio(audio)
    n = audio.shape[0]
    n_fft = min(n_fft, max(16, 2 ** int(math.log2(max(audio.shape[-1], 2)))))
    window = torch.hann_window(n_fft)
    spec = torch.stft(audio[:, 0], n_fft, hop_length=min(hop, n_fft), window=window, return_complex=True).abs()
    db = 20 * torch.log10(spec.clamp(min=1e-8))
    db = ((db - (db.max() - top_db)) / top_db).clamp(0, 1).flip(1).numpy()  # (N, F, frames), low freq last
    columns = columns or min(n, 4)
    rows = math.ceil(n / columns)
    h, w = db.shape[1], db.shape[2]
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        canvas[top : top + h, left : left + w] = _colourise(db[i])
    if titles is not None:
        from PIL import Image, ImageDraw

        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for i, title in enumerate(titles[:n]):
            r, c = divmod(i, columns)
            draw.text((padding + c * (w + padding) + 3, padding + r * (h + padding) + 2), str(title),
                      fill=(255, 255, 255))
        canvas = np.asarray(image).copy()
    return canvas


def _file_safe(text: str) -> str:
    """A class name as a file-name part: letters, digits, '-' and '_' only."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)[:40] or "x"


def check_audio_folder(path: str | os.PathLike) -> Path:
    """``path`` as a Path if the samples' folder can be there, else a ValueError that says why."""
    folder = Path(path)
    if folder.suffix.lower() in (".wav", ".flac", ".png"):
        raise ValueError(f"audio samples are saved as several files: give a folder for --out, not {folder}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; audio samples are saved as several files in a folder: give one for --out")
    return folder


def save_audio(samples: AudioSamples | torch.Tensor, path: str | os.PathLike,
               sample_rate: int | None = None) -> list[Path]:
    """Write each clip as a 16-bit WAV file in folder ``path`` and one spectrogram PNG of all.

    Files: ``sample_000.wav`` (``sample_000_7.wav`` with label 7; the class name when the
    checkpoint has names), ..., ``spectrograms.png``. Returns the paths written.
    """
    import soundfile as sf
    from PIL import Image

    if isinstance(samples, AudioSamples):
        audio, rate, labels, names = samples.audio, samples.sample_rate, samples.labels, samples.class_names
    else:
        if sample_rate is None:
            raise ValueError("pass sample_rate= when saving a bare audio tensor (or pass AudioSamples)")
        audio, rate, labels, names = samples, sample_rate, None, None
    audio = _as_audio(torch.as_tensor(audio).detach().float().cpu().clamp(-1, 1))
    if not isinstance(rate, int) or rate < 1:
        raise ValueError(f"sample_rate must be a positive integer, got {rate!r}")
    folder = check_audio_folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    width = max(3, len(str(len(audio) - 1)))
    titles = None
    if labels is not None:
        labels = [int(y) for y in torch.as_tensor(labels).flatten()]
        titles = [names[y] if names and 0 <= y < len(names) else str(y) for y in labels]
    for i, clip in enumerate(audio):
        suffix = f"_{_file_safe(titles[i])}" if titles else ""
        file = folder / f"sample_{i:0{width}d}{suffix}.wav"
        sf.write(str(file), clip[0].numpy(), rate, subtype="PCM_16")
        written.append(file)
    png = folder / "spectrograms.png"
    Image.fromarray(spectrogram_image(audio, rate, titles=titles)).save(png)
    written.append(png)
    return written


# ---------------------------------------------------------------------------------- modality
class AudioModality:
    """The ``audio`` modality object registered with diffkit (see docs/interfaces.md)."""

    name = "audio"

    def calibration_inputs(self, checkpoint: str, *, batch: int, data: int, device, generator: torch.Generator):
        """What ``diffkit calibrate`` fits on: clips (or log-mel frames) of random classes at the
        checkpoint's guidance, as :func:`generate_audio` draws them; no variances (a vocoder
        needs its frames, and the mel model scores with :func:`bits_per_sample`)."""
        from diffkit.calibration import CalibrationInputs

        model = load_audio_model(checkpoint, device)
        if model.kind == "vocoder":
            raise ValueError(f"checkpoint {checkpoint} is a vocoder: its grids depend on the frames it is given; "
                             "it is sampled on its own fast schedules and is not calibrated")
        dev = module_device(model.net)
        if model.kind == "mel":
            shape = (batch, model.mel_config.n_mels, model.length // model.mel_config.hop_length)
        else:
            shape = (batch, 1, model.length)
        cond: dict[str, torch.Tensor] = {}
        sample_kwargs: dict[str, Any] = {"wrappers": [diffkit.ClipX0(-1.0, 1.0)]}
        if model.num_classes is not None:
            cond["labels"] = torch.randint(0, model.num_classes, (batch,), generator=generator).to(dev)
            sample_kwargs["guidance_scale"] = float(model.default("guidance_scale"))
        return CalibrationInputs(model.net, model.diffusion, shape, cond, sample_kwargs)

    def generate(self, *, checkpoint=None, num_samples: int | None = None, seed: int | None = None, device="auto",
                 sampler: str | None = None, steps: int | None = None, progress: bool = False,
                 **cond: Any) -> AudioSamples:
        """AudioSamples (audio (N, 1, T) in [-1, 1], sample_rate); conditions as in :func:`generate_audio`."""
        return generate_audio(checkpoint=checkpoint, num_samples=num_samples, seed=seed, device=device,
                              sampler=sampler, steps=steps, progress=progress, **cond)

    def save(self, samples: AudioSamples, path: str | os.PathLike) -> list[Path]:
        """WAV files (16-bit) and a spectrogram PNG in folder ``path``."""
        return save_audio(samples, path)

    def check_output(self, path: str | os.PathLike) -> None:
        """What :meth:`save` would refuse, before any sampling."""
        check_audio_folder(path)

    def bits_per_sample(self, audio: Any, **kwargs: Any) -> torch.Tensor:
        """See :func:`bits_per_sample`."""
        return bits_per_sample(audio, **kwargs)

    def add_cli_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``diffkit generate audio``; their names match generate's arguments."""
        group = parser.add_argument_group(
            "audio options",
            "--out is a folder: one 16-bit WAV per sample and spectrograms.png. With no --checkpoint "
            "the shipped spoken-digits model is used (log-mel diffusion, then the shipped learned vocoder).",
        )
        group.add_argument("--labels", "--label", dest="labels", type=int, nargs="+", metavar="Y",
                           help="class label(s), e.g. the digit to say: one for all samples or one per sample")
        group.add_argument("--guidance-scale", type=float, metavar="W",
                           help="classifier-free guidance weight for --labels (1 = none; default: the checkpoint's)")
        add_guidance_interval_argument(group)
        group.add_argument("--route", choices=ROUTES, default=None,
                           help="waveform: DiffWave on samples; mel: log-mel diffusion, then --vocoder "
                                "(default: the checkpoint's own; the shipped digits model is a mel model)")
        group.add_argument("--vocoder", metavar="DIR",
                           help="route mel: a vocoder checkpoint directory, or griffin-lim "
                                "(default: the shipped learned vocoder, checkpoints/digits-vocoder)")
        group.add_argument("--batch-size", type=int, default=64, metavar="B",
                           help="clips per sampling batch (default: 64)")
