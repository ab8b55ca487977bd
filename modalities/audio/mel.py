"""The spectrogram route: log-mel features, their inverse by Griffin-Lim, and their scale.

    cfg = MelConfig(sample_rate=8000)              # 64 mel bins, hop 64 (8 ms), 512-point FFT
    mel = log_mel(audio, cfg)                      # (B, 1, T) -> (B, 64, T // 64) in [-1, 1]
    audio = griffin_lim(mel, cfg, length=T)        # the baseline inverse: (B, 1, T)

Log-mel frames are what the mel-diffusion model (:class:`modalities.audio.model.MelDenoiser`)
generates and what the DiffWave vocoder (``DiffWave(n_mels=...)``) is conditioned on; both
use this one front end, so its settings travel with a checkpoint (``MelConfig.to_dict``).

Scale: magnitudes (power 1, Slaney-normalised mel filters) in decibels, floored at -100 dB
and mapped linearly from [-100, +20] dB to [-1, 1], the range diffusion models work in (the
DiffWave recipe does the same with a 100 dB range). Frames: a centred STFT gives
T // hop + 1 frames; the last one (which only covers the padding) is dropped, so a clip of
T samples has exactly T // hop frames and the vocoder's upsampler returns T samples. T must
therefore be a multiple of the hop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["MelConfig", "log_mel", "mel_to_magnitude", "griffin_lim", "MIN_DB", "MAX_DB"]

MIN_DB = -100.0
MAX_DB = 20.0


@dataclass(frozen=True)
class MelConfig:
    """Settings of the log-mel front end (recorded with every checkpoint that uses it)."""

    sample_rate: int = 8000
    n_fft: int = 512
    win_length: int = 256
    hop_length: int = 64
    n_mels: int = 64
    f_min: float = 20.0
    f_max: float | None = None  # None: the Nyquist frequency

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate < 1:
            problems.append(f"sample_rate must be positive, got {self.sample_rate}")
        if self.n_fft < 2 or not 1 <= self.win_length <= self.n_fft:
            problems.append(f"need n_fft >= 2 and 1 <= win_length <= n_fft, got {self.n_fft}, {self.win_length}")
        if self.hop_length < 1 or self.n_mels < 1:
            problems.append(f"hop_length and n_mels must be positive, got {self.hop_length}, {self.n_mels}")
        top = self.f_max if self.f_max is not None else self.sample_rate / 2
        if not 0 <= self.f_min < top <= self.sample_rate / 2:
            problems.append(f"need 0 <= f_min < f_max <= sample_rate / 2, got {self.f_min}, {top}")
        if problems:
            raise ValueError("invalid MelConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown mel setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def frames(self, num_samples: int) -> int:
        """Frames of a clip of ``num_samples`` samples (which must be a multiple of the hop)."""
        if num_samples % self.hop_length:
            raise ValueError(f"clips of {num_samples} samples do not split into mel frames of hop "
                             f"{self.hop_length}; use a length that is a multiple of {self.hop_length}")
        return num_samples // self.hop_length


def _mel_transform(cfg: MelConfig, device: torch.device):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=1.0, center=True, norm="slaney",
        mel_scale="slaney",
    ).to(device)


def log_mel(audio: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """(B, 1, T) or (B, T) audio in [-1, 1] -> (B, n_mels, T // hop) log-mel frames in [-1, 1]."""
    if audio.ndim == 3:
        if audio.shape[1] != 1:
            raise ValueError(f"log_mel takes mono audio (B, 1, T); got shape {tuple(audio.shape)}")
        audio = audio[:, 0]
    if audio.ndim != 2:
        raise ValueError(f"log_mel takes audio of shape (B, 1, T) or (B, T); got {tuple(audio.shape)}")
    frames = cfg.frames(audio.shape[-1])
    mel = _mel_transform(cfg, audio.device)(audio.float())[..., :frames]
    db = 20.0 * torch.log10(mel.clamp(min=10 ** (MIN_DB / 20)))
    return ((db - MIN_DB) / (MAX_DB - MIN_DB) * 2.0 - 1.0).clamp(-1.0, 1.0)


def mel_to_magnitude(mel: torch.Tensor) -> torch.Tensor:
    """Undo :func:`log_mel`'s scaling: [-1, 1] frames -> mel magnitudes."""
    db = (mel.clamp(-1.0, 1.0) + 1.0) / 2.0 * (MAX_DB - MIN_DB) + MIN_DB
    return 10.0 ** (db / 20.0)


def griffin_lim(mel: torch.Tensor, cfg: MelConfig, length: int | None = None, n_iter: int = 64,
                generator_seed: int | None = 0) -> torch.Tensor:
    """Log-mel frames (B, n_mels, frames) in [-1, 1] -> audio (B, 1, length) in [-1, 1].

    The baseline inverse: least-squares inversion of the mel filters (torchaudio's
    InverseMelScale), then ``n_iter`` Griffin-Lim phase iterations. ``length`` defaults to
    frames * hop. GriffinLim starts from random phases; ``generator_seed`` fixes them.
    """
    import torchaudio

    if mel.ndim != 3 or mel.shape[1] != cfg.n_mels:
        raise ValueError(f"mel must be (batch, {cfg.n_mels}, frames); got shape {tuple(mel.shape)}")
    length = mel.shape[-1] * cfg.hop_length if length is None else length
    n_stft = cfg.n_fft // 2 + 1
    inverse = torchaudio.transforms.InverseMelScale(
        n_stft=n_stft, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=cfg.f_min, f_max=cfg.f_max,
        norm="slaney", mel_scale="slaney",
    ).to(mel.device)
    magnitude = inverse(mel_to_magnitude(mel.float())).clamp(min=0)
    # log_mel dropped the last (padding-only) frame; repeat the last frame so the ISTFT covers T.
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
    gl = torchaudio.transforms.GriffinLim(n_fft=cfg.n_fft, n_iter=n_iter, win_length=cfg.win_length,
                                          hop_length=cfg.hop_length, power=1.0, length=length,
                                          rand_init=True).to(mel.device)
    if generator_seed is not None:
        state = torch.random.get_rng_state()
        torch.manual_seed(generator_seed)  # GriffinLim draws its initial phases from the global RNG
        try:
            audio = gl(magnitude)
        finally:
            torch.random.set_rng_state(state)
    else:
        audio = gl(magnitude)
    return audio.clamp(-1.0, 1.0)[:, None]
