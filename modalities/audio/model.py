"""DiffWave: the waveform denoiser of the audio modality (Kong et al. 2021), in one file.

    net = DiffWave(residual_channels=64, num_layers=30, dilation_cycle=10, num_classes=10)
    eps_hat = net(x_t, noise_level, labels=y)           # x_t (B, 1, T), noise_level (B,)

The network, as in the paper:
- a 1x1 input convolution (1 -> C channels) and ReLU;
- ``num_layers`` residual layers; layer i applies a kernel-3 convolution with dilation
  ``2 ** (i % dilation_cycle)`` to (x + the layer's projection of the diffusion embedding),
  adds the conditioner's projection (the mel spectrogram, for a vocoder), gates the result
  with tanh(a) * sigmoid(b) and splits a 1x1 convolution of it into a residual output, added
  to x and scaled by 1/sqrt(2) (so the variance does not grow with depth), and a skip output;
- the skip outputs summed and scaled by 1/sqrt(num_layers), 1x1 conv, ReLU, and a 1x1 output
  convolution initialised to zero, so a fresh network predicts eps = 0 everywhere.

The diffusion input ``t`` is the continuous noise level sqrt(alpha_bar) in (0, 1] (the
diffusion's ``time_input="noise_level"``, WaveGrad's choice), embedded by
:class:`diffkit.nn.TimeEmbedding` (128 sinusoids scaled by 5000 as in WaveGrad, then a 512-unit
MLP as in DiffWave). Because the model never sees a step index, one trained model samples
on any grid: 1000, 50 or DiffWave's 6-point fast schedule.

:class:`MelDenoiser` (the spectrogram route's first stage; the shipped digits model) is a small 1-D
U-Net over log-mel frames; :class:`DiffWave` with ``n_mels`` then turns its frames into a
waveform (or Griffin-Lim does, as the baseline; see :mod:`modalities.audio.mel`).

Conditions of DiffWave (all optional, chosen at construction):
- ``labels`` (B,) class indices (the spoken digit). Index ``num_classes`` is a learned null
  class: ``drop_cond`` (B,) bool replaces the label with it (classifier-free guidance).
- ``mel`` (B, n_mels, frames) log-mel frames with ``frames * hop_length == T``: the
  vocoder's local condition. It is upsampled to the sample rate by two transposed
  convolutions (DiffWave's upsampler). A sampler calls the network many times with the same
  mel, so the modality calls :meth:`DiffWave.upsample_mel` once and passes the result as
  ``mel_features`` (B, n_mels, T) instead; training passes ``mel``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffkit.nn import ResidualBlock, TimeEmbedding

__all__ = ["DiffWave", "MelDenoiser", "NOISE_LEVEL_SCALE"]

# WaveGrad multiplies its noise level in (0, 1] by 5000 before the sinusoids, so that
# neighbouring levels of a fine schedule give clearly different features.
NOISE_LEVEL_SCALE = 5000.0


class _ResidualLayer(nn.Module):
    def __init__(self, channels: int, dilation: int, embed_dim: int, cond_channels: int | None):
        super().__init__()
        self.dilated = nn.Conv1d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
        self.embed = nn.Linear(embed_dim, channels)
        self.cond = nn.Conv1d(cond_channels, 2 * channels, 1) if cond_channels else None
        self.out = nn.Conv1d(channels, 2 * channels, 1)
        nn.init.kaiming_normal_(self.dilated.weight)
        nn.init.kaiming_normal_(self.out.weight)

    def forward(self, x, emb, cond):
        y = self.dilated(x + self.embed(emb)[:, :, None])
        if self.cond is not None:
            y = y + self.cond(cond)
        gate, filt = y.chunk(2, dim=1)
        y = self.out(torch.sigmoid(gate) * torch.tanh(filt))
        residual, skip = y.chunk(2, dim=1)
        return (x + residual) / math.sqrt(2.0), skip


class DiffWave(nn.Module):
    """DiffWave denoiser; see the module docstring.

    Args:
        residual_channels: C, the width of every layer (64 in DiffWave).
        num_layers: residual layers (30 in DiffWave).
        dilation_cycle: dilations run 1, 2, 4, ... 2**(cycle-1) and repeat (10 in DiffWave).
        num_classes: class-conditional with this many classes (plus a learned null class).
        n_mels: mel-conditioned (a vocoder) with this many mel bins.
        upsample_factors: the mel upsampler's strides; their product is the mel hop length.
            Each must be even (kernel 2f, padding f/2 gives exactly f times the frames).
        embed_dim: sinusoidal features of the noise level; embed_hidden: the MLP width.
    """

    def __init__(
        self,
        residual_channels: int = 64,
        num_layers: int = 30,
        dilation_cycle: int = 10,
        num_classes: int | None = None,
        n_mels: int | None = None,
        upsample_factors: Sequence[int] = (8, 8),
        embed_dim: int = 128,
        embed_hidden: int = 512,
    ):
        super().__init__()
        for name, value in (("residual_channels", residual_channels), ("num_layers", num_layers),
                            ("dilation_cycle", dilation_cycle), ("embed_dim", embed_dim),
                            ("embed_hidden", embed_hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiffWave: {name} must be a positive integer, got {value!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"DiffWave: num_classes must be a positive integer or None, got {num_classes!r}")
        if n_mels is not None and (not isinstance(n_mels, int) or n_mels < 1):
            raise ValueError(f"DiffWave: n_mels must be a positive integer or None, got {n_mels!r}")
        self.residual_channels = residual_channels
        self.num_layers = num_layers
        self.dilation_cycle = dilation_cycle
        self.num_classes = num_classes
        self.n_mels = n_mels
        self.upsample_factors = tuple(int(f) for f in upsample_factors)
        if n_mels is not None and (not self.upsample_factors or any(f < 2 or f % 2 for f in self.upsample_factors)):
            raise ValueError(f"DiffWave: upsample_factors must be even integers >= 2, got {list(upsample_factors)}")

        self.input = nn.Conv1d(1, residual_channels, 1)
        self.time_embed = TimeEmbedding(embed_dim, embed_hidden, embed_hidden, scale=NOISE_LEVEL_SCALE)
        # Row num_classes is the learned null class used when the condition is dropped.
        self.class_embed = nn.Embedding(num_classes + 1, embed_hidden) if num_classes else None
        if n_mels is not None:
            # DiffWave's upsampler: 2-D transposed convs over (mel bin, frame), stretching only time.
            self.upsampler = nn.ModuleList(
                nn.ConvTranspose2d(1, 1, (3, 2 * f), stride=(1, f), padding=(1, f // 2))
                for f in self.upsample_factors
            )
        else:
            self.upsampler = None
        self.layers = nn.ModuleList(
            _ResidualLayer(residual_channels, 2 ** (i % dilation_cycle), embed_hidden, n_mels)
            for i in range(num_layers)
        )
        self.skip = nn.Conv1d(residual_channels, residual_channels, 1)
        self.output = nn.Conv1d(residual_channels, 1, 1)
        nn.init.kaiming_normal_(self.input.weight)
        nn.init.kaiming_normal_(self.skip.weight)
        nn.init.zeros_(self.output.weight)  # a fresh network predicts zero noise
        nn.init.zeros_(self.output.bias)

    @property
    def hop_length(self) -> int | None:
        """Samples per mel frame (the product of the upsample factors); None without a mel."""
        return math.prod(self.upsample_factors) if self.n_mels is not None else None

    @property
    def receptive_field(self) -> int:
        """Samples of x_t that one output sample depends on."""
        return 1 + 2 * sum(2 ** (i % self.dilation_cycle) for i in range(self.num_layers))

    def upsample_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, frames) log-mel -> (B, n_mels, frames * hop_length) features at the sample rate."""
        if self.upsampler is None:
            raise ValueError("this DiffWave is not mel-conditioned (n_mels=None); it takes no mel")
        if mel.ndim != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel must be (batch, {self.n_mels} mel bins, frames); got shape {tuple(mel.shape)}")
        x = mel[:, None]
        for up in self.upsampler:
            x = F.leaky_relu(up(x), 0.4)
        return x[:, 0]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        mel: torch.Tensor | None = None,
        mel_features: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps_hat (B, 1, T) for x_t (B, 1, T) at noise levels t = sqrt(alpha_bar) (B,)."""
        if x.ndim != 3 or x.shape[1] != 1:
            raise ValueError(f"DiffWave takes mono audio (batch, 1, samples); got shape {tuple(x.shape)}")
        batch, _, length = x.shape
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must hold one noise level per example, shape ({batch},); got {tuple(t.shape)}")
        emb = _class_embedding(self, self.time_embed(t.float()), labels, drop_cond, batch)

        cond = None
        if self.n_mels is not None:
            if mel_features is None:
                if mel is None:
                    raise ValueError("this DiffWave is a mel-conditioned vocoder: pass mel (B, n_mels, frames) "
                                     "or mel_features from upsample_mel()")
                if mel.ndim != 3 or mel.shape[0] != batch or mel.shape[2] * self.hop_length != length:
                    raise ValueError(
                        f"mel must be ({batch}, {self.n_mels}, {length // self.hop_length}) for {length} samples "
                        f"at hop {self.hop_length}; got shape {tuple(mel.shape)}")
                mel_features = self.upsample_mel(mel.to(x.dtype))
            if mel_features.shape != (batch, self.n_mels, length):
                raise ValueError(f"mel_features must be ({batch}, {self.n_mels}, {length}); "
                                 f"got shape {tuple(mel_features.shape)}")
            cond = mel_features.to(x.dtype)
        elif mel is not None or mel_features is not None:
            raise ValueError("this DiffWave is not mel-conditioned (n_mels=None); it takes no mel")

        h = F.relu(self.input(x))
        skips = 0
        for layer in self.layers:
            h, skip = layer(h, emb, cond)
            skips = skips + skip
        h = F.relu(self.skip(skips / math.sqrt(self.num_layers)))
        return self.output(h)


def _class_embedding(net: nn.Module, emb: torch.Tensor, labels, drop_cond, batch: int) -> torch.Tensor:
    """emb + the class embedding (the null class for missing or dropped labels)."""
    if net.class_embed is None:
        if labels is not None:
            raise ValueError(f"this {type(net).__name__} is not class-conditional (num_classes=None); "
                             "it takes no labels")
        return emb
    if labels is None:
        labels = torch.full((batch,), net.num_classes, dtype=torch.long, device=emb.device)
    labels = torch.as_tensor(labels, device=emb.device).long()
    if labels.shape != (batch,):
        raise ValueError(f"labels must be ({batch},) class indices; got shape {tuple(labels.shape)}")
    # Index num_classes itself is the null class: allowed, it means "no label".
    if ((labels < 0) | (labels > net.num_classes)).any():
        raise ValueError(f"labels must be in 0..{net.num_classes - 1} (or {net.num_classes}, the null class); "
                         f"got {labels.unique().tolist()}")
    if drop_cond is not None:
        labels = torch.where(drop_cond.to(emb.device).bool(), torch.full_like(labels, net.num_classes), labels)
    return emb + net.class_embed(labels)


class MelDenoiser(nn.Module):
    """A small 1-D U-Net over log-mel frames (B, n_mels, frames): mel bins are channels.

    Three levels (``channels``, 2x, 2x) with ``blocks`` FiLM residual blocks each
    (:class:`diffkit.nn.ResidualBlock`, dims=1), stride-2 downsampling, nearest-neighbour
    upsampling and skip concatenations; a zero-initialised output convolution. The noise
    level and the optional class enter through one embedding as in :class:`DiffWave`.
    ``frames`` must be divisible by 4.
    """

    def __init__(self, n_mels: int = 64, channels: int = 64, blocks: int = 2,
                 num_classes: int | None = None, embed_dim: int = 128, embed_hidden: int = 256):
        super().__init__()
        if n_mels < 1 or channels < 1 or blocks < 1:
            raise ValueError(f"MelDenoiser: n_mels, channels and blocks must be >= 1, "
                             f"got {n_mels}, {channels}, {blocks}")
        self.n_mels, self.num_classes = n_mels, num_classes
        widths = (channels, 2 * channels, 2 * channels)
        self.time_embed = TimeEmbedding(embed_dim, embed_hidden, embed_hidden, scale=NOISE_LEVEL_SCALE)
        self.class_embed = nn.Embedding(num_classes + 1, embed_hidden) if num_classes else None
        self.input = nn.Conv1d(n_mels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, w in enumerate(widths):
            prev = widths[max(i - 1, 0)]
            self.down.append(nn.ModuleList(ResidualBlock(prev if j == 0 else w, w, embed_hidden, dims=1)
                                           for j in range(blocks)))
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv1d(w, w, 3, stride=2, padding=1))
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths) - 1)):
            self.up.append(nn.ModuleList(ResidualBlock((widths[i + 1] + widths[i]) if j == 0 else widths[i],
                                                       widths[i], embed_hidden, dims=1) for j in range(blocks)))
        self.output = nn.Conv1d(widths[0], n_mels, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.n_mels or x.shape[2] % 4:
            raise ValueError(f"MelDenoiser takes (batch, {self.n_mels}, frames) with frames divisible by 4; "
                             f"got shape {tuple(x.shape)}")
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        emb = _class_embedding(self, self.time_embed(t.float()), labels, drop_cond, batch)
        h = self.input(x)
        saved = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            if i < len(self.downsample):
                saved.append(h)
                h = self.downsample[i](h)
        for blocks in self.up:
            h = torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), saved.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.output(F.silu(h))
