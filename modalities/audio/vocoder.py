"""A learned harmonic-plus-noise vocoder (DDSP-style): log-mel frames -> waveform.

    voc = HarmonicVocoder(n_mels=64, sample_rate=8000, hop_length=64)
    audio = voc.vocode(mel)                       # (B, 64, frames) in [-1, 1] -> (B, 1, frames * 64)

Why this design. 64 mel bands at 8 kHz keep the spectral envelope but not the voice's pitch
harmonics, and Griffin-Lim cannot put them back (it reconstructs a phase for the smeared
magnitudes it is given). A sample-rate network (DiffWave) could, but does not learn it in CPU
time. This vocoder puts the harmonics back *by construction*: a small network at frame rate
(125 frames per second, not 8,000 samples) reads the log-mel frames and predicts, per frame,

- ``f0`` (Hz, 50-500) and a voicing probability;
- the amplitudes of ``num_harmonics`` harmonics of f0 (those at or above Nyquist are silenced);
- the magnitude envelope of a filtered noise (``noise_bands`` bands from 0 Hz to Nyquist).

A fixed, differentiable synthesiser turns those into sound (Engel et al. 2020, DDSP): an
additive oscillator bank, sum_k a_k(t) sin(k phi(t)) with phi the running phase of f0
linearly interpolated to the sample rate, plus white noise shaped by the envelope in the STFT
domain. Every harmonic is an exact multiple of one f0, so the output is periodic where the
network says it is voiced: the evenly spaced harmonic lines of a recording, and a high
autocorrelation peak at the pitch lag (``metrics.voicing_clarity``).

Training (``recipes/audio_train.py --preset ddsp``) compares the output with the recording it
came from through a multi-resolution STFT loss (:func:`multi_resolution_stft_loss`: linear and
log magnitudes at FFT sizes 128-1024; phase is free), and supervises f0 and voicing with a
pitch track of the *training* recording (:func:`pitch_track`, a normalised-autocorrelation
tracker). Magnitude losses do not constrain f0 well on their own (DDSP's known difficulty);
the pitch track does: training synthesises voiced frames with the track's f0 (teacher forcing),
so the amplitudes learn against the right harmonics, and the f0 head learns the track. The network is a few residual dilated 1-D convolutions over the frames
(the input is shifted so that silence is 0 and zero padding reads as silence), a fraction of
the mel model's cost: the whole route stays far below real time on one CPU thread.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mel import MAX_DB, MIN_DB

__all__ = [
    "HarmonicVocoder",
    "harmonic_synth",
    "filtered_noise",
    "upsample_frames",
    "multi_resolution_stft_loss",
    "pitch_track",
    "F0_MIN",
    "F0_MAX",
]

F0_MIN = 50.0
F0_MAX = 500.0


# ------------------------------------------------------------------------------- synthesiser
def upsample_frames(x: torch.Tensor, hop: int) -> torch.Tensor:
    """(B, C, frames) frame values -> (B, C, frames * hop), linear between frame centres.

    Frame j describes sample j * hop (``log_mel`` centres its windows there); samples after the
    last frame's centre keep its value.
    """
    frames = x.shape[-1]
    pos = torch.arange(frames * hop, device=x.device, dtype=x.dtype) / hop
    low = pos.floor().long().clamp(max=frames - 1)
    high = (low + 1).clamp(max=frames - 1)
    frac = pos - low.to(x.dtype)
    return x[..., low] * (1 - frac) + x[..., high] * frac


def harmonic_synth(f0: torch.Tensor, amplitudes: torch.Tensor, sample_rate: int, hop: int,
                   initial_phase: torch.Tensor | None = None) -> torch.Tensor:
    """An additive oscillator bank: f0 (B, frames) in Hz and harmonic amplitudes (B, K, frames)
    -> (B, frames * hop) audio, sum_k a_k(t) sin(k phi(t) + phase0).

    phi is 2 pi times the running sum of f0 / sample_rate (f0 and amplitudes linearly
    interpolated to the sample rate), accumulated in float64 and wrapped to [0, 1) cycles before
    it is multiplied by k, so high harmonics keep their precision over long clips. Harmonics at or
    above Nyquist must already be zero in ``amplitudes`` (the vocoder masks them).
    """
    f0_t = upsample_frames(f0[:, None], hop)[:, 0]                    # (B, T)
    cycles = torch.cumsum(f0_t.double() / sample_rate, dim=-1)
    cycles = (cycles - cycles.detach().floor()).to(f0.dtype)          # wrap, keep the gradient
    k = torch.arange(1, amplitudes.shape[1] + 1, device=f0.device, dtype=f0.dtype)
    phase = 2 * math.pi * cycles[:, None] * k[:, None]                # (B, K, T)
    if initial_phase is not None:
        phase = phase + initial_phase[..., None]
    return (upsample_frames(amplitudes, hop) * torch.sin(phase)).sum(1)


def filtered_noise(envelope: torch.Tensor, hop: int, n_fft: int = 256,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """White noise shaped by a magnitude envelope (B, bands, frames), bands spanning 0..Nyquist
    -> (B, frames * hop) audio. The envelope is interpolated to the STFT's n_fft / 2 + 1 bins;
    white noise in [-1, 1] is transformed (hop ``hop``, Hann window ``n_fft``), scaled bin by
    bin and transformed back."""
    b, _, frames = envelope.shape
    length = frames * hop
    device = envelope.device if generator is None else generator.device
    noise = torch.rand(b, length, generator=generator, device=device, dtype=envelope.dtype).to(envelope.device) * 2 - 1
    window = torch.hann_window(n_fft, device=envelope.device, dtype=envelope.dtype)
    spec = torch.stft(noise, n_fft, hop_length=hop, window=window, return_complex=True)   # (B, F, frames + 1)
    # (B, bands, frames) -> (B, frames, bands) -> linear over frequency -> (B, bins, frames)
    env = F.interpolate(envelope.transpose(1, 2), size=n_fft // 2 + 1, mode="linear",
                        align_corners=True).transpose(1, 2)
    env = torch.cat([env, env[..., -1:]], dim=-1)[..., : spec.shape[-1]]
    return torch.istft(spec * env, n_fft, hop_length=hop, window=window, length=length)


# ------------------------------------------------------------------------------- the network
class _Block(nn.Module):
    """x + conv1x1(GELU(dilated conv(GroupNorm(x))))."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(F.gelu(self.conv(self.norm(x))))


class HarmonicVocoder(nn.Module):
    """Log-mel frames -> f0, voicing, harmonic amplitudes and noise envelope -> waveform.

    ``forward(mel)`` returns the frame-rate controls (a dict); :meth:`synthesise` turns them into
    audio; :meth:`vocode` does both (no gradient, clamped to [-1, 1]).

    Amplitudes are predicted *relative to the spectral envelope the frames already hold*: the
    log-mel value interpolated (over the mel bands' centre frequencies) at each harmonic's
    frequency k * f0, and at each noise band's frequency, plus the network's log-correction
    and a fixed offset that turns mel magnitudes into sinusoid and noise amplitudes. A fresh
    network therefore already follows the frames' loudness and formants; training learns f0,
    voicing, the harmonic-to-noise balance and the corrections. The mel settings (``n_fft``,
    ``f_min``, ``f_max`` beside n_mels, the rate and the hop) fix the band centres.
    """

    # log(amplitude / mel magnitude) of one sinusoid, and of noise of envelope 1, through log_mel
    # with the default front end (512-point FFT, 256-sample window; measured by
    # tests/test_audio_vocoder.py::test_envelope_offsets_match_the_front_end).
    HARMONIC_OFFSET = -1.0
    NOISE_OFFSET = 1.2

    def __init__(self, n_mels: int = 64, sample_rate: int = 8000, hop_length: int = 64, n_fft: int = 512,
                 f_min: float = 20.0, f_max: float | None = None, channels: int = 128,
                 dilations: tuple[int, ...] | list[int] = (1, 2, 4, 8, 1, 2, 4, 8), num_harmonics: int = 50,
                 noise_bands: int = 65, noise_fft: int = 256):
        super().__init__()
        import torchaudio

        self.n_mels, self.sample_rate, self.hop_length = n_mels, sample_rate, hop_length
        self.num_harmonics, self.noise_bands, self.noise_fft = num_harmonics, noise_bands, noise_fft
        top = sample_rate / 2 if f_max is None else f_max
        fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, f_min, top, n_mels, sample_rate,
                                                   norm="slaney", mel_scale="slaney")       # (bins, n_mels)
        freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
        self.register_buffer("centres", (fb * freqs[:, None]).sum(0) / fb.sum(0).clamp(min=1e-12),
                             persistent=False)                                               # (n_mels,) Hz
        self.register_buffer("noise_freqs", torch.linspace(0, sample_rate / 2, noise_bands), persistent=False)
        self.inp = nn.Conv1d(n_mels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(channels, d) for d in dilations)
        self.norm = nn.GroupNorm(8, channels)
        # Outputs: f0 (1), voicing (1), log harmonic corrections (K), log noise corrections (bands).
        self.head = nn.Conv1d(channels, 2 + num_harmonics + noise_bands, 1)
        with torch.no_grad():  # start from the envelope itself, noise 10 dB under it, f0 mid-range
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.bias[2 + num_harmonics :].fill_(-1.15)

    def log_envelope(self, mel: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Natural-log mel magnitude of frames (B, n_mels, F) at frequencies (B, Q, F) or (Q,) Hz,
        linear between band centres (constant beyond the first and last)."""
        log_mag = ((mel.clamp(-1, 1) + 1) / 2 * (MAX_DB - MIN_DB) + MIN_DB) * (math.log(10) / 20)
        if freqs.ndim == 1:
            freqs = freqs[None, :, None].expand(mel.shape[0], -1, mel.shape[-1])
        c = self.centres
        q = freqs.clamp(c[0], c[-1]).contiguous()
        high = torch.searchsorted(c, q).clamp(1, len(c) - 1)
        low = high - 1
        frac = ((q - c[low]) / (c[high] - c[low])).clamp(0, 1)
        return log_mag.gather(1, low) * (1 - frac) + log_mag.gather(1, high) * frac

    def forward(self, mel: torch.Tensor, f0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, n_mels, frames) log-mel in [-1, 1] -> {"f0" (B, F) Hz, "voicing" (B, F) logits,
        "amplitudes" (B, K, F) (zero at or above Nyquist, times the voicing probability),
        "noise" (B, bands, F), "f0_predicted" (B, F) Hz}.

        ``f0`` (B, F), when given (training), replaces the predicted f0 wherever it is positive
        and leaves the prediction, detached, elsewhere: the synthesis uses the recording's pitch
        track on voiced frames (teacher forcing) and no loss on the sound reaches the f0 head,
        which learns from the track alone (``f0_predicted``). Otherwise the STFT loss would push
        f0 to extremes on unvoiced frames, where too high an f0 silences the harmonics."""
        h = self.inp(mel + 1.0)  # silence (-1) -> 0, so the convolutions' zero padding is silence
        for block in self.blocks:
            h = block(h)
        out = self.head(F.gelu(self.norm(h)))
        predicted = F0_MIN * (F0_MAX / F0_MIN) ** torch.sigmoid(out[:, 0])
        f0 = predicted if f0 is None else torch.where(f0 > 0, f0.to(predicted.dtype), predicted.detach())
        voicing = out[:, 1]
        k = torch.arange(1, self.num_harmonics + 1, device=mel.device, dtype=f0.dtype)
        harmonic_freqs = k[None, :, None] * f0[:, None]                                  # (B, K, F)
        below_nyquist = (harmonic_freqs < self.sample_rate / 2).to(f0.dtype)
        log_amps = self.log_envelope(mel, harmonic_freqs) + self.HARMONIC_OFFSET + out[:, 2 : 2 + self.num_harmonics]
        amps = torch.exp(log_amps.clamp(max=2.0)) * below_nyquist * torch.sigmoid(voicing)[:, None]
        log_noise = self.log_envelope(mel, self.noise_freqs) + self.NOISE_OFFSET + out[:, 2 + self.num_harmonics :]
        return {"f0": f0, "voicing": voicing, "amplitudes": amps, "noise": torch.exp(log_noise.clamp(max=2.0)),
                "f0_predicted": predicted}

    def synthesise(self, controls: dict[str, torch.Tensor],
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Controls from :meth:`forward` -> (B, 1, frames * hop) audio (not clamped)."""
        harmonic = harmonic_synth(controls["f0"], controls["amplitudes"], self.sample_rate, self.hop_length)
        noise = filtered_noise(controls["noise"], self.hop_length, self.noise_fft, generator=generator)
        return (harmonic + noise)[:, None]

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n_mels, frames) -> (B, 1, frames * hop) audio in [-1, 1]."""
        return self.synthesise(self(mel), generator).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------- training losses
def multi_resolution_stft_loss(pred: torch.Tensor, target: torch.Tensor,
                               fft_sizes: tuple[int, ...] = (128, 256, 512, 1024),
                               eps: float = 1e-5) -> torch.Tensor:
    """Mean over FFT sizes of L1(|S_pred| - |S_target|) + L1(log |S_pred| - log |S_target|).

    (B, 1, T) or (B, T) audio; hop n / 4, Hann window. Linear magnitudes weigh the loud parts,
    log magnitudes the quiet ones (down to ``eps``); phase is not compared. FFT sizes longer
    than the audio are skipped.
    """
    pred, target = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    total = pred.new_zeros(())
    # FFT sizes longer than the clip (short training crops) are left out.
    fft_sizes = [n for n in fft_sizes if n <= pred.shape[-1]] or [1 << (pred.shape[-1].bit_length() - 1)]
    for n in fft_sizes:
        window = torch.hann_window(n, device=pred.device, dtype=pred.dtype)
        sp = torch.stft(pred, n, hop_length=n // 4, window=window, return_complex=True).abs()
        st = torch.stft(target, n, hop_length=n // 4, window=window, return_complex=True).abs()
        total = total + (sp - st).abs().mean() + (torch.log(sp + eps) - torch.log(st + eps)).abs().mean()
    return total / len(fft_sizes)


@torch.no_grad()
def pitch_track(audio: torch.Tensor, sample_rate: int, hop: int, frame_length: int = 512,
                fmin: float = 80.0, fmax: float = 400.0, threshold: float = 0.6,
                min_db: float = -40.0) -> tuple[torch.Tensor, torch.Tensor]:
    """f0 (B, frames) in Hz and voiced (B, frames) bool of (B, 1, T) audio, one frame per hop.

    Frame j is the ``frame_length`` samples centred on sample j * hop (as ``log_mel``). The
    normalised autocorrelation (:func:`modalities.audio.metrics.frame_autocorrelation`) is
    searched between the lags of ``fmax`` and ``fmin``; the shortest lag within 10% of the best
    peak wins (against octave-down errors) and is refined by a parabola. A frame is voiced when
    that peak exceeds ``threshold`` and the frame is within ``-min_db`` dB of the clip's
    loudest. Unvoiced frames get f0 = 0.
    """
    from .metrics import frame_autocorrelation

    nac, energy = frame_autocorrelation(audio, frame_length, hop)        # (B, frames, lags), (B, frames)
    frames = audio.shape[-1] // hop
    nac, energy = nac[:, :frames], energy[:, :frames]
    lo, hi = int(math.floor(sample_rate / fmax)), int(math.ceil(sample_rate / fmin))
    band = nac[..., lo : hi + 1]
    best = band.amax(-1, keepdim=True)
    # local maxima within 10% of the best peak; the first (shortest lag) one wins
    left = nac[..., lo - 1 : hi]
    right = nac[..., lo + 1 : hi + 2]
    peaks = (band >= left) & (band >= right) & (band >= 0.9 * best)
    idx = torch.where(peaks.any(-1), peaks.float().argmax(-1), band.argmax(-1))
    lag = idx + lo
    y0 = nac.gather(-1, (lag - 1)[..., None])[..., 0]
    y1 = nac.gather(-1, lag[..., None])[..., 0]
    y2 = nac.gather(-1, (lag + 1).clamp(max=nac.shape[-1] - 1)[..., None])[..., 0]
    denom = y0 - 2 * y1 + y2
    shift = torch.where(denom.abs() > 1e-9, 0.5 * (y0 - y2) / denom, torch.zeros_like(denom)).clamp(-0.5, 0.5)
    f0 = sample_rate / (lag.float() + shift)
    db = 10 * torch.log10(energy.clamp(min=1e-12))
    loud = db > db.amax(-1, keepdim=True) + min_db
    voiced = (y1 > threshold) & loud
    return torch.where(voiced, f0, torch.zeros_like(f0)), voiced
