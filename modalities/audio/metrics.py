"""Sample-quality measures for spoken digits: a digit classifier, its feature space, and the
Frechet distance and inception score in that space (the SC09 measures DiffWave reports, on
FSDD).

The classifier hears waveforms: (B, 1, T) audio at 8 kHz in [-1, 1] is scaled to a peak of
0.9 (so loudness does not matter), turned into log-mel frames by the modality's own front end
(:func:`modalities.audio.mel.log_mel`) and read by a small 2-D CNN. It is trained by
``benchmarks/audio_quality.py --train-classifier`` on FSDD's training split (takes 5-49, the
clips the diffusion models learn from) and scored on the test split (takes 0-4); that held-out
accuracy is the ceiling for generated clips. The shipped weights in
``checkpoints/digits-classifier`` are an ordinary diffkit checkpoint of the audio modality
without a diffusion, loaded through an allow-list (``diffkit.load_network``), never unpickled;
its ``modality_config`` records how it was trained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffkit.checkpoint import checkpoint_exists, load_network, save_checkpoint
from diffkit.metrics import frechet_distance, inception_score  # noqa: F401  (re-exported: part of this module's API)

from .data import DEFAULT_WINDOW, FSDD_SAMPLE_RATE, load_fsdd
from .mel import MelConfig, log_mel

__all__ = [
    "CLASSIFIER_DIR",
    "SpokenDigitClassifier",
    "train_digit_classifier",
    "save_digit_classifier",
    "load_digit_classifier",
    "frechet_distance",
    "inception_score",
    "frame_autocorrelation",
    "voicing_clarity",
]

CLASSIFIER_DIR = Path(__file__).parent / "checkpoints" / "digits-classifier"
CLASSIFIER_CLASS = "modalities.audio.metrics.SpokenDigitClassifier"


class SpokenDigitClassifier(nn.Module):
    """Log-mel CNN for (B, 1, T) clips; ``features`` is ``feature_dim``-d (taken before a ReLU).

    Four stride-2 convolutions over (mel bin, frame), a mean over time, a linear layer to the
    features and a ReLU + linear head. Clips of other lengths work (the mean is over time);
    the mel settings are fixed at construction (the FSDD front end by default).
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 64, sample_rate: int = FSDD_SAMPLE_RATE,
                 channels: int = 16):
        super().__init__()
        self.mel = MelConfig(sample_rate=sample_rate)
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),          # 32 x 64
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),  # 16 x 32
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),  # 8 x 16
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(),  # 4 x 8
        )
        self.project = nn.Linear(4 * c * (self.mel.n_mels // 16), feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))
        self.config = {"num_classes": num_classes, "feature_dim": feature_dim, "sample_rate": sample_rate,
                       "channels": channels}

    def frames(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) audio -> (B, 1, n_mels, frames) log-mel of the clip scaled to a peak of 0.9."""
        audio = audio.float()
        if audio.ndim == 2:
            audio = audio[:, None]
        hop = self.mel.hop_length
        if audio.shape[-1] % hop:
            audio = F.pad(audio, (0, hop - audio.shape[-1] % hop))
        peak = audio.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-4)
        return log_mel(audio * (0.9 / peak), self.mel)[:, None]

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        return self.features_of_frames(self.frames(audio))

    def features_of_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Features of (B, 1, n_mels, frames) log-mel frames from :meth:`frames`."""
        h = self.body(frames)                       # (B, C, F', frames')
        h = h.mean(dim=-1).flatten(1)               # mean over time: any clip length
        return self.project(h)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(audio))

    @torch.no_grad()
    def embed(self, audio: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Features of many clips, in batches, in eval mode."""
        self.eval()
        return torch.cat([self.features(audio[i : i + batch_size]) for i in range(0, len(audio), batch_size)])

    @torch.no_grad()
    def probabilities(self, audio: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Class probabilities (N, num_classes), in eval mode."""
        self.eval()
        return torch.cat([self.head(self.features(audio[i : i + batch_size])).softmax(-1)
                          for i in range(0, len(audio), batch_size)])

    @torch.no_grad()
    def predict(self, audio: torch.Tensor) -> torch.Tensor:
        return self.probabilities(audio).argmax(1)


def _augment(frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Log-mel frames (B, 1, n_mels, frames): random time shifts (up to 0.13 s, circular over
    the silent padding), one masked band of up to 8 mel bins and a little level jitter."""
    n, _, bins, length = frames.shape
    shifts = torch.randint(-16, 17, (n,), generator=generator).tolist()
    x = torch.stack([torch.roll(frames[i], s, dims=-1) for i, s in enumerate(shifts)])
    start = torch.randint(0, bins - 8, (n,), generator=generator)
    width = torch.randint(0, 9, (n,), generator=generator)
    rows = torch.arange(bins)[None]
    band = (rows >= start[:, None]) & (rows < (start + width)[:, None])
    x = torch.where(band[:, None, :, None], torch.full_like(x, -1.0), x)
    jitter = torch.empty(n, 1, 1, 1).uniform_(-0.05, 0.05, generator=generator)
    return (x + jitter).clamp(-1, 1)


def train_digit_classifier(epochs: int = 12, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                           progress: bool = False) -> tuple[SpokenDigitClassifier, float, int]:
    """Train on FSDD takes 5-49; return the classifier, its accuracy on takes 0-4 and its step count."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = load_fsdd("train", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=0.9)
    test = load_fsdd("test", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=0.9)
    model = SpokenDigitClassifier()
    with torch.no_grad():
        frames = torch.cat([model.frames(train.audio[i : i + 256]) for i in range(0, len(train), 256)])
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    step = 0
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            idx = perm[i : i + batch_size]
            logits = model.head(model.features_of_frames(_augment(frames[idx], gen)))
            loss = F.cross_entropy(logits, train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    acc = (model.predict(test.audio) == test.labels).float().mean().item()
    return model, acc, step


def save_digit_classifier(model: SpokenDigitClassifier, path: str | os.PathLike,
                          training: Mapping[str, Any], step: int = 0) -> Path:
    """Write the classifier as a diffkit checkpoint; ``training`` becomes its ``modality_config``."""
    path = save_checkpoint(path, model=model, step=step, config={
        "modality": "audio",
        "model": {"class": CLASSIFIER_CLASS, "kwargs": model.config},
        "diffusion": None,
        "modality_config": dict(training),
    })
    for file in Path(path).iterdir():
        if file.is_file():
            file.chmod(0o644)
    return Path(path)


def load_digit_classifier(path: str | os.PathLike = CLASSIFIER_DIR,
                          device: str | torch.device = "cpu") -> SpokenDigitClassifier:
    """The shipped (or a given) spoken-digit classifier, in eval mode."""
    if not checkpoint_exists(path):
        raise FileNotFoundError(f"no spoken-digit classifier at {path}; run: "
                                "python benchmarks/audio_quality.py --train-classifier")
    net = load_network(path, {CLASSIFIER_CLASS: SpokenDigitClassifier}, modality="audio", device=device).net
    return net.float().eval()


# ---------------------------------------------------------------------------------- voicing
def frame_autocorrelation(audio: torch.Tensor, frame_length: int = 512,
                          hop: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised autocorrelation of Hann-windowed frames, and the frames' energies.

    (B, 1, T) or (B, T) audio -> (B, frames, frame_length) values at lags 0..frame_length-1 and
    (B, frames) mean-square energies. Frame j holds the ``frame_length`` samples centred on
    sample j * hop (zero padding at the ends; T // hop + 1 frames). Each frame's
    autocorrelation is divided by its value at lag 0 and by the window's own normalised
    autocorrelation (Boersma 1993), so a periodic signal scores close to 1 at its period and
    white noise close to 0.
    """
    x = audio.float().reshape(-1, audio.shape[-1])
    half = frame_length // 2
    x = F.pad(x, (half, half))
    frames = x.unfold(-1, frame_length, hop)                          # (B, frames, L)
    frames = frames - frames.mean(-1, keepdim=True)
    window = torch.hann_window(frame_length, periodic=False, device=x.device)
    n = 2 * frame_length
    power = torch.fft.rfft(frames * window, n=n).abs().square()
    ac = torch.fft.irfft(power, n=n)[..., :frame_length]
    wac = torch.fft.irfft(torch.fft.rfft(window, n=n).abs().square(), n=n)[:frame_length]
    nac = (ac / ac[..., :1].clamp(min=1e-12)) / (wac / wac[0]).clamp(min=1e-3)
    return nac, frames.square().mean(-1)


@torch.no_grad()
def voicing_clarity(audio: torch.Tensor, sample_rate: int = FSDD_SAMPLE_RATE, fmin: float = 80.0,
                    fmax: float = 400.0, frame_length: int = 512, hop: int = 64) -> torch.Tensor:
    """How periodic (voiced) each clip is: (N, 1, T) audio -> (N,) values in [0, 1].

    Per frame (:func:`frame_autocorrelation`, 64 ms frames every 8 ms at 8 kHz), the peak of the
    normalised autocorrelation over the pitch lags of ``fmax``..``fmin`` Hz (80-400: speech),
    capped at 1, averaged over the loudest half of the clip's frames. A harmonic sound scores
    near 1, noise near 0; recordings of speech lie between (unvoiced consonants and onsets).
    Average over clips for a set.
    """
    nac, energy = frame_autocorrelation(audio, frame_length, hop)
    lo, hi = int(math.floor(sample_rate / fmax)), int(math.ceil(sample_rate / fmin))
    peak = nac[..., lo : hi + 1].amax(-1).clamp(0.0, 1.0)             # (N, frames)
    k = max(1, energy.shape[-1] // 2)
    loudest = energy.topk(k, dim=-1).indices
    return peak.gather(-1, loudest).mean(-1)
